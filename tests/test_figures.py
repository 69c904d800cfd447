"""The README figures' script (docs/make_figures.py): reading log.txt, choosing the checkpoints,
the one-line exit without matplotlib, and both figures of a 2-epoch toy pretraining run (the
reconstruction grid's layout and tiles, the curves' data). The figures need matplotlib; those
tests are skipped without it."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
from conftest import REPO
from util import visualize
from util.checkpoint import load_checkpoint
from util.datasets import ImageFolderDataset

spec = importlib.util.spec_from_file_location("make_figures", os.path.join(REPO, "docs", "make_figures.py"))
make_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_figures)

PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "16", "--batch_size", "4",
            "--device", "cpu", "--num_workers", "0", "--vis_freq", "0", "--precision", "fp32", "--seed", "0",
            "--warmup_epochs", "1", "--save_freq", "1", "--knn_freq", "1", "--epochs", "2"]
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install matplotlib)")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def test_read_log_keeps_the_last_line_of_each_epoch_in_order_and_skips_other_lines(tmp_path):
    path = tmp_path / "log.txt"
    lines = [{"train_loss": 1.0, "epoch": 1}, "not json", {"train_loss": 2.0, "epoch": 0},
             {"train_loss": 0.5, "epoch": 1, "knn_top1": 30.0}, ["no", "epoch"], {"epoch": "2"}]
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    assert make_figures.read_log(path) == [{"train_loss": 2.0, "epoch": 0},
                                           {"train_loss": 0.5, "epoch": 1, "knn_top1": 30.0}]


def test_log_spec_takes_a_label_or_the_folder_name(tmp_path):
    assert make_figures.log_spec("long=runs/a/log.txt") == ("long", "runs/a/log.txt")
    assert make_figures.log_spec(os.path.join("runs", "b", "log.txt")) == ("b", os.path.join("runs", "b", "log.txt"))
    odd = tmp_path / "x=y"
    odd.mkdir()
    (odd / "log.txt").write_text("")
    assert make_figures.log_spec(str(odd / "log.txt")) == ("x=y", str(odd / "log.txt"))  # an existing path


def test_pick_epochs_all_a_few_spread_evenly_or_the_ones_asked_for():
    assert make_figures.pick_epochs([20, 0, 10, 49]) == [0, 10, 20, 49]
    assert make_figures.pick_epochs(range(50), most=5) == [0, 12, 24, 37, 49]
    assert make_figures.pick_epochs(range(50), [49, 0]) == [49, 0]
    with pytest.raises(ValueError, match=r"epochs \[7\]; the run has epochs \[0, 10\]"):
        make_figures.pick_epochs([0, 10], [0, 7])


def test_numbered_checkpoints_ignores_the_other_files(tmp_path):
    for name in ("checkpoint-0.pth", "checkpoint-12.pth", "checkpoint-last.pth", "checkpoint-best.pth",
                 "checkpoint-3.pth.nonfinite", "log.txt"):
        (tmp_path / name).write_text("")
    assert make_figures.numbered_checkpoints(str(tmp_path)) == {
        0: str(tmp_path / "checkpoint-0.pth"), 12: str(tmp_path / "checkpoint-12.pth")}


def test_without_matplotlib_it_exits_with_one_line_naming_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit_:
        make_figures.plot_curves([("run", [{"epoch": 0, "train_loss": 1.0}])], "title", str(tmp_path / "c.png"))
    assert "pip install matplotlib" in str(exit_.value.code) and "\n" not in str(exit_.value.code)
    assert not (tmp_path / "c.png").exists()


# ---------------------------------------------------------------------------------------------
# A toy run's figures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(toy_data, tmp_path_factory, run_script):
    """(data, run folder) of a 2-epoch pretraining on 4 classes x 6 images of 32 px: kNN at each
    epoch, checkpoint-0.pth and checkpoint-1.pth."""
    data = toy_data(train_per_class=6, val_per_class=3, size=32)
    out = str(tmp_path_factory.mktemp("figures") / "run")
    run_script("main_pretrain.py", *PRETRAIN, "--data_path", data, "--output_dir", out, timeout=900)
    return data, out


def tile(grid, row, col, n, size):
    """The (size, size, 3) tile at (row, col) of a draw_grid image (H, W, 3) of n rows."""
    step = size + visualize.GAP
    top = grid.shape[0] - n * step  # the title row's height
    y, x = top + row * step, visualize.GAP + col * step
    return grid[y:y + size, x:x + size]


def blocks(t, patch):
    """The (patch, patch, 3) blocks of a tile, row-major as the model's patches."""
    return [t[i:i + patch, j:j + patch] for i in range(0, t.shape[0], patch) for j in range(0, t.shape[1], patch)]


@pytest.mark.slow
@needs_matplotlib
def test_figures_of_a_toy_run(toy_run, tmp_path, make_args, run_script):
    data, run = toy_run
    out = tmp_path / "docs"
    curves, grid_path = make_figures.main(["--run_dir", run, "--out_dir", str(out), "--images", "4",
                                           "--logs", f"copy={os.path.join(run, 'log.txt')}"])
    assert (curves, grid_path) == (str(out / "pretrain_curves.png"), str(out / "reconstructions_by_epoch.png"))

    # the reconstructions: 4 rows (images) x 4 columns (original, masked, epoch 0, epoch 1)
    n, scale = 4, visualize.upscale_factor(32, 32)
    size, patch = 32 * scale, 16 * scale
    grid = np.array(Image.open(grid_path).convert("RGB"))  # (H, W, 3)
    titles = ["original", "masked", "epoch 0", "epoch 1"]
    expected = visualize.draw_grid(torch.zeros(n, 4, 3, 32, 32, dtype=torch.uint8), titles)
    assert grid.shape == (*expected.shape[1:], 3)
    assert os.path.getsize(grid_path) < 300_000 and os.path.getsize(curves) < 300_000
    # the original column holds the run's own grid images (main_pretrain.load_vis_images)
    args = make_args("pretrain", *PRETRAIN, "--data_path", data, "--vis_images", n)
    dataset = ImageFolderDataset(os.path.join(data, "train"))
    originals = visualize.denormalize(main_pretrain.load_vis_images(dataset, args))  # (n, 3, 32, 32)
    for row in range(n):
        original = originals[row].repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
        assert np.array_equal(tile(grid, row, 0, n, size), original)
        # masked: 3 of the 4 patches grey (mask ratio 0.75); the visible one as in the original
        masked = blocks(tile(grid, row, 1, n, size), patch)
        grey = [bool((np.abs(b.astype(int) - 128) <= 1).all()) for b in masked]
        assert sum(grey) == 3
        visible = grey.index(False)
        assert np.array_equal(masked[visible], blocks(original, patch)[visible])
        # each epoch: the visible patch pasted back exactly, the masked ones predicted
        for col in (2, 3):
            same = [np.array_equal(a, b) for a, b in zip(blocks(tile(grid, row, col, n, size), patch),
                                                         blocks(original, patch))]
            assert same == [i == visible for i in range(4)]
    assert not np.array_equal(tile(grid, 0, 2, n, size), tile(grid, 0, 3, n, size))  # two different models

    # the curves: a real picture, and the log's numbers in it
    picture = np.array(Image.open(curves).convert("RGB"))
    assert picture.shape[0] > 200 and picture.shape[1] > 400 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 50
    log = make_figures.read_log(os.path.join(run, "log.txt"))
    assert [r["epoch"] for r in log] == [0, 1] and all("knn_avg_top1" in r for r in log)
    fig = make_figures.plot_curves([("run", log), ("copy", log)], "t", str(tmp_path / "c.png"))
    loss_ax, knn_ax = fig.axes[:2]
    assert [list(line.get_ydata()) for line in loss_ax.lines] == [[r["train_loss"] for r in log]] * 2
    assert [line.get_label() for line in knn_ax.lines] == ["run: cls token", "run: mean-pooled",
                                                           "copy: cls token", "copy: mean-pooled"]
    assert list(knn_ax.lines[0].get_ydata()) == [r["knn_top1"] for r in log]
    assert list(knn_ax.lines[1].get_ydata()) == [r["knn_avg_top1"] for r in log]
    assert "mae_vit_tiny_patch16, 32 px, 2 epochs" in make_figures.run_title(
        load_checkpoint(os.path.join(run, "checkpoint-1.pth"))["args"])

    # the training scripts never import matplotlib
    _, imported = run_script("-c", "import sys, main_pretrain, main_finetune, main_linprobe, main_visualize; "
                                   "print('matplotlib' in sys.modules)", timeout=600)
    assert imported.strip().endswith("False")
