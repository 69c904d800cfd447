"""util/misc.py and util/args.py: logging without host syncs, grad scaler, precision, atomic and
safe checkpoints, RNG capture, resume (whole and mid-epoch), auto-resume, distributed helpers."""
import argparse
import builtins
import contextlib
import json
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

from util import misc
from util.args import add_common_args, resolve_lr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def restore_print_and_rng(monkeypatch):
    """init_distributed_mode replaces builtins.print and tests reseed the global RNGs: undo both."""
    monkeypatch.setattr(builtins, "print", builtins.print)
    state = misc.get_rng_state()
    yield
    misc.set_rng_state(state)


def draws():
    """One draw from each global RNG (torch, numpy incl. its cached gaussian, python)."""
    return torch.rand(4).tolist(), np.random.randn(3).tolist(), np.random.rand(2).tolist(), random.random()


class Evil:
    """An arbitrary class: unpickling it must be refused by the safe loader."""

    def __init__(self, payload):
        self.payload = payload


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


def test_resolve_lr_scales_with_effective_batch(capsys):
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(["--batch_size", "32", "--accum_iter", "2", "--blr", "1.5e-4"])
    args.world_size = 8
    assert resolve_lr(args) == pytest.approx(1.5e-4 * 512 / 256)
    out = capsys.readouterr().out
    assert "effective batch size: 512" in out and "actual lr: 3.00e-04" in out
    args = parser.parse_args(["--lr", "0.5"])
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


# ---------------------------------------------------------------------------------------------
# Precision and grad scaler
# ---------------------------------------------------------------------------------------------


def test_resolve_precision_and_autocast():
    assert misc.resolve_precision("auto", "cpu") == "fp32"
    assert misc.resolve_precision("bf16", "cpu") == "bf16"
    assert misc.resolve_precision("fp16", torch.device("cpu")) == "fp32"
    assert misc.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError):
        misc.resolve_precision("fp8", "cpu")
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with misc.autocast("cpu", "fp32"):
        assert lin(x).dtype == torch.float32
    with misc.autocast("cpu", "bf16"):
        assert lin(x).dtype == torch.bfloat16


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    data = [(torch.randn(5, 6), torch.randn(5, 3)) for _ in range(4)]
    return model, data


def test_disabled_scaler_is_bit_identical_to_plain_step():
    ref, data = tiny_problem()
    model, _ = tiny_problem()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = misc.NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
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


def test_scaler_clip_grad_and_accumulation():
    model, data = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = misc.NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
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


def test_enabled_scaler_unscales_before_norm_and_round_trips():
    model, data = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = misc.NativeScalerWithGradNormCount(enabled=True, device_type="cpu")
    x, y = data[0]
    nn.functional.mse_loss(model(x), y).backward()
    expected = misc.get_grad_norm_(model.parameters())
    model.zero_grad()
    norm = scaler(nn.functional.mse_loss(model(x), y), opt, parameters=model.parameters())
    torch.testing.assert_close(norm, expected)  # not 65536 times larger
    state = scaler.state_dict()
    assert state["scale"] == 65536.0
    other = misc.NativeScalerWithGradNormCount(enabled=True, device_type="cpu")
    other.load_state_dict(dict(state, scale=1024.0))
    assert other.state_dict()["scale"] == 1024.0
    other.load_state_dict({})  # a checkpoint of an fp32 run: keeps its fresh state
    assert other.state_dict()["scale"] == 1024.0


def test_get_grad_norm_inf_and_empty():
    p = nn.Parameter(torch.zeros(3))
    assert misc.get_grad_norm_([p]).item() == 0.0
    p.grad = torch.tensor([1.0, -4.0, 2.0])
    assert misc.get_grad_norm_([p], norm_type=float("inf")).item() == 4.0
    assert misc.get_grad_norm_(p).item() == pytest.approx(21 ** 0.5)


def test_non_finite_loss_error_message():
    err = misc.NonFiniteLossError(float("nan"), epoch=3, iteration=17)
    assert isinstance(err, RuntimeError)
    assert "epoch 3" in str(err) and "iteration 17" in str(err) and "nan" in str(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


# ---------------------------------------------------------------------------------------------
# Atomic save and RNG state
# ---------------------------------------------------------------------------------------------

SAVER = textwrap.dedent("""
    import sys, torch
    from util.misc import atomic_save
    path = sys.argv[1]
    for i in range(10 ** 6):
        print(i, flush=True)  # saves 0 .. i - 1 are complete
        atomic_save({"epoch": i, "data": torch.full((6_000_000,), float(i))}, path)
""")


def test_atomic_save_survives_sigkill(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    temp_names, killed_mid_save = set(), []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONPATH=REPO))
        try:
            assert proc.stdout.readline().strip() == "0"
            assert proc.stdout.readline().strip() == "1"  # save 0 is complete, save 1 starts
            tmp_name = tmp_path / f".{path.name}.tmp-{proc.pid}"
            temp_names.add(tmp_name.name)
            deadline = time.time() + 20
            while not tmp_name.exists() and time.time() < deadline:  # wait until a save is in progress
                time.sleep(0.0002)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        killed_mid_save.append(tmp_name.exists())
        ckpt = misc.load_checkpoint(path)  # the final name always holds a complete save
        assert ckpt["epoch"] >= 0 and torch.equal(ckpt["data"], torch.full((6_000_000,), float(ckpt["epoch"])))
        names = set(os.listdir(tmp_path))
        assert names <= {path.name} | temp_names, names  # nothing else, in particular no half *.pth
    assert any(killed_mid_save)  # the kill did land inside a save
    assert misc.find_latest_checkpoint(str(tmp_path)) == str(path)  # leftovers are never candidates


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.pth"
    misc.atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        misc.atomic_save({"v": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pth"]  # the temp file was removed


def test_rng_state_round_trip(tmp_path):
    misc.seed_everything(123)
    np.random.randn(1)  # leaves a cached gaussian in numpy's legacy state
    state = misc.get_rng_state()
    expected = draws()
    misc.set_rng_state(state)
    assert draws() == expected
    misc.seed_everything(0)
    assert draws() != expected
    misc.atomic_save({"rng": [state]}, tmp_path / "rng.pth")
    loaded = misc.load_checkpoint(tmp_path / "rng.pth")  # weights_only=True
    misc.set_rng_state(loaded["rng"][0])
    assert draws() == expected


def test_seed_everything_is_deterministic():
    misc.seed_everything(7)
    a = draws()
    misc.seed_everything(7)
    assert draws() == a
    misc.seed_everything(8)
    assert draws() != a


# ---------------------------------------------------------------------------------------------
# Safe loading and compatibility checks
# ---------------------------------------------------------------------------------------------


def test_load_checkpoint_refuses_arbitrary_class(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Evil("rm -rf")}, path)
    with pytest.raises(RuntimeError) as info:
        misc.load_checkpoint(path)
    msg = str(info.value)
    assert "Evil" in msg and "--unsafe_load" in msg and str(path) in msg and "code" in msg
    ckpt = misc.load_checkpoint(path, unsafe=True)
    assert isinstance(ckpt["extra"], Evil) and ckpt["extra"].payload == "rm -rf"


def test_load_checkpoint_original_release_layout(tmp_path):
    model, _ = tiny_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu")
    orig_args = argparse.Namespace(batch_size=64, epochs=800, model="mae_vit_large_patch16", lr=None, blr=1.5e-4,
                                   mask_ratio=0.75, norm_pix_loss=True, distributed=True, dist_backend="nccl",
                                   gpu=0, rank=0, world_size=64, output_dir="./output_dir", pin_mem=True)
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 399,
                "scaler": scaler.state_dict(), "args": orig_args}, path)
    ckpt = misc.load_checkpoint(path)
    assert ckpt["args"] == orig_args and ckpt["epoch"] == 399
    # resuming from it: no step / rng entries in the original's checkpoints
    new_model, _ = tiny_problem(seed=1)
    new_opt = torch.optim.AdamW(new_model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    args = argparse.Namespace(resume=str(path), start_epoch=0)
    assert misc.load_model(args, new_model, new_opt, misc.NativeScalerWithGradNormCount(True, "cpu")) == {}
    assert (args.start_epoch, args.start_iter) == (400, 0)
    for a, b in zip(model.parameters(), new_model.parameters()):
        assert torch.equal(a, b)


def test_load_checkpoint_missing_path(tmp_path):
    missing = tmp_path / "nope" / "checkpoint-7.pth"
    with pytest.raises(FileNotFoundError, match="checkpoint-7.pth"):
        misc.load_checkpoint(missing)


def test_check_state_dict_compat():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    good = model.state_dict()
    assert misc.check_state_dict_compat(model, good) is None
    bad = {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3), "decoder.w": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        misc.check_state_dict_compat(model, bad)
    msg = str(info.value)
    assert "0.weight: checkpoint (3, 5) vs model (3, 4)" in msg
    assert "missing keys (2): 1.weight, 1.bias" in msg
    assert "unexpected keys (1): decoder.w" in msg
    assert "another architecture / patch size / image size" in msg
    ok = dict(good, **{"decoder.w": torch.zeros(1)})
    del ok["1.bias"]
    assert misc.check_state_dict_compat(model, ok, allowed_missing=("1.*",),
                                        allowed_unexpected=("decoder*",)) is None
    many = {f"extra.{i}": torch.zeros(1) for i in range(25)}
    with pytest.raises(ValueError, match=r"unexpected keys \(25\): .*and 15 more"):
        misc.check_state_dict_compat(model, dict(good, **many))


# ---------------------------------------------------------------------------------------------
# save_model / load_model / auto-resume
# ---------------------------------------------------------------------------------------------


class Noisy(nn.Module):
    """Tiny model whose training uses every global RNG (dropout, numpy, random)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def train(model, opt, scaler, args, epochs, steps=4, start_iter=0, stop_at=None):
    """Toy training loop drawing its data from the global RNGs; optionally stops mid-epoch."""
    for epoch in range(args.start_epoch, epochs):
        if stop_at == (epoch, None):  # killed right after checkpoint-<epoch - 1>.pth was written
            return None
        for it in range(start_iter if epoch == args.start_epoch else 0, steps):
            if stop_at == (epoch, it):  # killed right after a mid-epoch checkpoint-last.pth
                return misc.save_model(args, epoch, model, opt, scaler, tag="last", step=it)
            x = torch.randn(8, 6) * (1 + np.random.rand()) + random.random()
            loss = model(x).pow(2).mean()
            scaler(loss, opt, parameters=model.parameters())
            opt.zero_grad()
        misc.save_model(args, epoch, model, opt, scaler, extra={"max_accuracy": float(epoch)})


def fresh(seed, output_dir, resume=""):
    misc.check_output_dir(str(output_dir))
    misc.seed_everything(seed)
    model = Noisy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    scaler = misc.NativeScalerWithGradNormCount(enabled=True, device_type="cpu")
    args = argparse.Namespace(output_dir=str(output_dir), resume=resume, start_epoch=0, seed=seed,
                              auto_resume=True, unsafe_load=False, device=torch.device("cpu"))
    return model, opt, scaler, args


def test_save_model_refuses_non_finite_weights(tmp_path):
    model = nn.Linear(3, 2)
    args = argparse.Namespace(output_dir=str(tmp_path))
    misc.save_model(args, 0, model, None, None)
    good = (tmp_path / "checkpoint-0.pth").read_bytes()
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(misc.NonFiniteLossError, match=r"non-finite values after epoch 0, iteration 5"):
        misc.save_model(args, 0, model, None, None, tag="last", step=5)
    with pytest.raises(misc.NonFiniteWeightsError, match=r"after epoch 0, iteration end"):
        misc.save_model(args, 0, model, None, None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0.pth"]  # nothing new, no temp file
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == good  # the good checkpoint is untouched


def test_save_load_round_trip(tmp_path):
    model, opt, scaler, args = fresh(0, tmp_path)
    train(model, opt, scaler, args, epochs=2)
    path = misc.save_model(args, 5, model, opt, scaler, extra={"max_accuracy": 81.5})
    assert path == str(tmp_path / "checkpoint-5.pth")
    after_save = draws()
    ckpt = misc.load_checkpoint(path)
    assert ckpt["args"].device == "cpu"  # non-builtin args values are stored as text
    assert ckpt["step"] is None and len(ckpt["rng"]) == 1

    model2, opt2, scaler2, args2 = fresh(1, tmp_path, resume=path)
    assert misc.load_model(args2, model2, opt2, scaler2) == {"max_accuracy": 81.5}
    assert draws() == after_save  # RNG continues where the saving run was
    assert (args2.start_epoch, args2.start_iter) == (6, 0)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert scaler2.state_dict() == scaler.state_dict()

    misc.save_model(args, 5, model, opt, scaler, tag="last", step=3)
    model3, opt3, scaler3, args3 = fresh(2, tmp_path, resume=str(tmp_path / "checkpoint-last.pth"))
    misc.load_model(args3, model3, opt3, scaler3)
    assert (args3.start_epoch, args3.start_iter) == (5, 3)

    model4, opt4, scaler4, args4 = fresh(3, tmp_path, resume=path)
    args4.eval = True  # evaluation: weights only, no optimizer / epoch / RNG
    misc.load_model(args4, model4, opt4, scaler4)
    assert args4.start_epoch == 0 and opt4.state_dict()["state"] == {}
    assert misc.load_model(argparse.Namespace(resume=""), model4, opt4, scaler4) == {}


@pytest.mark.parametrize("stop_at", [(2, None), (1, 2)], ids=["epoch_boundary", "mid_epoch"])
def test_resume_replays_uninterrupted_run(tmp_path, stop_at):
    """Killed run + auto-resume gives bit-identical weights to a run that was never interrupted."""
    model, opt, scaler, args = fresh(0, tmp_path / "straight")
    train(model, opt, scaler, args, epochs=3)

    out = tmp_path / "interrupted"
    model_a, opt_a, scaler_a, args_a = fresh(0, out)
    train(model_a, opt_a, scaler_a, args_a, epochs=3, stop_at=stop_at)
    del model_a, opt_a, scaler_a  # the process dies here

    model_b, opt_b, scaler_b, args_b = fresh(99, out)  # restarted with the same command line
    misc.auto_resume(args_b)
    extra = misc.load_model(args_b, model_b, opt_b, scaler_b)
    assert (args_b.start_epoch, args_b.start_iter) == (stop_at[0], stop_at[1] or 0)
    assert extra == ({"max_accuracy": 1.0} if stop_at[1] is None else {})
    train(model_b, opt_b, scaler_b, args_b, epochs=3, start_iter=args_b.start_iter)
    for a, b in zip(model.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)


def fake_ckpt(path, epoch, step=None):
    misc.atomic_save({"model": {}, "epoch": epoch, "step": step, "args": argparse.Namespace(x=1)}, path)


def test_find_latest_checkpoint(tmp_path, capsys):
    assert misc.find_latest_checkpoint(str(tmp_path / "absent")) is None
    assert misc.find_latest_checkpoint(str(tmp_path)) is None
    fake_ckpt(tmp_path / "checkpoint-9.pth", 9)
    fake_ckpt(tmp_path / "checkpoint-10.pth", 10)
    fake_ckpt(tmp_path / "checkpoint-last.pth", 11, step=5)
    fake_ckpt(tmp_path / ".checkpoint-30.pth.tmp-1234", 30)   # interrupted save: never a candidate
    fake_ckpt(tmp_path / "checkpoint-best.pth", 40)            # not a resume candidate
    (tmp_path / "checkpoint-20.pth").write_bytes(b"PK\x03\x04 truncated garbage")  # corrupt: skipped
    assert misc.find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    out = capsys.readouterr().out
    assert "checkpoint-20.pth" in out and ".checkpoint-30.pth.tmp-1234" in out
    fake_ckpt(tmp_path / "checkpoint-last.pth", 10, step=7)  # epoch 10 complete is further along
    assert misc.find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10.pth")

    args = argparse.Namespace(auto_resume=True, resume="", output_dir=str(tmp_path))
    assert misc.auto_resume(args) == str(tmp_path / "checkpoint-10.pth") == args.resume
    args = argparse.Namespace(auto_resume=True, resume="given.pth", output_dir=str(tmp_path))
    assert misc.auto_resume(args) == "given.pth"
    args = argparse.Namespace(auto_resume=False, resume="", output_dir=str(tmp_path))
    assert misc.auto_resume(args) == ""


def test_auto_resume_skips_checkpoints_of_another_script_or_model(tmp_path, capsys):
    """All three scripts default to ./output_dir: a finetuning run must not 'resume' from the
    pretraining checkpoints there, nor a linear probe from a finetuning run's."""
    def ckpt(name, epoch, **saved):
        misc.atomic_save({"model": {}, "epoch": epoch, "args": argparse.Namespace(**saved)}, tmp_path / name)
    ckpt("checkpoint-399.pth", 399, stage="pretrain", model="mae_vit_base_patch16")
    ckpt("checkpoint-last.pth", 400, step=3, stage="finetune", model="vit_large_patch16")
    ckpt("checkpoint-7.pth", 7, stage="finetune", model="vit_base_patch16")
    ckpt("checkpoint-90.pth", 90, stage="linprobe", model="vit_base_patch16")
    finetune = argparse.Namespace(auto_resume=True, resume="", output_dir=str(tmp_path), stage="finetune",
                                  model="vit_base_patch16")
    assert misc.auto_resume(finetune) == str(tmp_path / "checkpoint-7.pth")
    out = capsys.readouterr().out
    assert "checkpoint-399.pth" in out and "'pretrain' run, not 'finetune'" in out
    assert "checkpoint-last.pth" in out and "'vit_large_patch16' run, not 'vit_base_patch16'" in out
    linprobe = argparse.Namespace(**{**vars(finetune), "stage": "linprobe", "resume": ""})
    assert misc.auto_resume(linprobe) == str(tmp_path / "checkpoint-90.pth")
    pretrain = argparse.Namespace(**{**vars(finetune), "stage": "pretrain", "model": "mae_vit_large_patch16",
                                     "resume": ""})
    assert misc.auto_resume(pretrain) == ""  # nothing of its own: starts from scratch
    ckpt("checkpoint-1.pth", 1)  # the original release's checkpoints carry no stage: accepted
    assert misc.auto_resume(pretrain) == str(tmp_path / "checkpoint-1.pth")


def test_check_output_dir(tmp_path):
    target = tmp_path / "a" / "b"
    misc.check_output_dir(str(target))
    assert target.is_dir() and os.listdir(target) == []
    (tmp_path / "file.txt").write_text("x")
    blocked = tmp_path / "file.txt" / "sub"  # can never be created, even as root
    with pytest.raises(RuntimeError, match="file.txt/sub"):
        misc.check_output_dir(str(blocked))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        try:
            (locked / "probe").write_text("x")
            os.remove(locked / "probe")
            writable = True
        except PermissionError:
            writable = False
        if writable:
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(RuntimeError, match="locked"):
            misc.check_output_dir(str(locked))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def test_init_distributed_mode_single_process(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(device="cuda" if not torch.cuda.is_available() else "cpu", dist_url="env://",
                              dist_timeout=30, local_rank=-1)
    misc.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (False, 0, 1, 0)
    assert args.device == "cpu"  # CUDA asked for but absent: falls back with a warning
    assert misc.get_rank() == 0 and misc.get_world_size() == 1 and misc.is_main_process()
    assert misc.all_reduce_mean(2.5) == 2.5


def test_slurm_master_addr_without_scontrol(monkeypatch):
    monkeypatch.setattr(misc.shutil, "which", lambda name: None)
    for nodelist, host in [("gpu[03-05,9]", "gpu03"), ("node7,node8", "node7"), ("a-b[1,2]", "a-b1")]:
        monkeypatch.setenv("SLURM_NODELIST", nodelist)
        assert misc._slurm_master_addr() == host


def test_launcher_env_from_torchrun_slurm_and_openmpi(monkeypatch):
    for var in LAUNCHER_VARS + ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(local_rank=-1, dist_on_itp=False)
    assert misc._launcher_env(args) is None
    monkeypatch.setattr(misc.shutil, "which", lambda name: None)
    monkeypatch.setenv("SLURM_NODELIST", "gpu[12-13]")
    for var, value in (("SLURM_PROCID", "11"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "3")):
        monkeypatch.setenv(var, value)
    assert misc._launcher_env(args) == (11, 16, 3)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu12", "29500")
    for var, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(var, value)
    assert misc._launcher_env(args) == (5, 8, 1)  # torchrun's variables win over SLURM's
    for var, value in (("OMPI_COMM_WORLD_RANK", "6"), ("OMPI_COMM_WORLD_SIZE", "32"),
                       ("OMPI_COMM_WORLD_LOCAL_RANK", "2")):
        monkeypatch.setenv(var, value)
    assert misc._launcher_env(argparse.Namespace(local_rank=-1, dist_on_itp=True)) == (6, 32, 2)


def test_auto_precision_on_gpus_with_and_without_native_bf16(monkeypatch):
    native = {"flag": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native["flag"] or including_emulation)
    assert misc.resolve_precision("auto", "cuda") == "bf16"  # Ampere and newer
    native["flag"] = False  # V100 / T4: bf16 only emulated
    assert misc.resolve_precision("auto", "cuda") == "fp16"


def test_setup_for_distributed_silences_non_master(capsys):
    misc.setup_for_distributed(False)
    print("hidden")
    print("shown", force=True)
    misc.setup_for_distributed(True)
    print("master")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].endswith("] shown") and out[1].endswith("] master")
    assert out[0].startswith("[20")  # time stamp


WORKER = textwrap.dedent("""
    import argparse, json, os, sys, torch
    from util import misc
    out = sys.argv[1]
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_timeout=1, local_rank=-1,
                              output_dir=out, resume="", start_epoch=0, auto_resume=True)
    misc.init_distributed_mode(args)
    mean = misc.all_reduce_mean(float(args.rank))
    meter = misc.SmoothedValue()
    meter.update(torch.tensor(float(args.rank + 1)), n=args.rank + 1)
    meter.synchronize_between_processes()
    misc.seed_everything(args.rank)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = misc.save_model(args, 3, model, opt, None, step=1, tag="last")
    expected = torch.rand(3).tolist()
    torch.distributed.barrier()
    misc.auto_resume(args)
    misc.load_model(args, model, opt, None)
    result = dict(rank=args.rank, world=args.world_size, distributed=args.distributed, mean=mean,
                  count=meter.count, total=meter.total, path=path, resume=args.resume,
                  replay=torch.rand(3).tolist() == expected, start=[args.start_epoch, args.start_iter])
    json.dump(result, open(os.path.join(out, f"rank{args.rank}.json"), "w"))
    torch.distributed.destroy_process_group()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo(tmp_path):
    """init from torchrun-style env on CPU (gloo), all_reduce_mean, meter sync, RNG gathered per rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", PYTHONPATH=REPO,
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    ckpt_path = str(tmp_path / "checkpoint-last.pth")
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["distributed"], res["mean"]) == (r, 2, True, 0.5)
        assert (res["count"], res["total"]) == (3, 5.0)  # 1*1 + 2*2 over 1 + 2 samples
        assert res["resume"] == ckpt_path and res["start"] == [3, 1] and res["replay"]
    assert results[0]["path"] == ckpt_path and results[1]["path"] is None
    rng = misc.load_checkpoint(ckpt_path)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


# ---------------------------------------------------------------------------------------------
# Helpers shared by the training engines and the three scripts
# ---------------------------------------------------------------------------------------------

class FakeWriter:
    def __init__(self):
        self.scalars, self.flushed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def flush(self):
        self.flushed = True


def test_sync_losses_scalar_name_and_accumulation_boundaries():
    pending = [(i, 0.1 * i, torch.tensor(float(i))) for i in range(4)]  # (iteration, lr, loss)
    every, boundaries = FakeWriter(), FakeWriter()
    meters = misc.MetricLogger()
    misc.sync_losses(pending, 2, 8, meters, every, loss_name="train_loss")  # pretrain: every iteration
    assert meters.loss.count == 4 and meters.loss.global_avg == 1.5
    assert [(tag, step) for tag, step, _ in every.scalars] == [
        (tag, step) for step in (2000, 2125, 2250, 2375) for tag in ("train_loss", "lr")]
    misc.sync_losses(pending, 2, 8, misc.MetricLogger(), boundaries, loss_name="loss", accum_iter=2)
    assert boundaries.scalars == [("loss", 2125, 1.0), ("lr", 2125, 0.1), ("loss", 2375, 3.0),
                                  ("lr", 2375, pytest.approx(0.3))]  # finetune: accumulation ends


def test_sync_losses_stops_at_the_first_non_finite_loss():
    pending = [(5, 0.1, torch.tensor(1.0)), (6, 0.1, torch.tensor(float("inf"))), (7, 0.1, torch.tensor(2.0))]
    writer, meters = FakeWriter(), misc.MetricLogger()
    with pytest.raises(misc.NonFiniteLossError, match="Loss is inf at epoch 1, iteration 6"):
        misc.sync_losses(pending, 1, 10, meters, writer)
    assert meters.loss.count == 1 and [step for _, step, _ in writer.scalars] == [1500, 1500]


def test_is_log_point_matches_log_every(capsys):
    assert [i for i in range(10) if misc.is_log_point(i, 0, 10, 4)] == [0, 4, 8, 9]
    assert [i for i in range(3, 10) if misc.is_log_point(i, 3, 10, 4)] == [3, 4, 8, 9]
    for _ in misc.MetricLogger().log_every(range(7), 4, "E", start_iter=3):
        pass
    printed = re.findall(r"\[ ?(\d+)/10\]", capsys.readouterr().out)
    assert printed == ["3", "4", "8", "9"]  # log_every prints where the engines sync


def test_unwrap_model_wrap_model_and_grad_sync():
    model = nn.Linear(2, 2)
    args = argparse.Namespace(distributed=False, compile=False, device="cpu", gpu=0)
    assert misc.wrap_model(model, args) is model and misc.unwrap_model(model) is model
    compiled = misc.wrap_model(model, argparse.Namespace(**{**vars(args), "compile": True}))
    assert compiled is not model and misc.unwrap_model(compiled) is model

    class NoSync(nn.Linear):
        skipped = 0

        @contextlib.contextmanager
        def no_sync(self):
            NoSync.skipped += 1
            yield

    ddp_like = NoSync(2, 2)
    with misc.grad_sync(ddp_like, update_grad=True):
        pass
    assert NoSync.skipped == 0  # the update step all-reduces
    with misc.grad_sync(ddp_like, update_grad=False):
        pass
    assert NoSync.skipped == 1  # accumulation steps skip the all-reduce
    with misc.grad_sync(model, update_grad=False):  # no DDP: nothing to skip
        pass


def test_model_from_name():
    zoo = types.ModuleType("zoo")
    zoo.net_small = lambda **kwargs: ("small", kwargs)
    zoo.net_big = lambda **kwargs: ("big", kwargs)
    zoo.helper = lambda **kwargs: None
    assert misc.model_from_name(zoo, "net_big", "net_", depth=2, patch_size=None) == ("big", {"depth": 2})
    with pytest.raises(ValueError, match="unknown --model 'helper'; choose one of: net_big, net_small$"):
        misc.model_from_name(zoo, "helper", "net_")


def test_save_checkpoints_policy(tmp_path):
    def run_epochs(folder, **kw):
        folder.mkdir()
        args = argparse.Namespace(**{**dict(output_dir=str(folder), epochs=6, save_freq=2,
                                            save_every_iters=0), **kw})
        model = nn.Linear(2, 2)
        for epoch in range(args.epochs):
            misc.save_checkpoints(args, epoch, model, None, None, extra={"max_accuracy": epoch},
                                  improved=epoch in (1, 3))
        return sorted(os.listdir(folder))

    assert run_epochs(tmp_path / "a") == ["checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-4.pth",
                                          "checkpoint-5.pth", "checkpoint-best.pth"]  # + the last epoch
    best = misc.load_checkpoint(tmp_path / "a" / "checkpoint-best.pth")
    assert (best["epoch"], best["max_accuracy"]) == (3, 3)
    assert run_epochs(tmp_path / "b", save_freq=0, save_every_iters=10) == [
        "checkpoint-5.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    last = misc.load_checkpoint(tmp_path / "b" / "checkpoint-last.pth")
    assert (last["epoch"], last["step"]) == (5, None)  # a complete epoch
    misc.save_checkpoints(argparse.Namespace(output_dir=""), 0, None, None, None, improved=True)  # no-op


def test_write_log_and_create_log_writer(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), log_dir="")
    writer = FakeWriter()
    misc.write_log(args, {"train_loss": 0.5, "epoch": 0}, writer)
    misc.write_log(args, {"epoch": 1})
    with open(tmp_path / "log.txt") as f:
        assert [json.loads(line) for line in f] == [{"train_loss": 0.5, "epoch": 0}, {"epoch": 1}]
    assert writer.flushed
    misc.write_log(argparse.Namespace(output_dir=""), {"epoch": 2})  # no output_dir: nothing written

    assert misc.create_log_writer(args) is None  # no --log_dir
    tb = tmp_path / "tb"
    assert misc.create_log_writer(argparse.Namespace(log_dir=str(tb), eval=True)) is None
    writer = misc.create_log_writer(argparse.Namespace(log_dir=str(tb)))
    writer.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))


def test_run_exits_with_one_line_on_a_non_finite_loss(capsys):
    def diverges(args):
        raise misc.NonFiniteLossError(float("nan"), 2, 7)

    with pytest.raises(SystemExit) as e:
        misc.run(diverges, None)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: Loss is nan at epoch 2, iteration 7;") and err.count("\n") == 1
    seen = []
    misc.run(seen.append, "args")
    assert seen == ["args"]
    with pytest.raises(KeyError):  # other errors keep their traceback
        misc.run(lambda args: {}[args], "missing")


def test_init_run_single_process(tmp_path, monkeypatch, capsys):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = misc.save_model(argparse.Namespace(output_dir=str(out)), 3, nn.Linear(2, 2), None, None)
    argv = ["--device", "cpu", "--seed", "7", "--output_dir", str(out), "--log_dir", str(tmp_path / "tb" / "x")]
    args = add_common_args(argparse.ArgumentParser()).parse_args(argv)

    device = misc.init_run(args)
    assert device == torch.device("cpu") and args.precision == "fp32" and not args.distributed
    assert args.resume == checkpoint  # --auto_resume found the checkpoint
    assert (tmp_path / "tb" / "x").is_dir() and torch.backends.cudnn.benchmark
    drawn = draws()
    misc.seed_everything(7)  # seed + rank 0
    assert draws() == drawn
    printed = capsys.readouterr().out
    assert f"job dir: {REPO}\n" in printed and "seed=7,\n" in printed
