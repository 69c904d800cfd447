"""Training-speed benchmark for MAE and SimMIM: this implementation against the original releases' way.

Each mode is one row of the table, measured in the same process on the same machine:

  fast               how main_pretrain.py trains: autocast in --precision (bf16 on GPUs), fused
                     scaled-dot-product attention (timm's default), fused AdamW (CUDA and CPU),
                     no host-device sync inside the step, optional --compile.
  baseline           the original release (facebookresearch/mae on timm 0.3.2): fp16 autocast +
                     GradScaler on CUDA (fp32 on the CPU), attention computed explicitly as
                     softmax(q k^T * scale) v, loss.item() after the forward and
                     torch.cuda.synchronize() after every step, single-tensor (for-loop) AdamW.
  all_tokens         fast settings, but the encoder processes all L patches, removed ones
                     replaced by a learned mask token (SimMIM-style, the paper's "encoder w/ [M]"
                     ablation); the decoder is unchanged. fast vs all_tokens is MAE's own saving.
  finetune           the models_vit counterpart (global pool, layer-wise lr decay groups, label
                     smoothing CE on random labels) with the fast settings.
  finetune_baseline  the same classifier trained the original's way.
  simmim_vit         SimMIM pretraining (models_simmim) of --simmim_vit_model at --input_size, as
                     main_pretrain trains it: the encoder on every patch, masks of
                     util.masking.MaskGenerator (ratio 0.6, blocks of --mask_patch_size px, 32 by
                     default), AdamW (0.9, 0.999) in simmim_param_groups, clip 5.0, fast settings.
  simmim_swin        the same with --simmim_swin_model at its own image size (or
                     --simmim_input_size). main_pretrain's Swin computes window attention
                     explicitly (timm's default), so this row's attention column says so.
  simmim_*_baseline  the official SimMIM's way (microsoft/SimMIM, timm 0.3/0.4 era): apex AMP O1,
                     i.e. fp16 + dynamic loss scale (GradScaler here; fp32 on the CPU), explicit
                     attention (BEiT / Swin V1 code), single-tensor AdamW, clip 5.0, a host read
                     of the loss and torch.cuda.synchronize() every step (assumed the same as
                     MAE's baseline step; the official reads loss.item() after the synchronize,
                     MAE's between forward and backward: one host read per step either way).

Inputs are synthetic tensors already on the device (model-bound). With --data_path (an
ImageFolder root: <data_path>/train/<class>/<image>, as --make_jpegs writes), the pretraining
transform is also timed on one core (util.datasets.benchmark_transform; and side by side with
--fast_decode off and on, compare_fast_decode), the DataLoader alone
with --num_workers workers, and the fast step fed by that DataLoader (data-bound row
"fast+data"). Dataset, transform and DataLoader are main_pretrain's: util.datasets'
build_dataset, build_pretrain_transform and build_train_loader.

Reported per row: images/s (median over the timed steps after warm-up), step ms, peak memory,
achieved TFLOP/s from analytic model FLOPs (training = 3x forward, see mae_forward_flops), MFU
against --peak_tflops (CUDA only) and the speedup over the baseline of the same task.
Peak memory on CUDA is torch.cuda.max_memory_allocated() over the mode (the peak statistics are
reset before it). On the CPU it is the process's max resident set so far
(getrusage ru_maxrss): it never goes down, so a mode's figure includes every mode that ran
before it in the same process, and DataLoader worker processes are not counted.

  python benchmark.py --model mae_vit_large_patch16 --batch_size 64 --modes fast,baseline,all_tokens
  python benchmark.py --modes fast,baseline,simmim_vit,simmim_vit_baseline,simmim_swin,simmim_swin_baseline
  python benchmark.py --make_jpegs /tmp/jpegs --n 256 --size 500x375
  python benchmark.py --device cpu --modes fast --data_path /tmp/jpegs --num_workers 2
"""
import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time

import numpy as np
import timm
import timm.optim
import torch
import torch.nn as nn
from PIL import Image

import models_mae
import models_simmim
import models_vit
from util.args import HelpFormatter, add_loader_args
from util.datasets import (PretrainTransform, benchmark_transform, build_dataset, build_pretrain_transform,
                           build_train_loader)
from util.lr_decay import param_groups_lrd, simmim_param_groups
from util.masking import MaskGenerator
from util.models import SIMMIM_PREFIX, model_from_name
from util.precision import NativeScalerWithGradNormCount, autocast, fast_adamw_kwargs, resolve_precision

ALL_MODES = ("fast", "baseline", "all_tokens", "finetune", "finetune_baseline",
             "simmim_vit", "simmim_vit_baseline", "simmim_swin", "simmim_swin_baseline")
SIMMIM_MASK_RATIO = 0.6  # SimMIM's recipes (the compute does not depend on it: every patch is encoded)
SIMMIM_CLIP_GRAD = 5.0  # main_pretrain's default for SimMIM, and the official TRAIN.CLIP_GRAD


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs
# ---------------------------------------------------------------------------------------------

def block_flops(tokens, dim, mlp_ratio=4.0, window_tokens=None):
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens of width `dim`.

    Matrix products only, 2 FLOPs per multiply-accumulate:
      qkv 3D*D, proj D*D, mlp 2*(mlp_ratio*D*D)  ->  2*T*(4 + 2*mlp_ratio)*D*D
      q k^T and attn v                           ->  2 * 2*T*T*D
    (= 2*T*(3D*D + D*D + 8D*D) + 4*T*T*D for mlp_ratio 4). LayerNorm, softmax, GELU and
    residual adds are not counted.
    window_tokens T_w (Swin): each token attends within its window of T_w tokens, so the
    attention is 2 * 2*T*T_w*D (= 2*2*T_w*T_w*D per window, summed over the T / T_w windows).
    """
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 2 * 2 * tokens * (window_tokens or tokens) * dim
    return linear + attention


def mae_forward_flops(num_patches, patch_dim, embed_dim, depth, decoder_embed_dim, decoder_depth,
                      mlp_ratio=4.0, mask_ratio=0.75, all_tokens=False):
    """Forward FLOPs of MaskedAutoencoderViT for ONE image (training step = 3x this).

    num_patches L, patch_dim p*p*C, K = int(L * (1 - mask_ratio)) visible patches:
      patch embed    2 * L * (p*p*C) * D           (the conv runs on every patch)
      encoder        depth x block(1 + K, D)       (all_tokens: block(1 + L, D))
      decoder_embed  2 * (1 + K) * D * Dd          (all_tokens: 1 + L tokens)
      decoder        decoder_depth x block(1 + L, Dd)
      decoder_pred   2 * L * Dd * (p*p*C)
    """
    L = num_patches
    K = int(L * (1 - mask_ratio))
    enc_tokens = 1 + (L if all_tokens else K)
    flops = 2 * L * patch_dim * embed_dim
    flops += depth * block_flops(enc_tokens, embed_dim, mlp_ratio)
    flops += 2 * enc_tokens * embed_dim * decoder_embed_dim
    flops += decoder_depth * block_flops(1 + L, decoder_embed_dim, mlp_ratio)
    flops += 2 * L * decoder_embed_dim * patch_dim
    return flops


def vit_forward_flops(num_patches, patch_dim, embed_dim, depth, num_classes, mlp_ratio=4.0):
    """Forward FLOPs of the ViT classifier for ONE image: patch embed, depth x block(1 + L, D),
    head 2 * D * num_classes."""
    flops = 2 * num_patches * patch_dim * embed_dim
    flops += depth * block_flops(1 + num_patches, embed_dim, mlp_ratio)
    flops += 2 * embed_dim * num_classes
    return flops


def simmim_vit_forward_flops(num_patches, patch_dim, embed_dim, depth, mlp_ratio=4.0):
    """Forward FLOPs of SimMIM with the ViT encoder for ONE image (training step = 3x this).

    Every patch is encoded (L of them, p*p*C values each, stride s = p):
      patch embed  2 * L * (p*p*C) * D
      encoder      depth x block(1 + L, D)
      decoder      2 * L * D * (p*p*C)         (the 1x1 conv to s*s*C channels on the L cells)
    Not counted (as block_flops): the mask-token blend, the shared relative position bias
    (gather and add), layer scale, LayerNorms, softmax, GELU, PixelShuffle and the L1 loss.
    """
    L = num_patches
    flops = 2 * L * patch_dim * embed_dim
    flops += depth * block_flops(1 + L, embed_dim, mlp_ratio)
    flops += 2 * L * embed_dim * patch_dim
    return flops


def swin_forward_flops(img_size, patch_size, embed_dim, depths, windows, mlp_ratio=4.0, in_chans=3):
    """Forward FLOPs of SimMIM with the Swin encoder for ONE square image (training = 3x this).

    windows: each stage's window side as the blocks use it (clipped to the stage resolution:
    Swin-B at 192 px 6, 6, 6, 6; Swin-L 12, 12, 12, 6). With H x W tokens of width C in a stage:
      patch embed     2 * (H*W) * (p*p*C_in) * embed_dim
      each block      block(H*W, C, window_tokens=w*w): qkv / proj / mlp on every token, the
                      attention 2*2*T_w*T_w*C per window (summed over the H*W / T_w windows)
      patch merging   2 * (H*W / 4) * 4C * 2C      (after every stage but the last)
      decoder         2 * (H*W) * F * (s*s*C_in)   (the 1x1 conv on the final H/32 x W/32 map,
                                                    F its width, stride s = p * 2^(stages-1))
    Not counted: the relative position bias (gather and add), the shift mask add, the rolls,
    the mask-token blend, LayerNorms, softmax, GELU, PixelShuffle and the L1 loss. Stage
    resolutions are taken as divisible by their window (every factory's are; timm would pad).
    """
    H = W = img_size // patch_size
    C = embed_dim
    flops = 2 * H * W * patch_size * patch_size * in_chans * C
    for stage, (depth, window) in enumerate(zip(depths, windows)):
        flops += depth * block_flops(H * W, C, mlp_ratio, window_tokens=window * window)
        if stage < len(depths) - 1:
            flops += 2 * (H * W // 4) * (4 * C) * (2 * C)
            H, W, C = H // 2, W // 2, 2 * C
    stride = patch_size * 2 ** (len(depths) - 1)
    flops += 2 * H * W * C * stride * stride * in_chans
    return flops


def _swin_dims(encoder):
    """swin_forward_flops' arguments read off a models_swin encoder."""
    block = encoder.layers[0].blocks[0]
    return dict(img_size=encoder.patch_embed.img_size[0], patch_size=encoder.patch_size,
                embed_dim=encoder.embed_dim, depths=[len(layer.blocks) for layer in encoder.layers],
                windows=[layer.blocks[0].window_size[0] for layer in encoder.layers],
                mlp_ratio=block.mlp.fc1.out_features / encoder.embed_dim,
                in_chans=encoder.patch_embed.proj.in_channels)


def _encoder_dims(model):
    """(L, p*p*C, D, depth, mlp_ratio) read off a MAE, ViT or SimMIM ViT encoder."""
    pe = model.patch_embed
    L = pe.num_patches
    patch_dim = pe.proj.in_channels * pe.patch_size[0] * pe.patch_size[1]
    D = pe.proj.out_channels
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / D
    return L, patch_dim, D, len(model.blocks), mlp_ratio


def train_flops_per_image(model, mode, mask_ratio):
    """Training FLOPs per image (3x forward: backward costs twice the forward) for a mode."""
    if mode.startswith("finetune"):
        L, patch_dim, D, depth, mlp_ratio = _encoder_dims(model)
        return 3 * vit_forward_flops(L, patch_dim, D, depth, model.head.out_features, mlp_ratio)
    if mode.startswith("simmim_vit"):
        return 3 * simmim_vit_forward_flops(*_encoder_dims(model.encoder))
    if mode.startswith("simmim_swin"):
        return 3 * swin_forward_flops(**_swin_dims(model.encoder))
    mae = model.mae if isinstance(model, AllTokensMAE) else model
    L, patch_dim, D, depth, mlp_ratio = _encoder_dims(mae)
    return 3 * mae_forward_flops(L, patch_dim, D, depth, mae.decoder_embed.out_features,
                                 len(mae.decoder_blocks), mlp_ratio, mask_ratio,
                                 all_tokens=(mode == "all_tokens"))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class AllTokensMAE(nn.Module):
    """MAE whose encoder also processes the removed patches, as a learned mask token.

    The paper's "encoder w/ [M]" ablation (and SimMIM's encoder): the same random mask as MAE,
    the patch embeddings of removed patches are replaced by an encoder-width mask token, all
    1 + L tokens go through the encoder, then straight into the unchanged decoder (no mask
    tokens to insert, no unshuffle). The loss is MAE's, on the removed patches only.
    Reuses the wrapped model's modules; adds only `mask_token` (1, 1, D).
    """

    def __init__(self, mae):
        super().__init__()
        self.mae = mae
        self.mask_token = nn.Parameter(torch.zeros(1, 1, mae.cls_token.shape[-1]))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs: (N, C, H, W) -> loss, pred (N, L, p*p*C), mask (N, L)."""
        mae = self.mae
        x = mae.patch_embed(imgs)  # (N, L, D)
        _, mask, _ = mae.random_masking(x, mask_ratio, noise)  # mask (N, L): 1 = removed
        removed = mask.unsqueeze(-1).to(x.dtype)  # (N, L, 1)
        x = x * (1 - removed) + self.mask_token.to(x.dtype) * removed
        x = x + mae.pos_embed[:, 1:, :]
        cls_token = mae.cls_token + mae.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1+L, D)
        for blk in mae.blocks:
            x = blk(x)
        x = mae.norm(x)

        x = mae.decoder_embed(x) + mae.decoder_pos_embed  # (N, 1+L, Dd)
        for blk in mae.decoder_blocks:
            x = blk(x)
        pred = mae.decoder_pred(mae.decoder_norm(x))[:, 1:, :]  # (N, L, p*p*C)
        return mae.forward_loss(imgs, pred, mask), pred, mask


def use_explicit_attention(model):
    """Make every timm Attention in model compute softmax(q k^T * scale) v with explicit
    matrix products (the original release's attention) instead of fused SDPA.
    Returns the number of attention modules switched."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            count += 1
    return count


def vit_name(mae_name):
    """models_vit counterpart of a models_mae name: mae_vit_base_patch16[_dec512d8b] ->
    vit_base_patch16."""
    return re.sub(r"_dec\d+d\d+b$", "", mae_name.removeprefix("mae_"))


def _factory_kwargs(args, kwargs):
    """kwargs + --input_size + --patch_size (when given; it overrides --model_kwargs')."""
    return {**kwargs, "img_size": args.input_size,
            "patch_size": args.patch_size or kwargs.get("patch_size")}


def build_mae(args):
    """models_mae.<--model>(img_size, [patch_size], **--model_kwargs); an unknown name raises a
    ValueError listing the mae_vit_* choices."""
    return model_from_name(models_mae, args.model, "mae_vit_", **_factory_kwargs(args, args.model_kwargs))


def _encoder_kwargs(args):
    """--model_kwargs without the decoder's and the loss's keys (those of the encoder)."""
    return {k: v for k, v in args.model_kwargs.items() if not k.startswith("decoder") and k != "norm_pix_loss"}


def build_vit(args):
    """The models_vit counterpart of --model (see vit_name), global pool, --num_classes,
    --drop_path; --model_kwargs without the decoder's and the loss's keys."""
    return model_from_name(models_vit, vit_name(args.model), "vit_", num_classes=args.num_classes,
                           global_pool=True, drop_path_rate=args.drop_path,
                           **_factory_kwargs(args, _encoder_kwargs(args)))


def simmim_name(args, family):
    """The models_simmim factory of a SimMIM mode, family 'vit' or 'swin': --simmim_vit_model
    (default: simmim_<vit_name(--model)>, the ViT of --model's size) or --simmim_swin_model. A name
    that is not a simmim_<family>_* factory raises a ValueError naming the flag and the choices."""
    flag = f"simmim_{family}_model"
    name = getattr(args, flag) or SIMMIM_PREFIX + vit_name(args.model)  # only the ViT's can be None
    choices = sorted(n for n in vars(models_simmim) if n.startswith(f"{SIMMIM_PREFIX}{family}_"))
    if name not in choices:
        why = f" (from --model {args.model})" if getattr(args, flag) is None else ""
        raise ValueError(f"unknown --{flag} {name!r}{why}; choose one of: {', '.join(choices)}")
    return name


def build_simmim(args, family):
    """models_simmim.<simmim_name(args, family)>, with main_pretrain's factory defaults (drop path
    0.1 ViT, 0 Swin). The ViT: at --input_size and --patch_size with the encoder's --model_kwargs
    (the encoder of --model, so that simmim_vit and fast compare one encoder); the Swin: at
    --simmim_input_size, else the factory's own size (192 for Swin-B / L)."""
    name = simmim_name(args, family)
    if family == "vit":
        return model_from_name(models_simmim, name, SIMMIM_PREFIX, **_factory_kwargs(args, _encoder_kwargs(args)))
    return model_from_name(models_simmim, name, SIMMIM_PREFIX, img_size=args.simmim_input_size)


def simmim_masks(args, model, device):
    """One batch of SimMIM masks (N, H/p, W/p) int64 on the device: MaskGenerator(the model's input
    size, --mask_patch_size or 32, the model's patch size, 0.6), from a numpy Generator seeded with
    --seed. A size the blocks do not divide: a ValueError that names --mask_patch_size."""
    size = model.encoder.patch_embed.img_size  # (H, W)
    try:
        generator = MaskGenerator(size, args.mask_patch_size or 32, model.patch_size, SIMMIM_MASK_RATIO)
    except ValueError as error:
        raise ValueError(f"{error}: pass --mask_patch_size (a divisor of the input size and a multiple of "
                         f"the patch size {model.patch_size})") from error
    rng = np.random.default_rng(args.seed)
    return torch.from_numpy(np.stack([generator(rng) for _ in range(args.batch_size)])).to(device)


def build_model(args, mode):
    """The module trained in `mode` (not compiled)."""
    if mode.startswith("finetune"):
        model = build_vit(args)
    elif mode.startswith("simmim_"):
        model = build_simmim(args, mode.split("_")[1])
    elif mode == "all_tokens":
        model = AllTokensMAE(build_mae(args))
    else:
        model = build_mae(args)
    if mode.endswith("baseline"):
        use_explicit_attention(model)
    return model


# ---------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------

def build_optimizer(model, mode, device):
    """AdamW as main_pretrain / main_finetune build it; single-tensor (for-loop) for baseline."""
    if mode.startswith("finetune"):
        groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.75)
        betas = (0.9, 0.999)
    elif mode.startswith("simmim_"):
        groups = simmim_param_groups(model, 0.05)
        betas = (0.9, 0.999)
    else:
        groups = timm.optim.param_groups_weight_decay(model, 0.05)
        betas = (0.9, 0.95)
    impl = dict(foreach=False, fused=False) if mode.endswith("baseline") else fast_adamw_kwargs(device)
    return torch.optim.AdamW(groups, lr=1e-4, betas=betas, **impl)


def make_loss_fn(model, mode, args):
    """(imgs, targets) -> scalar loss for the mode's task (SimMIM: targets are the masks)."""
    if mode.startswith("finetune"):
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        return lambda imgs, targets: criterion(model(imgs), targets)
    if mode.startswith("simmim_"):
        return lambda imgs, masks: model(imgs, masks)[0]
    return lambda imgs, targets: model(imgs, mask_ratio=args.mask_ratio)[0]


def make_step(loss_fn, optimizer, precision, device, baseline=False, clip_grad=None):
    """One training step as main_pretrain runs it: no host-device sync inside; gradients clipped
    to clip_grad (None: not clipped, the norm still computed, as the engine). With baseline=True,
    as the original engine_pretrain / engine_finetune ran it: loss.item() between forward and
    backward (a host sync), gradients zeroed in place (torch 1.8's default: a memset of every
    grad) and torch.cuda.synchronize() after the step."""
    scaler = NativeScalerWithGradNormCount(enabled=precision == "fp16", device_type=device.type)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(imgs, targets):
        with autocast(device, precision):
            loss = loss_fn(imgs, targets)
        if baseline:
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise RuntimeError(f"Loss is {loss_value}, stopping training")
        scaler(loss, optimizer, clip_grad=clip_grad, parameters=params)  # backward, grad norm, step
        optimizer.zero_grad(set_to_none=not baseline)
        if baseline:
            synchronize(device)
            return loss_value
        return loss.detach()
    return step


class StepTimer:
    """Durations between consecutive mark() calls, without a host sync on CUDA (events)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_s(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device):
    """Start a new peak: CUDA's peak statistics are reset. The CPU's max RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(MB, kind): CUDA max_memory_allocated since reset_peak_memory ("cuda_max_allocated"), or
    on the CPU this process's max resident set so far ("cpu_max_rss"; getrusage's ru_maxrss is
    in kilobytes on Linux, bytes on macOS). The CPU figure never goes down: it includes
    everything that ran before in this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss"


def run_mode(args, mode, device, batches=None):
    """Build, warm up and time one mode; returns its table row. batches: an iterator of
    (imgs, targets) on the CPU (data-bound); None = one synthetic batch already on the device
    (model-bound)."""
    torch.manual_seed(args.seed)
    gc.collect()
    reset_peak_memory(device)
    row = time_mode(args, mode, device, batches)
    row["memory_mb"], row["memory_kind"] = peak_memory(device)
    row["mfu"] = row["tflops"] / args.peak_tflops if device.type == "cuda" else None
    return row


def time_mode(args, mode, device, batches):
    baseline = mode.endswith("baseline")
    precision = baseline_precision(device) if baseline else args.precision
    simmim = mode.startswith("simmim_")
    model = build_model(args, mode).to(device)
    model.train()
    optimizer = build_optimizer(model, mode, device)
    flops_per_image = train_flops_per_image(model, mode, args.mask_ratio)
    attention = attention_kind(model)
    if batches is None:
        batch = synthetic_batch(args, mode, model, device)
        next_batch = lambda: batch  # noqa: E731
    else:
        def next_batch():
            imgs, targets = next(batches)
            return imgs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    compiled = args.compile and not baseline
    if compiled:
        model = torch.compile(model)
    loss_fn = make_loss_fn(model, mode, args)
    step = make_step(loss_fn, optimizer, precision, device, baseline=baseline,
                     clip_grad=SIMMIM_CLIP_GRAD if simmim else None)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(*next_batch())
    synchronize(device)
    warmup_s = time.perf_counter() - t0

    timer = StepTimer(device)
    cpu0 = time.process_time()
    timer.mark()
    for _ in range(args.steps):
        step(*next_batch())
        timer.mark()
    durations = timer.durations_s()
    step_s = statistics.median(durations)
    return dict(
        mode=mode + ("+data" if batches is not None else ""),
        model=mode_model_name(args, mode), batch=args.batch_size, precision=precision, compile=compiled,
        attention=attention,
        images_per_s=args.batch_size / step_s, step_ms=step_s * 1e3,
        train_gflops_per_image=flops_per_image / 1e9,
        tflops=flops_per_image * args.batch_size / step_s / 1e12,
        warmup_s=warmup_s, steps=args.steps, warmup=args.warmup,
        step_ms_each=[d * 1e3 for d in durations],
        # CPU seconds of all this process's threads per step: on a shared CPU, wall time
        # grows with other processes' load, this much less
        process_cpu_ms_per_step=(time.process_time() - cpu0) * 1e3 / args.steps,
    )


def synthetic_batch(args, mode, model, device):
    """The one batch a model-bound mode trains on, on the device: (imgs (N, 3, H, W) standard
    normal, targets). MAE / finetune: --input_size images and random labels; SimMIM: images at the
    model's input size and the masks of simmim_masks as the targets."""
    if mode.startswith("simmim_"):
        imgs = torch.randn(args.batch_size, 3, *model.encoder.patch_embed.img_size, device=device)
        return imgs, simmim_masks(args, model, device)
    imgs = torch.randn(args.batch_size, 3, *args.input_hw, device=device)
    return imgs, torch.randint(0, args.num_classes, (args.batch_size,), device=device)


def attention_kind(model):
    """'sdpa' when every attention module of model is fused, 'explicit' when none is (the
    baselines; also main_pretrain's Swin: timm's WindowAttention is explicit by default)."""
    fused = {bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")}
    if fused == {True}:
        return "sdpa"
    return "explicit" if fused == {False} else "mixed"


def mode_model_name(args, mode):
    """The factory name a mode trains: --model, its models_vit counterpart, or the SimMIM model."""
    if mode.startswith("finetune"):
        return vit_name(args.model)
    if mode.startswith("simmim_"):
        return simmim_name(args, mode.split("_")[1])
    return args.model


def baseline_precision(device):
    """The original trained with fp16 autocast + GradScaler on GPUs; on the CPU it is fp32."""
    return "fp16" if device.type == "cuda" else "fp32"


def baseline_of(mode):
    """The baseline row of a mode's task: 'baseline' for MAE pretraining (fast, all_tokens),
    else <task>_baseline (finetune_baseline, simmim_vit_baseline, simmim_swin_baseline)."""
    task = mode.removesuffix("+data").removesuffix("_baseline")
    return "baseline" if task in ("fast", "baseline", "all_tokens") else task + "_baseline"


def add_speedups(rows):
    """speedup = baseline step time / row step time, against the baseline of the same task."""
    base = {r["mode"]: r["step_ms"] for r in rows if r["mode"].endswith("baseline")}
    for r in rows:
        ref = base.get(baseline_of(r["mode"]))
        model_bound = not r["mode"].endswith("+data")
        r["speedup_vs_baseline"] = ref / r["step_ms"] if ref and model_bound else None


# ---------------------------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------------------------

def build_data(args):
    """main_pretrain's dataset (ImageFolder over <data_path>/train with the pretraining
    transform) and training DataLoader: (dataset, sampler, loader)."""
    dataset = build_dataset(True, args, build_pretrain_transform(args))
    sampler, loader = build_train_loader(args, dataset)
    return dataset, sampler, loader


def endless(sampler, loader):
    """Batches of loader without end, epoch after epoch (sampler.set_epoch before each)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_loader(batches, args):
    """Images/s of the DataLoader alone (no training), after --warmup batches."""
    for _ in range(args.warmup):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def compare_fast_decode(folder, input_size, n, rounds=3):
    """Images/s per core of the pretraining transform with --fast_decode off and on, side by side:
    `rounds` alternations (the order swapped every round, so a drift in the machine's load
    favours neither). Returns {'off': median, 'on': median, 'speedup': on / off}."""
    runs = {False: [], True: []}
    for r in range(rounds):
        for fast in ((False, True) if r % 2 == 0 else (True, False)):
            runs[fast].append(benchmark_transform(folder, PretrainTransform(input_size, fast_decode=fast), n=n))
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    return dict(off=off, on=on, speedup=on / off)


def measure_data(args, device):
    """Transform on one core, DataLoader alone, and the fast step fed by the DataLoader."""
    dataset, sampler, loader = build_data(args)
    result = dict(data_path=args.data_path, num_workers=args.num_workers, images=len(dataset),
                  fast_decode=args.fast_decode)
    ips = benchmark_transform(dataset.root, build_pretrain_transform(args), n=args.n)
    result["transform_images_per_s_per_core"] = ips
    result["fast_decode_comparison"] = compare_fast_decode(dataset.root, args.input_size, args.n)
    batches = endless(sampler, loader)
    loader_ips = time_loader(batches, args)
    result["loader_images_per_s"] = loader_ips
    result["loader_images_per_s_per_worker"] = loader_ips / max(args.num_workers, 1)
    row = run_mode(args, "fast", device, batches=batches)
    return result, row


def make_jpegs(folder, n, size, quality=90, seed=0):
    """Write n synthetic photo-like JPEGs (smooth colour noise + gradients + grain, w x h) as an
    ImageFolder root: folder/train/synthetic/img_00000.jpg, ..."""
    w, h = size
    out = os.path.join(folder, "train", "synthetic")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        coarse = rng.uniform(0, 255, (rng.integers(3, 12), rng.integers(3, 12), 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] * rng.uniform(-80, 80, 3)
        grain = rng.normal(0, 6, (h, w, 3))
        pixels = np.clip(smooth + ramp + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(out, f"img_{i:05d}.jpg"), quality=quality)
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def _fmt(value, spec, suffix=""):
    return "n/a" if value is None else format(value, spec) + suffix


MEMORY_HEADERS = {"cuda_max_allocated": "peak alloc MB", "cpu_max_rss": "max RSS so far MB"}


def format_table(rows):
    """The table. The memory column is CUDA's max allocated over each mode, or on the CPU the
    process's max RSS so far (it includes the modes above it)."""
    kinds = {r["memory_kind"] for r in rows}
    memory = MEMORY_HEADERS.get(kinds.pop(), "mem MB") if len(kinds) == 1 else "mem MB"
    header = ["mode", "model", "batch", "prec", "compile", "img/s", "step ms", memory,
              "TFLOP/s", "MFU", "speedup"]
    lines = [[r["mode"], r["model"], str(r["batch"]), r["precision"], "yes" if r["compile"] else "no",
              _fmt(r["images_per_s"], ".1f"), _fmt(r["step_ms"], ".1f"), _fmt(r["memory_mb"], ".0f"),
              _fmt(r["tflops"], ".3f"), _fmt(r["mfu"], ".1%"), _fmt(r["speedup_vs_baseline"], ".2f", "x")]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def notes_for(args, device):
    notes = []
    if device.type == "cuda":
        notes.append(f"MFU against --peak_tflops {args.peak_tflops} TFLOP/s "
                     "(989 = H100 SXM bf16 dense)")
        notes.append("memory: torch.cuda.max_memory_allocated() during each mode (peak reset "
                     "before it)")
    else:
        notes.append("CPU: baseline runs in fp32 (the original's fp16 autocast + GradScaler is "
                     "CUDA-only; CPU fp16 autocast is not what anyone ran); no MFU")
        notes.append("memory: the process's max resident set so far (getrusage ru_maxrss); it "
                     "never goes down, so each row includes the modes run before it; DataLoader "
                     "workers are other processes and not counted")
    notes.append("FLOPs: matrix products only, 2 per MAC, training = 3x forward")
    return notes


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def get_args_parser():
    p = argparse.ArgumentParser("MAE training-speed benchmark", add_help=True, formatter_class=HelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16", help="a models_mae factory name")
    p.add_argument("--batch_size", default=16, type=int)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="precision of the fast modes (auto: bf16 on GPUs, fp32 on the CPU)")
    p.add_argument("--steps", default=10, type=int, help="timed steps per mode")
    p.add_argument("--warmup", default=3, type=int, help="untimed steps per mode")
    p.add_argument("--modes", default="fast,baseline,all_tokens",
                   help=f"comma-separated, from {','.join(ALL_MODES)}; 'all' for every mode")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fast modes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--patch_size", default=None, type=int, help="override the model's patch size")
    p.add_argument("--model_kwargs", default={}, type=json.loads,
                   help='JSON overrides for the model factory, e.g. \'{"depth": 2}\'')
    p.add_argument("--mask_ratio", default=0.75, type=float, help="MAE's (SimMIM modes: 0.6)")
    p.add_argument("--simmim_vit_model", default=None,
                   help="models_simmim ViT of the simmim_vit modes (default: the one of --model's size, "
                        "e.g. mae_vit_base_patch16 -> simmim_vit_base_patch16); at --input_size, --patch_size")
    p.add_argument("--simmim_swin_model", default="simmim_swin_base_patch4_window6_192",
                   help="models_simmim Swin of the simmim_swin modes")
    p.add_argument("--simmim_input_size", default=None, type=int,
                   help="image size of the simmim_swin modes (default: the model's own, 192)")
    p.add_argument("--mask_patch_size", default=None, type=int,
                   help="SimMIM mask block side in px (default 32); needed for an input size not a multiple of 32")
    p.add_argument("--num_classes", default=1000, type=int, help="finetune head size")
    p.add_argument("--drop_path", default=0.1, type=float, help="finetune drop path rate")
    p.add_argument("--peak_tflops", default=989.0, type=float,
                   help="device peak for MFU (989 = H100 SXM bf16 dense)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--data_path", default=None,
                   help="ImageFolder root (<data_path>/train/<class>/<image>) for the data-bound rows")
    p.add_argument("--num_workers", default=8, type=int)
    add_loader_args(p)  # --pin_mem / --no_pin_mem, --skip_bad_images, --max_image_pixels, as the scripts
    p.add_argument("--fast_decode", action="store_true",
                   help="pretraining transform with JPEG draft decoding (see util.datasets.PretrainTransform)")
    p.add_argument("--n", default=256, type=int,
                   help="images timed by the transform benchmark / written by --make_jpegs")
    p.add_argument("--make_jpegs", default=None, metavar="DIR",
                   help="write --n synthetic JPEGs of --size into DIR/train/synthetic and exit")
    p.add_argument("--size", default="500x375", help="WxH of --make_jpegs images")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def parse_modes(text):
    modes = list(ALL_MODES) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(ALL_MODES)}")
    return modes


def main(args):
    if args.make_jpegs:
        w, h = (int(v) for v in args.size.lower().split("x"))
        out = make_jpegs(args.make_jpegs, args.n, (w, h))
        print(f"wrote {args.n} {w}x{h} JPEGs to {out}")
        return None
    device = torch.device(args.device)
    args.distributed = False  # one process: build_train_loader's RandomSampler
    args.precision = resolve_precision(args.precision, device)
    args.input_hw = (args.input_size, args.input_size)
    torch.backends.cudnn.benchmark = True
    modes = parse_modes(args.modes)
    for mode in modes:  # an unknown SimMIM model fails now, not after the other rows
        if mode.startswith("simmim_"):
            try:
                simmim_name(args, mode.split("_")[1])
            except ValueError as error:
                raise SystemExit(f"benchmark.py: error: {error}") from error

    rows = []
    for mode in modes:
        print(f"running {mode} ...", flush=True)
        rows.append(run_mode(args, mode, device))
    data = None
    if args.data_path:
        print("running data pipeline ...", flush=True)
        data, row = measure_data(args, device)
        rows.append(row)
    add_speedups(rows)

    report = dict(rows=rows, data=data, device=device_name(device), torch=torch.__version__,
                  timm=timm.__version__, python=platform.python_version(),
                  command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                  peak_tflops=args.peak_tflops, notes=notes_for(args, device))
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def print_report(report):
    rows = report["rows"]
    print(f"\n{report['device']} | torch {report['torch']} | timm {report['timm']}")
    print(format_table(rows))
    by_mode = {r["mode"]: r for r in rows}
    if "fast" in by_mode and "all_tokens" in by_mode:
        saving = by_mode["all_tokens"]["step_ms"] / by_mode["fast"]["step_ms"]
        print(f"MAE saving (all_tokens step / fast step): {saving:.2f}x (paper: 2.8x-4.1x)")
    if "fast" in by_mode and "simmim_vit" in by_mode:
        ratio = by_mode["simmim_vit"]["step_ms"] / by_mode["fast"]["step_ms"]
        print(f"SimMIM / MAE step ({by_mode['simmim_vit']['model']} / {by_mode['fast']['model']}, "
              f"fast settings): {ratio:.2f}x")
    if report["data"]:
        d = report["data"]
        fd = d["fast_decode_comparison"]
        print(f"data: --fast_decode off {fd['off']:.1f} / on {fd['on']:.1f} images/s per core "
              f"({fd['speedup']:.2f}x, median of 3 alternations)")
        print(f"data: transform {d['transform_images_per_s_per_core']:.1f} images/s per core; "
              f"DataLoader {d['loader_images_per_s']:.1f} images/s with {d['num_workers']} workers "
              f"({d['loader_images_per_s_per_worker']:.1f} per worker)")
    for note in report["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
