"""Reconstructions of a pretraining checkpoint: original | masked input | reconstruction |
reconstruction + visible patches, for any checkpoint that holds the decoder (this repo's
pretraining checkpoints, or the original release's mae_visualize_vit_*.pth):

    python main_visualize.py --checkpoint output_dir/checkpoint-399.pth --data_path DIR \
        [--out grid.png] [--num_images 8] [--mask_ratio 0.75]

--data_path is an ImageFolder root (<class>/<image>) or a flat folder of images; --num_images
images are picked round-robin over the folders holding them (one of each class, then a second
of each, ...), resized and centre-cropped to --input_size. The PNG goes beside the checkpoint
(<its folder>/reconstructions-<its name>.png) unless --out says otherwise.

The model, input size, patch size and norm_pix_loss default to the checkpoint's own args. A
checkpoint without args (the original's mae_visualize_vit_*.pth hold only 'model') gets its
model inferred from the state_dict's keys and shapes (infer_mae); what its weights cannot tell
(norm_pix_loss, the attention heads) takes the defaults said in one line, and the flags.
"""
import argparse
import glob
import math
import os
import sys

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

import models_mae
from util.args import HelpFormatter
from util.checkpoint import CorruptCheckpointError, UnsafeCheckpointError, check_state_dict_compat, load_checkpoint
from util.datasets import build_eval_transform, load_and_transform
from util.models import model_from_name
from util.pos_embed import interpolate_pos_embed
from util.visualize import round_robin_indices, save_reconstructions

MAE_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")  # a ViT encoder


def list_images(folder, n):
    """n image files under folder (class sub-folders or a flat folder), picked round-robin over
    the folders that hold them (sorted by path within each): a grid of several classes."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data_path {folder} is not a folder of images")
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if os.path.isfile(p) and has_file_allowed_extension(p, IMG_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    return [paths[i] for i in round_robin_indices([os.path.dirname(p) for p in paths], n)]


def load_images(paths, input_size):
    """Images at paths -> (N, 3, S, S) normalised tensors (resize + centre crop, no randomness)."""
    transform = build_eval_transform(input_size)
    return torch.stack([load_and_transform(p, transform) for p in paths])


def default_out(checkpoint):
    """<checkpoint's folder>/reconstructions-<checkpoint's name without .pth>.png; for a URL, that
    name in the current folder."""
    folder, name = os.path.split(os.fspath(checkpoint))
    if folder.startswith(("http://", "https://")):
        folder = ""
    return os.path.join(folder, f"reconstructions-{os.path.splitext(name)[0]}.png")


def num_blocks(state_dict, prefix):
    """Transformer blocks in state_dict under `prefix` ('blocks.' or 'decoder_blocks.'): the
    highest index N of its '<prefix>N.' keys + 1 (0 when there are none)."""
    indices = {key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)}
    return max((int(i) + 1 for i in indices if i.isdigit()), default=0)


def mae_factories():
    """{models_mae factory name: (embed_dim, num_heads, decoder_embed_dim, decoder_num_heads)},
    shorter names first (mae_vit_base_patch16 before its alias ..._dec512d8b); each read off its
    model built with one block per half on the meta device (no memory, no initialisation)."""
    layouts = {}
    for name in sorted((n for n in vars(models_mae) if n.startswith("mae_vit_")), key=lambda n: (len(n), n)):
        with torch.device("meta"):
            model = getattr(models_mae, name)(depth=1, decoder_depth=1)
        layouts[name] = (model.pos_embed.shape[-1], model.blocks[0].attn.num_heads,
                         model.decoder_embed.out_features, model.decoder_blocks[0].attn.num_heads)
    return layouts


def heads_of(width, head_dim):
    """width / head_dim attention heads where that divides, else 1 (any width divides into 1)."""
    return width // head_dim if width % head_dim == 0 else 1


def infer_mae(state_dict):
    """The MaskedAutoencoderViT that a state_dict holds, from its keys and shapes, or None when
    it holds none (keys of MAE_KEYS missing, a non-square patch grid). Returns (args, layout):
    args the flags it implies (model: the models_mae factory of the same encoder width, else
    any; input_size, patch_size, num_heads, decoder_num_heads), layout the factory overrides
    (embed_dim, depth, mlp_ratio, and decoder_embed_dim, decoder_depth when it has a decoder).
    Heads are not in the weights: those of the factory of the same width, else 64 channels a head
    (encoder, as ViT) and 32 (decoder, as MAE's 512-wide, 16-head one), else 1."""
    if not all(key in state_dict for key in MAE_KEYS) or state_dict["patch_embed.proj.weight"].ndim != 4:
        return None
    embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape  # (D, C, p, p)
    side = math.isqrt(state_dict["pos_embed"].shape[1] - 1)  # pos_embed (1, 1 + L, D), L = side^2
    if side * side != state_dict["pos_embed"].shape[1] - 1:
        return None
    layout = dict(embed_dim=embed_dim, depth=num_blocks(state_dict, "blocks."),
                  mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim)  # fc1 (D*r, D)
    if "decoder_embed.weight" in state_dict:  # (Dd, D); absent: check_has_decoder says so
        layout.update(decoder_embed_dim=state_dict["decoder_embed.weight"].shape[0],
                      decoder_depth=num_blocks(state_dict, "decoder_blocks."))
    factories = mae_factories()
    decoder_dim = layout.get("decoder_embed_dim", 512)
    name = next((n for n, f in factories.items() if f[0] == embed_dim), next(iter(factories)))
    num_heads = next((f[1] for f in factories.values() if f[0] == embed_dim), heads_of(embed_dim, 64))
    decoder_heads = next((f[3] for f in factories.values() if f[2] == decoder_dim), heads_of(decoder_dim, 32))
    args = dict(model=name, input_size=side * patch_size, patch_size=patch_size, num_heads=num_heads,
                decoder_num_heads=decoder_heads)
    return args, layout


def check_has_decoder(model, state_dict, path):
    """Encoder-only checkpoints (e.g. mae_pretrain_vit_*.pth) cannot reconstruct anything."""
    decoder_keys = [k for k in model.state_dict() if k.startswith("decoder") or k == "mask_token"]
    if not any(k in state_dict for k in decoder_keys):
        raise ValueError(
            f"checkpoint '{path}' holds no decoder weights (none of {len(decoder_keys)} decoder keys, "
            f"e.g. {decoder_keys[0]}): it is an encoder-only checkpoint (like the released "
            "mae_pretrain_vit_*.pth). Reconstructions need a checkpoint with the decoder: one written "
            "by main_pretrain.py, or the release's mae_visualize_vit_*.pth.")


def checkpoint_args(checkpoint, args):
    """(saved, layout): the flags the checkpoint implies and the factory overrides of its layout.
    Its own args when it has them; else (the original's mae_visualize_vit_*.pth) what infer_mae
    reads off its weights, only the input and patch size of it when --model names the model.
    A SimMIM reader would go here beside infer_mae."""
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    if saved.get("model") is not None:
        return saved, {}
    saved, layout = infer_mae(checkpoint["model"]) or ({}, {})
    if args.model is not None:  # the named factory's own layout and heads
        return {k: v for k, v in saved.items() if k in ("input_size", "patch_size")}, {}
    if not layout:
        keys = list(checkpoint["model"])
        raise ValueError(f"checkpoint '{args.checkpoint}' has no args and its weights are not a MAE's (keys "
                         f"{', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}; a MAE has "
                         f"{', '.join(MAE_KEYS)}): give a MAE pretraining checkpoint, or --model")
    return saved, layout


def inferred_line(args, layout):
    """The one line that says what a checkpoint without args was taken to hold."""
    return (f"No args in '{args.checkpoint}', inferred from its weights: {args.input_size} px, patch "
            f"{args.patch_size}, encoder {layout['embed_dim']} wide x {layout['depth']} blocks x {args.num_heads} "
            f"heads, decoder {layout.get('decoder_embed_dim', '-')} x {layout.get('decoder_depth', '-')} x "
            f"{args.decoder_num_heads} heads (models_mae.{args.model} with these overrides), norm_pix_loss "
            f"{args.norm_pix_loss}; heads and norm_pix_loss are not in the weights (--num_heads, "
            "--decoder_num_heads, --norm_pix_loss)")


def load_mae(args):
    """MaskedAutoencoderViT from --checkpoint, built from --model etc., where flags left unset
    take the checkpoint's own args, or what its weights imply when it has none. Loaded strictly."""
    checkpoint = load_checkpoint(args.checkpoint, unsafe=args.unsafe_load)
    if "model" not in checkpoint:
        raise ValueError(f"checkpoint '{args.checkpoint}' has no 'model' entry (keys: {sorted(checkpoint)})")
    saved, layout = checkpoint_args(checkpoint, args)
    fallbacks = dict(model=None, input_size=224, patch_size=None, norm_pix_loss=False, num_heads=None,
                     decoder_num_heads=None)
    for name, fallback in fallbacks.items():
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, fallback))
    model = model_from_name(models_mae, args.model, "mae_vit_", img_size=args.input_size,
                            patch_size=args.patch_size, norm_pix_loss=args.norm_pix_loss,
                            num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads, **layout)
    state_dict = checkpoint["model"]
    check_has_decoder(model, state_dict, args.checkpoint)
    if layout:
        print(inferred_line(args, layout))
    if state_dict.get("pos_embed", model.pos_embed).shape != model.pos_embed.shape:
        interpolate_pos_embed(model, state_dict)  # another --input_size than the checkpoint's
    check_state_dict_compat(model, state_dict)  # strict, with a readable error
    model.load_state_dict(state_dict, strict=True)
    print(f"Loaded {args.model} (input {args.input_size}, norm_pix_loss {args.norm_pix_loss}) "
          f"from {args.checkpoint}")
    return model


def get_args_parser():
    parser = argparse.ArgumentParser("MAE reconstructions of a checkpoint", add_help=True, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint path or URL holding 'model'")
    parser.add_argument("--data_path", required=True, help="ImageFolder root or flat folder of images")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: <checkpoint's folder>/reconstructions-<checkpoint name>.png)")
    parser.add_argument("--model", default=None,
                        help="models_mae model name (default: the checkpoint's, else inferred from its weights)")
    parser.add_argument("--input_size", default=None, type=int,
                        help="default: the checkpoint's, else its position embeddings'")
    parser.add_argument("--patch_size", default=None, type=int, help="default: the checkpoint's / model's")
    parser.add_argument("--num_heads", default=None, type=int,
                        help="encoder attention heads (default: the model's; for a checkpoint without args, "
                             "the factory's of the same width, else width / 64)")
    parser.add_argument("--decoder_num_heads", default=None, type=int,
                        help="decoder attention heads (default: as --num_heads, else width / 32)")
    parser.add_argument("--norm_pix_loss", action="store_true", default=None,
                        help="the model was trained with normalised pixel targets "
                             "(default: the checkpoint's, else off)")
    parser.add_argument("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss")
    parser.add_argument("--num_images", default=8, type=int, help="rows of the grid (default: %(default)s)")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="default: %(default)s")
    parser.add_argument("--seed", default=0, type=int, help="seed of the masking noise (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: %(default)s")
    parser.add_argument("--unsafe_load", action="store_true",
                        help="load with weights_only=False (runs code in the file: trusted files only)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model = load_mae(args).to(args.device)
    imgs = load_images(list_images(args.data_path, args.num_images), args.input_size)  # (N, 3, S, S)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=generator)  # (N, L)
    return save_reconstructions(model, imgs, args.out or default_out(args.checkpoint), args.mask_ratio, noise)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError) as e:
        sys.stderr.write(f"ERROR: {e}\n")  # a checkpoint or folder it cannot use: the reason, no traceback
        sys.exit(1)
