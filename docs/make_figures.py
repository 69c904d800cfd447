"""The README's pretraining figures, regenerated from a run's log.txt and checkpoints:

    python docs/make_figures.py --run_dir output_dir --data_path DIR [--out_dir docs] \
        [--epochs 0 10 20 49] [--images 4] [--logs LABEL=other_run/log.txt ...]

- <out_dir>/pretrain_curves.png: the training loss and the kNN top-1 (cls token, and mean of the
  patch tokens; --knn_freq) per epoch, from <run_dir>/log.txt and each --logs file, one colour a
  run; the title names the run (model, input size, epochs) from its newest checkpoint's args.
- <out_dir>/reconstructions_by_epoch.png: the same --images training images of <data_path>/train
  (picked round-robin over the classes, eval transform, masks from torch.Generator seeded with the
  run's --seed: the images and masks of the run's own reconstructions/ grids), one row each;
  columns original | masked | "reconstruction + visible" of each checkpoint-<N>.pth of --epochs
  (default: all of them, at most MAX_COLUMNS spread evenly, the first and the last included).

Epochs are numbered as in log.txt and the checkpoint names (0 = after the first epoch). Each
model is built from its checkpoint's args (util.models) and runs on the CPU. --data_path
defaults to the run's own. matplotlib is needed here (the curves) and nowhere else in this
repository: `pip install matplotlib`.
"""
import argparse
import io
import json
import os
import re
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from util.checkpoint import load_checkpoint  # noqa: E402
from util.datasets import ImageFolderDataset, build_eval_transform, load_and_transform  # noqa: E402
from util.models import build_pretrain_model  # noqa: E402
from util.visualize import draw_grid, reconstruction_tiles, round_robin_indices  # noqa: E402

CURVES, RECONSTRUCTIONS = "pretrain_curves.png", "reconstructions_by_epoch.png"
MAX_COLUMNS = 6  # checkpoints shown by default
MAX_PNG_BYTES = 250_000  # above this a grid is saved with a 256-colour palette (README-sized files)
CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pth")


# ---------------------------------------------------------------------------------------------
# Inputs: log.txt, checkpoints
# ---------------------------------------------------------------------------------------------

def read_log(path):
    """The epoch lines of a log.txt, sorted by epoch: one dict each (the last line of an epoch
    wins, as for a run resumed before trim_log existed); lines that are not JSON are skipped."""
    by_epoch = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def log_spec(spec):
    """'LABEL=PATH' or 'PATH' (labelled by its folder's name) -> (label, path)."""
    label, sep, path = spec.partition("=")
    if not sep or os.path.exists(spec):
        path = spec
        label = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return label, path


def numbered_checkpoints(run_dir):
    """{epoch: path} of the run's checkpoint-<epoch>.pth files."""
    return {int(m[1]): os.path.join(run_dir, name) for name in os.listdir(run_dir)
            if (m := CHECKPOINT.fullmatch(name))}


def pick_epochs(available, wanted=None, most=MAX_COLUMNS):
    """The checkpoint epochs to show: `wanted` (each must be in `available`), else all available
    ones when there are at most `most`, else `most` of them spread evenly (first and last kept)."""
    available = sorted(available)
    if wanted:
        missing = [e for e in wanted if e not in available]
        if missing:
            raise ValueError(f"no checkpoint-<N>.pth for epochs {missing}; the run has epochs {available}")
        return list(wanted)
    if len(available) <= most:
        return available
    return [available[round(i * (len(available) - 1) / (most - 1))] for i in range(most)]


def run_title(args):
    """'mae_vit_tiny_patch16, 112 px, 50 epochs, norm_pix_loss' from a checkpoint's args."""
    title = f"{args.model}, {args.input_size} px, {args.epochs} epochs"
    return title + (", norm_pix_loss" if getattr(args, "norm_pix_loss", False) else "")


def load_model(path):
    """(MaskedAutoencoderViT in eval mode, its args) of a pretraining checkpoint."""
    checkpoint = load_checkpoint(path)
    args = checkpoint["args"]
    model = build_pretrain_model(args)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), args


# ---------------------------------------------------------------------------------------------
# Figure 1: loss and kNN top-1 per epoch
# ---------------------------------------------------------------------------------------------

def require_matplotlib():
    """matplotlib.figure.Figure, or exit with one line saying how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("make_figures.py draws its curves with matplotlib: pip install matplotlib")
    return Figure


def plot_curves(runs, title, path):
    """runs: [(label, log.txt records)]. Two panels: train_loss per epoch; knn_top1 (solid, cls
    token) and knn_avg_top1 (dashed, mean-pooled) per epoch, one colour a run. Saved to the
    PNG `path`; returns the matplotlib Figure."""
    Figure = require_matplotlib()
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
    loss_ax, knn_ax = fig.subplots(1, 2)
    for i, (label, records) in enumerate(runs):
        colour = f"C{i}"
        loss_ax.plot([r["epoch"] for r in records], [r["train_loss"] for r in records], color=colour,
                     label=label)
        for key, style, name in (("knn_top1", "-", "cls token"), ("knn_avg_top1", "--", "mean-pooled")):
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                knn_ax.plot(*zip(*points), style, color=colour, marker=".", label=f"{label}: {name}")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    knn_ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN top-1 on val (k=20, T=0.07)")
    for ax in (loss_ax, knn_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
        if ax.lines:
            ax.legend(fontsize="small")
    if not knn_ax.lines:
        knn_ax.text(0.5, 0.5, "no kNN in log.txt (--knn_freq 0?)", ha="center", va="center",
                    transform=knn_ax.transAxes)
    fig.suptitle(f"MAE pretraining: {title}")
    fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 2: reconstructions by epoch
# ---------------------------------------------------------------------------------------------

def load_images(data_path, n, input_size):
    """n images of <data_path>/train, round-robin over its classes, eval transform:
    (n, 3, S, S) normalised (the images of main_pretrain's reconstruction grids)."""
    dataset = ImageFolderDataset(os.path.join(data_path, "train"))
    transform = build_eval_transform(input_size)
    indices = round_robin_indices(dataset.targets, n)
    return torch.stack([load_and_transform(dataset.samples[i][0], transform) for i in indices])


def reconstructions_by_epoch(checkpoints, data_path, n):
    """checkpoints: {epoch: path}, in column order. Returns (tiles (n, 2 + K, 3, S, S) uint8,
    column titles): original, masked, then each checkpoint's reconstruction + visible patches,
    all with the same masks (noise from torch.Generator seeded with the run's --seed)."""
    columns, titles = [], ["original", "masked"]
    imgs = noise = None
    for epoch, path in checkpoints.items():
        model, args = load_model(path)
        if imgs is None:
            imgs = load_images(data_path or args.data_path, n, args.input_size)  # (n, 3, S, S)
            generator = torch.Generator().manual_seed(args.seed)  # as main_pretrain: the run's masks
            noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=generator)  # (n, L)
        tiles = reconstruction_tiles(model, imgs, args.mask_ratio, noise)  # (n, 4, 3, S, S)
        if not columns:
            columns += [tiles[:, 0], tiles[:, 1]]
        columns.append(tiles[:, 3])
        titles.append(f"epoch {epoch}")
    return torch.stack(columns, dim=1), titles


def save_png(grid, path, max_bytes=MAX_PNG_BYTES):
    """Write a (3, H, W) uint8 grid as PNG; one larger than max_bytes gets a 256-colour palette
    instead (photos in full colour compress poorly). Returns the file's size in bytes."""
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())  # (H, W, 3)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        image.quantize(256, dither=Image.Dither.NONE).save(buffer, "PNG", optimize=True)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.tell()


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def get_args_parser():
    parser = argparse.ArgumentParser("The README's pretraining figures from a run's log.txt and checkpoints")
    parser.add_argument("--run_dir", required=True, help="pretraining --output_dir (log.txt, checkpoint-<N>.pth)")
    parser.add_argument("--data_path", default=None,
                        help="ImageFolder root whose train/ gives the images (default: the run's --data_path)")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where the PNGs go (default: docs/)")
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help=f"checkpoint epochs, one column each (default: all, at most {MAX_COLUMNS} spread evenly)")
    parser.add_argument("--images", type=int, default=4, help="rows of the reconstructions (default: %(default)s)")
    parser.add_argument("--logs", nargs="+", default=[], metavar="[LABEL=]LOG",
                        help="more log.txt files drawn beside the run's, to compare runs")
    return parser


def main(argv=None):
    """Write both figures; returns their paths (curves, reconstructions)."""
    args = get_args_parser().parse_args(argv)
    checkpoints = numbered_checkpoints(args.run_dir)
    if not checkpoints:
        raise SystemExit(f"no checkpoint-<N>.pth in {args.run_dir}")
    epochs = pick_epochs(checkpoints, args.epochs)
    title = run_title(load_checkpoint(checkpoints[max(checkpoints)])["args"])
    os.makedirs(args.out_dir, exist_ok=True)

    runs = [(os.path.basename(os.path.abspath(args.run_dir)), read_log(os.path.join(args.run_dir, "log.txt")))]
    runs += [(label, read_log(path)) for label, path in map(log_spec, args.logs)]
    curves = os.path.join(args.out_dir, CURVES)
    plot_curves(runs, title, curves)
    print(f"{curves}: {os.path.getsize(curves) / 1e3:.0f} KB")

    tiles, titles = reconstructions_by_epoch({e: checkpoints[e] for e in epochs}, args.data_path, args.images)
    grid = os.path.join(args.out_dir, RECONSTRUCTIONS)
    size = save_png(draw_grid(tiles, titles), grid)
    print(f"{grid}: {tiles.shape[0]} images x {tiles.shape[1]} columns ({', '.join(titles)}), {size / 1e3:.0f} KB")
    return curves, grid


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"ERROR: {e}")
