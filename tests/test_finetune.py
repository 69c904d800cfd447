"""Finetuning and linear probing: --finetune loading, the linear-probe head, evaluate, the
training loop's stop on a non-finite loss, and both scripts end to end on a generated dataset."""
import argparse
import builtins
import json
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import models_mae
import main_finetune
import main_linprobe
import main_pretrain
from engine_finetune import evaluate, set_train_mode, train_one_epoch
from main_finetune import build_criterion, build_mixup
from main_finetune import get_args_parser as finetune_parser
from main_linprobe import add_linear_probe_head
from util.checkpoint import NonFiniteLossError, load_checkpoint, load_pretrained_encoder, save_model
from util.lars import LARS
from util.precision import NativeScalerWithGradNormCount


def save_pretrain_checkpoint(make_args, folder, mae):
    """A checkpoint written the way main_pretrain writes one (checkpoint.save_model)."""
    args = make_args("pretrain", "--output_dir", folder, "--model", "mae_tiny")
    return save_model(args, 0, mae, None, None)


def encoder_keys(state_dict):
    return [k for k in state_dict if not k.startswith(("decoder", "mask_token", "norm.", "head", "fc_norm"))]


# ---------------------------------------------------------------------------------------------
# --finetune loading
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("global_pool", [True, False])
def test_load_pretrained_encoder_expected_keys(tmp_path, global_pool, make_args, tiny_mae, tiny_vit):
    torch.manual_seed(0)
    mae = tiny_mae(patch_size=16, depth=2)
    path = save_pretrain_checkpoint(make_args, tmp_path, mae)
    model = tiny_vit(global_pool=global_pool)
    msg = load_pretrained_encoder(model, path, unsafe=False)

    expected_missing = {"head.weight", "head.bias"}
    if global_pool:
        expected_missing |= {"fc_norm.weight", "fc_norm.bias"}
    assert set(msg.missing_keys) == expected_missing
    unexpected = set(msg.unexpected_keys)
    assert {"mask_token", "decoder_embed.weight", "decoder_pred.bias", "decoder_pos_embed"} <= unexpected
    assert ({"norm.weight", "norm.bias"} <= unexpected) == global_pool
    assert all(k.startswith(("decoder", "mask_token", "norm.")) for k in unexpected)
    mae_state, state = mae.state_dict(), model.state_dict()
    keys = encoder_keys(mae_state)
    assert "blocks.1.mlp.fc2.weight" in keys and "pos_embed" in keys and "cls_token" in keys
    for k in keys:
        assert torch.equal(state[k], mae_state[k]), k
    if not global_pool:
        assert torch.equal(state["norm.weight"], mae_state["norm.weight"])


def test_load_pretrained_encoder_into_linprobe_model(tmp_path, make_args, tiny_mae, tiny_vit):
    mae = tiny_mae(patch_size=16, depth=2)
    path = save_pretrain_checkpoint(make_args, tmp_path, mae)
    # as main_linprobe: load into the plain classifier, then wrap the head
    model = tiny_vit(global_pool=False)
    msg = load_pretrained_encoder(model, path)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"}
    add_linear_probe_head(model)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], mae.state_dict()["blocks.0.attn.qkv.weight"])
    # a model whose head is already the probe's Sequential: head.0.* / head.1.* are the missing ones
    wrapped = add_linear_probe_head(tiny_vit(global_pool=False))
    msg = load_pretrained_encoder(wrapped, path)
    # (torch does not report BatchNorm's num_batches_tracked as missing)
    assert set(msg.missing_keys) == {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"}


def test_load_pretrained_encoder_accepts_bare_state_dict_and_drops_mismatched_head(tmp_path, tiny_vit):
    finetuned = tiny_vit(num_classes=7)
    torch.save(finetuned.state_dict(), tmp_path / "bare.pth")
    model = tiny_vit(num_classes=5)
    msg = load_pretrained_encoder(model, str(tmp_path / "bare.pth"))
    assert set(msg.missing_keys) == {"head.weight", "head.bias"}  # 7-class head dropped
    assert torch.equal(model.fc_norm.weight, finetuned.fc_norm.weight)  # fc_norm loaded


def test_load_pretrained_encoder_rejects_other_model_size(tmp_path, make_args, tiny_mae, tiny_vit):
    path = save_pretrain_checkpoint(make_args, tmp_path, tiny_mae(patch_size=16, depth=2, embed_dim=48))
    model = tiny_vit(embed_dim=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_pretrained_encoder(model, path)
    message = str(e.value)
    assert path in message
    assert "patch_embed.proj.weight: checkpoint (48, 3, 16, 16) vs model (32, 3, 16, 16)" in message
    assert "blocks.0.attn.qkv.weight" in message
    # checked before loading: nothing was changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ckpt_depth, key", [(3, "unexpected keys"), (1, "missing keys")])
def test_load_pretrained_encoder_rejects_other_depth(tmp_path, ckpt_depth, key, make_args, tiny_mae, tiny_vit):
    path = save_pretrain_checkpoint(make_args, tmp_path, tiny_mae(patch_size=16, depth=ckpt_depth))
    with pytest.raises(ValueError, match=key) as e:
        load_pretrained_encoder(tiny_vit(depth=2), path)
    assert ("blocks.2.attn.qkv.weight" if ckpt_depth == 3 else "blocks.1.attn.qkv.weight") in str(e.value)


def test_load_pretrained_encoder_interpolates_224_to_384(tmp_path, make_args, tiny_mae, tiny_vit):
    mae = tiny_mae(img_size=224, patch_size=16, depth=1)  # 14 x 14 patches
    path = save_pretrain_checkpoint(make_args, tmp_path, mae)
    model = tiny_vit(img_size=384, depth=1)  # 24 x 24 patches
    msg = load_pretrained_encoder(model, path)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}

    ckpt_pos = mae.pos_embed.detach()  # (1, 1 + 196, 32)
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(pos[:, 0], ckpt_pos[:, 0])  # cls row kept
    grid = ckpt_pos[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 576, 32))
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 5)


# ---------------------------------------------------------------------------------------------
# Linear probe: head, freezing, train mode
# ---------------------------------------------------------------------------------------------

def small_train_args(make_args, lr=0.1, **flags):
    """main_finetune's arguments for these tiny runs: the flags (accum_iter, blr, min_lr,
    warmup_epochs, epochs, log_freq, save_every_iters; defaults below) on the command line, the
    resolved lr and precision (fp32) set as a run sets them."""
    flags = dict(dict(accum_iter=1, blr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, log_freq=1,
                      save_every_iters=0), **flags)
    argv = [item for name, value in flags.items() for item in (f"--{name}", value)]
    return make_args("finetune", *argv, lr=lr, precision="fp32")


def random_batches(n_batches=2, batch_size=4, img_size=32, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, img_size, img_size, generator=g),
             torch.randint(0, num_classes, (batch_size,), generator=g)) for _ in range(n_batches)]


def test_linear_probe_head_is_bn_without_affine_and_only_head_trains(make_args, tiny_vit):
    torch.manual_seed(0)
    model = add_linear_probe_head(tiny_vit(global_pool=False, drop_path_rate=0.5))
    bn, linear = model.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert bn.weight is None and bn.bias is None and not list(bn.parameters())
    assert isinstance(linear, nn.Linear) and linear.in_features == 32
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]

    seen = {"blocks": [], "bn": []}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen["blocks"].append(m.training))
    model.head[0].register_forward_hook(lambda m, i, o: seen["bn"].append(m.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = LARS(model.head.parameters(), lr=0.1, weight_decay=0.0)
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    stats = train_one_epoch(model, nn.CrossEntropyLoss(), random_batches(), optimizer, torch.device("cpu"), 0,
                            scaler, None, small_train_args(make_args), frozen_backbone=True)
    assert set(stats) == {"loss", "lr"} and stats["loss"] > 0

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.1.weight", "head.1.bias", "head.0.running_mean", "head.0.running_var",
                       "head.0.num_batches_tracked"}
    # the frozen encoder ran in eval mode, the head's BatchNorm in train mode (batch statistics)
    assert seen["blocks"] == [False, False] and seen["bn"] == [True, True]


def test_frozen_backbone_features_are_deterministic_with_drop_path(tiny_vit):
    torch.manual_seed(0)
    model = add_linear_probe_head(tiny_vit(global_pool=False, drop_path_rate=0.5))
    x = torch.randn(4, 3, 32, 32)
    set_train_mode(model, frozen_backbone=True)
    assert model.head.training and model.head[0].training
    assert not any(m.training for name, m in model.named_modules() if not name.startswith("head"))
    torch.testing.assert_close(model.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    # the original's model.train(True) for the whole model: drop path makes the features random
    set_train_mode(model, frozen_backbone=False)
    assert not torch.equal(model.forward_features(x), model.forward_features(x))


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------

class LogitsLookup(nn.Module):
    """Returns logits[i] for an 'image' whose pixels all hold the sample index i."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)
        self.modes = []

    def forward(self, images):
        self.modes.append(self.training)
        return self.logits[images.flatten(1)[:, 0].long()]


def eval_args(make_args):
    """What evaluate reads (log_freq, precision), as main_finetune has them."""
    return make_args("finetune", precision="fp32")


def test_evaluate_top1_top5_weighted_across_unequal_batches(make_args):
    logits = torch.tensor([
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # target 0: ranked 1st -> top-1 and top-5
        [9.0, 7.0, 8.0, 1.0, 2.0, 3.0],  # target 1: ranked 3rd -> top-5 only
        [9.0, 8.0, 0.0, 7.0, 6.0, 5.0],  # target 2: ranked 6th -> neither
        [0.0, 1.0, 2.0, 9.0, 4.0, 5.0],  # target 3: ranked 1st -> top-1 and top-5
    ])
    targets = torch.tensor([0, 1, 2, 3])
    images = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 3, 2, 2)
    batches = DataLoader(TensorDataset(images, targets), batch_size=3)  # sizes 3 and 1
    model = LogitsLookup(logits).train()
    stats = evaluate(batches, model, torch.device("cpu"), eval_args(make_args))
    assert model.modes == [False, False]  # evaluated in eval mode
    assert stats["acc1"] == pytest.approx(50.0)  # 2 of 4, not the mean of batch accuracies (66.7)
    assert stats["acc5"] == pytest.approx(75.0)  # 3 of 4 (mean of batch accuracies: 83.3)
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_evaluate_with_fewer_than_five_classes(make_args):
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    images = torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 3, 2, 2)
    batches = DataLoader(TensorDataset(images, torch.tensor([0, 2])), batch_size=2)  # one batch
    stats = evaluate(batches, LogitsLookup(logits), torch.device("cpu"), eval_args(make_args))
    assert stats["acc1"] == pytest.approx(50.0) and stats["acc5"] == pytest.approx(100.0)  # top-3


# ---------------------------------------------------------------------------------------------
# train_one_epoch details, criterion
# ---------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_with_epoch_and_iteration(make_args, tiny_vit):
    torch.manual_seed(0)
    model = tiny_vit(depth=1)
    calls = []

    def criterion(output, target):
        calls.append(1)
        loss = F.cross_entropy(output, target)
        return loss * float("nan") if len(calls) == 2 else loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, iteration 1\b"):
        train_one_epoch(model, criterion, random_batches(3), optimizer, torch.device("cpu"), 3, scaler, None,
                        small_train_args(make_args, epochs=5, log_freq=10))


def test_finetune_accum_iter_2_equals_double_batch(make_args, tiny_vit):
    """engine_finetune with --accum_iter 2 on halves = one step on the whole batch (fp32, SGD:
    an update linear in the gradient; no dropout / drop path, so the halves see the same net)."""
    (imgs, targets), = random_batches(1, batch_size=8)
    results = []
    for accum_iter, batches in ((1, [(imgs, targets)]), (2, [(imgs[:4], targets[:4]), (imgs[4:], targets[4:])])):
        torch.manual_seed(0)
        model = tiny_vit(depth=2)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
        train_one_epoch(model, nn.CrossEntropyLoss(), batches * 2, optimizer, torch.device("cpu"), 0, scaler, None,
                        small_train_args(make_args, accum_iter=accum_iter, lr=0.1, log_freq=10), max_norm=1.0)
        results.append(model.state_dict())
    for k, w in results[0].items():
        torch.testing.assert_close(results[1][k], w, rtol=1e-5, atol=1e-6, msg=k)
    assert sum(not torch.equal(w, initial[k]) for k, w in results[0].items()) > 10  # it trained


def test_evaluate_runs_without_autograd(make_args, tiny_vit):
    model = tiny_vit(depth=1)
    seen = []
    model.head.register_forward_hook(lambda mod, inp, out: seen.append(torch.is_grad_enabled() or out.requires_grad))
    images, targets = (torch.cat(parts) for parts in zip(*random_batches(2)))
    batches = DataLoader(TensorDataset(images, targets), batch_size=4)  # the same 2 batches of 4
    evaluate(batches, model, torch.device("cpu"), eval_args(make_args))
    assert seen == [False, False]


def test_lr_follows_schedule_with_layer_decay_and_clipping(make_args, tiny_vit):
    from util.lr_decay import param_groups_lrd
    from util.lr_sched import adjust_learning_rate
    torch.manual_seed(0)
    model = tiny_vit(depth=2)
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    args = small_train_args(make_args, lr=1e-3, min_lr=1e-6, warmup_epochs=1, epochs=2)
    seen = []
    real_step = optimizer.step

    def step(*a, **kw):
        seen.append([g["lr"] for g in optimizer.param_groups])
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in groups for p in g["params"]]))
        assert norm <= 0.01 * (1 + 1e-5)  # clipped to --clip_grad before the step
        return real_step(*a, **kw)

    optimizer.step = step
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    train_one_epoch(model, nn.CrossEntropyLoss(), random_batches(4), optimizer, torch.device("cpu"), 0, scaler,
                    None, args, max_norm=0.01)
    for i, lrs in enumerate(seen):
        base = adjust_learning_rate(argparse.Namespace(param_groups=[]), i / 4, args)  # the base lr
        assert lrs == pytest.approx([base * g["lr_scale"] for g in groups])
    assert seen[1][-1] == pytest.approx(1e-3 / 4)  # the head: lr x 1 at a quarter of the warmup


@pytest.mark.parametrize("module,std", [(main_finetune, 2e-5), (main_linprobe, 0.01)])
def test_head_init_after_loading_the_pretrained_encoder(module, std, tmp_path, make_args, tiny_mae, tiny_vit):
    torch.manual_seed(0)
    mae = tiny_mae(patch_size=16, depth=2)
    path = save_pretrain_checkpoint(make_args, tmp_path, mae)
    model = tiny_vit(num_classes=1000, global_pool=module is main_finetune)
    args = module.get_args_parser().parse_args(["--finetune", path])
    module.init_from_pretrained(model, args)
    assert torch.equal(model.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    w = model.head.weight  # (1000, 32): trunc_normal(0, std) cut at +-2 (absolute), far beyond std
    assert abs(w.std().item() / std - 1) < 0.05 and abs(w.mean().item()) < std / 10


def test_script_defaults_are_the_originals():
    ft = finetune_parser().parse_args([])
    assert (ft.model, ft.batch_size, ft.epochs, ft.warmup_epochs, ft.blr, ft.weight_decay, ft.min_lr) == (
        "vit_large_patch16", 64, 50, 5, 1e-3, 0.05, 1e-6)
    assert (ft.layer_decay, ft.drop_path, ft.smoothing, ft.reprob, ft.remode, ft.recount) == (
        0.75, 0.1, 0.1, 0.25, "pixel", 1)
    assert (ft.mixup, ft.cutmix, ft.mixup_prob, ft.mixup_switch_prob, ft.mixup_mode, ft.clip_grad) == (
        0, 0, 1.0, 0.5, "batch", None)
    assert (ft.aa, ft.global_pool, ft.nb_classes, ft.input_size, ft.stage) == (
        "rand-m9-mstd0.5-inc1", True, 1000, 224, "finetune")
    lp = main_linprobe.get_args_parser().parse_args([])
    assert (lp.model, lp.batch_size, lp.epochs, lp.warmup_epochs, lp.blr, lp.weight_decay, lp.min_lr) == (
        "vit_large_patch16", 512, 90, 10, 0.1, 0.0, 0.0)
    assert (lp.global_pool, lp.nb_classes, lp.stage) == (False, 1000, "linprobe")
    pre = main_pretrain.get_args_parser().parse_args([])
    assert (pre.save_freq, pre.log_freq, pre.vis_freq, pre.patch_size, pre.stage) == (20, 20, 20, None, "pretrain")


def test_criterion_choice():
    parse = finetune_parser().parse_args
    args = parse(["--mixup", "0.8", "--cutmix", "1.0", "--nb_classes", "4"])
    mixup = build_mixup(args)
    assert mixup is not None and type(build_criterion(args, mixup)).__name__ == "SoftTargetCrossEntropy"
    x, y = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 4) and torch.allclose(y.sum(1), torch.ones(4))  # soft targets
    args = parse([])
    assert build_mixup(args) is None
    assert type(build_criterion(args)).__name__ == "LabelSmoothingCrossEntropy"
    assert type(build_criterion(parse(["--smoothing", "0"]))).__name__ == "CrossEntropyLoss"
    assert args.global_pool and args.layer_decay == 0.75 and args.min_lr == 1e-6 and args.epochs == 50
    assert not parse(["--cls_token"]).global_pool


# ---------------------------------------------------------------------------------------------
# End to end, from the command line
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e(tmp_path_factory, make_args, toy_data):
    root = tmp_path_factory.mktemp("e2e")
    data = toy_data(train_per_class=8, val_per_class=4, size=32, classes=("horizontal_stripes", "disc"))
    torch.manual_seed(0)
    pretrain = save_pretrain_checkpoint(make_args, root, models_mae.mae_vit_tiny_patch16(img_size=32))
    return root, data, pretrain


E2E_FLAGS = ["--device", "cpu", "--num_workers", "0", "--model", "vit_tiny_patch16", "--input_size", "32",
             "--patch_size", "16", "--nb_classes", "2", "--batch_size", "8", "--log_freq", "1", "--save_freq", "1"]


def run_in_process(main_module, *flags, out, monkeypatch, capsys):
    """main_module.main(parsed flags) in this process (saves the interpreter start-up of a
    subprocess); init_distributed_mode's time-stamped print is undone afterwards."""
    monkeypatch.setattr(builtins, "print", builtins.print)
    argv = [*E2E_FLAGS, "--output_dir", str(out), "--log_dir", str(out), *flags]
    capsys.readouterr()
    main_module.main(main_module.get_args_parser().parse_args(argv))
    return capsys.readouterr().out


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def printed_accuracy(stdout):
    return float(re.findall(r"Accuracy of the network on the 8 test images: ([\d.]+)%", stdout)[-1])


@pytest.mark.slow
def test_finetune_end_to_end_resume_and_eval(e2e, monkeypatch, capsys, run_script):
    root, data, pretrain = e2e
    out = root / "finetune"
    common = ["--data_path", data, "--warmup_epochs", "1", "--mixup", "0.8", "--cutmix", "1.0",
              "--finetune", pretrain]
    run_script("main_finetune.py", *E2E_FLAGS, "--output_dir", out, "--log_dir", out, "--epochs", "1", *common)
    assert {"checkpoint-0.pth", "checkpoint-best.pth", "log.txt"} <= set(os.listdir(out))
    (log0,) = read_log(out)
    assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "epoch", "n_parameters"} <= set(log0)
    assert log0["epoch"] == 0 and log0["test_acc5"] == 100.0  # 2 classes: top-2
    ckpt = load_checkpoint(out / "checkpoint-0.pth")
    assert ckpt["max_accuracy"] == log0["test_acc1"] and ckpt["epoch"] == 0
    pre = load_checkpoint(pretrain)["model"]
    assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])  # trained

    # --resume restores max_accuracy: an impossible value must survive the next epoch
    ckpt["max_accuracy"] = 101.0
    torch.save(ckpt, out / "checkpoint-0.pth")
    stdout = run_in_process(main_finetune, "--epochs", "2", "--resume", str(out / "checkpoint-0.pth"), *common,
                            out=out, monkeypatch=monkeypatch, capsys=capsys)
    assert "Max accuracy: 101.00%" in stdout
    logs = read_log(out)
    assert [log["epoch"] for log in logs] == [0, 1]
    ckpt1 = load_checkpoint(out / "checkpoint-1.pth")
    assert ckpt1["epoch"] == 1 and ckpt1["max_accuracy"] == 101.0
    assert load_checkpoint(out / "checkpoint-best.pth")["epoch"] == 0  # no improvement over 101

    # --eval of the finetuned checkpoint gives the accuracy logged after epoch 1
    stdout = run_in_process(main_finetune, "--eval", "--resume", str(out / "checkpoint-1.pth"),
                            "--data_path", data, out=root / "eval", monkeypatch=monkeypatch, capsys=capsys)
    assert printed_accuracy(stdout) == pytest.approx(logs[1]["test_acc1"], abs=0.05)
    assert "* Acc@1" in stdout


@pytest.mark.slow
def test_linprobe_end_to_end(e2e, run_script):
    root, data, pretrain = e2e
    out = root / "linprobe"
    _, output = run_script("main_linprobe.py", *E2E_FLAGS, "--output_dir", out, "--log_dir", out, "--epochs", "1",
                           "--warmup_epochs", "0", "--cls_token", "--data_path", data, "--finetune", pretrain)
    assert {"checkpoint-0.pth", "checkpoint-best.pth", "log.txt"} <= set(os.listdir(out))
    (log0,) = read_log(out)
    assert {"train_loss", "test_acc1", "test_acc5", "test_loss"} <= set(log0)
    assert log0["n_parameters"] == 192 * 2 + 2  # only the linear layer trains
    state = load_checkpoint(out / "checkpoint-0.pth")["model"]
    pre = load_checkpoint(pretrain)["model"]
    for k in encoder_keys(pre) + ["norm.weight", "norm.bias"]:
        assert torch.equal(state[k], pre[k]), k  # the encoder is frozen
    assert state["head.0.num_batches_tracked"] == 2 and "head.0.weight" not in state
    assert printed_accuracy(output) == pytest.approx(log0["test_acc1"], abs=0.05)


# ---------------------------------------------------------------------------------------------
# The whole chain: main_pretrain -> main_finetune and main_pretrain -> main_linprobe
# ---------------------------------------------------------------------------------------------

CHAIN_FLAGS = ["--device", "cpu", "--num_workers", "0", "--input_size", "32", "--patch_size", "8",
               "--batch_size", "16", "--log_freq", "100"]


def run_chain_step(run_script, script, *flags, out):
    """run_script with the chain's flags; returns the run's log.txt entries."""
    run_script(script, *CHAIN_FLAGS, "--output_dir", out, "--log_dir", out, *flags, timeout=600)
    return read_log(out)


@pytest.mark.slow
def test_chain_pretrain_then_finetune_and_linprobe_from_the_command_line(tmp_path, toy_data, run_script):
    """4 toy classes that differ in shape and texture (random colours, scales and phases), 32 px,
    8 px patches. The finetuned classifier must clearly beat chance (25%): it reaches about 77%
    (max 80%) here on a CPU; 55% leaves room for other CPUs' numerics."""
    data = toy_data(train_per_class=32, val_per_class=16, size=32)
    pre = run_chain_step(run_script, "main_pretrain.py", "--model", "mae_vit_tiny_patch16", "--norm_pix_loss",
                         "--epochs", 5, "--warmup_epochs", 1, "--blr", 1.5e-4, "--data_path", data,
                         out=tmp_path / "pre")
    assert [log["epoch"] for log in pre] == [0, 1, 2, 3, 4] and pre[-1]["train_loss"] < pre[0]["train_loss"]
    checkpoint = tmp_path / "pre" / "checkpoint-4.pth"

    finetune = run_chain_step(run_script, "main_finetune.py", "--model", "vit_tiny_patch16", "--nb_classes", 4,
                              "--epochs", 20, "--warmup_epochs", 2, "--blr", 1e-2, "--aa", "", "--reprob", 0,
                              "--drop_path", 0, "--finetune", checkpoint, "--data_path", data, out=tmp_path / "ft")
    assert len(finetune) == 20 and finetune[-1]["train_loss"] < finetune[0]["train_loss"]
    assert finetune[-1]["test_acc1"] >= 55.0, [log["test_acc1"] for log in finetune]

    # LARS normalises the step by the weight/gradient norms: at batch 16 the absolute lr of the
    # original recipe (0.1 x 16384 / 256 = 6.4) is given with --lr, not scaled down by --blr
    linprobe = run_chain_step(run_script, "main_linprobe.py", "--model", "vit_tiny_patch16", "--nb_classes", 4,
                              "--epochs", 3, "--warmup_epochs", 1, "--lr", 6.4, "--cls_token", "--finetune",
                              checkpoint, "--data_path", data, out=tmp_path / "lp")
    assert [log["epoch"] for log in linprobe] == [0, 1, 2]
    assert {"train_loss", "test_acc1", "test_acc5", "test_loss"} <= set(linprobe[-1])
    pretrained = load_checkpoint(checkpoint)["model"]
    probed = load_checkpoint(tmp_path / "lp" / "checkpoint-2.pth")["model"]
    for key in encoder_keys(pretrained):
        assert torch.equal(probed[key], pretrained[key]), key  # the probe read main_pretrain's encoder
