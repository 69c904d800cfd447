"""util/misc.py (and the flags of util/args.py): logging without host syncs (SmoothedValue,
MetricLogger, TrainingLog), the grad scaler, precision, and the plumbing the three scripts share
(init_run, print_model, epochs_to_train, the TensorBoard writer, log.txt, run)."""
import argparse
import builtins
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import LAUNCHER_VARS
from util import checkpoint, misc, precision
from util.args import add_common_args, resolve_lr
from util.checkpoint import ResumePoint
from util.precision import NativeScalerWithGradNormCount, autocast, get_grad_norm_, resolve_precision


@pytest.fixture(autouse=True)
def restore_print_and_rng(monkeypatch):
    """init_run replaces builtins.print (init_distributed_mode) and reseeds the global RNGs: undo both."""
    monkeypatch.setattr(builtins, "print", builtins.print)
    state = checkpoint.get_rng_state()
    yield
    checkpoint.set_rng_state(state)


def draws():
    """One draw from each global RNG (torch, numpy incl. its cached gaussian, python)."""
    return torch.rand(4).tolist(), np.random.randn(3).tolist(), np.random.rand(2).tolist(), random.random()


# ---------------------------------------------------------------------------------------------
# util/args.py
# ---------------------------------------------------------------------------------------------


def test_common_args_defaults_and_aliases():
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.batch_size, args.epochs, args.accum_iter, args.warmup_epochs) == (64, 400, 1, 40)
    assert (args.blr, args.min_lr, args.weight_decay, args.lr) == (1e-3, 0.0, 0.05, None)
    assert args.pin_mem and args.auto_resume and not args.compile and not args.unsafe_load
    assert (args.precision, args.dist_timeout, args.local_rank, args.save_every_iters) == ("auto", 30, -1, 0)
    args = parser.parse_args(["--local-rank", "3", "--no_pin_mem", "--no_auto_resume", "--precision", "bf16"])
    assert (args.local_rank, args.pin_mem, args.auto_resume, args.precision) == (3, False, False, "bf16")
    assert parser.parse_args(["--local_rank=2"]).local_rank == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])


def test_resolve_lr_scales_with_effective_batch(capsys, make_args):
    args = make_args("pretrain", "--batch_size", "32", "--accum_iter", "2", "--blr", "1.5e-4", world_size=8)
    assert resolve_lr(args) == pytest.approx(1.5e-4 * 512 / 256)
    out = capsys.readouterr().out
    assert "effective batch size: 512" in out and "actual lr: 3.00e-04" in out
    args = make_args("pretrain", "--lr", "0.5")
    assert resolve_lr(args) == 0.5 and args.lr == 0.5


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def test_smoothed_value_tensor_matches_float():
    values = [0.5, 2.25, -1.0, 3.5, 0.125, 7.0, 1.5]
    as_float, as_tensor = misc.SmoothedValue(window_size=4), misc.SmoothedValue(window_size=4)
    for i, v in enumerate(values):
        as_float.update(v, n=i + 1)
        as_tensor.update(torch.tensor(v), n=i + 1)
    for name in ("median", "avg", "global_avg", "max", "value"):
        assert getattr(as_tensor, name) == getattr(as_float, name), name
    assert as_float.median == 1.5 and as_float.max == 7.0 and as_float.value == 1.5  # window: last 4
    assert as_float.global_avg == pytest.approx(sum(v * (i + 1) for i, v in enumerate(values)) / 28)
    assert str(as_tensor) == str(as_float) == "1.5000 (2.4688)"


def test_smoothed_value_update_never_reads_tensor_data(monkeypatch):
    # Meta tensors have no data: .item(), float() or .cpu() on them raise. Updating with them
    # proves update() stays on the device; reading afterwards would need the data.
    calls = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or real_item(self))
    meter = misc.SmoothedValue()
    logger = misc.MetricLogger()
    for _ in range(30):
        meter.update(torch.tensor(1.5, device="meta"))
        logger.update(loss=torch.tensor(0.5, device="meta"), lr=0.1)
    assert calls == []
    assert meter.count == 30 and meter.total.device.type == "meta"
    assert logger.loss.count == 30
    with pytest.raises(Exception):
        meter.global_avg  # reading is where the (single) sync happens


def test_metric_logger_log_every_with_start_iter(capsys):
    logger = misc.MetricLogger(delimiter=" | ")
    logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    seen = []
    for x in logger.log_every(range(5), print_freq=2, header="Epoch: [1]", start_iter=3):
        seen.append(x)
        logger.update(loss=torch.tensor(float(x)), lr=0.25)
    assert seen == [0, 1, 2, 3, 4]
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if "eta:" in line]
    assert [line.split("[")[2].split("]")[0] for line in progress] == ["3/8", "4/8", "6/8", "7/8"]
    assert "loss: 2.0000 (2.0000)" in progress[-1] and "lr: 0.250000" in progress[-1]
    assert "Total time" in out and "max mem" not in out  # no CUDA in use
    assert logger.loss.global_avg == 2.0
    with pytest.raises(AttributeError):
        logger.nonexistent


def test_metric_logger_averages():
    logger = misc.MetricLogger()
    logger.add_meter("unused", misc.SmoothedValue())  # saw no value: left out
    logger.update(loss=torch.tensor(1.0), lr=0.5, skipped=None)
    logger.update(loss=torch.tensor(2.0), lr=0.25)
    logger.meters["acc"].update(80.0, n=3)
    logger.meters["acc"].update(40.0, n=1)
    averages = logger.averages()
    assert averages == {"loss": 1.5, "lr": 0.375, "acc": 70.0}  # global (sample-weighted) averages
    assert all(type(v) is float for v in averages.values())
    assert misc.MetricLogger().averages() == {}


def test_is_log_point_matches_log_every(capsys):
    assert [i for i in range(10) if misc.is_log_point(i, 0, 10, 4)] == [0, 4, 8, 9]
    assert [i for i in range(3, 10) if misc.is_log_point(i, 3, 10, 4)] == [3, 4, 8, 9]
    for _ in misc.MetricLogger().log_every(range(7), 4, "E", start_iter=3):
        pass
    printed = re.findall(r"\[ ?(\d+)/10\]", capsys.readouterr().out)
    assert printed == ["3", "4", "8", "9"]  # log_every prints where the engines sync


class FakeWriter:
    def __init__(self):
        self.scalars, self.flushed, self.closed = [], False, False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


def test_training_log_scalar_name_and_accumulation_boundaries(make_args):
    every, boundaries = FakeWriter(), FakeWriter()
    # accum_iter 1 (pretraining's default): every iteration
    log = misc.TrainingLog(2, 0, 8, make_args("pretrain"), every, loss_name="train_loss")
    for i in range(4):  # (iteration, lr, loss)
        log.record(i, 0.1 * i, torch.tensor(float(i)))
    log.sync()
    meters = log.meters
    assert meters.loss.count == 4 and meters.loss.global_avg == 1.5
    assert [(tag, step) for tag, step, _ in every.scalars] == [
        (tag, step) for step in (2000, 2125, 2250, 2375) for tag in ("train_loss", "lr")]
    log = misc.TrainingLog(2, 0, 8, make_args("finetune", "--accum_iter", 2), boundaries, loss_name="loss")
    for i in range(4):
        log.record(i, 0.1 * i, torch.tensor(float(i)))
    log.sync()
    assert boundaries.scalars == [("loss", 2125, 1.0), ("lr", 2125, 0.1), ("loss", 2375, 3.0),
                                  ("lr", 2375, pytest.approx(0.3))]  # accumulation ends


def test_training_log_stops_at_the_first_non_finite_loss(make_args):
    writer = FakeWriter()
    log = misc.TrainingLog(1, 0, 10, make_args("pretrain"), writer)  # --log_freq 20: 5, 6, 7 are no log points
    for i, loss in ((5, 1.0), (6, float("inf")), (7, 2.0)):
        log.record(i, 0.1, torch.tensor(loss))
    with pytest.raises(checkpoint.NonFiniteLossError, match="Loss is inf at epoch 1, iteration 6"):
        log.sync()
    meters = log.meters
    assert meters.loss.count == 1 and [step for _, step, _ in writer.scalars] == [1500, 1500]


def test_training_log_writes_grad_norm_at_optimizer_steps_only(make_args):
    writer = FakeWriter()
    log = misc.TrainingLog(0, 0, 8, make_args("finetune", "--accum_iter", 2), writer, loss_name="loss")
    for i in range(6):
        update_grad = (i + 1) % 2 == 0  # what the engines pass: the scaler's norm at a step, else None
        grad_norm = torch.tensor(10.0 * i) if update_grad else None
        log.record(i, 0.5, torch.tensor(float(i)), grad_norm=grad_norm)
    log.sync()
    norms = [(step, value) for tag, step, value in writer.scalars if tag == "grad_norm"]
    assert norms == [(125, 10.0), (375, 30.0), (625, 50.0)]  # x = (epoch + i / 8) * 1000 at i = 1, 3, 5
    assert [(tag, step) for tag, step, _ in writer.scalars] == [
        (tag, step) for step in (125, 375, 625) for tag in ("loss", "lr", "grad_norm")]
    assert [value for tag, _, value in writer.scalars if tag == "loss"] == [1.0, 3.0, 5.0]
    # a norm given at every iteration (accum_iter 1) is logged at every iteration, each its own value
    writer = FakeWriter()
    log = misc.TrainingLog(0, 0, 4, make_args("pretrain"), writer, loss_name="train_loss")
    for i in range(3):
        log.record(i, 0.5, torch.tensor(float(i)), grad_norm=torch.tensor(float(i + 100)))
    log.sync()
    assert [(step, value) for tag, step, value in writer.scalars if tag == "grad_norm"] == [
        (0, 100.0), (250, 101.0), (500, 102.0)]
    writer = FakeWriter()
    log = misc.TrainingLog(0, 0, 4, make_args("pretrain"), writer)
    log.record(0, 0.5, torch.tensor(1.0))  # no norm: no grad_norm scalar
    assert [tag for tag, _, _ in writer.scalars] == ["loss", "lr"]


def test_training_log_syncs_at_log_points_and_on_request_only(make_args):
    writer = FakeWriter()
    log = misc.TrainingLog(0, 0, 10, make_args("pretrain", "--log_freq", 4), writer)
    synced = []  # the loss meter's count after each record: it only grows at a sync
    for i in range(10):
        log.record(i, 0.1, torch.tensor(float(i)), sync=i == 6)
        synced.append(log.meters.loss.count)
    # log points 0, 4, 8 and 9 (the last), and 6 (sync=True, e.g. before a mid-epoch checkpoint)
    assert synced == [1, 1, 1, 1, 5, 5, 7, 7, 9, 10]
    assert [step for tag, step, _ in writer.scalars if tag == "loss"] == [i * 100 for i in range(10)]
    # joined mid-epoch at iteration 3: the first iteration is a log point
    log = misc.TrainingLog(0, 3, 10, make_args("pretrain", "--log_freq", 4), FakeWriter())
    log.record(3, 0.1, torch.tensor(1.0))
    assert log.meters.loss.count == 1
    # the losses between log points stay on the device: meta tensors (no data) are never read
    log = misc.TrainingLog(0, 0, 10, make_args("pretrain", "--log_freq", 4), FakeWriter())
    log.record(0, 0.1, torch.tensor(1.0))
    for i in (1, 2, 3):
        log.record(i, 0.1, torch.tensor(1.0, device="meta"), grad_norm=torch.tensor(1.0, device="meta"))
    assert log.meters.loss.count == 1
    with pytest.raises(NotImplementedError, match="meta"):
        log.sync()  # an explicit sync reads them (here: data-less tensors)


def test_training_log_finish_returns_the_epoch_averages(make_args, capsys):
    log = misc.TrainingLog(0, 0, 4, make_args("pretrain"), None)
    for i, (lr, loss) in enumerate(((0.1, 1.0), (0.2, 2.0), (0.3, 6.0))):  # a loader shorter than its len()
        log.record(i, lr, torch.tensor(loss))
    assert log.meters.loss.count == 1  # only iteration 0 was a log point
    stats = log.finish()
    assert stats == pytest.approx({"lr": 0.2, "loss": 3.0})
    assert "Averaged stats: lr: 0.300000  loss: 2.0000 (3.0000)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Precision and grad scaler
# ---------------------------------------------------------------------------------------------


def test_resolve_precision_and_autocast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})  # bf16 only emulated
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # native bf16
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("fp8", "cpu")
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("cpu", "fp32"):
        assert lin(x).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert lin(x).dtype == torch.bfloat16


def test_disabled_scaler_is_bit_identical_to_plain_step(tiny_problem):
    ref, data = tiny_problem()
    model, _ = tiny_problem()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    for x, y in data:
        loss = nn.functional.mse_loss(ref(x), y)
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        norm = scaler(nn.functional.mse_loss(model(x), y), opt, parameters=model.parameters())
        expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
        torch.testing.assert_close(norm, expected_norm)
        opt.zero_grad()
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert scaler.state_dict() == {}


def test_scaler_clip_grad_and_accumulation(tiny_problem):
    model, data = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    (x, y), (x2, y2) = data[:2]
    # update_grad=False: gradients add up, nothing is stepped, no norm is returned
    before = [p.detach().clone() for p in model.parameters()]
    assert scaler(nn.functional.mse_loss(model(x), y), opt, update_grad=False) is None
    g1 = [p.grad.clone() for p in model.parameters()]
    assert scaler(nn.functional.mse_loss(model(x2), y2), opt, update_grad=False) is None
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    model.zero_grad()
    nn.functional.mse_loss(model(x2), y2).backward()
    g2 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scaler(nn.functional.mse_loss(model(x), y), opt, update_grad=False)
    # final micro-step with clipping: returned norm is the total norm before clipping
    norm = scaler(nn.functional.mse_loss(model(x2), y2), opt, clip_grad=0.01, parameters=model.parameters())
    full = [a + b for a, b in zip(g1, g2)]
    full_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in full]))
    assert norm.dim() == 0 and full_norm > 0.1
    torch.testing.assert_close(norm, full_norm)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(0.01), rtol=1e-4, atol=1e-6)
    for p, b, g in zip(model.parameters(), before, full):  # SGD lr 1: moved by the clipped gradient
        torch.testing.assert_close(p.detach(), b - g * 0.01 / full_norm, rtol=1e-4, atol=1e-6)


def test_enabled_scaler_unscales_before_norm_and_round_trips(tiny_problem):
    model, data = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = NativeScalerWithGradNormCount(enabled=True, device_type="cpu")
    x, y = data[0]
    nn.functional.mse_loss(model(x), y).backward()
    expected = get_grad_norm_(model.parameters())
    model.zero_grad()
    norm = scaler(nn.functional.mse_loss(model(x), y), opt, parameters=model.parameters())
    torch.testing.assert_close(norm, expected)  # not 65536 times larger
    state = scaler.state_dict()
    assert state["scale"] == 65536.0
    other = NativeScalerWithGradNormCount(enabled=True, device_type="cpu")
    other.load_state_dict(dict(state, scale=1024.0))
    assert other.state_dict()["scale"] == 1024.0
    other.load_state_dict({})  # a checkpoint of an fp32 run: keeps its fresh state
    assert other.state_dict()["scale"] == 1024.0


def test_get_grad_norm_inf_and_empty():
    p = nn.Parameter(torch.zeros(3))
    assert get_grad_norm_([p]).item() == 0.0
    p.grad = torch.tensor([1.0, -4.0, 2.0])
    assert get_grad_norm_([p], norm_type=float("inf")).item() == 4.0
    assert get_grad_norm_(p).item() == pytest.approx(21 ** 0.5)


def test_auto_precision_on_gpus_with_and_without_native_bf16(monkeypatch):
    native = {"flag": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native["flag"] or including_emulation)
    assert resolve_precision("auto", "cuda") == "bf16"  # Ampere and newer
    native["flag"] = False  # V100 / T4: bf16 only emulated
    assert resolve_precision("auto", "cuda") == "fp16"


# ---------------------------------------------------------------------------------------------
# Helpers shared by the training engines and the three scripts
# ---------------------------------------------------------------------------------------------


def test_write_log_and_create_log_writer(tmp_path, make_args):
    args = make_args("pretrain", "--output_dir", tmp_path, "--log_dir", "")
    writer = FakeWriter()
    misc.write_log(args, {"train_loss": 0.5, "epoch": 0}, writer)
    misc.write_log(args, {"epoch": 1})
    with open(tmp_path / "log.txt") as f:
        assert [json.loads(line) for line in f] == [{"train_loss": 0.5, "epoch": 0}, {"epoch": 1}]
    assert writer.flushed
    misc.write_log(make_args("pretrain", "--output_dir", ""), {"epoch": 2})  # no output_dir: nothing written

    assert misc.create_log_writer(args) is None  # no --log_dir
    tb = tmp_path / "tb"
    assert misc.create_log_writer(make_args("finetune", "--log_dir", tb), training=False) is None  # --eval
    writer = misc.create_log_writer(make_args("pretrain", "--log_dir", tb))
    writer.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))


def test_log_epoch_writes_test_scalars_and_one_json_line(tmp_path, make_args):
    args = make_args("finetune", "--output_dir", tmp_path)
    writer = FakeWriter()
    train_stats, test_stats = {"loss": 0.5, "lr": 1e-3}, {"acc1": 81.5, "acc5": 95.25, "loss": 0.75}
    misc.log_epoch(args, writer, 3, train_stats, test_stats, n_parameters=1234)
    assert writer.scalars == [("perf/test_acc1", 3, 81.5), ("perf/test_acc5", 3, 95.25),
                              ("perf/test_loss", 3, 0.75)]  # x = epoch
    assert writer.flushed
    misc.log_epoch(args, FakeWriter(), 4, {"loss": 0.25, "lr": 2e-3})  # pretraining: no test metrics
    misc.log_epoch(args, None, 5, {"loss": 0.125, "lr": 3e-3}, test_stats)  # rank > 0 / no --log_dir
    with open(tmp_path / "log.txt") as f:
        assert [json.loads(line) for line in f] == [
            {"train_loss": 0.5, "train_lr": 1e-3, "test_acc1": 81.5, "test_acc5": 95.25, "test_loss": 0.75,
             "epoch": 3, "n_parameters": 1234},
            {"train_loss": 0.25, "train_lr": 2e-3, "epoch": 4},
            {"train_loss": 0.125, "train_lr": 3e-3, "test_acc1": 81.5, "test_acc5": 95.25, "test_loss": 0.75,
             "epoch": 5}]
    no_test = FakeWriter()
    misc.log_epoch(args, no_test, 6, {"loss": 0.1})
    assert no_test.scalars == [] and no_test.flushed


def test_run_exits_with_one_line_on_a_non_finite_loss(capsys, tmp_path, make_args):
    def diverges(args):
        raise checkpoint.NonFiniteLossError(float("nan"), 2, 7)

    with pytest.raises(SystemExit) as e:
        misc.run(diverges, make_args("pretrain", "--output_dir", tmp_path))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: Loss is nan at epoch 2, iteration 7;") and err.count("\n") == 1
    # a checkpoint-last.pth saved at the diverged iteration is set aside (auto-resume skips it)
    checkpoint.save_model(make_args("pretrain", "--output_dir", tmp_path), 2, nn.Linear(2, 2), None, None,
                          tag="last", step=7)
    with pytest.raises(SystemExit):
        misc.run(diverges, make_args("pretrain", "--output_dir", tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth.nonfinite"]
    seen = []
    misc.run(seen.append, "args")
    assert seen == ["args"]
    with pytest.raises(KeyError):  # other errors keep their traceback
        misc.run(lambda args: {}[args], "missing")


def test_init_run_single_process(tmp_path, monkeypatch, capsys, make_args):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--device", "cpu", "--seed", "7", "--output_dir", str(out), "--log_dir", str(tmp_path / "tb" / "x")]
    saved = checkpoint.save_model(make_args("pretrain", *argv), 3, nn.Linear(2, 2), None, None)  # same flags
    args = make_args("pretrain", *argv)
    monkeypatch.setattr(precision, "cpu_flags", set)  # a CPU without native bf16: auto is fp32

    device = misc.init_run(args)
    assert device == torch.device("cpu") and args.precision == "fp32" and not args.distributed
    assert args.resume == ""  # init_run no longer resumes: checkpoint.resume does, through auto_resume
    assert checkpoint.auto_resume(args) == saved  # --auto_resume finds the checkpoint
    assert (tmp_path / "tb" / "x").is_dir() and torch.backends.cudnn.benchmark
    drawn = draws()
    checkpoint.seed_everything(7)  # seed + rank 0
    assert draws() == drawn
    printed = capsys.readouterr().out
    # one line on the run instead of the ~50-line Namespace (the flags go to args.txt at the first epoch)
    assert (f"] pretrain on cpu, 1 process, fp32; outputs in {out} (checkpoints, log.txt, args.txt, model.txt), "
            f"TensorBoard in {tmp_path / 'tb' / 'x'}\n") in printed
    assert "seed=7" not in printed and "Namespace" not in printed


def test_print_model_counts_trainable_parameters(capsys):
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 500))  # 1_001_000 + 500_500
    model[1].bias.requires_grad_(False)
    assert misc.print_model(model) == 1_501_000
    out = capsys.readouterr().out
    assert out == "model: Sequential (Sequential), 1.50 M trainable parameters (500 frozen)\n"  # no args: no file


class FakeSampler:
    def __init__(self):
        self.calls = []

    def set_epoch(self, epoch, start=0):
        self.calls.append((epoch, start))


def test_epochs_to_train_from_a_resume_point(make_args, capsys, tmp_path):
    args = make_args("pretrain", "--epochs", 5, "--batch_size", 8, "--output_dir", tmp_path, precision="fp32")
    sampler, writer = FakeSampler(), FakeWriter()
    epochs = misc.epochs_to_train(args, ResumePoint(2, 3), sampler, writer)
    assert next(epochs) == (2, 3)  # the resumed epoch, 3 iterations already done
    assert sampler.calls == [(2, 24)]  # set before the epoch runs: skips 3 batches of 8 samples
    assert "Start training for 5 epochs (fp32)" in capsys.readouterr().out
    assert next(epochs) == (3, 0) and sampler.calls[-1] == (3, 0)
    assert next(epochs) == (4, 0) and sampler.calls[-1] == (4, 0)
    assert not writer.closed  # still needed by the last epoch's logging
    with pytest.raises(StopIteration):
        next(epochs)
    assert writer.closed and "Training time" in capsys.readouterr().out
    assert sampler.calls == [(2, 24), (3, 0), (4, 0)]

    sampler = FakeSampler()
    assert list(misc.epochs_to_train(args, ResumePoint(3), sampler)) == [(3, 0), (4, 0)]  # no writer
    assert sampler.calls == [(3, 0), (4, 0)]
    sampler, writer = FakeSampler(), FakeWriter()
    assert list(misc.epochs_to_train(args, ResumePoint(5), sampler, writer)) == []  # all done already
    assert sampler.calls == [] and writer.closed
