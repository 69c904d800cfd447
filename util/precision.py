"""Mixed precision: the precision a run uses on its device (--precision), autocast, and the
gradient scaler with its gradient norm (fp16 needs the scaler; fp32 and bf16 step directly).
"""
import math

import torch

# CPU flags of native bf16 arithmetic (/proc/cpuinfo names): AVX512-BF16 (Cooper Lake, Zen 4 and
# newer) and AMX-BF16 (Sapphire Rapids and newer). Without them bf16 autocast is emulated, slower than fp32.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The feature flags of this machine's CPU: the first 'flags' line of `cpuinfo` (Linux), else
    the capabilities torch reports (torch.cpu.get_capabilities, recent torch), else none."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    return {name for name, value in get_capabilities().items() if value is True} if get_capabilities else set()


def cpu_has_native_bf16(flags=None):
    """Whether the CPU computes bf16 natively (any of NATIVE_BF16_CPU_FLAGS in `flags`, default
    cpu_flags()): there bf16 autocast trained the ViT-B MAE step 1.9-2.1x faster than fp32, and
    --precision auto picks it. The README quickstart's per-epoch loss in bf16 stayed within 0.00005
    of fp32's with the same seed (epochs 0-5), where two fp32 seeds differ by 0.0008-0.043
    (measured with emulated bf16 on an AVX2 CPU: the same bf16 rounding of the operands)."""
    flags = cpu_flags() if flags is None else set(flags)
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(precision, device):
    """Map --precision to 'fp32' | 'fp16' | 'bf16' for `device`.

    auto: bf16 on a CUDA GPU that supports it, fp16 on older GPUs, bf16 on a CPU with native
    bf16 (cpu_has_native_bf16), fp32 elsewhere (emulated bf16 is ~10x slower than fp32 on an
    AVX2 CPU). fp16 is not offered on the CPU (falls back to fp32 with a warning); bf16 is.
    """
    device_type = torch.device(device).type
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, fp16 or bf16")
    if precision == "auto":
        if device_type == "cuda":
            # native bf16 (Ampere and newer); emulated bf16 on older GPUs is slower than fp16
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device_type == "cpu":
        print("WARNING: fp16 autocast is not supported on the CPU here; using fp32")
        return "fp32"
    return precision


def fast_adamw_kwargs(device):
    """AdamW implementation options: the fused kernel on CUDA and the CPU (several times faster
    than foreach there, e.g. 0.07 s vs 0.35 s a step for ViT-B MAE on 2 cores), foreach elsewhere."""
    return dict(fused=True) if torch.device(device).type in ("cuda", "cpu") else dict(foreach=True)


def autocast(device, precision):
    """torch.autocast context for a resolved precision (disabled for fp32)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=_DTYPES.get(precision), enabled=precision in _DTYPES)


def _grads(parameters):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def get_grad_norm_(parameters, norm_type=2.0):
    """Total norm of the gradients of `parameters` as a 0-d tensor (no host sync)."""
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norm_type = float(norm_type)
    if norm_type == math.inf:
        return torch.stack([g.detach().abs().max().to(device) for g in grads]).max()
    norms = [torch.linalg.vector_norm(g.detach(), norm_type).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


class NativeScalerWithGradNormCount:
    """Backward + (unscale, clip, step, update) through torch.amp.GradScaler.

    With enabled=False (fp32 / bf16) it is exactly loss.backward(); optimizer.step().
    Call with update_grad=False on the accumulation steps of --accum_iter.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, enabled=True, device_type="cuda"):
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False,
                 update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        if parameters is None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self._scaler.unscale_(optimizer)  # no-op when disabled
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = get_grad_norm_(parameters)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        if not state_dict:  # saved by a disabled scaler (fp32/bf16 run): keep the fresh state
            return
        self._scaler.load_state_dict(state_dict)
