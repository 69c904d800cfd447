"""MAE reconstructions: original | masked input | reconstruction | reconstruction + visible patches.

The grids that main_pretrain.py writes every --vis_freq epochs and that main_visualize.py draws
for any checkpoint holding the decoder.
"""
import os

import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid

GREY = 0.5  # pixel value (in [0, 1]) painted over the removed patches of the masked input


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
def reconstruction_grid(model, imgs, mask_ratio=0.75, noise=None,
                        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Reconstructions of `imgs` by a MaskedAutoencoderViT (not DDP / compiled wrapped).

    imgs: (N, C, H, W), normalised with mean/std; noise: optional (N, L) masking noise (fixed
    noise gives the same masks every call). Returns a uint8 tensor (C, N*H, 4*W): one row per
    image with the columns original | masked input (removed patches grey) | reconstruction |
    reconstruction with the visible patches pasted back from the original.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs = imgs.to(device).float()
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
    cells = denormalize(columns.flatten(0, 1), mean, std)  # (N*4, C, H, W)
    return make_grid(cells, nrow=4, padding=0).cpu()  # (C, N*H, 4*W)


def save_reconstructions(model, imgs, path, mask_ratio=0.75, noise=None, log_writer=None, step=None):
    """Write the reconstruction grid of `imgs` to the PNG `path` (folders created) and, with a
    TensorBoard SummaryWriter, as the image 'reconstructions' at `step`. Returns the grid."""
    grid = reconstruction_grid(model, imgs, mask_ratio, noise)  # (3, N*H, 4*W) uint8
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # (N*H, 4*W, 3) uint8
    if log_writer is not None:
        log_writer.add_image("reconstructions", grid, step)
    print(f"Reconstructions written to {path}")
    return grid
