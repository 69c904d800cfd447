"""MAE and SimMIM reconstructions: original | masked input | reconstruction | reconstruction +
visible patches.

The grids that main_pretrain.py writes every --vis_freq epochs and that main_visualize.py draws
for any checkpoint holding the decoder: a title row naming the columns, one row per image, tiles
upscaled to at least MIN_TILE px so that a 32-112 px image is readable, images picked round-robin
over the classes so that a grid shows several of them.
"""
import itertools
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import models_simmim
from util.masking import MaskGenerator

GREY = 0.5  # pixel value (in [0, 1]) painted over the removed patches of the masked input
COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
MIN_TILE = 96  # px: tiles are upscaled by the smallest integer factor that reaches this
GAP = 2  # px of background around and between the tiles
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def round_robin_indices(labels, n):
    """Indices of n items picked round-robin over the classes in `labels` (one label per item, e.g.
    an ImageFolder's targets): the first item of each class (classes in order of first appearance),
    then the second of each, and so on; all items when n >= len(labels). Deterministic and without
    any RNG, so the training RNG stream is untouched; the first n files of a sorted folder would
    all be of one class."""
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    picked = []
    for rank in itertools.count():
        row = [members[rank] for members in by_class.values() if rank < len(members)]
        if not row or len(picked) >= n:
            break
        picked += row
    return picked[:n]


def denormalize(imgs, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """(N, C, H, W) normalised images -> uint8 (N, C, H, W), clamped to [0, 255]."""
    mean = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    pixels = (imgs.float() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8)


def unnormalize_pred(pred, target):
    """Undo norm_pix_loss: pred (N, L, p*p*C) was regressed on (t - mean) / sqrt(var + 1e-6) of
    each target patch t (N, L, p*p*C), var unbiased; map it back to pixel space with each
    patch's own mean and variance (exactly the inverse of the loss's normalisation)."""
    mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
    var = target.var(dim=-1, keepdim=True)  # (N, L, 1), unbiased as in forward_loss
    return pred * (var + 1.e-6) ** .5 + mean


@torch.no_grad()
def reconstruction_tiles(model, imgs, mask_ratio=0.75, noise=None,
                         mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Reconstructions of `imgs` by a MaskedAutoencoderViT, or a SimMIM (not DDP / compiled wrapped).

    imgs: (N, C, H, W), normalised with mean/std; noise: optional (N, L) masking noise (fixed
    noise gives the same masks every call). For a SimMIM, mask_ratio is the model's second input
    instead, as in training: the mask (N, H/p, W/p), 1 = masked (noise unused; simmim_tiles).
    Returns uint8 tiles (N, 4, C, H, W), per image the columns original | masked input (removed
    patches grey) | reconstruction | reconstruction with the visible patches pasted back from the
    original.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs = imgs.to(device).float()
    if isinstance(mask_ratio, torch.Tensor):  # a SimMIM and its mask
        _, recon, mask = model(imgs, mask_ratio.to(device))  # (N, C, H, W), (N, H/p, W/p)
        model.train(was_training)
        return simmim_tiles(imgs, recon.float(), mask, model.patch_size, mean, std)
    noise = noise.to(device) if noise is not None else None
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # (N, L, p*p*C), (N, L)
    model.train(was_training)

    target = model.patchify(imgs)  # (N, L, p*p*C)
    pred = pred.float()
    if model.norm_pix_loss:
        pred = unnormalize_pred(pred, target)
    removed = mask.bool().unsqueeze(-1).expand_as(target)  # (N, L, p*p*C)
    grid_size = model.patch_embed.grid_size  # (H/p, W/p)
    grey = (GREY - torch.tensor(mean, device=device)) / torch.tensor(std, device=device)  # (C,)
    grey = grey.repeat(target.shape[-1] // len(mean))  # (p*p*C,), channel last as in patchify

    masked = model.unpatchify(torch.where(removed, grey, target), grid_size)  # (N, C, H, W)
    recon = model.unpatchify(pred, grid_size)
    pasted = model.unpatchify(torch.where(removed, pred, target), grid_size)
    columns = torch.stack([imgs, masked, recon, pasted], dim=1)  # (N, 4, C, H, W)
    return denormalize(columns.flatten(0, 1), mean, std).unflatten(0, columns.shape[:2]).cpu()


def fixed_masking(model, n, seed, mask_ratio, mask_patch_size=32):
    """(masking, noise) of reconstruction_tiles for n images, a function of seed alone (the training
    RNGs are not touched), so that a grid shows the same masks at every epoch and on every call.
    MAE: (mask_ratio, noise (n, L) from a torch Generator seeded with seed); SimMIM: (masks (n, H/p,
    W/p) of util.masking.MaskGenerator's blocks of mask_patch_size px, from a numpy Generator seeded
    with seed, None)."""
    if isinstance(model, models_simmim.SimMIM):
        generator = MaskGenerator(model.encoder.patch_embed.img_size, mask_patch_size, model.patch_size, mask_ratio)
        rng = np.random.default_rng(seed)
        return torch.from_numpy(np.stack([generator(rng) for _ in range(n)])), None
    generator = torch.Generator().manual_seed(seed)
    return mask_ratio, torch.rand(n, model.patch_embed.num_patches, generator=generator)


def simmim_tiles(imgs, recon, mask, patch_size, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """The four columns of reconstruction_tiles for a SimMIM, whose reconstruction is already an
    image: imgs and recon (N, C, H, W) normalised, mask (N, H/p, W/p) at the encoder's patch grid
    (1 = masked). Returns uint8 tiles (N, 4, C, H, W)."""
    removed = mask.bool().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)  # (N, H, W)
    removed = removed.unsqueeze(1)  # (N, 1, H, W)
    grey = (GREY - torch.tensor(mean, device=imgs.device)) / torch.tensor(std, device=imgs.device)  # (C,)
    grey = grey.view(1, -1, 1, 1)
    masked = torch.where(removed, grey, imgs)  # (N, C, H, W)
    pasted = torch.where(removed, recon, imgs)
    columns = torch.stack([imgs, masked, recon, pasted], dim=1)  # (N, 4, C, H, W)
    return denormalize(columns.flatten(0, 1), mean, std).unflatten(0, columns.shape[:2]).cpu()


def upscale_factor(height, width):
    """The smallest integer factor that makes a height x width tile at least MIN_TILE px on its
    short side (1 for tiles already that large): an integer keeps every patch a square block."""
    return max(1, math.ceil(MIN_TILE / min(height, width)))


def wrap(text, fits):
    """Greedy word wrap: the lines of `text` for which fits(line) holds (a word too long for a
    line gets one of its own)."""
    lines = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def draw_grid(tiles, titles=COLUMNS):
    """Tiles (N, K, 3, H, W) uint8 -> a readable grid (3, H', W') uint8: a title row naming the K
    columns (PIL's default font, wrapped to the tile width), then one row per image, every tile
    upscaled by upscale_factor with nearest neighbour (the patch grid stays sharp), GAP px of
    background around and between the tiles."""
    n, k, _, h, w = tiles.shape
    scale = upscale_factor(h, w)
    tile_h, tile_w = h * scale, w * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [wrap(title, lambda s: measure.textlength(s, font=font) <= tile_w) for title in titles]
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 2  # px per text line
    title_h = 2 * GAP + line_h * max(map(len, lines))

    canvas = Image.new("RGB", (GAP + k * (tile_w + GAP), title_h + n * (tile_h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for col, column_lines in enumerate(lines):
        left = GAP + col * (tile_w + GAP)
        for i, line in enumerate(column_lines):  # centred over the column
            x = left + (tile_w - draw.textlength(line, font=font)) / 2
            draw.text((x, GAP + i * line_h), line, fill=INK, font=font)
    big = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)  # (N, K, 3, h*s, w*s)
    for row, col in itertools.product(range(n), range(k)):
        tile = Image.fromarray(big[row, col].permute(1, 2, 0).numpy())  # (h*s, w*s, 3)
        canvas.paste(tile, (GAP + col * (tile_w + GAP), title_h + row * (tile_h + GAP)))
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()  # (3, H', W')


def reconstruction_grid(model, imgs, mask_ratio=0.75, noise=None,
                        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """The readable grid (3, H', W') uint8 of reconstruction_tiles(model, imgs, ...): see draw_grid."""
    return draw_grid(reconstruction_tiles(model, imgs, mask_ratio, noise, mean, std))


def save_reconstructions(model, imgs, path, mask_ratio=0.75, noise=None, log_writer=None, step=None):
    """Write the reconstruction grid of `imgs` to the PNG `path` (folders created) and, with a
    TensorBoard SummaryWriter, as the image 'reconstructions' at `step`. Returns the grid."""
    grid = reconstruction_grid(model, imgs, mask_ratio, noise)  # (3, H', W') uint8
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # (H', W', 3) uint8
    if log_writer is not None:
        log_writer.add_image("reconstructions", grid, step)
    print(f"Reconstructions written to {path}")
    return grid
