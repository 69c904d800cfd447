"""MAE reconstructions: original | masked input | reconstruction | reconstruction + visible patches.

Used by main_pretrain.py every --vis_freq epochs, and as a command for any checkpoint that
holds the decoder (this repo's checkpoints, or the original release's mae_visualize_vit_*.pth):

    python -m util.visualize --checkpoint output_dir/checkpoint-399.pth --data_path DIR \
        --out grid.png [--model mae_vit_large_patch16] [--num_images 8] [--mask_ratio 0.75]

--data_path is an ImageFolder root (<class>/<image>) or a flat folder of images; the first
--num_images images (sorted by path) are shown, resized and centre-cropped to --input_size.
"""
import argparse
import glob
import os

import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
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


# ---------------------------------------------------------------------------------------------
# Command line: reconstructions of any checkpoint that holds the decoder
# ---------------------------------------------------------------------------------------------

def list_images(folder, n):
    """The first n image files under folder (sorted; class sub-folders or a flat folder)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data_path {folder} is not a folder of images")
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if os.path.isfile(p) and has_file_allowed_extension(p, IMG_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    return paths[:n]


def load_images(paths, input_size):
    """Images at paths -> (N, 3, S, S) normalised tensors (resize + centre crop, no randomness)."""
    from util.datasets import build_eval_transform, load_and_transform
    transform = build_eval_transform(input_size)
    return torch.stack([load_and_transform(p, transform) for p in paths])


def check_has_decoder(model, state_dict, path):
    """Encoder-only checkpoints (e.g. mae_pretrain_vit_*.pth) cannot reconstruct anything."""
    decoder_keys = [k for k in model.state_dict() if k.startswith("decoder") or k == "mask_token"]
    if not any(k in state_dict for k in decoder_keys):
        raise ValueError(
            f"checkpoint '{path}' holds no decoder weights (none of {len(decoder_keys)} decoder keys, "
            f"e.g. {decoder_keys[0]}): it is an encoder-only checkpoint (like the released "
            "mae_pretrain_vit_*.pth). Reconstructions need a checkpoint with the decoder: one written "
            "by main_pretrain.py, or the release's mae_visualize_vit_*.pth.")


def load_mae(args):
    """MaskedAutoencoderViT from --checkpoint, built from --model etc., where flags left unset
    take the checkpoint's own args (when it has them). Loaded strictly."""
    import util.misc as misc
    from main_pretrain import build_model
    from util.pos_embed import interpolate_pos_embed

    checkpoint = misc.load_checkpoint(args.checkpoint, unsafe=args.unsafe_load)
    if "model" not in checkpoint:
        raise KeyError(f"checkpoint '{args.checkpoint}' has no 'model' entry (keys: {sorted(checkpoint)})")
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    fallbacks = dict(model=None, input_size=224, patch_size=None, norm_pix_loss=False)
    for name, fallback in fallbacks.items():
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, fallback))
    if args.model is None:
        raise ValueError(f"checkpoint '{args.checkpoint}' does not say which model it holds: pass --model")
    model = build_model(args)
    state_dict = checkpoint["model"]
    check_has_decoder(model, state_dict, args.checkpoint)
    if state_dict.get("pos_embed", model.pos_embed).shape != model.pos_embed.shape:
        interpolate_pos_embed(model, state_dict)  # another --input_size than the checkpoint's
    misc.check_state_dict_compat(model, state_dict)  # strict, with a readable error
    model.load_state_dict(state_dict, strict=True)
    print(f"Loaded {args.model} (input {args.input_size}, norm_pix_loss {args.norm_pix_loss}) "
          f"from {args.checkpoint}")
    return model


def get_args_parser():
    parser = argparse.ArgumentParser("MAE reconstructions of a checkpoint", add_help=True)
    parser.add_argument("--checkpoint", required=True, help="checkpoint path or URL holding 'model'")
    parser.add_argument("--data_path", required=True, help="ImageFolder root or flat folder of images")
    parser.add_argument("--out", default="reconstructions.png", help="output PNG")
    parser.add_argument("--model", default=None, help="model name (default: the checkpoint's)")
    parser.add_argument("--input_size", default=None, type=int, help="default: the checkpoint's, else 224")
    parser.add_argument("--patch_size", default=None, type=int, help="default: the checkpoint's / model's")
    parser.add_argument("--norm_pix_loss", action="store_true", default=None,
                        help="the model was trained with normalised pixel targets "
                             "(default: the checkpoint's)")
    parser.add_argument("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss")
    parser.add_argument("--num_images", default=8, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--seed", default=0, type=int, help="seed of the masking noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--unsafe_load", action="store_true",
                        help="load with weights_only=False (runs code in the file: trusted files only)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model = load_mae(args).to(args.device)
    imgs = load_images(list_images(args.data_path, args.num_images), args.input_size)  # (N, 3, S, S)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=generator)  # (N, L)
    return save_reconstructions(model, imgs, args.out, args.mask_ratio, noise)


if __name__ == "__main__":
    main()
