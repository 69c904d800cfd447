"""SimMIM finetuning and linear probing through main_finetune.py / main_linprobe.py (issue 12):
--finetune of a SimMIM checkpoint into the BEiT-style ViT and the Swin (SPEC-simmim section 9)
with exactly the expected missing / unexpected keys, the refusal of other checkpoints, the
optimizer groups and the schedule that the flags build (section 10: layer ids, single layer decay,
lr x batch / 512, warmup from --warmup_lr, cosine from iteration 0), and 1-epoch runs from the
command line, with exact resume."""
import json
import math
import os

import pytest
import torch

from conftest import assert_same_training_state

import main_finetune
import main_linprobe
import models_simmim
import models_swin
import models_vit
import util.lr_sched as lr_sched
from util.args import linear_scaled_lr, resolve_lr
from util.checkpoint import atomic_save, load_checkpoint, load_pretrained_encoder, save_model

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 4x4 patches, 2 blocks


def simmim_vit_checkpoint(make_args, folder, **overrides):
    """A checkpoint of a tiny SimMIM ViT written the way main_pretrain writes one (save_model:
    {'model', 'epoch', 'step', 'args'}); returns (path, the model's state_dict)."""
    torch.manual_seed(0)
    model = models_simmim.simmim_vit_tiny_patch16(**{**TINY_VIT, **overrides})
    with torch.no_grad():  # a shared table that is not all zeros (its init), so copies can be told apart
        model.encoder.rel_pos_bias.relative_position_bias_table.normal_()
    args = make_args("pretrain", "--model", "simmim_vit_tiny_patch16", "--output_dir", folder)
    return save_model(args, 0, model, None, None), model.state_dict()


def official_swin_checkpoint(path):
    """An official-style checkpoint of the tiny SimMIM Swin: {'model': state_dict} only."""
    torch.manual_seed(0)
    model = models_simmim.simmim_swin_tiny_patch4_window4_64()
    atomic_save({"model": model.state_dict()}, path)
    return path, model.state_dict()


def tiny_beit(**overrides):
    return models_vit.beit_tiny_patch16(**{**TINY_VIT, "num_classes": 5, **overrides})


# ---------------------------------------------------------------------------------------------
# --finetune loading
# ---------------------------------------------------------------------------------------------

def test_vit_checkpoint_loads_with_expected_keys(tmp_path, make_args, capsys):
    path, pre = simmim_vit_checkpoint(make_args, tmp_path)
    model = tiny_beit()
    head = model.head.weight.clone()
    msg = load_pretrained_encoder(model, path)
    # the pretrained final norm is discarded (mean pooling: fc_norm starts fresh), the head is new
    assert msg.missing_keys == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
    assert msg.unexpected_keys == []
    out = capsys.readouterr().out
    assert "Dropping the non-encoder keys: ['decoder.0.bias', 'decoder.0.weight']" in out
    assert "['mask_token', 'norm.bias', 'norm.weight']" in out  # what the conversion discards, printed
    state = model.state_dict()
    shared = pre["encoder.rel_pos_bias.relative_position_bias_table"]  # (7*7 + 3, 2)
    for i in range(2):
        assert torch.equal(state[f"blocks.{i}.attn.relative_position_bias_table"], shared)  # copied per block
        for name in ("attn.qkv.weight", "attn.q_bias", "attn.v_bias", "gamma_1", "mlp.fc2.weight"):
            assert torch.equal(state[f"blocks.{i}.{name}"], pre[f"encoder.blocks.{i}.{name}"])
    assert torch.equal(state["cls_token"], pre["encoder.cls_token"])
    assert torch.equal(state["patch_embed.proj.weight"], pre["encoder.patch_embed.proj.weight"])
    assert torch.equal(model.head.weight, head)  # the head keeps its init (no re-draw, as the official)
    assert torch.equal(state["fc_norm.weight"], torch.ones(32))


def test_swin_official_checkpoint_loads_with_expected_keys(tmp_path):
    path, pre = official_swin_checkpoint(tmp_path / "simmim_swin.pth")
    model = models_swin.swin_tiny_patch4_window4_64(num_classes=5)
    msg = load_pretrained_encoder(model, path)
    assert msg.missing_keys == ["head.weight", "head.bias"] and msg.unexpected_keys == []
    state = model.state_dict()
    for k, v in pre.items():
        name = k[len("encoder."):]
        if k.startswith("encoder.") and name != "mask_token":  # every encoder key, the final norm included
            assert torch.equal(state[name], v), name


@pytest.mark.parametrize("case", ["mae_into_beit", "simmim_into_vit", "deeper_vit", "swin_into_beit",
                                  "vit_into_swin"])
def test_other_checkpoints_are_refused(case, tmp_path, make_args, tiny_mae):
    if case == "mae_into_beit":
        path = save_model(make_args("pretrain", "--output_dir", tmp_path), 0, tiny_mae(patch_size=8, depth=2),
                          None, None)
        model, hint = tiny_beit(), "a MAE checkpoint"
    elif case == "simmim_into_vit":
        path, _ = simmim_vit_checkpoint(make_args, tmp_path)
        model = models_vit.vit_tiny_patch16(**TINY_VIT, num_classes=5, global_pool=True)
        hint = "a SimMIM checkpoint (encoder.* keys): finetune it with --model beit_*"
    elif case == "deeper_vit":  # 3 blocks into 2: the extra block is not silently dropped
        path, _ = simmim_vit_checkpoint(make_args, tmp_path, depth=3)
        model, hint = tiny_beit(), "unexpected keys (15): blocks.2."
    elif case == "swin_into_beit":
        path, _ = official_swin_checkpoint(tmp_path / "swin.pth")
        model, hint = tiny_beit(img_size=64), "missing keys"
    else:
        path, _ = simmim_vit_checkpoint(make_args, tmp_path)
        model, hint = models_swin.swin_tiny_patch4_window4_64(num_classes=5), "missing keys"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the") as error:
        load_pretrained_encoder(model, path)
    assert hint in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


# ---------------------------------------------------------------------------------------------
# Flags, optimizer groups and schedule
# ---------------------------------------------------------------------------------------------

def test_recipe_defaults_follow_the_model(make_args):
    beit = make_args("finetune", "--model", "beit_tiny_patch16")
    assert (beit.clip_grad, beit.lr_schedule, beit.warmup_lr) == (5.0, "cosine", 2.5e-7)
    swin = make_args("finetune", "--model", "swin_tiny_patch4_window4_64", "--clip_grad", "0")
    assert (swin.clip_grad, swin.lr_schedule) == (0.0, "cosine")
    mae = make_args("finetune", "--model", "vit_tiny_patch16")
    assert (mae.clip_grad, mae.lr_schedule) == (None, None)  # MAE's path: no clipping, its own schedule
    # lr = blr x batch / 512 for SimMIM's finetuning, / 256 for MAE's and for every linear probe
    for script, model, base in (("finetune", "beit_tiny_patch16", 512), ("finetune", "vit_tiny_patch16", 256),
                                ("linprobe", "beit_tiny_patch16", 256)):
        args = make_args(script, "--model", model, "--batch_size", 64, "--accum_iter", 2, "--blr", 1e-3, world_size=2)
        assert linear_scaled_lr(args) == pytest.approx(1e-3 * 256 / base)


@pytest.mark.parametrize("flags, message", [
    (("--model", "vit_tiny_patch16", "--lr_schedule", "cosine"), "are SimMIM flags"),
    (("--model", "swin_tiny_patch4_window4_64", "--cls_token"), "has no cls token"),
    (("--model", "beit_tiny_patch16", "--clip_grad", "-1"), "--clip_grad must be >= 0"),
    (("--model", "beit_tiny_patch16", "--milestones", "10"), "--milestones is for --lr_schedule multistep"),
])
def test_finetune_flag_checks(flags, message, cli, tmp_path):
    status, output = cli("main_finetune.py", *flags, "--output_dir", tmp_path, "--device", "cpu")
    assert status == 2 and message in output
    assert os.listdir(tmp_path) == []  # stopped before anything was written


def test_linprobe_of_simmim_models_uses_mean_pooling(make_args, capsys):
    args = main_linprobe.resolve_probe_pooling(make_args("linprobe", "--model", "beit_tiny_patch16"))
    assert args.global_pool and "probing the mean of the last block's patch tokens" in capsys.readouterr().out
    assert not main_linprobe.resolve_probe_pooling(make_args("linprobe", "--model", "vit_tiny_patch16")).global_pool


def vit_layer_id(name):
    """SPEC-simmim section 10, depth 2: cls_token / patch_embed 0, blocks.i i + 1, the rest 3."""
    if name == "cls_token" or name.startswith("patch_embed."):
        return 0
    return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 3


def swin_layer_id(name):
    """SPEC-simmim section 10, depths (2, 2, 2, 2): patch_embed 0, layers.s.blocks.j 2s + j + 1,
    layers.s.downsample 2s + 2, the rest 9."""
    if name.startswith("patch_embed."):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        s = int(parts[1])
        return 2 * s + 2 if parts[2] == "downsample" else 2 * s + int(parts[3]) + 1
    return 9


@pytest.mark.parametrize("model_name, build, layer_id, num_layers, no_decay_names", [
    ("beit_tiny_patch16", tiny_beit, vit_layer_id, 4, ("cls_token",)),  # the ViT's tables ARE decayed
    ("swin_tiny_patch4_window4_64", lambda: models_swin.swin_tiny_patch4_window4_64(num_classes=5), swin_layer_id,
     10, ("relative_position_bias_table",)),
])
def test_optimizer_groups_follow_the_layer_ids(model_name, build, layer_id, num_layers, no_decay_names, make_args):
    args = make_args("finetune", "--model", model_name, "--layer_decay", 0.5, "--weight_decay", 0.05, lr=1e-3)
    model = build()
    optimizer = main_finetune.build_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        ids = {layer_id(names[id(p)]) for p in group["params"]}
        assert len(ids) == 1, group["group_name"]
        (i,) = ids
        assert group["lr_scale"] == 0.5 ** (num_layers - 1 - i)  # single decay
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (num_layers - 1 - i))
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        for p in group["params"]:
            name = names[id(p)]
            no_decay = p.ndim == 1 or name.endswith(".bias") or any(k in name for k in no_decay_names)
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        seen += [names[id(p)] for p in group["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter, once
    assert {layer_id(n) for n in seen} == set(range(num_layers))


def test_schedule_at_chosen_iterations(make_args):
    """The lrs that the finetuning loop sets (util.lr_sched.set_lr with the flags): 10 iterations
    an epoch, 5 epochs, 2 of warmup; total batch 128 -> every base value x 128 / 512."""
    args = make_args("finetune", "--model", "beit_tiny_patch16", "--batch_size", 128, "--blr", 2e-3,
                     "--warmup_lr", 4e-6, "--min_lr", 8e-6, "--epochs", 5, "--warmup_epochs", 2,
                     "--layer_decay", 0.5, world_size=1)
    resolve_lr(args)
    peak, warmup_lr, min_lr = 5e-4, 1e-6, 2e-6  # x 0.25
    assert args.lr == pytest.approx(peak)
    model = tiny_beit()
    optimizer = main_finetune.build_optimizer(model, args, torch.device("cpu"))

    def expected(t, scale):  # the official timm 0.4 CosineLRScheduler, single decay
        base = peak * scale
        if t < 20:
            return warmup_lr + t * (base - warmup_lr) / 20
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / 50))

    # (epoch, iteration) -> t: the step runs with the lr of the previous update (one-iteration lag)
    for epoch, step, t in ((0, 0, 0), (0, 1, 0), (0, 7, 6), (2, 0, 19), (2, 1, 20), (3, 4, 33), (4, 9, 48)):
        lr = lr_sched.set_lr(optimizer, epoch, step, 10, args)
        assert lr == pytest.approx(expected(t, 1.0), rel=1e-12)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected(t, group["lr_scale"]), rel=1e-12), (epoch, step)
    # the warmup starts from the unscaled warmup lr in every group; the cosine ends at the unscaled min lr
    lr_sched.set_lr(optimizer, 0, 0, 10, args)
    assert all(g["lr"] == pytest.approx(warmup_lr) for g in optimizer.param_groups)
    assert expected(20, 1.0) < peak  # counted from iteration 0: below the peak when the warmup ends


# ---------------------------------------------------------------------------------------------
# From the command line
# ---------------------------------------------------------------------------------------------

RUN_FLAGS = ["--device", "cpu", "--num_workers", "0", "--nb_classes", "2", "--batch_size", "8", "--log_freq", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_args, toy_data):
    """(folder, 32 px data, a SimMIM ViT-Ti/16 checkpoint of 32 px images, its state_dict)."""
    root = tmp_path_factory.mktemp("simmim_runs")
    data = toy_data(train_per_class=8, val_per_class=4, size=32, classes=("horizontal_stripes", "disc"))
    torch.manual_seed(0)
    model = models_simmim.simmim_vit_tiny_patch16(img_size=32)
    args = make_args("pretrain", "--model", "simmim_vit_tiny_patch16", "--output_dir", root)
    return root, data, save_model(args, 0, model, None, None), model.state_dict()


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def finetune_flags(runs, out, *flags):
    _, data, pretrain, _ = runs
    return [*RUN_FLAGS, "--model", "beit_tiny_patch16", "--input_size", 32, "--finetune", pretrain,
            "--data_path", data, "--mixup", 0.8, "--cutmix", 1.0, "--warmup_epochs", 1, "--output_dir", out, *flags]


@pytest.mark.slow
def test_finetune_and_linprobe_from_the_command_line(runs, cli):
    root, data, pretrain, pre = runs
    status, output = cli("main_finetune.py", *finetune_flags(runs, root / "ft", "--epochs", 1))
    assert status == 0, output[-3000:]
    assert "Missing keys (trained from scratch): ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']" \
        in output and "Unused checkpoint keys: []" in output
    (log,) = read_log(root / "ft")
    assert {"train_loss", "train_lr", "test_acc1", "test_loss"} <= set(log) and math.isfinite(log["train_loss"])
    # both iterations of the 1-epoch warmup run with lr(0) = --warmup_lr x 8 / 512 (MAE's would start at 0)
    assert log["train_lr"] == pytest.approx(2.5e-7 * 8 / 512)
    ckpt = load_checkpoint(root / "ft" / "checkpoint-0.pth")
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[0]["group_name"] == "layer_0_no_decay" and len(groups) == 2 * 14  # layer ids 0..13
    assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], pre["encoder.blocks.0.attn.qkv.weight"])

    status, output = cli("main_linprobe.py", *RUN_FLAGS, "--model", "beit_tiny_patch16", "--input_size", 32,
                         "--finetune", pretrain, "--data_path", data, "--epochs", 1, "--warmup_epochs", 0,
                         "--output_dir", root / "lp")
    assert status == 0, output[-3000:]
    assert "probing the mean of the last block's patch tokens" in output
    (log,) = read_log(root / "lp")
    assert log["n_parameters"] == 192 * 2 + 2 and math.isfinite(log["train_loss"])  # only the linear layer
    state = load_checkpoint(root / "lp" / "checkpoint-0.pth")["model"]
    for i in range(12):  # the encoder is frozen
        assert torch.equal(state[f"blocks.{i}.attn.qkv.weight"], pre[f"encoder.blocks.{i}.attn.qkv.weight"])
        assert torch.equal(state[f"blocks.{i}.attn.relative_position_bias_table"],
                           pre["encoder.rel_pos_bias.relative_position_bias_table"])
    assert "norm.weight" not in state and torch.equal(state["fc_norm.weight"], torch.ones(192))


@pytest.mark.slow
def test_swin_finetune_from_the_command_line(tmp_path, toy_data, cli):
    data = toy_data(train_per_class=8, val_per_class=4, size=64, classes=("horizontal_stripes", "disc"))
    path, pre = official_swin_checkpoint(tmp_path / "simmim_swin.pth")
    status, output = cli("main_finetune.py", *RUN_FLAGS, "--model", "swin_tiny_patch4_window4_64", "--input_size", 64,
                         "--finetune", path, "--data_path", data, "--epochs", 1, "--warmup_epochs", 1,
                         "--layer_decay", 0.9, "--output_dir", tmp_path / "ft")
    assert status == 0, output[-3000:]
    assert "Missing keys (trained from scratch): ['head.weight', 'head.bias']" in output
    (log,) = read_log(tmp_path / "ft")
    assert math.isfinite(log["train_loss"]) and log["train_lr"] == pytest.approx(2.5e-7 * 8 / 512)


@pytest.mark.slow
def test_finetune_resume_is_bit_exact(runs, cli):
    """1 epoch, then `--epochs 2` in the same folder (auto-resume) equals 2 epochs straight."""
    root = runs[0]
    straight, resumed = root / "straight", root / "resumed"
    for out, epochs in ((straight, 2), (resumed, 1), (resumed, 2)):
        status, output = cli("main_finetune.py", *finetune_flags(runs, out, "--epochs", epochs))
        assert status == 0, output[-3000:]
    assert "Auto-resume from" in output
    assert_same_training_state(resumed / "checkpoint-1.pth", straight / "checkpoint-1.pth")
    drop = ("epoch_time", "train_time", "test_time")  # timings, if logged, vary from run to run
    logs = [[{k: v for k, v in line.items() if k not in drop} for line in read_log(d)] for d in (resumed, straight)]
    assert logs[0] == logs[1] and len(logs[0]) == 2
