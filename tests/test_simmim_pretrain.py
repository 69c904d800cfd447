"""SimMIM pretraining through main_pretrain.py and engine_pretrain.py (issue 12): the flags and
their --model defaults, the optimizer, the lr rule and schedule, the engine fed by the data
pipeline's masks, the reconstruction grids and kNN features, and end to end from the command line
(2 epochs, exact resume, then the chain on through finetuning, evaluation and linear probing).

Tiny models: simmim_vit_tiny_patch16 with 1 block of width 32 at 32 px in 8 px patches (16 of them,
2 x 2 mask blocks of 16 px) in-process; the command-line runs use the factory's 12 blocks at 32 px.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import main_pretrain
import models_simmim
from conftest import REPO, SUBPROCESS_ENV
from engine_pretrain import train_one_epoch
from test_reliability import assert_same_training_state
from util import lr_sched, visualize
from util.args import check_args, resolve_lr, resolve_pretrain_defaults, simmim_lrs
from util.checkpoint import load_checkpoint
from util.datasets import ImageFolderDataset, build_train_loader, sample_seed
from util.knn import extract_features
from util.lr_decay import simmim_param_group_names
from util.masking import SimMIMTransform
from util.models import build_pretrain_model, model_patch_size
from util.precision import NativeScalerWithGradNormCount
from util.run_dir import RESULT_ARGS

TINY = ["--model", "simmim_vit_tiny_patch16", "--input_size", 32, "--patch_size", 8, "--mask_patch_size", 16]
SCRIPT_ARGS = ["--device", "cpu", "--num_workers", "0", "--model", "simmim_vit_tiny_patch16", "--input_size", "32",
               "--patch_size", "8", "--mask_patch_size", "16", "--batch_size", "4", "--warmup_epochs", "1",
               "--blr", "0.5", "--log_freq", "2", "--vis_images", "4", "--seed", "0"]


def tiny_simmim(**overrides):
    """A SimMIM ViT of 32 px images in 8 px patches, 1 block of width 32, no drop path."""
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0)
    return models_simmim.simmim_vit_tiny_patch16(**{**kwargs, **overrides})


def block_masks(n, seed=0):
    """n random SimMIM masks (n, 4, 4) of 2 x 2 blocks of 2 x 2 patches, 3 blocks masked each."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 4), dtype=np.int64)
    for m in masks:
        m[rng.permutation(4)[:3]] = 1
    return torch.from_numpy(masks.reshape(n, 2, 2).repeat(2, 1).repeat(2, 2))


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def read_log(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# Flags, their --model defaults and checks
# ---------------------------------------------------------------------------------------------

def test_defaults_follow_the_model(make_args):
    mae, simmim = make_args("pretrain"), make_args("pretrain", *TINY)
    assert (mae.mask_ratio, mae.clip_grad, mae.lr_schedule, mae.drop_path) == (0.75, None, None, None)
    assert (simmim.mask_ratio, simmim.clip_grad, simmim.lr_schedule, simmim.drop_path) == (0.6, 5.0, "cosine", None)
    assert (simmim.mask_patch_size, simmim.warmup_lr, simmim.milestones, simmim.gamma) == (16, 5e-7, [], 0.1)
    given = make_args("pretrain", *TINY, "--mask_ratio", 0.75, "--clip_grad", 0, "--lr_schedule", "multistep")
    assert (given.mask_ratio, given.clip_grad, given.lr_schedule) == (0.75, 0.0, "multistep")  # explicit values kept


def test_launcher_parser_leaves_the_defaults_to_main():
    """A launcher's parser (parents=[...]) leaves them None; main() resolves them the same way."""
    launcher = argparse.ArgumentParser(parents=[main_pretrain.get_args_parser()])
    args = launcher.parse_args(["--model", "simmim_swin_tiny_patch4_window4_64"])
    assert (args.mask_ratio, args.clip_grad, args.lr_schedule) == (None, None, None)
    assert resolve_pretrain_defaults(args) is args
    assert (args.mask_ratio, args.clip_grad, args.lr_schedule) == (0.6, 5.0, "cosine")
    resolve_pretrain_defaults(args)  # idempotent
    assert (args.mask_ratio, args.clip_grad, args.lr_schedule) == (0.6, 5.0, "cosine")


def check(*flags):
    parser = main_pretrain.get_args_parser(add_help=True)
    check_args(parser, parser.parse_args([str(f) for f in flags]))


@pytest.mark.parametrize("flags, message", [
    ((*TINY, "--mask_ratio", 0), "error: --mask_ratio must be in (0, 1] for SimMIM, got 0.0"),
    ((*TINY, "--mask_ratio", 1.5), "error: --mask_ratio must be in (0, 1] for SimMIM, got 1.5"),
    ((*TINY, "--mask_patch_size", 12), "error: --mask_patch_size 12 is not a multiple of the patch size 8"),
    ((*TINY, "--input_size", 40), "error: --input_size 40 is not divisible by --mask_patch_size 16"),
    (("--model", "simmim_swin_base_patch4_window6_192", "--input_size", 192, "--mask_patch_size", 6),
     "--mask_patch_size 6 is not a multiple of the patch size 4"),
    ((*TINY, "--norm_pix_loss"), "error: --norm_pix_loss is a MAE flag"),
    ((*TINY, "--fast_decode"), "error: --fast_decode is a MAE flag"),
    ((*TINY, "--clip_grad", -1), "error: --clip_grad must be >= 0"),
    ((*TINY, "--milestones", 3), "error: --milestones is for --lr_schedule multistep (not cosine)"),
    ((*TINY, "--lr_schedule", "multistep", "--milestones", 3, "--warmup_epochs", 5),
     "error: --milestones 3 falls inside the --warmup_epochs 5"),
    (("--model", "simmim_nope"), "error: unknown --model 'simmim_nope'"),
    (("--drop_path", 0.1), "error: --drop_path is a SimMIM flag"),
    (("--lr_schedule", "cosine"), "error: --lr_schedule is a SimMIM flag"),
    (("--milestones", 700), "error: --milestones is a SimMIM flag"),
])
def test_bad_simmim_flag_is_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        check(*flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_official_recipes_pass_the_checks(capsys):
    check("--model", "simmim_vit_base_patch16", "--warmup_epochs", 10, "--epochs", 800, "--lr_schedule",
          "multistep", "--milestones", 700)  # 224 px: 7 x 7 blocks of 2 x 2 patches
    check("--model", "simmim_swin_base_patch4_window6_192", "--input_size", 192, "--warmup_epochs", 10)
    check("--model", "simmim_swin_large_patch4_window12_192", "--input_size", 192, "--mask_ratio", 1)
    assert capsys.readouterr() == ("", "")


def test_result_affecting_flags_are_compared_on_rerun():
    assert {"mask_ratio", "mask_patch_size", "warmup_lr", "min_lr", "lr_schedule", "milestones", "gamma",
            "clip_grad", "drop_path"} <= set(RESULT_ARGS)


# ---------------------------------------------------------------------------------------------
# Model, data, optimizer, lr
# ---------------------------------------------------------------------------------------------

def test_model_from_the_flags(make_args):
    args = make_args("pretrain", *TINY, "--drop_path", 0.3)
    model = build_pretrain_model(args)
    assert isinstance(model, models_simmim.SimMIM) and model.patch_size == 8 and model.encoder_stride == 8
    assert model.encoder.patch_embed.grid_size == (4, 4)  # --input_size 32 reached the encoder
    assert model.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)  # --drop_path too
    default = build_pretrain_model(make_args("pretrain", *TINY))
    assert default.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # the ViT recipe's
    assert model_patch_size(make_args("pretrain", "--model", "simmim_vit_base_patch16")) == 16
    assert model_patch_size(make_args("pretrain", "--model", "simmim_swin_base_patch4_window6_192")) == 4
    assert model_patch_size(make_args("pretrain", *TINY)) == 8  # --patch_size wins


def test_samples_carry_their_mask_seeded_per_sample(make_args, toy_data):
    """((img, mask), label): the official transform (crop scale 0.67-1) and a mask at the patch
    grid with 3 of 4 blocks masked; the same (seed, epoch, index) gives the same mask."""
    args = make_args("pretrain", *TINY, "--data_path", toy_data(train_per_class=4, val_per_class=1, size=32),
                     "--batch_size", 4, "--num_workers", 0, "--device", "cpu")
    transform = main_pretrain.build_transform(args)
    assert isinstance(transform, SimMIMTransform)
    assert transform.image_transform.transforms[0].scale == (0.67, 1.0)
    dataset = ImageFolderDataset(os.path.join(args.data_path, "train"), transform)
    (img, mask), _ = dataset[(5, sample_seed(0, 3, 5))]
    assert img.shape == (3, 32, 32) and mask.shape == (4, 4) and mask.dtype == torch.int64
    assert mask.sum() == 3 * 4 and torch.equal(mask, mask[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1))
    (img2, mask2), _ = dataset[(5, sample_seed(0, 3, 5))]
    assert torch.equal(img, img2) and torch.equal(mask, mask2)
    masks = {tuple(dataset[(5, sample_seed(0, e, 5))][0][1].flatten().tolist()) for e in range(12)}
    assert len(masks) > 1  # another epoch, another mask

    args.distributed = False
    _, loader = build_train_loader(args, dataset)
    (imgs, masks), labels = next(iter(loader))
    assert imgs.shape == (4, 3, 32, 32) and masks.shape == (4, 4, 4) and labels.shape == (4,)


def test_optimizer_as_the_official(make_args):
    """AdamW betas (0.9, 0.999), groups [decay 0.05, no decay] as util.lr_decay's, lr = args.lr."""
    args = make_args("pretrain", *TINY, lr=1e-3)
    model = tiny_simmim()
    optimizer = main_pretrain.build_optimizer(model, args, torch.device("cpu"))
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    names = {id(p): n for n, p in model.named_parameters()}
    expected = simmim_param_group_names(model, 0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups] == [g["params"] for g in expected]
    assert "encoder.mask_token" in expected[0]["params"] and "decoder.0.bias" in expected[1]["params"]
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
    mae = main_pretrain.build_optimizer(build_pretrain_model(make_args("pretrain", "--model", "mae_vit_tiny_patch16",
                                                                       "--input_size", 32, "--patch_size", 16)),
                                        make_args("pretrain", lr=1e-3), torch.device("cpu"))
    assert mae.defaults["betas"] == (0.9, 0.95)  # MAE's stays


def test_lr_is_blr_times_batch_over_512(make_args, capsys):
    args = make_args("pretrain", *TINY, "--blr", 1e-4, "--batch_size", 32, "--accum_iter", 2, "--warmup_lr", 5e-7,
                     "--min_lr", 5e-6, world_size=4)  # 256 images per step
    assert resolve_lr(args) == pytest.approx(1e-4 * 256 / 512) and args.lr == pytest.approx(5e-5)
    line = capsys.readouterr().out
    assert "actual lr: 5.00e-05 (base lr 1.00e-04 x 256 / 512); warmup lr 2.50e-07, min lr 2.50e-06" in line
    assert simmim_lrs(args) == pytest.approx((5e-5, 2.5e-7, 2.5e-6))
    assert (args.warmup_lr, args.min_lr) == (5e-7, 5e-6)  # the flags stay base values (compared on resume)
    explicit = make_args("pretrain", *TINY, "--lr", 0.01, "--batch_size", 1024, "--warmup_lr", 1e-6)
    assert resolve_lr(explicit) == 0.01 and simmim_lrs(explicit)[1] == pytest.approx(2e-6)
    mae = make_args("pretrain", "--blr", 1e-4, "--batch_size", 32, "--accum_iter", 2, world_size=4)
    assert resolve_lr(mae) == pytest.approx(1e-4 * 256 / 256)  # MAE's rule unchanged


def lr_at(args, epoch, step, iters_per_epoch=5):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr = lr_sched.set_lr(optimizer, epoch, step, iters_per_epoch, args)
    assert optimizer.param_groups[0]["lr"] == lr
    return lr


def test_schedules_at_chosen_iterations(make_args):
    """5 iterations per epoch, 4 epochs, 1 of warmup; lr(t) set one iteration late (official
    step_update after the optimizer step), so iterations 0 and 1 both run with warmup_lr."""
    base, warmup, low = 1e-3, 1e-5, 1e-4
    args = make_args("pretrain", *TINY, "--epochs", 4, "--warmup_epochs", 1, "--min_lr", low * 512 / 8,
                     "--warmup_lr", warmup * 512 / 8, "--batch_size", 8, lr=base)
    assert lr_at(args, 0, 0) == pytest.approx(warmup) and lr_at(args, 0, 1) == pytest.approx(warmup)
    assert lr_at(args, 0, 3) == pytest.approx(warmup + 2 * (base - warmup) / 5)
    assert lr_at(args, 1, 0) == pytest.approx(warmup + 4 * (base - warmup) / 5)  # last warmup step
    # the cosine counts from iteration 0: at t = 5 it is already below the peak
    assert lr_at(args, 1, 1) == pytest.approx(low + (base - low) * (1 + math.cos(math.pi * 5 / 20)) / 2)
    assert lr_at(args, 3, 4) == pytest.approx(low + (base - low) * (1 + math.cos(math.pi * 18 / 20)) / 2)

    multistep = make_args("pretrain", *TINY, "--epochs", 4, "--warmup_epochs", 1, "--lr_schedule", "multistep",
                          "--milestones", 2, 3, "--gamma", 0.5, "--warmup_lr", 0, "--batch_size", 8, lr=base)
    assert lr_at(multistep, 1, 1) == pytest.approx(base)  # t = 5: warmup over, min_lr unused
    assert lr_at(multistep, 2, 0) == pytest.approx(base)  # t = 9
    assert lr_at(multistep, 2, 1) == pytest.approx(base * 0.5)  # t = 10 = 2 x 5: the first milestone
    assert lr_at(multistep, 3, 2) == pytest.approx(base * 0.25)  # t = 16 > 15

    mae = make_args("pretrain", "--epochs", 4, "--warmup_epochs", 1, lr=base)
    assert lr_at(mae, 0, 3) == pytest.approx(base * 3 / 5) and lr_at(mae, 2, 1) == lr_sched.adjust_learning_rate(
        argparse.Namespace(param_groups=[]), 2 + 1 / 5, mae)  # MAE: its own schedule, by fractional epoch


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

class RecordingScaler(NativeScalerWithGradNormCount):
    """The fp32 loss scaler, recording the clip_grad of each call."""

    def __init__(self):
        super().__init__(enabled=False, device_type="cpu")
        self.clips = []

    def __call__(self, loss, optimizer, clip_grad=None, **kwargs):
        self.clips.append(clip_grad)
        return super().__call__(loss, optimizer, clip_grad=clip_grad, **kwargs)


@pytest.fixture
def engine_args(make_args):
    def make(*flags, **fields):
        return make_args("pretrain", *TINY, "--log_freq", 1000, "--warmup_epochs", 0, "--epochs", 10,
                         "--output_dir", "", *flags, **{"precision": "fp32", "lr": 1e-3, **fields})
    return make


def test_engine_trains_on_the_pipelines_masks(engine_args):
    """With lr 0 the weights stay put: the epoch's loss is the mean of model(images, masks) over
    the batches, so the masks of the batches are what the model used."""
    model = tiny_simmim()
    batches = [((images(4, seed=i), block_masks(4, seed=i)), torch.zeros(4)) for i in range(3)]
    with torch.no_grad():
        expected = [model(imgs, masks)[0].item() for (imgs, masks), _ in batches]
    args = engine_args("--warmup_lr", 0, "--min_lr", 0, lr=0.0)
    optimizer = main_pretrain.build_optimizer(model, args, torch.device("cpu"))
    stats = train_one_epoch(model, batches, optimizer, "cpu", 0, RecordingScaler(), None, args)
    assert stats["loss"] == pytest.approx(sum(expected) / 3, rel=1e-6) and stats["lr"] == 0.0
    no_mask = [((imgs, torch.zeros_like(masks)), y) for (imgs, masks), y in batches]
    assert train_one_epoch(model, no_mask, optimizer, "cpu", 0, RecordingScaler(), None, args)["loss"] == 0.0


def test_engine_clips_at_5_by_default_and_learns(engine_args):
    model = tiny_simmim()
    batch = ((images(4), block_masks(4)), torch.zeros(4))
    args = engine_args()
    optimizer = main_pretrain.build_optimizer(model, args, torch.device("cpu"))
    scaler = RecordingScaler()
    losses = [train_one_epoch(model, [batch] * 4, optimizer, "cpu", epoch, scaler, None, args)["loss"]
              for epoch in range(3)]
    assert scaler.clips == [5.0] * 12 and losses[2] < losses[0]
    scaler = RecordingScaler()
    train_one_epoch(model, [batch], optimizer, "cpu", 0, scaler, None, engine_args("--clip_grad", 0))
    assert scaler.clips == [None]  # 0 turns clipping off
    scaler = RecordingScaler()
    train_one_epoch(model, [batch], optimizer, "cpu", 0, scaler, None, engine_args("--clip_grad", 0.5))
    assert scaler.clips == [0.5]


def test_clipping_bounds_the_update(engine_args):
    """The optimizer steps on the gradient rescaled to total norm --clip_grad (checked on the
    gradients it sees: AdamW's update itself hardly depends on their scale)."""
    seen = []

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in self.param_groups
                                                              for p in g["params"] if p.grad is not None])))
            return super().step(closure)

    model = tiny_simmim()
    batch = ((images(4) * 100, block_masks(4)), torch.zeros(4))  # a large loss: a large gradient
    args = engine_args("--clip_grad", 0.01)
    optimizer = Spy(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, [batch], optimizer, "cpu", 0, RecordingScaler(), None, args)
    assert seen[0] == pytest.approx(0.01, rel=1e-4) and math.isfinite(stats["loss"])


def test_swin_trains_too(engine_args):
    torch.manual_seed(0)
    model = models_simmim.simmim_swin_tiny_patch4_window4_64(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(np.stack([np.kron(rng.permutation([1, 1, 1, 0]).reshape(2, 2), np.ones((8, 8), int))
                                       for _ in range(2)]))  # (2, 16, 16): 32 px blocks of 4 px patches
    batch = ((torch.randn(2, 3, 64, 64), masks), torch.zeros(2))
    args = engine_args("--input_size", 64, "--patch_size", 4, "--mask_patch_size", 32)
    optimizer = main_pretrain.build_optimizer(model, args, torch.device("cpu"))
    stats = train_one_epoch(model, [batch, batch], optimizer, "cpu", 0, RecordingScaler(), None, args)
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0


# ---------------------------------------------------------------------------------------------
# Reconstruction grids and kNN features
# ---------------------------------------------------------------------------------------------

def test_reconstruction_tiles_of_a_simmim():
    model = tiny_simmim()
    imgs, masks = images(2), block_masks(2)
    tiles = visualize.reconstruction_tiles(model, imgs, masks).int()  # (2, 4, 3, 32, 32)
    with torch.no_grad():
        _, recon, _ = model(imgs, masks)
    removed = masks.repeat_interleave(8, 1).repeat_interleave(8, 2).bool().unsqueeze(1).expand(-1, 3, -1, -1)
    original, masked, reconstruction, pasted = tiles.unbind(1)
    assert tiles.shape == (2, 4, 3, 32, 32) and torch.equal(original, visualize.denormalize(imgs).int())
    assert torch.equal(reconstruction, visualize.denormalize(recon).int())
    assert (masked[removed] == 128).all() and torch.equal(masked[~removed], original[~removed])  # grey 0.5
    assert torch.equal(pasted[removed], reconstruction[removed]) and torch.equal(pasted[~removed], original[~removed])
    assert model.training  # the mode is restored


def test_fixed_vis_masking(make_args):
    """The masks of the pretraining grids (util.visualize.fixed_masking, as main_pretrain calls it):
    SimMIM: the same masks at every call, from a numpy Generator seeded with --seed; MAE: its mask
    ratio and the noise of a torch Generator seeded with --seed, as before."""
    args = make_args("pretrain", *TINY)
    model = tiny_simmim()
    masks, noise = visualize.fixed_masking(model, 5, args.seed, args.mask_ratio, args.mask_patch_size)
    assert noise is None and masks.shape == (5, 4, 4) and (masks.sum((1, 2)) == 12).all()
    assert torch.equal(masks, visualize.fixed_masking(model, 5, args.seed, args.mask_ratio, args.mask_patch_size)[0])
    assert not torch.equal(masks, visualize.fixed_masking(model, 5, 1, args.mask_ratio, args.mask_patch_size)[0])
    mae_args = make_args("pretrain", "--model", "mae_vit_tiny_patch16", "--input_size", 32, "--patch_size", 16)
    ratio, noise = visualize.fixed_masking(build_pretrain_model(mae_args), 3, mae_args.seed, mae_args.mask_ratio)
    assert ratio == 0.75 and torch.equal(noise, torch.rand(3, 4, generator=torch.Generator().manual_seed(0)))


def test_knn_features_of_simmim_encoders(make_args):
    vit = tiny_simmim().eval()
    batches = [(images(3), torch.tensor([0, 1, 2]))]
    features, labels = extract_features(vit, batches, torch.device("cpu"), "fp32")
    assert set(features) == {"cls", "avg"} and features["avg"].shape == (3, 32) and labels.tolist() == [0, 1, 2]
    with torch.no_grad():
        tokens = vit.encoder.forward_tokens(images(3))  # (3, 1 + 16, 32), no mask
    normalize = torch.nn.functional.normalize
    assert torch.allclose(features["cls"], normalize(tokens[:, 0], dim=1), atol=1e-6)
    assert torch.allclose(features["avg"], normalize(tokens[:, 1:].mean(1), dim=1), atol=1e-6)
    swin = models_simmim.simmim_swin_tiny_patch4_window4_64(embed_dim=16, depths=(1, 1, 1, 1),
                                                            num_heads=(1, 1, 1, 1)).eval()
    features, _ = extract_features(swin, [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))], torch.device("cpu"),
                                   "fp32")
    assert set(features) == {"avg"} and features["avg"].shape == (2, swin.num_features)  # no cls token


# ---------------------------------------------------------------------------------------------
# From the command line
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(toy_data):
    """4 classes x (4 train + 1 val) images of 32 px: 4 iterations per epoch at batch 4."""
    return toy_data(train_per_class=4, val_per_class=1, size=32)


def start(out, *extra):
    """main_pretrain.py with SCRIPT_ARGS into `out`, as a subprocess (output in <out>.log)."""
    cmd = [sys.executable, "main_pretrain.py", *SCRIPT_ARGS, "--output_dir", *map(str, (out, *extra))]
    with open(f"{out}.log", "w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """(straight, one_epoch): 2 epochs straight and 1 epoch alone, run side by side."""
    straight, one_epoch = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("one_epoch")
    procs = [start(straight, "--epochs", 2, "--data_path", data), start(one_epoch, "--epochs", 1, "--data_path", data)]
    for proc, out in zip(procs, (straight, one_epoch)):
        assert proc.wait(timeout=1200) == 0, open(f"{out}.log").read()[-3000:]
    return straight, one_epoch


@pytest.mark.slow
def test_two_epochs_from_the_command_line(runs):
    straight, _ = runs
    log = read_log(straight)
    assert [line["epoch"] for line in log] == [0, 1] and all(math.isfinite(line["train_loss"]) for line in log)
    assert log[1]["train_loss"] < log[0]["train_loss"] and "knn_top1" in log[0]
    assert {"checkpoint-0.pth", "checkpoint-1.pth"} <= set(os.listdir(straight))
    assert sorted(os.listdir(straight / "reconstructions")) == ["epoch_0000.png", "epoch_0001.png"]
    checkpoint = load_checkpoint(straight / "checkpoint-1.pth")
    args = checkpoint["args"]
    assert (args.mask_ratio, args.clip_grad, args.lr_schedule, args.lr) == (0.6, 5.0, "cosine", 0.5 * 4 / 512)
    assert set(checkpoint["model"]) == set(models_simmim.simmim_vit_tiny_patch16(img_size=32, patch_size=8)
                                           .state_dict())
    assert checkpoint["model"]["decoder.0.weight"].shape == (8 * 8 * 3, 192, 1, 1)
    text = open(f"{straight}.log").read()
    assert "(base lr 5.00e-01 x 4 / 512); warmup lr 3.91e-09" in text
    assert "optimizer: AdamW, 2 parameter groups (weight decay 0.0 / 0.05), betas (0.9, 0.999)" in text


@pytest.mark.slow
def test_resume_at_epoch_boundary_is_bit_exact(runs, data, tmp_path):
    """1 epoch, then `--epochs 2` in the same folder (auto-resume; 2 loader workers draw the
    masks) equals 2 epochs straight: model, optimizer, RNG states, and the log."""
    straight, one_epoch = runs
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    proc = start(out, "--epochs", 2, "--data_path", data, "--num_workers", 2)
    assert proc.wait(timeout=1200) == 0, open(f"{out}.log").read()[-3000:]
    text = open(f"{out}.log").read()
    assert f"Auto-resume from {out / 'checkpoint-0.pth'}" in text and "continuing at epoch 1, iteration 0" in text
    assert_same_training_state(out / "checkpoint-1.pth", straight / "checkpoint-1.pth")
    drop_timing = [{k: v for k, v in line.items() if k != "knn_seconds"} for line in read_log(out)]
    assert drop_timing == [{k: v for k, v in line.items() if k != "knn_seconds"} for line in read_log(straight)]


@pytest.mark.slow
def test_pretrain_finetune_linprobe_chain_from_the_command_line(runs, data, tmp_path, cli):
    """The whole SimMIM chain as a user types it: the pretraining run's checkpoint (main_pretrain.py,
    above) -> main_finetune.py --finetune -> main_finetune.py --eval of the finetuned checkpoint, and
    main_linprobe.py --finetune of the same pretraining checkpoint."""
    pretrain = runs[0] / "checkpoint-1.pth"
    encoder = {k.removeprefix("encoder."): v for k, v in load_checkpoint(pretrain)["model"].items()
               if k.startswith("encoder.")}
    common = ["--device", "cpu", "--num_workers", 0, "--model", "beit_tiny_patch16", "--input_size", 32,
              "--patch_size", 8, "--nb_classes", 4, "--batch_size", 4, "--data_path", data]

    status, output = cli("main_finetune.py", *common, "--finetune", pretrain, "--epochs", 1, "--warmup_epochs", 0,
                         "--output_dir", tmp_path / "ft")
    assert status == 0, output[-3000:]
    assert "Missing keys (trained from scratch): ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']" \
        in output and "Unused checkpoint keys: []" in output
    (ft_log,) = read_log(tmp_path / "ft")
    assert math.isfinite(ft_log["train_loss"]) and 0 <= ft_log["test_acc1"] <= 100
    finetuned = load_checkpoint(tmp_path / "ft" / "checkpoint-0.pth")["model"]
    assert not torch.equal(finetuned["blocks.0.attn.qkv.weight"], encoder["blocks.0.attn.qkv.weight"])  # trained

    status, output = cli("main_finetune.py", *common, "--eval", "--resume", tmp_path / "ft" / "checkpoint-0.pth")
    assert status == 0, output[-3000:]
    assert f"Accuracy of the network on the 4 test images: {ft_log['test_acc1']:.1f}%" in output  # the same model

    status, output = cli("main_linprobe.py", *common, "--finetune", pretrain, "--epochs", 1, "--warmup_epochs", 0,
                         "--output_dir", tmp_path / "lp")
    assert status == 0, output[-3000:]
    (lp_log,) = read_log(tmp_path / "lp")
    assert math.isfinite(lp_log["train_loss"]) and lp_log["n_parameters"] == 192 * 4 + 4  # the head alone
    probed = load_checkpoint(tmp_path / "lp" / "checkpoint-0.pth")["model"]
    for i in range(12):  # the pretrained encoder, frozen, its shared table in every block
        assert torch.equal(probed[f"blocks.{i}.attn.qkv.weight"], encoder[f"blocks.{i}.attn.qkv.weight"])
        assert torch.equal(probed[f"blocks.{i}.attn.relative_position_bias_table"],
                           encoder["rel_pos_bias.relative_position_bias_table"])
