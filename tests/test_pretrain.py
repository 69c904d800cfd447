"""Pretraining stage: main_pretrain.py end to end, engine_pretrain.train_one_epoch, and
main_visualize.py on a pretraining checkpoint (the grids: tests/test_visualize.py).

The scripts run as subprocesses (plain and under torchrun with gloo) on a generated 32 px image
folder; the engine is checked in-process on tiny models.
"""
import json
import math
import os
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import main_visualize
from conftest import REPO
from engine_pretrain import train_one_epoch
from util import visualize
from util.checkpoint import NonFiniteLossError, load_checkpoint, resume
from util.dist import unwrap_model
from util.lr_sched import adjust_learning_rate
from util.models import build_pretrain_model
from util.precision import NativeScalerWithGradNormCount
from util.toy_data import CLASSES, make_image
NUM_TRAIN = 16  # 4 classes x 4 images
IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
SCRIPT_ARGS = ["--device", "cpu", "--num_workers", "0", "--model", "mae_vit_tiny_patch16",
               "--input_size", "32", "--patch_size", "16", "--batch_size", "4", "--warmup_epochs", "1",
               "--log_freq", "2", "--vis_images", "4", "--seed", "0"]


def read_log(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


class FixedNoiseMAE(torch.nn.Module):
    """A MAE whose masks depend only on each image (noise = patch means): the same sample gets
    the same mask whatever batch it is in."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    def forward(self, imgs, mask_ratio=0.75):
        noise = self.mae.patchify(imgs).mean(-1)  # (N, L)
        return self.mae(imgs, mask_ratio=mask_ratio, noise=noise)


@pytest.fixture
def engine_args(make_args):
    """engine_args(*flags, **fields): main_pretrain's arguments for train_one_epoch: --log_freq 1000,
    --warmup_epochs 0, --epochs 100, no --output_dir, then `flags`; the resolved precision='fp32'
    and lr=1e-3 unless `fields` say otherwise (defaults: --accum_iter 1, --mask_ratio 0.75,
    --save_every_iters 0, --min_lr 0, --weight_decay 0.05)."""
    def make(*flags, **fields):
        return make_args("pretrain", "--log_freq", 1000, "--warmup_epochs", 0, "--epochs", 100,
                         "--output_dir", "", *flags, **{"precision": "fp32", "lr": 1e-3, **fields})
    return make


def random_images(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------------
# main_pretrain.py end to end
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_path(toy_data):
    return toy_data(train_per_class=4, val_per_class=1, size=32)


@pytest.fixture(scope="module")
def first_run(data_path, tmp_path_factory, run_script):
    """One epoch of mae_vit_tiny_patch16 (32 px, patch 16) on 16 images, 4 iterations."""
    out = str(tmp_path_factory.mktemp("run1"))
    _, log = run_script("main_pretrain.py", *SCRIPT_ARGS, "--epochs", "1", "--data_path", data_path,
                        "--output_dir", out, "--log_dir", out, timeout=120)
    return out, log


def test_one_epoch_writes_checkpoint_log_tensorboard_and_reconstructions(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = first_run
    (stats,) = read_log(out)
    assert stats["epoch"] == 0 and set(stats) == {"epoch", "train_loss", "train_lr", "knn_top1", "knn_top5",
                                                  "knn_avg_top1", "knn_avg_top5", "knn_seconds"}  # kNN: val/ exists
    assert math.isfinite(stats["train_loss"]) and stats["train_loss"] > 0

    checkpoint = load_checkpoint(os.path.join(out, "checkpoint-0.pth"))
    assert checkpoint["epoch"] == 0 and checkpoint["step"] is None
    assert checkpoint["args"].input_size == 32 and checkpoint["args"].patch_size == 16
    assert checkpoint["model"]["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
    assert checkpoint["model"]["pos_embed"].shape == (1, 1 + 4, 192)  # --input_size reached the model

    events = EventAccumulator(out, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    losses, lrs = events.Scalars("train_loss"), events.Scalars("lr")
    assert [e.step for e in losses] == [0, 250, 500, 750]  # epoch_1000x of 4 iterations
    assert [e.step for e in lrs] == [0, 250, 500, 750]
    assert all(math.isfinite(e.value) for e in losses)
    # warmup over 1 epoch: lr = lr_max * i / 4, lr_max = 1e-3 * 4 / 256
    assert [e.value for e in lrs] == pytest.approx([1e-3 * 4 / 256 * i / 4 for i in range(4)])
    assert stats["train_loss"] == pytest.approx(sum(e.value for e in losses) / 4, rel=1e-5)
    assert "reconstructions" in events.Tags()["images"]

    with Image.open(os.path.join(out, "reconstructions", "epoch_0000.png")) as im:
        width, height = im.size  # 4 columns x --vis_images rows of 32 px tiles shown at 96 px, titles on top
        assert width == visualize.GAP + 4 * (96 + visualize.GAP) and height > 4 * (96 + visualize.GAP) + 10


@pytest.mark.slow
def test_reconstructions_every_vis_freq_epochs_and_after_the_last(data_path, tmp_path, run_script):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path)
    run_script("main_pretrain.py", *SCRIPT_ARGS, "--epochs", "4", "--vis_freq", "2",
               "--data_path", data_path, "--output_dir", out, "--log_dir", out, timeout=120)
    assert sorted(os.listdir(os.path.join(out, "reconstructions"))) == [
        "epoch_0000.png", "epoch_0002.png", "epoch_0003.png"]
    events = EventAccumulator(out, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("reconstructions")] == [0, 2, 3]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-0.pth", "checkpoint-3.pth"]


@pytest.mark.slow
def test_resume_restores_everything_and_continues(first_run, data_path, tmp_path, make_args, run_script):
    first_out, _ = first_run
    checkpoint_path = os.path.join(first_out, "checkpoint-0.pth")
    checkpoint = load_checkpoint(checkpoint_path)

    # in-process: what main_pretrain builds takes model, optimizer, scaler and epoch back
    checkpoint["scaler"] = {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 7}  # as an fp16 run saves it
    fp16_path = str(tmp_path / "checkpoint-fp16.pth")
    torch.save(checkpoint, fp16_path)
    args = make_args("pretrain", *SCRIPT_ARGS, "--data_path", data_path, "--resume", fp16_path, "--lr", "1e-3")
    model = build_pretrain_model(args)
    optimizer = main_pretrain.build_optimizer(model, args, "cpu")
    scaler = NativeScalerWithGradNormCount(enabled=True, device_type="cpu")
    start = resume(args, model, optimizer, scaler)
    assert start.epoch == 1 and start.iteration == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, checkpoint["model"][k]), k
    state = optimizer.state_dict()["state"]
    assert len(state) == len(checkpoint["optimizer"]["state"]) > 0
    assert all(int(s["step"]) == 4 for s in state.values())
    saved_state = checkpoint["optimizer"]["state"]
    assert all(torch.equal(state[i]["exp_avg"], saved_state[i]["exp_avg"]) for i in state)
    assert scaler.state_dict()["scale"] == 256.0 and scaler.state_dict()["_growth_tracker"] == 7

    # the script resumes from checkpoint-0 and trains epoch 1 only (with 2 persistent workers)
    out = str(tmp_path / "run2")
    _, log = run_script("main_pretrain.py", *SCRIPT_ARGS, "--epochs", "2", "--num_workers", "2",
                        "--resume", checkpoint_path, "--data_path", data_path, "--output_dir", out,
                        "--log_dir", out, timeout=120)
    assert "Resume checkpoint" in log
    assert [s["epoch"] for s in read_log(out)] == [1]
    assert not os.path.exists(os.path.join(out, "checkpoint-0.pth"))
    resumed = load_checkpoint(os.path.join(out, "checkpoint-1.pth"))
    assert resumed["epoch"] == 1
    assert all(int(s["step"]) == 8 for s in resumed["optimizer"]["state"].values())  # 4 + 4 steps
    assert not torch.equal(resumed["model"]["blocks.0.attn.qkv.weight"],
                           checkpoint["model"]["blocks.0.attn.qkv.weight"])
    assert os.path.exists(os.path.join(out, "reconstructions", "epoch_0001.png"))  # the last epoch


@pytest.mark.slow
def test_torchrun_two_processes_see_disjoint_shards(data_path, tmp_path, run_script):
    out = str(tmp_path / "ddp")
    wrapper = tmp_path / "record_indices.py"
    wrapper.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {REPO!r})
        import util.datasets
        seen = []
        getitem = util.datasets.ImageFolderDataset.__getitem__
        def recording_getitem(self, item):
            if isinstance(item, tuple):  # (index, sample_seed) from the training sampler
                seen.append(item[0])
            return getitem(self, item)
        util.datasets.ImageFolderDataset.__getitem__ = recording_getitem
        import main_pretrain
        main_pretrain.main(main_pretrain.get_args_parser().parse_args())
        with open(os.path.join({out!r}, "seen-" + os.environ["RANK"] + ".json"), "w") as f:
            json.dump(seen, f)
    """))
    _, log = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", wrapper,
                        *SCRIPT_ARGS, "--epochs", "1", "--data_path", data_path, "--output_dir", out,
                        "--log_dir", out, timeout=180)
    assert "effective batch size: 8" in log  # 4 per process x 2 processes
    seen = [json.load(open(os.path.join(out, f"seen-{r}.json"))) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == NUM_TRAIN // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_TRAIN))
    (stats,) = read_log(out)  # written once, by rank 0
    assert stats["epoch"] == 0 and math.isfinite(stats["train_loss"])
    assert len([n for n in os.listdir(out) if n.startswith("events.out.tfevents")]) == 1  # rank 0 only
    checkpoint = load_checkpoint(os.path.join(out, "checkpoint-0.pth"))
    rank0, rank1 = checkpoint["rng"]  # the same number of draws from seed + rank: different states
    assert not torch.equal(rank0["torch"], rank1["torch"]) and rank0["python"] != rank1["python"]


def test_build_model_uses_input_and_patch_size_and_names_valid_models(make_args):
    args = make_args("pretrain", "--model", "mae_vit_tiny_patch16", "--input_size", "48", "--patch_size", "8",
                     "--norm_pix_loss")
    model = build_pretrain_model(args)
    assert model.patch_embed.grid_size == (6, 6) and model.norm_pix_loss
    assert model.decoder_pred.out_features == 8 * 8 * 3
    defaults = make_args("pretrain")
    assert (defaults.model, defaults.batch_size, defaults.epochs, defaults.warmup_epochs, defaults.blr,
            defaults.weight_decay, defaults.mask_ratio, defaults.min_lr, defaults.norm_pix_loss) == (
        "mae_vit_large_patch16", 64, 400, 40, 1e-3, 0.05, 0.75, 0.0, False)
    with pytest.raises(ValueError, match="mae_vit_base_patch16"):
        build_pretrain_model(make_args("pretrain", "--model", "vit_base_patch16"))


def test_pretrain_optimizer_groups_as_the_original(tiny_mae, make_args):
    """AdamW(betas=(0.9, 0.95)); weight decay on every >= 2-D parameter (cls_token and mask_token
    included), none on biases and norms; the fixed sin-cos pos embeds are not optimised."""
    model = tiny_mae()
    args = make_args("pretrain", "--lr", "1e-3")
    optimizer = main_pretrain.build_optimizer(model, args, "cpu")
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {wd: {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == wd for p in g["params"]}
             for wd in (0.0, 0.05)}
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "decoder_embed.weight", "decoder_pred.weight"} <= decay[0.05]
    assert {"patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias",
            "decoder_norm.weight"} <= decay[0.0]
    assert all(model.get_parameter(n).ndim > 1 for n in decay[0.05])
    assert all(model.get_parameter(n).ndim <= 1 for n in decay[0.0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay[0.0] | decay[0.05] == trainable and not decay[0.0] & decay[0.05]
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable


def test_fast_decode_flag_reaches_the_pretrain_transform(make_args):
    from util.datasets import build_pretrain_transform
    assert not build_pretrain_transform(make_args("pretrain", "--input_size", "32")).fast_decode
    transform = build_pretrain_transform(make_args("pretrain", "--input_size", "32", "--fast_decode"))
    assert transform.fast_decode and transform.size == (32, 32)


# ---------------------------------------------------------------------------------------------
# engine_pretrain.train_one_epoch
# ---------------------------------------------------------------------------------------------

def test_accum_iter_2_equals_double_batch(tiny_mae, engine_args):
    imgs = random_images(8)
    results = []
    for accum_iter, batches in ((1, [imgs]), (2, [imgs[:4], imgs[4:]])):
        torch.manual_seed(0)
        model = FixedNoiseMAE(tiny_mae(norm_pix_loss=True))
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        args = engine_args("--accum_iter", accum_iter, lr=1e-2)
        # SGD: its update is linear in the gradient. (Adam's first step is ~lr * sign(grad), which
        # turns float noise in mathematically zero gradients, e.g. the attention key bias, into
        # full-size differences.)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=0.05)
        scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
        loader = [(b, torch.zeros(len(b))) for b in batches] * 2  # two updates
        stats = train_one_epoch(model, loader, optimizer, "cpu", 0, scaler, None, args)
        results.append((model.state_dict(), stats))
    (weights_1, stats_1), (weights_2, stats_2) = results
    for k, w in weights_1.items():
        torch.testing.assert_close(weights_2[k], w, rtol=1e-5, atol=1e-6, msg=k)
    assert sum(not torch.equal(w, initial[k]) for k, w in weights_1.items()) > 10  # it trained
    assert stats_2["loss"] == pytest.approx(stats_1["loss"], rel=1e-5)  # mean of equal-mask halves


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))


@pytest.mark.parametrize("accum_iter, start_iter", [(1, 0), (2, 0), (1, 2)])
def test_lr_follows_schedule_every_iteration(accum_iter, start_iter, tiny_mae, engine_args):
    torch.manual_seed(0)
    model = tiny_mae()
    args = engine_args("--accum_iter", accum_iter, "--min_lr", 0.01, "--warmup_epochs", 2, "--epochs", 4, lr=0.1)
    optimizer = main_pretrain.build_optimizer(model, args, "cpu")
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    iters_per_epoch, epoch = 4, 1
    loader = [(random_images(2, seed=i), torch.zeros(2)) for i in range(iters_per_epoch - start_iter)]
    writer = FakeWriter()
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    train_one_epoch(model, loader, optimizer, "cpu", epoch, scaler, writer, args, start_iter=start_iter)

    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0)
    steps = range(start_iter, iters_per_epoch)
    expected, expected_tb = [], []
    for i in steps:
        if i % accum_iter == 0:
            lr = adjust_learning_rate(reference, epoch + i / iters_per_epoch, args)
        if (i + 1) % accum_iter == 0:
            expected.append(lr)
            # TensorBoard at the ends of the accumulation cycles, as the original
            expected_tb.append((int((epoch + i / iters_per_epoch) * 1000), lr))
    assert all(len(groups) == 2 and groups[0] == groups[1] for groups in seen)  # no decay / decay
    assert [groups[0] for groups in seen] == pytest.approx(expected)
    assert len(seen) == len(steps) // accum_iter and len({s[0] for s in seen}) == len(seen)
    assert [s for s, _ in writer.scalars["lr"]] == [s for s, _ in expected_tb]
    assert [v for _, v in writer.scalars["lr"]] == pytest.approx([v for _, v in expected_tb])
    assert [s for s, _ in writer.scalars["train_loss"]] == [s for s, _ in expected_tb]


def test_resume_inside_an_accumulation_cycle_sets_the_lr_at_once(tiny_mae, engine_args):
    """A checkpoint-last.pth of a run with another --accum_iter can put start_iter inside a cycle:
    the lr is then set from the schedule at the resumed iteration, not left unset."""
    torch.manual_seed(0)
    model = tiny_mae()
    args = engine_args("--accum_iter", 2, "--warmup_epochs", 2, "--epochs", 4, lr=0.1)
    optimizer = main_pretrain.build_optimizer(model, args, "cpu")
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    loader = [(random_images(2, seed=i), torch.zeros(2)) for i in range(3)]  # iterations 1, 2, 3 of 4
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    stats = train_one_epoch(model, loader, optimizer, "cpu", 1, scaler, None, args, start_iter=1)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0)
    expected = [adjust_learning_rate(reference, 1 + i / 4, args) for i in (1, 2)]  # cycles from 1 and 2
    assert seen == pytest.approx(expected) and math.isfinite(stats["loss"])


def toy_images(n, seed=0):
    """n normalised 32 px images of the toy dataset's classes (learnable structure)."""
    rng = np.random.default_rng(seed)
    pixels = np.stack([make_image(CLASSES[i % len(CLASSES)], 32, rng) for i in range(n)])  # (N, S, S, 3)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S)
    return (x - IMAGENET_MEAN.view(3, 1, 1)) / IMAGENET_STD.view(3, 1, 1)


def test_loss_is_finite_and_decreases_on_a_fixed_batch(tiny_mae, engine_args):
    torch.manual_seed(0)
    model = tiny_mae()
    args = engine_args("--weight_decay", 0.0, lr=1e-2)
    optimizer = main_pretrain.build_optimizer(model, args, "cpu")
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    batch = (toy_images(8), torch.zeros(8))
    losses = [train_one_epoch(model, [batch] * 5, optimizer, "cpu", epoch, scaler, None, args)["loss"]
              for epoch in range(4)]
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.75 * losses[0], losses


def test_bf16_autocast_on_cpu_trains(tiny_mae, engine_args):
    torch.manual_seed(0)
    model = tiny_mae()
    args = engine_args(precision="bf16")
    optimizer = main_pretrain.build_optimizer(model, args, "cpu")
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    stats = train_one_epoch(model, [(random_images(4), torch.zeros(4))] * 2, optimizer, "cpu", 0, scaler,
                            None, args)
    assert math.isfinite(stats["loss"]) and model.blocks[0].attn.qkv.weight.dtype == torch.float32


class NaNAtIteration(torch.nn.Module):
    def __init__(self, mae, bad_call):
        super().__init__()
        self.mae, self.bad_call, self.calls = mae, bad_call, 0

    def forward(self, imgs, mask_ratio=0.75):
        loss, pred, mask = self.mae(imgs, mask_ratio=mask_ratio)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.bad_call else loss), pred, mask


def test_non_finite_loss_stops_before_saving(tmp_path, tiny_mae, engine_args):
    torch.manual_seed(0)
    model = NaNAtIteration(tiny_mae(), bad_call=3)  # iterations 0, 1, 2 fine, 3 NaN
    args = engine_args("--save_every_iters", 2, "--log_freq", 100, "--output_dir", tmp_path)
    optimizer = main_pretrain.build_optimizer(model, args, "cpu")
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    loader = [(random_images(2, seed=i), torch.zeros(2)) for i in range(6)]
    with pytest.raises(NonFiniteLossError, match="epoch 5, iteration 3"):
        train_one_epoch(model, loader, optimizer, "cpu", 5, scaler, None, args)
    checkpoint = load_checkpoint(str(tmp_path / "checkpoint-last.pth"))
    assert (checkpoint["epoch"], checkpoint["step"]) == (5, 2)  # the save at iteration 4 never happened
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_no_host_sync_per_iteration(monkeypatch, tiny_mae, engine_args):
    """Reading a tensor on the host (item, tolist, float, bool, ...) happens at log points only: the
    number of reads does not grow with the number of iterations."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            counts["n"] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def host_reads(num_iters):
        torch.manual_seed(0)
        model = tiny_mae()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
        loader = [(random_images(2, seed=i), torch.zeros(2)) for i in range(num_iters)]
        counts["n"] = 0
        train_one_epoch(model, loader, optimizer, "cpu", 0, scaler, None, engine_args("--log_freq", 1000))
        return counts["n"]

    # the log points (first and last iteration) read a fixed number of values, whatever the length
    assert host_reads(3) == host_reads(9) > 0


def test_unwrap_finds_the_bare_model(tiny_mae):
    model = tiny_mae()
    assert unwrap_model(model) is model


# ---------------------------------------------------------------------------------------------
# main_visualize.py on a pretraining checkpoint (the grids themselves: tests/test_visualize.py)
# ---------------------------------------------------------------------------------------------

def test_visualize_command_on_a_pretraining_checkpoint(first_run, data_path):
    out, _ = first_run
    grid = main_visualize.main(["--checkpoint", os.path.join(out, "checkpoint-0.pth"), "--data_path",
                                os.path.join(data_path, "val"), "--num_images", "2", "--device", "cpu"])
    with Image.open(os.path.join(out, "reconstructions-checkpoint-0.png")) as im:  # beside the checkpoint
        assert im.size == (grid.shape[2], grid.shape[1])
    assert grid.shape[2] == visualize.GAP + 4 * (96 + visualize.GAP)  # 32 px tiles shown at 96 px
