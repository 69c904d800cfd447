"""Reconstructions of a MAE or SimMIM pretraining checkpoint: original | masked input |
reconstruction | reconstruction + visible patches, for any checkpoint that holds the decoder (this
repo's pretraining checkpoints, the original MAE release's mae_visualize_vit_*.pth, the official
SimMIM pretraining checkpoints):

    python main_visualize.py --checkpoint output_dir/checkpoint-399.pth --data_path DIR \
        [--out grid.png] [--num_images 8] [--mask_ratio R] [--mask_patch_size 32]

--data_path is an ImageFolder root (<class>/<image>) or a flat folder of images; --num_images
images are picked round-robin over the folders holding them (one of each class, then a second
of each, ...), resized and centre-cropped to --input_size. The PNG goes beside the checkpoint
(<its folder>/reconstructions-<its name>.png) unless --out says otherwise.

The model, input size, patch size and norm_pix_loss default to the checkpoint's own args. A
checkpoint without args (the original's mae_visualize_vit_*.pth hold only 'model') gets its
model inferred from the state_dict's keys and shapes (infer_mae); what its weights cannot tell
(norm_pix_loss, the attention heads) takes the defaults said in one line, and the flags.

SimMIM (--model simmim_*, or a checkpoint of one): the same grid, the masks drawn as in
pretraining, blocks of --mask_patch_size px (default the checkpoint's, else 32) by
util.masking.MaskGenerator with a numpy Generator seeded with --seed, so that the same images and
seed give the same grid (and the masks of the pretraining grids: util.visualize.fixed_masking).
An official checkpoint ({'model': {encoder.*, decoder.0.*}}, no args) is taken to be the first
models_simmim.simmim_* factory (in name order) whose model at its default size has its keys and
shapes (infer_simmim). --mask_ratio defaults to the checkpoint's, else 0.75 (MAE) or 0.6 (SimMIM).
"""
import argparse
import functools
import glob
import math
import os
import sys

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

import models_mae
import models_simmim
from util.args import HelpFormatter
from util.checkpoint import CorruptCheckpointError, UnsafeCheckpointError, check_state_dict_compat, load_checkpoint
from util.datasets import build_eval_transform, load_and_transform
from util.models import SIMMIM_PREFIX, is_simmim, model_from_name
from util.pos_embed import interpolate_pos_embed
from util.visualize import fixed_masking, round_robin_indices, save_reconstructions

MAE_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")  # a ViT encoder
SIMMIM_KEYS = ("encoder.patch_embed.proj.weight", "decoder.0.weight")  # the official SimMIM layout


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


def shapes_of(state_dict):
    """{key: shape} of a state_dict's entries but the decoder's (`decoder.*`): what tells a
    SimMIM's encoder apart (check_has_decoder judges the decoder)."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith("decoder.")}


@functools.cache
def simmim_layout(name, blocks=True):
    """shapes_of the state_dict of models_simmim.<name> at its default size (blocks=False: built
    without blocks, its other entries only), read off the model built on the meta device: shapes
    only, no memory, no initialisation (cached: a whole Swin-B takes a second or more)."""
    no_blocks = {} if blocks else {"depths": (0, 0, 0, 0)} if "_swin_" in name else {"depth": 0}
    with torch.device("meta"):
        return shapes_of(getattr(models_simmim, name)(**no_blocks).state_dict())


def infer_simmim(state_dict):
    """The name of the first models_simmim.simmim_* factory (in name order) whose model at its
    default size has the keys and shapes of from_official(state_dict) (the decoder aside, so that
    an encoder-only file gets check_has_decoder's error), or None. Only the factories whose
    entries outside the blocks (patch embedding, norm, ...) match are built whole."""
    shapes = shapes_of(models_simmim.from_official(state_dict))
    if not any(k.startswith("encoder.") for k in shapes):  # a MAE's or other weights: no build
        return None

    def matches(name):
        stub = simmim_layout(name, blocks=False).items()
        return stub <= shapes.items() and simmim_layout(name) == shapes
    return next((n for n in sorted(vars(models_simmim)) if n.startswith(SIMMIM_PREFIX) and matches(n)), None)


def check_has_decoder(model, state_dict, path):
    """Encoder-only checkpoints (e.g. mae_pretrain_vit_*.pth, a SimMIM's encoder) cannot
    reconstruct anything."""
    decoder_keys = [k for k in model.state_dict() if k.startswith("decoder") or k == "mask_token"]
    if not any(k in state_dict for k in decoder_keys):
        raise ValueError(
            f"checkpoint '{path}' holds no decoder weights (none of {len(decoder_keys)} decoder keys, "
            f"e.g. {decoder_keys[0]}): it is an encoder-only checkpoint (like the released "
            "mae_pretrain_vit_*.pth). Reconstructions need a checkpoint with the decoder: one written "
            "by main_pretrain.py, the MAE release's mae_visualize_vit_*.pth or an official SimMIM "
            "pretraining checkpoint.")


def checkpoint_args(checkpoint, args):
    """(saved, layout): the flags the checkpoint implies and the factory overrides of its layout.
    Its own args when it has them; else (the original's mae_visualize_vit_*.pth) what infer_mae
    reads off its weights, only the input and patch size of it when --model names the model.
    (A SimMIM's: load_simmim.)"""
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    if saved.get("model") is not None:
        return saved, {}
    saved, layout = infer_mae(checkpoint["model"]) or ({}, {})
    if args.model is not None:  # the named factory's own layout and heads
        return {k: v for k, v in saved.items() if k in ("input_size", "patch_size")}, {}
    if not layout:
        keys = list(checkpoint["model"])
        raise ValueError(f"checkpoint '{args.checkpoint}' has no args and its weights are not a MAE's or a "
                         f"SimMIM's (keys {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}; a MAE has "
                         f"{', '.join(MAE_KEYS)}; a SimMIM has {', '.join(SIMMIM_KEYS)}, the keys and shapes "
                         "of a models_simmim factory at its default size): give a MAE or SimMIM pretraining "
                         "checkpoint, or --model")
    return saved, layout


def inferred_line(args, layout):
    """The one line that says what a checkpoint without args was taken to hold."""
    return (f"No args in '{args.checkpoint}', inferred from its weights: {args.input_size} px, patch "
            f"{args.patch_size}, encoder {layout['embed_dim']} wide x {layout['depth']} blocks x {args.num_heads} "
            f"heads, decoder {layout.get('decoder_embed_dim', '-')} x {layout.get('decoder_depth', '-')} x "
            f"{args.decoder_num_heads} heads (models_mae.{args.model} with these overrides), norm_pix_loss "
            f"{args.norm_pix_loss}; heads and norm_pix_loss are not in the weights (--num_heads, "
            "--decoder_num_heads, --norm_pix_loss)")


def load_model(args):
    """The pretraining model of --checkpoint: a SimMIM (load_simmim) when --model, else the
    checkpoint's args, else its weights (infer_simmim) name one; else a MAE (load_mae). A
    checkpoint whose args name a classifier (finetuning, linear probing) is refused: no decoder."""
    checkpoint = load_checkpoint(args.checkpoint, unsafe=args.unsafe_load)
    if "model" not in checkpoint:
        raise ValueError(f"checkpoint '{args.checkpoint}' has no 'model' entry (keys: {sorted(checkpoint)})")
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    name = args.model or saved.get("model") or infer_simmim(checkpoint["model"])
    if args.model is None and name is not None and not name.startswith(("mae_vit_", SIMMIM_PREFIX)):
        raise ValueError(f"checkpoint '{args.checkpoint}' holds a {name} classifier (finetuning or linear "
                         "probing) and no decoder: reconstructions need a pretraining checkpoint (a MAE's "
                         "mae_vit_* or a SimMIM's simmim_*)")
    if name is not None and is_simmim(name):
        return load_simmim(args, checkpoint, saved, name)
    return load_mae(args, checkpoint)


def load_simmim(args, checkpoint, saved, name):
    """models_simmim.<name> from the checkpoint (official names mapped by from_official) at
    --input_size, else the checkpoint's, else the factory's own size; --mask_patch_size and
    --mask_ratio left unset take the checkpoint's, else 32 and 0.6. Loaded strictly."""
    inferred = args.model is None and saved.get("model") is None  # by infer_simmim
    args.model = name
    take_defaults(args, saved, dict(input_size=None, patch_size=None, mask_patch_size=32, mask_ratio=0.6))
    model = model_from_name(models_simmim, name, SIMMIM_PREFIX, img_size=args.input_size,
                            patch_size=args.patch_size)
    args.input_size, args.patch_size = model.encoder.patch_embed.img_size[0], model.patch_size
    state_dict = models_simmim.from_official(checkpoint["model"])
    check_has_decoder(model, state_dict, args.checkpoint)
    if inferred:
        print(f"No args in '{args.checkpoint}', inferred from its weights: models_simmim.{name} at "
              f"{args.input_size} px, patch {args.patch_size} (the first simmim_* factory whose keys and shapes "
              f"at its default size are the checkpoint's); masks of {args.mask_patch_size} px blocks, ratio "
              f"{args.mask_ratio}: not in the weights (--mask_patch_size, --mask_ratio)")
    return load_strictly(model, state_dict, f"{name} (input {args.input_size}, masks of {args.mask_patch_size} px "
                         f"blocks, ratio {args.mask_ratio}) from {args.checkpoint}")


def load_mae(args, checkpoint):
    """MaskedAutoencoderViT from the checkpoint, built from --model etc., where flags left unset
    take the checkpoint's own args, or what its weights imply when it has none. Loaded strictly."""
    saved, layout = checkpoint_args(checkpoint, args)
    take_defaults(args, saved, dict(model=None, input_size=224, patch_size=None, norm_pix_loss=False, num_heads=None,
                                    decoder_num_heads=None, mask_ratio=0.75))
    model = model_from_name(models_mae, args.model, "mae_vit_", img_size=args.input_size,
                            patch_size=args.patch_size, norm_pix_loss=args.norm_pix_loss,
                            num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads, **layout)
    state_dict = checkpoint["model"]
    check_has_decoder(model, state_dict, args.checkpoint)
    if layout:
        print(inferred_line(args, layout))
    if state_dict.get("pos_embed", model.pos_embed).shape != model.pos_embed.shape:
        interpolate_pos_embed(model, state_dict)  # another --input_size than the checkpoint's
    return load_strictly(model, state_dict, f"{args.model} (input {args.input_size}, norm_pix_loss "
                         f"{args.norm_pix_loss}) from {args.checkpoint}")


def take_defaults(args, saved, fallbacks):
    """Each flag of `fallbacks` left None takes the checkpoint's saved value, else the fallback."""
    for name, fallback in fallbacks.items():
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, fallback))


def load_strictly(model, state_dict, what):
    """Load state_dict into model strictly (check_state_dict_compat first: a readable error) and
    print 'Loaded <what>'. Returns the model."""
    check_state_dict_compat(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    print(f"Loaded {what}")
    return model


def check_mask_blocks(model, args):
    """A SimMIM's masks are whole --mask_patch_size blocks: a one-line error with the fix when they
    do not tile --input_size."""
    if isinstance(model, models_simmim.SimMIM) and args.input_size % args.mask_patch_size:
        raise ValueError(f"the input size {args.input_size} is not divisible by the mask patch size "
                         f"{args.mask_patch_size}: give --mask_patch_size, a multiple of the patch size "
                         f"{model.patch_size} that divides {args.input_size}")


def get_args_parser():
    parser = argparse.ArgumentParser("MAE / SimMIM reconstructions of a pretraining checkpoint", add_help=True,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint path or URL holding 'model'")
    parser.add_argument("--data_path", required=True, help="ImageFolder root or flat folder of images")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: <checkpoint's folder>/reconstructions-<checkpoint name>.png)")
    parser.add_argument("--model", default=None,
                        help="models_mae (mae_vit_*) or models_simmim (simmim_*) model name (default: the "
                             "checkpoint's, else inferred from its weights)")
    parser.add_argument("--input_size", default=None, type=int,
                        help="default: the checkpoint's, else its position embeddings' (MAE) or its factory's "
                             "(SimMIM)")
    parser.add_argument("--patch_size", default=None, type=int, help="default: the checkpoint's / model's")
    parser.add_argument("--num_heads", default=None, type=int,
                        help="MAE: encoder attention heads (default: the model's; for a checkpoint without args, "
                             "the factory's of the same width, else width / 64)")
    parser.add_argument("--decoder_num_heads", default=None, type=int,
                        help="MAE: decoder attention heads (default: as --num_heads, else width / 32)")
    parser.add_argument("--norm_pix_loss", action="store_true", default=None,
                        help="MAE: the model was trained with normalised pixel targets "
                             "(default: the checkpoint's, else off)")
    parser.add_argument("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss")
    parser.add_argument("--num_images", default=8, type=int, help="rows of the grid (default: %(default)s)")
    parser.add_argument("--mask_ratio", default=None, type=float,
                        help="fraction of the patches masked (SimMIM: of the --mask_patch_size blocks, rounded "
                             "up); default: the checkpoint's, else 0.75 (MAE) or 0.6 (SimMIM)")
    parser.add_argument("--mask_patch_size", default=None, type=int,
                        help="SimMIM: side in px of the square blocks masked (a multiple of the patch size that "
                             "divides --input_size); default: the checkpoint's, else 32")
    parser.add_argument("--seed", default=0, type=int,
                        help="seed of the masks (MAE's noise, SimMIM's blocks) (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: %(default)s")
    parser.add_argument("--unsafe_load", action="store_true",
                        help="load with weights_only=False (runs code in the file: trusted files only)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model = load_model(args).to(args.device)
    imgs = load_images(list_images(args.data_path, args.num_images), args.input_size)  # (N, 3, S, S)
    check_mask_blocks(model, args)
    # the masks of the pretraining grids for the same seed; MAE: ratio, (N, L); SimMIM: (N, H/p, W/p), None
    masking, noise = fixed_masking(model, imgs.shape[0], args.seed, args.mask_ratio, args.mask_patch_size)
    return save_reconstructions(model, imgs, args.out or default_out(args.checkpoint), masking, noise)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError) as e:
        sys.stderr.write(f"ERROR: {e}\n")  # a checkpoint or folder it cannot use: the reason, no traceback
        sys.exit(1)
