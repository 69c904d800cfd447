"""Shared helpers of the MAE scripts: distributed setup, logging, mixed precision, checkpoints, RNG,
the pieces both training engines use (unwrap_model, grad_sync, is_log_point, sync_losses) and
the set-up and plumbing all three main scripts use (init_run, model_from_name, create_log_writer,
wrap_model, save_checkpoints, write_log, run).

Reliability rules followed here:
- metrics stay on their device until printed (no per-step host-device sync);
- checkpoints are written atomically (temp file + fsync + os.replace), by rank 0 only, and hold
  every rank's RNG state so that a resumed run continues like an uninterrupted one;
- checkpoints are loaded with torch.load(weights_only=True) unless the user knowingly opts out.
"""
import argparse
import builtins
import datetime
import fnmatch
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict, deque
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------

_builtin_print = builtins.print


def setup_for_distributed(is_master):
    """Make print() time-stamped and silent on non-master ranks (unless called with force=True)."""

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            _builtin_print(f"[{now}]", *args, **kwargs)

    builtins.print = print


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def _comm_device():
    """Device that collectives need: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(x):
    """Average a python number over all ranks; returns a python float."""
    world_size = get_world_size()
    if world_size == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.item() / world_size


def _slurm_master_addr():
    """First host of SLURM_NODELIST, e.g. 'node[03-05,9]' -> 'node03'."""
    nodelist = os.environ.get("SLURM_NODELIST", os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    prefix, _, ranges = nodelist.split(",")[0].partition("[")
    return prefix + re.split(r"[-,\]]", ranges)[0] if ranges else prefix


def _launcher_env(args):
    """(rank, world_size, local_rank) from torchrun, OpenMPI (--dist_on_itp) or SLURM, or None
    for a plain process."""
    if getattr(args, "dist_on_itp", False):  # OpenMPI (the original's ITP clusters)
        rank, world_size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        return rank, world_size, int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", max(getattr(args, "local_rank", -1), 0)))
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", "29500")
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), local_rank
    return None


def _elastic_agent_store(args, timeout):
    """Under torchrun, whose agent serves one TCP store for all restart rounds, a client of that
    store with keys prefixed by the round (TORCHELASTIC_RESTART_COUNT); None elsewhere.

    Without the prefix, init_process_group('env://') of a restarted group can read the gloo / NCCL
    addresses that the previous round's (dead) workers left in the store, and fail or hang.
    """
    if args.dist_url != "env://" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), args.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/mae/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed_mode(args):
    """Join the process group described by torchrun or SLURM, or set up a single process.

    Sets args.rank, args.world_size, args.gpu, args.distributed, args.dist_backend (and falls back
    to args.device = 'cpu' when CUDA is asked for but absent). A launcher with world size 1 runs
    as a plain single process. Collectives time out after args.dist_timeout minutes, so a dead
    peer makes the others fail instead of hanging.
    """
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        print(f"WARNING: --device {args.device} asked for but CUDA is not available; using the CPU")
        args.device = "cpu"
    use_cuda = str(args.device).startswith("cuda")
    env = _launcher_env(args)
    if env is None or env[1] == 1:
        args.rank, args.world_size, args.gpu = 0, 1, env[2] if env else 0
        args.distributed, args.dist_backend = False, None
        if use_cuda:
            torch.cuda.set_device(args.gpu)
        print("Not using distributed mode")
        setup_for_distributed(True)
        return
    args.rank, args.world_size, args.gpu = env
    args.distributed = True
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    print(f"| distributed init (rank {args.rank}/{args.world_size}, backend {args.dist_backend}): "
          f"{args.dist_url}, gpu {args.gpu}", flush=True)
    timeout = datetime.timedelta(minutes=getattr(args, "dist_timeout", 30))
    store = _elastic_agent_store(args, timeout)
    dist.init_process_group(backend=args.dist_backend, init_method=None if store else args.dist_url,
                            store=store, world_size=args.world_size, rank=args.rank, timeout=timeout)
    if use_cuda:
        dist.barrier(device_ids=[args.gpu])
    else:
        dist.barrier()
    setup_for_distributed(args.rank == 0)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def _to_floats(values):
    """Python floats of a list of numbers and 0-d tensors, with one device->host copy."""
    tensors = [v.detach().float().reshape(()) for v in values if torch.is_tensor(v)]
    if tensors:
        tensors = [t.to(tensors[0].device) for t in tensors]
    host = iter(torch.stack(tensors).cpu().tolist() if tensors else [])
    return [next(host) if torch.is_tensor(v) else float(v) for v in values]


class SmoothedValue:
    """Track a series of values; report smoothed values over a window and the global average.

    update() accepts python numbers or 0-d tensors. Tensors stay on their device and are summed
    there, so updating every step costs no host-device sync; values become python floats only
    when they are read (median, avg, global_avg, max, value, str).
    """

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0  # python float, or a float64 0-d tensor once a tensor was added
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        if torch.is_tensor(value):
            value = value.detach()
            self.total = self.total + value.to(torch.float64) * n
        else:
            self.total += value * n
        self.deque.append(value)
        self.count += n

    def synchronize_between_processes(self):
        """All-reduce count and total (the window stays per-process)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, float(self.total)], dtype=torch.float64, device=_comm_device())
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        # torch's median of an even count is the lower middle value, as the original printed
        return torch.tensor(_to_floats(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(_to_floats(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return float(self.total) / self.count

    @property
    def max(self):
        return max(_to_floats(self.deque))

    @property
    def value(self):
        return _to_floats([self.deque[-1]])[0]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def is_log_point(i, start_iter, iters_per_epoch, log_freq):
    """Whether MetricLogger.log_every prints after iteration i of an epoch that it joined at
    start_iter: every log_freq iterations, the first and the last. The training engines sync
    their losses at these iterations, so the printed meters are up to date."""
    return i % log_freq == 0 or i == start_iter or i == iters_per_epoch - 1


class MetricLogger:
    """A dict of SmoothedValue meters plus a logging iterator for the training loops."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if v is None:
                continue
            assert isinstance(v, (float, int)) or (torch.is_tensor(v) and v.numel() == 1), (k, v)
            self.meters[k].update(v)

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        # meters that saw no value yet (e.g. an epoch resumed after its last iteration) are skipped
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items()
                                   if meter.count)

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None, start_iter=0):
        """Yield the items of `iterable`, printing progress every print_freq iterations.

        start_iter: iterations of this epoch already done before `iterable` (mid-epoch resume);
        `iterable` yields the remaining ones, and the printed index / ETA count from start_iter.
        """
        header = header or ""
        total = start_iter + len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        show_mem = torch.cuda.is_available() and torch.cuda.is_initialized()
        start_time = end = time.time()
        i = start_iter
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if is_log_point(i, start_iter, total, print_freq):
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if show_mem:
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
                print(self.delimiter.join(p for p in parts if p))
            i += 1
            end = time.time()
        done = i - start_iter
        total_time = time.time() - start_time
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(done, 1):.4f} s / it)")


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision, device):
    """Map --precision to 'fp32' | 'fp16' | 'bf16' for `device`.

    auto: bf16 on a CUDA GPU that supports it, fp16 on older GPUs, fp32 elsewhere.
    fp16 is not offered on the CPU (falls back to fp32 with a warning); bf16 is.
    """
    device_type = torch.device(device).type
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, fp16 or bf16")
    if precision == "auto":
        if device_type == "cuda":
            # native bf16 (Ampere and newer); emulated bf16 on older GPUs is slower than fp16
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "fp32"
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


class NonFiniteLossError(RuntimeError):
    """Raised by the training engines when the loss becomes NaN or infinite."""

    def __init__(self, loss, epoch, iteration):
        self.loss, self.epoch, self.iteration = loss, epoch, iteration
        super().__init__(f"Loss is {loss} at epoch {epoch}, iteration {iteration}; stopping training. "
                         "Try --precision bf16 or fp32, a lower --blr, or --clip_grad, and resume from "
                         "the last checkpoint.")

    def __reduce__(self):
        return type(self), (self.loss, self.epoch, self.iteration)


class NonFiniteWeightsError(NonFiniteLossError):
    """Raised by save_model instead of writing weights that hold a NaN or an infinity (an update
    that diverged after the last finite loss, e.g. at the last iteration of an epoch)."""

    def __init__(self, epoch, iteration):
        self.loss, self.epoch, self.iteration = "finite", epoch, iteration
        RuntimeError.__init__(self, f"The weights hold non-finite values after epoch {epoch}, iteration "
                              f"{iteration}; not saving them, stopping training. Try --precision bf16 or "
                              "fp32, a lower --blr, or --clip_grad, and resume from the last checkpoint.")

    def __reduce__(self):
        return type(self), (self.epoch, self.iteration)


def check_finite_weights(model, epoch, iteration):
    """Raise NonFiniteWeightsError when a parameter of model holds a NaN or an infinity (one
    device-to-host sync)."""
    params = [p.detach() for p in model.parameters()]
    if params and not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
        raise NonFiniteWeightsError(epoch, iteration)


# ---------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------


def seed_everything(seed):
    """Seed torch (CPU and all GPUs), numpy's global RNG and python's random (pass seed + rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def get_rng_state():
    """States of torch (CPU, every CUDA device), numpy's global RNG and python's random.

    Holds only tensors and python builtins, so a checkpoint containing it loads with
    weights_only=True.
    """
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what get_rng_state() returned (CUDA states for the devices present)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(_as_tuples(state["python"]))
    if torch.cuda.is_available() and "cuda" in state:
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def _as_tuples(x):
    """random.setstate needs tuples; a state that went through some serialisers has lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

# Types a checkpoint of this repo or of the original release may hold besides tensors and python
# builtins: the original scripts pickled their argparse.Namespace under 'args'.
SAFE_GLOBALS = [argparse.Namespace]
_STANDARD_KEYS = {"model", "optimizer", "epoch", "scaler", "args", "rng", "step"}
_CKPT_NAME = re.compile(r"checkpoint-(\d+|last)\.pth")


def _fsync_dir(folder):
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save `obj` so that `path` always holds either the old file or the complete new one.

    Writes `.<name>.tmp-<pid>` in the same folder, fsyncs it, renames it onto `path` with
    os.replace (atomic on POSIX and Windows) and fsyncs the folder so the rename survives a crash.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _plain(value):
    """Reduce an args value to python builtins so the checkpoint stays weights_only-loadable."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)  # paths, devices, dtypes, ...


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra=None, tag=None, step=None):
    """Write {output_dir}/checkpoint-{tag or epoch}.pth atomically on rank 0.

    Every rank must call it: the RNG states of all ranks are gathered into 'rng' (list by rank).
    step: iterations completed inside `epoch` (None = the epoch is complete).
    Returns the path on rank 0, None on the other ranks. Raises NonFiniteWeightsError, writing
    nothing, when the weights hold a NaN or an infinity.
    """
    check_finite_weights(model_without_ddp, epoch, "end" if step is None else step)
    rng = [get_rng_state()]
    if is_dist_avail_and_initialized():
        rng = [None] * get_world_size()
        dist.all_gather_object(rng, get_rng_state())
    if not is_main_process():
        return None
    checkpoint = {
        "model": model_without_ddp.state_dict(),
        "epoch": epoch,
        "step": step,
        "args": argparse.Namespace(**{k: _plain(v) for k, v in vars(args).items()}),
        "rng": rng,
    }
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
    if loss_scaler is not None:
        checkpoint["scaler"] = loss_scaler.state_dict()
    checkpoint.update(extra or {})
    path = os.path.join(args.output_dir, f"checkpoint-{tag if tag is not None else epoch}.pth")
    atomic_save(checkpoint, path)
    return path


def _refused_global(message):
    match = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if match:
        return f"the type {match.group(1)}"
    return "an object: " + message.strip().splitlines()[-1]


def load_checkpoint(path, unsafe=False, mmap=False):
    """Load a checkpoint (file path or http(s) URL) onto the CPU, safely by default.

    Uses torch.load(weights_only=True) with SAFE_GLOBALS allowed; unsafe=True (--unsafe_load)
    uses weights_only=False, which can execute code stored in the file.
    """
    path = os.fspath(path)
    is_url = path.startswith(("http://", "https://"))
    if not is_url and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            if is_url:
                return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=not unsafe)
            return torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"Refused to load checkpoint '{path}': it contains {_refused_global(str(e))}, which is not "
            "on the allow-list of safe types. Unpickling arbitrary objects can run arbitrary code. If you "
            "trust this file, pass --unsafe_load (load_checkpoint(..., unsafe=True)) to load it with "
            "weights_only=False.") from e


def _truncated(items, limit=10):
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def check_state_dict_compat(model, state_dict, allowed_missing=(), allowed_unexpected=()):
    """Raise ValueError listing missing / unexpected keys and shape mismatches, else return None.

    allowed_missing / allowed_unexpected are fnmatch patterns such as 'head.*' or 'decoder*'.
    """
    model_state = model.state_dict()

    def allowed(key, patterns):
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    missing = [k for k in model_state if k not in state_dict and not allowed(k, allowed_missing)]
    unexpected = [k for k in state_dict if k not in model_state and not allowed(k, allowed_unexpected)]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in state_dict.items()
                  if k in model_state and torch.is_tensor(v) and v.shape != model_state[k].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = ["checkpoint does not fit the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_truncated(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_truncated(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines += [f"    {m}" for m in mismatched[:10]]
        if len(mismatched) > 10:
            lines.append(f"    ... and {len(mismatched) - 10} more")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        lines.append("  hint: keys start with 'module.': the state_dict was saved from a DDP wrapper")
    lines.append("  hint: checkpoint of another architecture / patch size / image size?")
    raise ValueError("\n".join(lines))


def load_model(args, model_without_ddp, optimizer, loss_scaler):
    """Resume from args.resume (if set): model, and unless args.eval, optimizer, scaler, epoch, RNG.

    Sets args.start_epoch and args.start_iter (iterations of args.start_epoch already done).
    Returns the checkpoint's extra entries, e.g. {'max_accuracy': 83.1}; {} when not resuming.
    """
    args.start_iter = 0
    if not args.resume:
        return {}
    checkpoint = load_checkpoint(args.resume, unsafe=getattr(args, "unsafe_load", False))
    if "model" not in checkpoint:
        raise KeyError(f"checkpoint '{args.resume}' has no 'model' entry (keys: {sorted(checkpoint)})")
    check_state_dict_compat(model_without_ddp, checkpoint["model"])
    model_without_ddp.load_state_dict(checkpoint["model"])
    print(f"Resume checkpoint {args.resume}")
    if optimizer is not None and "optimizer" in checkpoint and not getattr(args, "eval", False):
        optimizer.load_state_dict(checkpoint["optimizer"])
        if loss_scaler is not None and "scaler" in checkpoint:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        step = checkpoint.get("step")
        args.start_epoch = checkpoint["epoch"] + 1 if step is None else checkpoint["epoch"]
        args.start_iter = step or 0
        _restore_rng(checkpoint.get("rng"))
        print(f"With optim & sched: epoch {checkpoint['epoch']}, step {step}; "
              f"continuing at epoch {args.start_epoch}, iteration {args.start_iter}")
    return {k: v for k, v in checkpoint.items() if k not in _STANDARD_KEYS}


def _restore_rng(states):
    if not states:
        print("checkpoint holds no RNG state: keeping the current seeding")
    elif len(states) != get_world_size():
        print(f"checkpoint holds RNG states of {len(states)} ranks but the world size is now "
              f"{get_world_size()}: keeping the current seeding (the run will not replay exactly)")
    else:
        set_rng_state(states[get_rank()])


def _progress(checkpoint):
    """(epoch, step) ordering key; a complete epoch counts as after all of its steps."""
    step = checkpoint.get("step")
    return checkpoint["epoch"], math.inf if step is None else step


def _other_run(checkpoint, run):
    """Why a checkpoint is not one of run's (a different --model or script), or None.
    run: the current args; a checkpoint without a saved stage/model (the original's) matches."""
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    for key in ("stage", "model"):
        mine, theirs = getattr(run, key, None), saved.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            return f"it was written by a {theirs!r} run, not {mine!r} ({key})"
    return None


def find_latest_checkpoint(output_dir, unsafe=False, run=None):
    """Path of the checkpoint-<int>.pth / checkpoint-last.pth with the most progress, or None.
    With run (the current args), checkpoints of another script or model are skipped with a
    warning (e.g. pretraining checkpoints in the folder a finetuning run writes to)."""
    if not os.path.isdir(output_dir):
        return None
    best, best_progress = None, None
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(".") and ".tmp-" in name:
            print(f"WARNING: '{path}' is left from an interrupted save; it is ignored and can be deleted")
        if not _CKPT_NAME.fullmatch(name):
            continue
        try:
            checkpoint = load_checkpoint(path, unsafe=unsafe, mmap=True)
            progress = _progress(checkpoint)
        except Exception as e:  # corrupt / truncated / foreign file: never fatal here
            print(f"WARNING: skipping unreadable checkpoint '{path}': {type(e).__name__}: {e}")
            continue
        other = run is not None and _other_run(checkpoint, run)
        if other:
            print(f"WARNING: auto-resume skips '{path}': {other}")
            continue
        if best_progress is None or progress > best_progress:
            best, best_progress = path, progress
    return best


def auto_resume(args):
    """With --auto_resume and no --resume, point args.resume at the latest checkpoint in output_dir.

    Call on every rank after init_distributed_mode: rank 0 chooses and broadcasts its choice.
    Returns args.resume.
    """
    if not getattr(args, "auto_resume", False) or args.resume or not args.output_dir:
        return args.resume
    choice = [None]
    if is_main_process():
        choice[0] = find_latest_checkpoint(args.output_dir, unsafe=getattr(args, "unsafe_load", False),
                                           run=args)
    if is_dist_avail_and_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0]:
        args.resume = choice[0]
        print(f"Auto-resume from {args.resume}")
    return args.resume


def check_output_dir(path):
    """Create `path` (with parents) and check it is writable; raise a clear error otherwise."""
    probe = os.path.join(path, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RuntimeError(f"output folder '{path}' is not writable ({type(e).__name__}: {e.strerror or e}); "
                           "choose another --output_dir / --log_dir") from e


# ---------------------------------------------------------------------------------------------
# Training loops (engine_pretrain, engine_finetune)
# ---------------------------------------------------------------------------------------------


def unwrap_model(model):
    """The bare model inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def grad_sync(model, update_grad):
    """Context for one backward: DDP all-reduces the gradients in every backward, so skip that
    (model.no_sync()) on the accumulation steps of --accum_iter, where update_grad is False."""
    if update_grad or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def sync_losses(pending, epoch, iters_per_epoch, metric_logger, log_writer=None, loss_name="loss",
                accum_iter=1):
    """Average the buffered losses over the processes (one all-reduce, one host copy), stop on a
    non-finite one, then log each iteration.

    pending: [(iteration, lr, loss as a 0-d tensor on the device)] not synced yet.
    Each loss goes into the 'loss' meter of metric_logger. On rank 0 (log_writer set) the
    TensorBoard scalars `loss_name` and 'lr' are written for every iteration that ends an
    accumulation cycle of `accum_iter` (every iteration with accum_iter=1), at
    x = epoch_1000x, the original's units, which calibrate curves of different batch sizes.
    Raises NonFiniteLossError naming the first non-finite loss's epoch and iteration.
    """
    losses = torch.stack([loss.float() for _, _, loss in pending])  # (B,) on the device
    if get_world_size() > 1:
        dist.all_reduce(losses)
        losses = losses / get_world_size()
    for (i, lr, _), value in zip(pending, losses.tolist()):
        if not math.isfinite(value):
            raise NonFiniteLossError(value, epoch, i)
        metric_logger.update(loss=value)
        if log_writer is not None and (i + 1) % accum_iter == 0:
            epoch_1000x = int((i / iters_per_epoch + epoch) * 1000)
            log_writer.add_scalar(loss_name, value, epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)


# ---------------------------------------------------------------------------------------------
# Scripts (main_pretrain, main_finetune, main_linprobe)
# ---------------------------------------------------------------------------------------------


def init_run(args):
    """The common start of the three training scripts; returns the torch.device to train on.

    In order: join the process group or set up a single process (init_distributed_mode), point
    args.resume at the latest checkpoint with --auto_resume, check that --output_dir and
    --log_dir are writable (rank 0), print the job dir and the arguments, resolve
    args.precision for the device, seed torch / numpy / random with seed + rank (each rank its
    own masking noise, drop path and mixup draws) and turn on cudnn.benchmark.
    """
    init_distributed_mode(args)
    auto_resume(args)
    if is_main_process():
        for folder in {args.output_dir, args.log_dir} - {None, ""}:
            check_output_dir(folder)

    print("job dir: {}".format(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
    print("{}".format(args).replace(", ", ",\n"))

    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device)
    seed_everything(args.seed + get_rank())
    torch.backends.cudnn.benchmark = True
    return device


def model_from_name(module, name, prefix, **kwargs):
    """module.<name>(**kwargs): the model that --model names, e.g.
    model_from_name(models_vit, "vit_base_patch16", "vit_", num_classes=10).

    The choices are module's attributes whose names start with `prefix`; another name raises a
    ValueError listing them. Keyword arguments that are None are left out, so the factory's
    default holds (e.g. patch_size=args.patch_size when --patch_size is not given).
    """
    names = sorted(n for n in vars(module) if n.startswith(prefix))
    if name not in names:
        raise ValueError(f"unknown --model {name!r}; choose one of: {', '.join(names)}")
    return getattr(module, name)(**{k: v for k, v in kwargs.items() if v is not None})


def create_log_writer(args):
    """A TensorBoard SummaryWriter on args.log_dir on rank 0 when training, else None."""
    if not (is_main_process() and args.log_dir) or getattr(args, "eval", False):
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported here: only the scripts need it
    return SummaryWriter(log_dir=args.log_dir)


def wrap_model(model, args):
    """DistributedDataParallel when distributed, then torch.compile with --compile.

    Compiling the DDP-wrapped model lets dynamo split graphs at DDP's gradient buckets, so the
    all-reduce overlaps the backward. Keep the bare model (model_without_ddp) for the optimizer
    and the checkpoints.
    """
    if args.distributed:
        device_ids = [args.gpu] if torch.device(args.device).type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        model = torch.compile(model)
    return model


def save_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler, extra=None, improved=False):
    """The end-of-epoch checkpoints: checkpoint-<epoch>.pth every --save_freq epochs and at the
    last one, checkpoint-last.pth with --save_every_iters (so it is never older than the epoch
    checkpoints), checkpoint-best.pth when `improved`. Nothing without --output_dir.
    extra: entries added to each checkpoint (e.g. {'max_accuracy': ...}). All ranks call it.
    """
    if not args.output_dir:
        return
    state = dict(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer,
                 loss_scaler=loss_scaler, epoch=epoch, extra=extra)
    if (args.save_freq > 0 and epoch % args.save_freq == 0) or epoch + 1 == args.epochs:
        save_model(**state)
    if args.save_every_iters > 0:  # keep checkpoint-last.pth current
        save_model(**state, tag="last")
    if improved:
        save_model(**state, tag="best")


def write_log(args, log_stats, log_writer=None):
    """Append log_stats as one JSON line to {output_dir}/log.txt (rank 0), after flushing the
    TensorBoard writer."""
    if not (args.output_dir and is_main_process()):
        return
    if log_writer is not None:
        log_writer.flush()
    with open(os.path.join(args.output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
        f.write(json.dumps(log_stats) + "\n")


def _set_aside_diverged_checkpoint(args, error):
    """A checkpoint-last.pth saved at the very iteration whose loss was non-finite holds the
    diverged weights: rename it so that auto-resume falls back to the last good checkpoint."""
    path = os.path.join(getattr(args, "output_dir", "") or "", "checkpoint-last.pth")
    if not os.path.isfile(path):
        return
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except Exception:  # unreadable: leave it, auto-resume skips it with a warning
        return
    if (ckpt.get("epoch"), ckpt.get("step")) == (error.epoch, error.iteration):
        os.replace(path, path + ".nonfinite")
        sys.stderr.write(f"{path} was saved after the last finite loss; moved to {path}.nonfinite\n")


def run(main_fn, args):
    """Run a script's main_fn(args): a NonFiniteLossError ends it with one clear line on stderr
    (rank 0) and exit status 1; the process group is destroyed at the end either way."""
    try:
        main_fn(args)
    except NonFiniteLossError as e:
        if is_main_process():
            sys.stderr.write(f"ERROR: {e}\n")
            _set_aside_diverged_checkpoint(args, e)
        sys.exit(1)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()
