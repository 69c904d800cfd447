"""Fixed 2D sin-cos position embeddings (MAE Sec. A.1) and their resizing for transfer.

Numbers match the original MAE release: the FIRST half of the channels encodes a patch's
column (w) index, the second half its row (h) index, computed in float64.
"""
import numpy as np
from timm.layers import resample_abs_pos_embed, resample_patch_embed


def _as_hw(grid_size):
    """int or (h, w) -> (h, w)."""
    if isinstance(grid_size, int):
        return grid_size, grid_size
    return tuple(grid_size)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """embed_dim: D; grid_size: G or (Gh, Gw).

    Returns a float64 numpy array (Gh*Gw, D), or (1 + Gh*Gw, D) with a leading zero row for
    the cls token. Rows follow the patches in row-major order.
    """
    grid_h, grid_w = _as_hw(grid_size)
    # meshgrid(w, h): the first plane holds each patch's column index, the second its row.
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    """grid: (2, 1, Gh, Gw) with column indices in grid[0], row indices in grid[1].
    Returns (Gh*Gw, D): [1D embedding of grid[0] (D/2) | 1D embedding of grid[1] (D/2)]."""
    assert embed_dim % 2 == 0, f"embed_dim must be even, got {embed_dim}"
    emb_first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (Gh*Gw, D/2)
    emb_second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (Gh*Gw, D/2)
    return np.concatenate([emb_first, emb_second], axis=1)  # (Gh*Gw, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: D' channels; pos: positions of any shape (M values in all).
    Returns (M, D'): [sin(pos * omega) | cos(pos * omega)], omega_k = 1 / 10000^(2k/D')."""
    assert embed_dim % 2 == 0, f"embed_dim must be even, got {embed_dim}"
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D'/2,)
    pos = np.asarray(pos, dtype=np.float64).reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D'/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D')


def _resize_grid_embed(pos_embed, num_extra_tokens, new_hw, name):
    """pos_embed: (1, extra + Gh*Gw, D) from a checkpoint, square grid; resize the grid part
    to new_hw with bicubic interpolation, keeping the extra (cls) tokens as they are."""
    num_old = pos_embed.shape[-2] - num_extra_tokens
    old_size = int(round(num_old**0.5))
    if old_size * old_size != num_old:
        raise ValueError(
            f"{name}: the checkpoint holds {num_old} grid positions, not a square grid; "
            "cannot tell its height and width"
        )
    if (old_size, old_size) == tuple(new_hw):
        return pos_embed
    print(f"Position interpolate {name} from {old_size}x{old_size} to {new_hw[0]}x{new_hw[1]}")
    # timm's resize is the same computation as the original MAE code: bicubic with
    # align_corners=False (F.interpolate's default) on the (1, D, G, G) grid in float32, cast
    # back to the table's dtype, extra tokens put back in front unchanged. With antialias off it
    # gives bit-identical tables (tests/test_pos_embed.py checks fp32 and fp16, up and down).
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_hw),
        old_size=[old_size, old_size],
        num_prefix_tokens=num_extra_tokens,
        interpolation="bicubic",
        antialias=False,
    )  # (1, extra + Gh'*Gw', D)


def interpolate_pos_embed(model, checkpoint_model):
    """In place: resize checkpoint_model's position embeddings to model's patch grid.

    Handles `pos_embed` (finetune/linprobe and pretrain models) and `decoder_pos_embed`
    (pretrain models). The cls token row is kept; the grid is resized bicubically, so a model
    pretrained at 224 px (14x14 patches) loads into one built for 384 px (24x24).
    """
    new_hw = tuple(model.patch_embed.grid_size)
    num_patches = model.patch_embed.num_patches
    for name in ("pos_embed", "decoder_pos_embed"):
        if name not in checkpoint_model or not hasattr(model, name):
            continue
        num_extra_tokens = getattr(model, name).shape[-2] - num_patches
        checkpoint_model[name] = _resize_grid_embed(
            checkpoint_model[name], num_extra_tokens, new_hw, name
        )


def interpolate_patch_embed(model, checkpoint_model):
    """In place: resample `patch_embed.proj.weight` when the checkpoint's patch size differs
    from the model's (FlexiViT-style pseudo-inverse resize, as timm provides it)."""
    key = "patch_embed.proj.weight"
    if key not in checkpoint_model:
        return
    new_size = tuple(model.patch_embed.proj.weight.shape[-2:])
    old_size = tuple(checkpoint_model[key].shape[-2:])
    if old_size != new_size:
        print(f"Patch embedding resample from {old_size} to {new_size}")
        checkpoint_model[key] = resample_patch_embed(checkpoint_model[key], list(new_size))
