"""SimMIM: masked image modelling with a linear decoder (Xie et al., arXiv 2111.09886), as the
official code (microsoft/SimMIM) behaves; the facts and numbers are those of SPEC-simmim.md.

The encoder sees EVERY patch; the masked ones are replaced by a learned mask token. A 1x1 conv
and a PixelShuffle turn the encoder's feature map back into pixels, and the loss is the L1 error
on the masked pixels only. The mask comes from the caller (util/masking.py draws it in the data
pipeline, as the original does), so a run is testable and comparable.

- SimMIM(encoder, encoder_stride): the wrapper, decoder and loss (spec section 1).
- VisionTransformerForSimMIM: the BEiT-style ViT encoder (q/v biases without a k bias, layer scale
  0.1, one shared relative position bias, no absolute position embedding, cls token, final norm),
  built from timm.models.beit's Block and RelativePositionBias; the Swin encoder is
  models_swin.SwinTransformerForSimMIM.
- Factories simmim_vit_* / simmim_swin_*; every one takes overrides (img_size, embed_dim,
  depth / depths, num_heads, window_size (Swin), drop_path_rate, ...).
- from_official / to_official: official checkpoints <-> this project's names.
- finetune_state_dict: the pretrain -> finetune conversion (spec section 9), incl. the geometric
  cubic resize of relative position bias tables (resize_rel_pos_bias_table).

State_dict names and shapes are the official ones (spec section 8): `encoder.*`, `decoder.0.*`.
"""
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.beit import Block, RelativePositionBias

import models_swin


class SimMIM(nn.Module):
    """Encoder + linear decoder (1x1 conv to stride*stride*C channels, then PixelShuffle(stride)).

    forward(imgs (N, C, H, W), mask (N, H/p, W/p) 0/1, 1 = masked, at the ENCODER's patch grid)
    -> (loss, reconstruction (N, C, H, W), mask as given).
    Attributes: patch_size (the encoder's, p), encoder_stride (s: input pixels per feature-map
    cell, 16 ViT-B/16, 32 Swin), in_chans."""

    def __init__(self, encoder, encoder_stride):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.patch_size = encoder.patch_size
        self.decoder = nn.Sequential(  # PyTorch's default init, as the original
            nn.Conv2d(encoder.num_features, encoder_stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride))

    def forward_loss(self, imgs, rec, mask):
        """L1 on the masked pixels: sum |imgs - rec| over masked pixels and channels, divided by
        (masked pixel count + 1e-5), then by the channel count (spec section 1). 0 if no mask."""
        p = self.patch_size
        mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)  # (N, 1, H, W)
        dtype = torch.promote_types(imgs.dtype, torch.float32)  # fp32 under autocast (fp64 kept)
        mask = mask.to(dtype)
        loss = F.l1_loss(imgs.to(dtype), rec.to(dtype), reduction="none")  # (N, C, H, W)
        return (loss * mask).sum() / (mask.sum() + 1e-5) / self.in_chans

    def forward(self, imgs, mask):
        z = self.encoder(imgs, mask)  # (N, F, H/s, W/s)
        rec = self.decoder(z)  # (N, C, H, W)
        return self.forward_loss(imgs, rec, mask), rec, mask

    @property
    def num_prefix_tokens(self):
        return getattr(self.encoder, "num_prefix_tokens", 0)

    @property
    def num_features(self):
        return self.encoder.num_features

    def forward_features(self, imgs):
        """The encoder on the unmasked images (the kNN monitor's features): (N, P+L, F) tokens
        after the final norm, P = num_prefix_tokens (the ViT's cls token first; Swin: none)."""
        if isinstance(self.encoder, models_swin.SwinTransformer):
            return self.encoder.forward_stages(self.encoder.patch_embed(imgs))
        return self.encoder.forward_tokens(imgs)

    def no_weight_decay(self):
        """The encoder's skip set with `encoder.` prefixed, as the original."""
        return {"encoder." + n for n in getattr(self.encoder, "no_weight_decay", set)()}

    def no_weight_decay_keywords(self):
        """The encoder's keywords with `encoder.` prefixed, as the original; so for Swin
        'encoder.relative_position_bias_table' matches no name (spec section 12, quirk 12)."""
        return {"encoder." + n for n in getattr(self.encoder, "no_weight_decay_keywords", set)()}


class VisionTransformerForSimMIM(nn.Module):
    """The BEiT-style ViT encoder of SimMIM (spec section 2), timm's BEiT Block and
    RelativePositionBias: patch embedding, mask tokens in place of masked patches, cls token
    prepended (never masked), one relative position bias table shared by all blocks, blocks with
    layer scale, final LayerNorm (eps 1e-6). forward(x, mask) -> feature map (B, D, H/p, W/p).

    Init (spec section 4): EVERY trunc-normal draw is truncated at +-0.02 (+-1 std), the
    official subclass's quirk; proj / fc2 weights of block l (1-based) divided by sqrt(2l)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., qkv_bias=True, init_values=0.1, drop_path_rate=0.1,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.patch_size = patch_size
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(self.patch_embed.grid_size, num_heads)
        keep_index_in_state_dict(self.rel_pos_bias)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: meta builds too
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, drop_path=dpr[i],
                  init_values=init_values, act_layer=nn.GELU, norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.init_weights()

    def init_weights(self):
        """Spec section 4, ViT pretrain column: trunc_normal(0.02, -0.02, 0.02) for cls_token,
        mask_token, every Linear and the patch-embedding conv (biases 0), LayerNorm 1/0, then the
        sqrt(2l) rescale; q/v biases 0, gammas init_values, the shared table 0 (timm's init)."""
        trunc = partial(trunc_normal_, std=.02, a=-.02, b=.02)
        trunc(self.cls_token)
        for m in self.modules():  # the order of draws is not reproducible anyway; the laws are
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for layer_id, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_((2.0 * layer_id) ** 0.5)
                blk.mlp.fc2.weight.div_((2.0 * layer_id) ** 0.5)
        trunc(self.mask_token)

    def no_weight_decay(self):
        """The official skip set (pos_embed does not exist here; mask_token and the shared table
        ARE decayed, spec section 6)."""
        return {"pos_embed", "cls_token"}

    def forward_tokens(self, x, mask=None):
        """x (B, C, H, W), mask (B, H/p, W/p) or None -> tokens (B, 1+L, D) after the final norm."""
        x = self.patch_embed(x)  # (B, L, D), token t = row * W/p + col
        B, L, _ = x.shape
        if mask is not None:
            if mask.shape[1:].numel() != L:
                raise ValueError(f"mask of shape {tuple(mask.shape)} for a patch grid of "
                                 f"{tuple(self.patch_embed.grid_size)}")
            w = mask.flatten(1).unsqueeze(-1).type_as(x)  # (B, L, 1)
            x = x * (1 - w) + self.mask_token * w
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+L, D)
        rel_pos_bias = self.rel_pos_bias()  # (heads, 1+L, 1+L), the same for every block
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    def forward(self, x, mask):
        x = self.forward_tokens(x, mask)[:, 1:]  # (B, L, D), cls dropped
        B, L, D = x.shape
        h, w = self.patch_embed.grid_size
        return x.transpose(1, 2).reshape(B, D, h, w)  # (B, D, H/p, W/p)


def keep_index_in_state_dict(module):
    """Make timm's non-persistent `relative_position_index` persistent: the official
    checkpoints hold it (spec section 8); its values are the ones timm computes."""
    module.register_buffer("relative_position_index", module.relative_position_index, persistent=True)


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------

def _simmim_vit(defaults, kwargs):
    """SimMIM with a VisionTransformerForSimMIM encoder; the decoder stride is the patch size."""
    cfg = dict(img_size=224, patch_size=16, mlp_ratio=4., qkv_bias=True, init_values=0.1, drop_path_rate=0.1)
    cfg.update(defaults)
    cfg.update(kwargs)
    encoder = VisionTransformerForSimMIM(**cfg)
    return SimMIM(encoder, encoder_stride=encoder.patch_size)


def simmim_vit_base_patch16(**kwargs):
    """ViT-B/16 at 224 (vit_base__800ep pretrain: drop path 0.1)."""
    return _simmim_vit(dict(embed_dim=768, depth=12, num_heads=12), kwargs)


def simmim_vit_tiny_patch16(**kwargs):
    """ViT-Ti/16 (192 wide, 12 deep, 3 heads): the encoder size of mae_vit_tiny_patch16, for CPUs
    and the equal-terms comparison with MAE."""
    return _simmim_vit(dict(embed_dim=192, depth=12, num_heads=3), kwargs)


def _simmim_swin(defaults, kwargs):
    """SimMIM with a models_swin.SwinTransformerForSimMIM encoder, decoder stride 32 (= 4 * 2^3)."""
    cfg = dict(patch_size=4, in_chans=3, mlp_ratio=4., qkv_bias=True, ape=False, patch_norm=True,
               drop_path_rate=0.0)
    cfg.update(defaults)
    cfg.update(kwargs)
    encoder = models_swin.SwinTransformerForSimMIM(**cfg)
    return SimMIM(encoder, encoder_stride=encoder.encoder_stride)


def simmim_swin_base_patch4_window6_192(**kwargs):
    """Swin-B at 192 px, window 6 (swin_base 100ep / 800ep pretrain)."""
    return _simmim_swin(dict(img_size=192, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                             window_size=6), kwargs)


def simmim_swin_large_patch4_window12_192(**kwargs):
    """Swin-L at 192 px, window 12 (stage 3 unshifted, stage 4 window 6)."""
    return _simmim_swin(dict(img_size=192, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                             window_size=12), kwargs)


def simmim_swin_tiny_patch4_window4_64(**kwargs):
    """A tiny Swin at 64 px (the encoder of models_swin.swin_tiny_patch4_window4_64): stage
    resolutions 16, 8, 4, 2, shifted windows in stages 0 and 1; for CPUs and tests."""
    return _simmim_swin(dict(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16),
                             window_size=4), kwargs)


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------

def _model_dict(state_dict):
    """The state_dict itself, or checkpoint['model'] of a whole official checkpoint file."""
    if "model" in state_dict and not torch.is_tensor(state_dict["model"]):
        return state_dict["model"]
    return state_dict


def from_official(state_dict):
    """An official SimMIM state_dict (pretrain `encoder.*` / `decoder.0.*`, or finetune) -> this
    project's names; a whole checkpoint file ({'model': ...}) is unwrapped, and a `module.`
    prefix (a DDP wrapper) removed.

    The names are the official ones here, so the mapping is the identity and NO key is dropped:
    the buffers `relative_position_index` (ViT shared / per-block, Swin per block) and the Swin
    `attn_mask` are persistent in this project's models as in the official ones, and their
    values are what the models compute themselves (a strict load checks every key; the tests
    check the values). Returns a new dict."""
    sd = _model_dict(state_dict)
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def to_official(state_dict):
    """This project's SimMIM / classifier state_dict -> the official names (the identity; the
    buffers are kept, as the official checkpoints hold them). Returns a new dict."""
    return dict(_model_dict(state_dict))


# ---------------------------------------------------------------------------------------------
# Pretrain -> finetune conversion (spec section 9)
# ---------------------------------------------------------------------------------------------

def _geometric_axis(src_size, dst_size):
    """Source coordinates of the geometric rule: src_size values symmetric around 0 whose spacing
    grows by q away from the centre, q found by bisection so that the outermost one is ~dst//2."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1 - q ** (src_size // 2)) / (1 - q) > dst_size // 2:
            right = q
        else:
            left = q
    dis = np.cumsum([q ** k for k in range(src_size // 2)])  # 1, 1+q, 1+q+q^2, ...
    return np.concatenate([-dis[::-1], [0.0], dis])


def _bspline_basis(knots, x, k=3):
    """B[i, j] = B_{j,k}(x_i), Cox-de Boor; x is clamped to the base interval, as FITPACK's
    evaluation does (points outside take the boundary value)."""
    t = np.asarray(knots, dtype=np.float64)
    x = np.clip(np.asarray(x, dtype=np.float64), t[k], t[-k - 1])
    B = ((t[:-1] <= x[:, None]) & (x[:, None] < t[1:])).astype(np.float64)  # (m, len(t)-1)
    last = np.nonzero(t[:-1] < t[1:])[0][-1]  # the right end belongs to the last interval
    B[x == t[-k - 1]] = 0.0
    B[x == t[-k - 1], last] = 1.0
    for d in range(1, k + 1):
        nxt = np.zeros((len(x), len(t) - 1 - d))
        for j in range(len(t) - 1 - d):
            if t[j + d] > t[j]:
                nxt[:, j] += (x - t[j]) / (t[j + d] - t[j]) * B[:, j]
            if t[j + d + 1] > t[j + 1]:
                nxt[:, j] += (t[j + d + 1] - x) / (t[j + d + 1] - t[j + 1]) * B[:, j + 1]
        B = nxt
    return B


def cubic_interpolation_matrix(x, xi):
    """A (len(xi), len(x)) with A @ y = the interpolating cubic spline of (x, y) at xi, float64.

    For n >= 4 points this is FITPACK's interpolating spline with k=3, s=0 (knots at the data
    points but the 2nd and the 2nd-to-last: the not-a-knot spline), evaluated with FITPACK's
    clamping to [x[0], x[-1]]. For n < 4 (FITPACK refuses) the polynomial of degree n-1."""
    x = np.asarray(x, dtype=np.float64)
    xi = np.clip(np.asarray(xi, dtype=np.float64), x[0], x[-1])
    n = len(x)
    if n < 4:
        V = np.vander(x, n, increasing=True)
        return np.vander(xi, n, increasing=True) @ np.linalg.inv(V)
    knots = np.concatenate([[x[0]] * 4, x[2:n - 2], [x[-1]] * 4])
    collocation = _bspline_basis(knots, x)  # (n, n)
    return np.linalg.solve(collocation.T, _bspline_basis(knots, xi).T).T


def resize_rel_pos_bias_table(table, dst_size, num_extra=0):
    """A relative position bias table (src_size^2 + num_extra, heads) -> (dst_size^2 + num_extra,
    heads) by the official geometric cubic rule (spec section 9): per head, the table as a
    (src_size x src_size) image (row = delta row) sampled at geometrically spaced coordinates is
    fitted by the bicubic interpolating spline (FITPACK kx = ky = 3, s = 0, what scipy's removed
    interp2d did; separable: A Z A^T) and evaluated at -t..t, t = dst_size // 2. The num_extra last
    rows (the ViT's cls entries) are kept as they are. float32 out, as the original."""
    rows, heads = table.shape
    src_size = int(round((rows - num_extra) ** 0.5))
    assert src_size ** 2 + num_extra == rows, f"table of {rows} rows is not a square + {num_extra}"
    if src_size == dst_size:
        return table.clone()
    x = _geometric_axis(src_size, dst_size)
    t = dst_size // 2
    A = cubic_interpolation_matrix(x, np.arange(-t, t + 0.1, 1.0))  # (dst, src)
    z = table[:src_size ** 2].detach().float().cpu().numpy().astype(np.float64)
    z = z.T.reshape(heads, src_size, src_size)  # (heads, src, src), row = delta row
    out = np.einsum("ia,hab,jb->hij", A, z, A).reshape(heads, -1).T  # (dst^2, heads)
    out = torch.from_numpy(out.astype(np.float32)).to(table.device)
    return torch.cat([out, table[src_size ** 2:].float()], dim=0)


def _square_grid(model):
    h, w = model.patch_embed.grid_size
    assert h == w, f"the finetune patch grid {h}x{w} is not square"
    return h


def _remap_vit(ckpt, model_state, grid):
    """BEiT ViT: the shared table copied into every block that has its own (quirk 10 fixed: a
    checkpoint without a shared table, e.g. a finetuned one, is fine), every index dropped (the
    model's own is used), every table resized to the finetune grid, cls rows kept."""
    shared = "rel_pos_bias.relative_position_bias_table"
    per_block = [k for k in model_state
                 if k.startswith("blocks.") and k.endswith("attn.relative_position_bias_table")]
    if shared in ckpt and per_block and shared not in model_state:
        print(f"Expanding the shared relative position bias table to {len(per_block)} blocks")
        table = ckpt.pop(shared)
        for k in per_block:
            ckpt[k] = table.clone()
    for k in [k for k in ckpt if "relative_position_index" in k]:
        del ckpt[k]
    for k in [k for k in ckpt if k.endswith("relative_position_bias_table") and k in model_state]:
        dst_rows = model_state[k].shape[0]
        num_extra = dst_rows - (2 * grid - 1) ** 2
        src_size = int(round((ckpt[k].shape[0] - num_extra) ** 0.5))
        if src_size != 2 * grid - 1:
            print(f"Resizing {k}: {src_size}x{src_size} -> {2 * grid - 1}x{2 * grid - 1} (+{num_extra} cls rows)")
            ckpt[k] = resize_rel_pos_bias_table(ckpt[k], 2 * grid - 1, num_extra)


def _remap_swin(ckpt, model_state):
    """Swin: tables resized to the model's window (not when the heads differ: left, reported);
    every relative_position_index / relative_coords_table / attn_mask dropped (the model's own)."""
    for k in [k for k in ckpt if "relative_position_bias_table" in k and k in model_state]:
        (src_rows, src_heads), (dst_rows, dst_heads) = ckpt[k].shape, model_state[k].shape
        if src_heads != dst_heads:
            print(f"Not resizing {k}: {src_heads} heads in the checkpoint, {dst_heads} in the model")
        elif src_rows != dst_rows:
            src_size, dst_size = int(round(src_rows ** 0.5)), int(round(dst_rows ** 0.5))
            print(f"Resizing {k}: {src_size}x{src_size} -> {dst_size}x{dst_size}")
            ckpt[k] = resize_rel_pos_bias_table(ckpt[k], dst_size)
    for k in [k for k in ckpt if any(s in k for s in ("relative_position_index", "relative_coords_table",
                                                        "attn_mask"))]:
        del ckpt[k]


def finetune_state_dict(checkpoint_model, model):
    """A SimMIM pretraining state_dict (or a whole checkpoint file's dict) -> the state_dict to
    load into the finetune classifier `model` (models_vit.beit_* or models_swin.swin_*), spec
    section 9 (utils.load_pretrained of the original):
    - `encoder.` keys kept with the prefix removed (the decoder goes);
    - ViT: the shared relative position bias table copied into every block's table;
    - tables resized by the geometric cubic rule when the window / patch grid differs;
    - the index and attn_mask buffers are the MODEL's own (recomputed for its size);
    - what the model does not have (mask_token; the ViT's final `norm` under mean pooling, which
      thus starts fresh as fc_norm; a head of another shape) is discarded, and printed.
    Keys of the model that stay out (head.*, fc_norm.*) keep their init: load with strict=False
    (they are printed too); every other key is present, with the checkpoint's shape."""
    ckpt = dict(from_official(checkpoint_model))
    if any(k.startswith("encoder.") for k in ckpt):
        dropped = sorted(k for k in ckpt if not k.startswith("encoder."))
        print(f"Dropping the non-encoder keys: {dropped}")
        ckpt = {k[len("encoder."):]: v for k, v in ckpt.items() if k.startswith("encoder.")}
    model_state = model.state_dict()
    if isinstance(model, models_swin.SwinTransformer):
        _remap_swin(ckpt, model_state)
    else:
        _remap_vit(ckpt, model_state, _square_grid(model))
    for k in ("head.weight", "head.bias"):
        if k in ckpt and k in model_state and ckpt[k].shape != model_state[k].shape:
            print(f"Discarding {k} of shape {tuple(ckpt[k].shape)} (the model's: {tuple(model_state[k].shape)})")
            del ckpt[k]
    discarded = sorted(k for k in ckpt if k not in model_state)
    print(f"Discarded checkpoint keys (not in the {type(model).__name__}): {discarded}")
    out = {k: v for k, v in ckpt.items() if k in model_state}
    for k, v in model_state.items():  # the model's own buffers (recomputed for its size)
        if k not in out and any(s in k for s in ("relative_position_index", "attn_mask")):
            out[k] = v
    kept = [k for k in model_state if k not in out]
    print(f"Not in the checkpoint (kept at their init): {kept}")
    return out
