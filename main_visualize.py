"""Reconstructions of a pretraining checkpoint: original | masked input | reconstruction |
reconstruction + visible patches, for any checkpoint that holds the decoder (this repo's
pretraining checkpoints, or the original release's mae_visualize_vit_*.pth):

    python main_visualize.py --checkpoint output_dir/checkpoint-399.pth --data_path DIR \
        --out grid.png [--model mae_vit_large_patch16] [--num_images 8] [--mask_ratio 0.75]

--data_path is an ImageFolder root (<class>/<image>) or a flat folder of images; the first
--num_images images (sorted by path) are shown, resized and centre-cropped to --input_size.
The model, input size, patch size and norm_pix_loss default to the checkpoint's own args.
"""
import argparse
import glob
import os

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from util.checkpoint import check_state_dict_compat, load_checkpoint
from util.datasets import build_eval_transform, load_and_transform
from util.models import build_pretrain_model
from util.pos_embed import interpolate_pos_embed
from util.visualize import save_reconstructions


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
    checkpoint = load_checkpoint(args.checkpoint, unsafe=args.unsafe_load)
    if "model" not in checkpoint:
        raise KeyError(f"checkpoint '{args.checkpoint}' has no 'model' entry (keys: {sorted(checkpoint)})")
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    fallbacks = dict(model=None, input_size=224, patch_size=None, norm_pix_loss=False)
    for name, fallback in fallbacks.items():
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, fallback))
    if args.model is None:
        raise ValueError(f"checkpoint '{args.checkpoint}' does not say which model it holds: pass --model")
    model = build_pretrain_model(args)
    state_dict = checkpoint["model"]
    check_has_decoder(model, state_dict, args.checkpoint)
    if state_dict.get("pos_embed", model.pos_embed).shape != model.pos_embed.shape:
        interpolate_pos_embed(model, state_dict)  # another --input_size than the checkpoint's
    check_state_dict_compat(model, state_dict)  # strict, with a readable error
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
