"""Flags and data checked before the first step (issue 10, section 4): one-line errors for bad
flags (util.args.check_args), the scripts' parsers usable as parent parsers, symlink loops in the
data folder, 16-bit images, Pillow's decompression-bomb limit (--max_image_pixels), and the
original release's layer-decay group order (optimizer state of its finetune checkpoints)."""
import argparse
import os
import runpy
import signal
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from conftest import REPO, SCRIPTS
from util.args import check_args
from util.datasets import (BadImageError, ImageFolderDataset, PretrainTransform, SymlinkWarning, build_dataset,
                           load_and_transform, to_8_bits)
from util.lr_decay import get_layer_id_for_vit, param_group_names_lrd, param_groups_lrd


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def check(script, *flags):
    """check_args on `python main_<script>.py flags`: (stdout, stderr) of a run that passes the
    checks; a bad flag raises SystemExit."""
    parser = SCRIPTS[script].get_args_parser(add_help=True)
    check_args(parser, parser.parse_args([str(f) for f in flags]))


def error_of(capsys, script, *flags):
    """The one error line check_args prints (as argparse: usage, then 'prog: error: ...'),
    asserting exit status 2."""
    with pytest.raises(SystemExit) as e:
        check(script, *flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (("--mask_ratio", 1.5), "error: --mask_ratio must be in [0, 1), got 1.5"),
    (("--mask_ratio", -0.25), "error: --mask_ratio must be in [0, 1), got -0.25"),
    (("--mask_ratio", "nan"), "error: --mask_ratio must be in [0, 1), got nan"),
    (("--mask_ratio", 0), "error: --mask_ratio 0.0 masks none of the 196 patches"),  # NaN loss today
    (("--mask_ratio", 0.999), "error: --mask_ratio 0.999 leaves no visible patch of the 196"),
    (("--input_size", 32, "--patch_size", 8, "--mask_ratio", 0.95),
     "error: --mask_ratio 0.95 leaves no visible patch of the 16"),
    # ViT-L/16 at 224 px: 196 patches, int(196 * 0.005) = 0 visible; ViT-H/14: 256, 1 visible (below)
    (("--model", "mae_vit_large_patch16", "--mask_ratio", 0.995), "leaves no visible patch of the 196"),
    (("--input_size", 225), "error: --input_size 225 is not divisible by the patch size 16"),
    (("--model", "mae_vit_huge_patch14", "--input_size", 224, "--patch_size", 10),
     "error: --input_size 224 is not divisible by the patch size 10"),
    (("--model", "mae_vit_nope"), "error: unknown --model 'mae_vit_nope'"),
    (("--max_image_pixels", -1), "error: --max_image_pixels must be >= 0"),
])
def test_bad_pretrain_flag_is_one_line(capsys, flags, message):
    assert message in error_of(capsys, "pretrain", *flags)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("flag", ["--batch_size", "--epochs", "--accum_iter", "--log_freq", "--patch_size",
                                  "--input_size"])
def test_counts_below_one_are_refused(capsys, script, flag):
    assert error_of(capsys, script, flag, 0).endswith(f"error: {flag} must be >= 1, got 0")


def test_classifier_input_size_uses_the_models_patch_size(capsys):
    # vit_huge_patch14: 224 = 16 x 14 is fine, 240 is not; mask_ratio is not a classifier flag
    check("finetune", "--model", "vit_huge_patch14", "--input_size", 224)
    assert "divisible by the patch size 14" in error_of(capsys, "linprobe", "--model", "vit_huge_patch14",
                                                        "--input_size", 240)


def test_good_flags_pass_silently(capsys):
    for script in SCRIPTS:
        check(script)  # the original's defaults
    check("pretrain", "--model", "mae_vit_huge_patch14", "--mask_ratio", 0.995)  # 1 of 256 visible
    check("pretrain", "--input_size", 32, "--patch_size", 8, "--mask_ratio", 0.9)  # 1 of 16 visible
    assert capsys.readouterr() == ("", "")


def test_warmup_above_epochs_warns_in_one_line(capsys):
    check("finetune", "--epochs", 5, "--warmup_epochs", 10)  # no SystemExit
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Warning: --warmup_epochs 10 is above --epochs 5")


@pytest.mark.slow
def test_bad_flag_exits_2_without_traceback(run_script):
    """mask 1.5 trained silently (at 0.5) before; now the command line fails as argparse does."""
    status, output = run_script("main_pretrain.py", "--mask_ratio", 1.5, "--device", "cpu", check=False,
                                timeout=120)
    assert status == 2, output[-2000:]
    assert output.strip().splitlines()[-1] == "MAE pre-training: error: --mask_ratio must be in [0, 1), got 1.5"
    assert "Traceback" not in output


def run_as_main(monkeypatch, script, *argv):
    """Run main_<script>.py's __main__ block in-process with argv; returns its SystemExit code."""
    path = os.path.join(REPO, f"main_{script}.py")
    monkeypatch.setattr(sys, "argv", [path, *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(path, run_name="__main__")
    return e.value.code


@pytest.mark.parametrize("script", ["finetune", "linprobe"])
def test_classifier_scripts_check_their_flags(monkeypatch, capsys, script):
    assert run_as_main(monkeypatch, script, "--batch_size", 0) == 2
    assert capsys.readouterr().err.strip().endswith("error: --batch_size must be >= 1, got 0")


def test_help_still_works(monkeypatch, capsys):
    assert run_as_main(monkeypatch, "pretrain", "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--mask_ratio" in out and "--max_image_pixels" in out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_get_args_parser_is_a_parent_parser(script):
    """The original's submitit launchers: ArgumentParser(parents=[main_x.get_args_parser()])."""
    module = SCRIPTS[script]
    for parent in (module.get_args_parser(), module.get_args_parser(add_help=False)):
        launcher = argparse.ArgumentParser("Submitit for MAE", parents=[parent])
        launcher.add_argument("--nodes", default=2, type=int)
        args = launcher.parse_args(["--nodes", "4", "--batch_size", "8"])
        assert (args.nodes, args.batch_size, args.stage) == (4, 8, script)
        assert vars(args).keys() - {"nodes"} == vars(module.get_args_parser().parse_args([])).keys()


# ---------------------------------------------------------------------------------------------
# Symlinks in the data folder
# ---------------------------------------------------------------------------------------------

def touch_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), "wb").close()  # listing only: never decoded here


@pytest.fixture
def tree(tmp_path):
    """train/{a,b,c}: a with a nested folder, b a symlink to a folder outside train/, c with a
    symlinked sub-folder (outside train/): a normal tree that ImageFolder lists correctly."""
    root = tmp_path / "train"
    touch_images(root / "a", ["1.png", "2.jpg", "notes.txt"])
    touch_images(root / "a" / "nested", ["3.png"])
    touch_images(tmp_path / "elsewhere" / "b", ["4.png", "5.png"])
    os.symlink(tmp_path / "elsewhere" / "b", root / "b")
    touch_images(root / "c", ["6.png"])
    touch_images(tmp_path / "extra", ["7.png"])
    os.symlink(tmp_path / "extra", root / "c" / "more")
    return root


class ListingTimeout(Exception):
    """Not an OSError (as TimeoutError is), which os.walk would swallow."""


def listing(root):
    """(samples, classes, SymlinkWarning messages) of ImageFolderDataset(root), stopped after 10 s
    (torchvision's walk never ends under two loops)."""
    def timeout(*_):
        raise ListingTimeout(f"listing {root} did not end in 10 s")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = ImageFolderDataset(str(root))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return ds.samples, ds.classes, [str(w.message) for w in caught if issubclass(w.category, SymlinkWarning)]


def test_normal_tree_lists_as_torchvision(tree):
    samples, classes, warned = listing(tree)
    reference = datasets.ImageFolder(str(tree))
    assert (samples, classes) == (reference.samples, reference.classes)
    assert [os.path.relpath(p, tree) for p, _ in samples] == [
        "a/1.png", "a/2.jpg", "a/nested/3.png", "b/4.png", "b/5.png", "c/6.png", "c/more/7.png"]
    assert warned == []


def test_one_loop_is_read_once_with_a_warning(tree):
    """A link back to train/ inside class a: ImageFolder listed every image ~40 times, b's and c's
    under label a."""
    expected, classes, _ = listing(tree)
    os.symlink(tree, tree / "a" / "nested" / "up")
    samples, loop_classes, warned = listing(tree)
    assert (samples, loop_classes) == (expected, classes)
    loop = tree / "a" / "nested" / "up"
    assert len(warned) == 1 and warned[0].startswith(f"not following {loop}: a symlink loop")


def test_two_loops_and_a_second_way_in_do_not_hang(tree):
    """Two loops made ImageFolder's walk never end; a link into another class's folder put that
    class's images under the wrong label."""
    expected, _, _ = listing(tree)
    os.symlink(tree, tree / "a" / "up")
    os.symlink("..", tree / "c" / "self")  # c/self -> c
    os.symlink(tree / "b", tree / "a" / "nested" / "b_again")
    samples, _, warned = listing(tree)
    assert samples == expected
    assert sorted(w.split(":")[0] for w in warned) == sorted(
        f"not following {tree / p}" for p in ("a/up", "c/self", "a/nested/b_again"))
    assert sum("symlink loop" in w for w in warned) == 2
    assert any(f"already read as {tree / 'b'}" in w for w in warned)


# ---------------------------------------------------------------------------------------------
# Image modes and sizes
# ---------------------------------------------------------------------------------------------

def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))  # (16, 64), 0 .. 65535
    path = str(tmp_path / "gradient16.png")
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_and_transform(path, None))  # (16, 64, 3)
    np.testing.assert_array_equal(rgb, np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=2))
    # the lazily decoding pretraining transform gets the scaled image too: a gradient, not white
    out = load_and_transform(path, PretrainTransform(16, scale=(1, 1), ratio=(4, 4)))  # (3, 16, 16)
    assert out.max() - out.min() > 3  # normalised units: about the whole 0..255 range


def test_32_bit_integer_mode_is_scaled_as_16_bit():
    img = Image.fromarray(np.array([[0, 255, 256, 40000, 65535, 70000, -5]], dtype=np.int32))
    assert img.mode == "I"
    assert np.asarray(to_8_bits(img)).tolist() == [[0, 0, 1, 156, 255, 255, 0]]
    rgb = Image.new("RGB", (2, 2))
    assert to_8_bits(rgb) is rgb


def test_max_image_pixels_flag(monkeypatch, tmp_path, make_args):
    """32 x 32 = 1024 pixels; Pillow refuses images above twice its limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    os.makedirs(tmp_path / "train" / "x")
    os.replace(tmp_path / "img.png", tmp_path / "train" / "x" / "img.png")
    assert make_args("pretrain").max_image_pixels == Image.MAX_IMAGE_PIXELS  # Pillow's default

    limited = build_dataset(True, make_args("pretrain", "--data_path", tmp_path, "--max_image_pixels", 100), None)
    Image.MAX_IMAGE_PIXELS = 89478485  # as in a fresh DataLoader worker: the dataset sets its own
    with pytest.raises(BadImageError) as e:
        limited[0]
    assert str(tmp_path / "train" / "x" / "img.png") in str(e.value) and "--max_image_pixels" in str(e.value)

    unlimited = build_dataset(True, make_args("pretrain", "--data_path", tmp_path, "--max_image_pixels", 0), None)
    Image.MAX_IMAGE_PIXELS = 100
    assert unlimited[0][0].size == (32, 32)


# ---------------------------------------------------------------------------------------------
# Layer-decay groups in the original's order
# ---------------------------------------------------------------------------------------------

def timm_0_3_2_order(model):
    """The parameter names of model as the original's models_vit (timm 0.3.2) registered them:
    its VisionTransformer's own parameters with `head` last, then MAE's `fc_norm`."""
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith("head.")]
    fc_norm = [n for n in names if n.startswith("fc_norm.")]
    assert head and fc_norm and names.index(fc_norm[0]) < names.index(head[0])  # timm 1.x
    return [n for n in names if n not in head + fc_norm] + head + fc_norm


def original_param_groups_lrd(model, names, weight_decay, no_weight_decay_list, layer_decay):
    """The original release's util/lr_decay.param_groups_lrd over the parameters in `names`'
    order: {group name: {lr_scale, weight_decay, params (tensors), names}} in insertion order."""
    num_layers = len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))
    params = dict(model.named_parameters())
    groups = {}
    for n in names:
        p = params[n]
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = get_layer_id_for_vit(n, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in groups:
            groups[group_name] = {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay,
                                  "params": [], "names": []}
        groups[group_name]["params"].append(p)
        groups[group_name]["names"].append(n)
    return groups


@pytest.fixture
def finetune_model(tiny_vit):
    torch.manual_seed(0)
    return tiny_vit(embed_dim=32, depth=2, num_classes=7)  # global pool: fc_norm before head in timm 1.x


def test_groups_in_the_original_order(finetune_model):
    model = finetune_model
    original = original_param_groups_lrd(model, timm_0_3_2_order(model), 0.05, model.no_weight_decay(), 0.75)
    ours = param_group_names_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    assert list(ours) == list(original)  # ..., layer_3_decay (head.weight), layer_3_no_decay
    for name, group in ours.items():
        assert group["params"] == original[name]["names"], name
        assert group["lr_scale"] == original[name]["lr_scale"]
    tensors = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    assert [[id(p) for p in g["params"]] for g in tensors] == [
        [id(p) for p in g["params"]] for g in original.values()]


def test_original_optimizer_state_loads_onto_the_same_parameters(finetune_model):
    model = finetune_model
    original = original_param_groups_lrd(model, timm_0_3_2_order(model), 0.05, model.no_weight_decay(), 0.75)
    theirs = torch.optim.AdamW([{k: g[k] for k in ("lr_scale", "weight_decay", "params")}
                                for g in original.values()], lr=1e-3)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i + 1))  # each parameter's state tells which one it is
    theirs.step()
    state_dict = theirs.state_dict()
    # as saved by the original (torch 1.x): int steps, none of the newer group options
    for s in state_dict["state"].values():
        s["step"] = int(s["step"])
    for g in state_dict["param_groups"]:
        for key in ("foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"):
            g.pop(key, None)

    ours = torch.optim.AdamW(param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75), lr=1e-3)
    ours.load_state_dict(state_dict)
    for name, p in model.named_parameters():
        assert ours.state[p]["exp_avg"].shape == p.shape, name
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], theirs.state[p]["exp_avg_sq"], msg=name)
    ours.step()  # and it trains on
