"""util/checkpoint.py: atomic and safe checkpoints, RNG capture, the non-finite guards, resume
(whole and mid-epoch) as a ResumePoint, auto-resume, the output-folder probe and the
end-of-epoch save policy."""
import argparse
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, SUBPROCESS_ENV
from util import checkpoint, run_dir
from util.checkpoint import ResumePoint
from util.precision import NativeScalerWithGradNormCount


@pytest.fixture(autouse=True)
def restore_rng():
    """Tests reseed the global RNGs: undo it."""
    state = checkpoint.get_rng_state()
    yield
    checkpoint.set_rng_state(state)


def draws():
    """One draw from each global RNG (torch, numpy incl. its cached gaussian, python)."""
    return torch.rand(4).tolist(), np.random.randn(3).tolist(), np.random.rand(2).tolist(), random.random()


class Evil:
    """An arbitrary class: unpickling it must be refused by the safe loader."""

    def __init__(self, payload):
        self.payload = payload


def test_non_finite_loss_error_message():
    err = checkpoint.NonFiniteLossError(float("nan"), epoch=3, iteration=17)
    assert isinstance(err, RuntimeError)
    assert "epoch 3" in str(err) and "iteration 17" in str(err) and "nan" in str(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


# ---------------------------------------------------------------------------------------------
# Atomic save and RNG state
# ---------------------------------------------------------------------------------------------

SAVER = textwrap.dedent("""
    import sys, torch
    from util.checkpoint import atomic_save
    path = sys.argv[1]
    for i in range(10 ** 6):
        print(i, flush=True)  # saves 0 .. i - 1 are complete
        atomic_save({"epoch": i, "data": torch.full((6_000_000,), float(i))}, path)
""")


@pytest.mark.slow
def test_atomic_save_survives_sigkill(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    temp_names, killed_mid_save = set(), []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True, env=dict(SUBPROCESS_ENV, PYTHONPATH=REPO))
        try:
            assert proc.stdout.readline().strip() == "0"
            assert proc.stdout.readline().strip() == "1"  # save 0 is complete, save 1 starts
            tmp_name = tmp_path / f".{path.name}.tmp-{socket.gethostname()}-{proc.pid}"
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
        ckpt = checkpoint.load_checkpoint(path)  # the final name always holds a complete save
        assert ckpt["epoch"] >= 0 and torch.equal(ckpt["data"], torch.full((6_000_000,), float(ckpt["epoch"])))
        names = set(os.listdir(tmp_path))
        assert names <= {path.name} | temp_names, names  # nothing else, in particular no half *.pth
    assert any(killed_mid_save)  # the kill did land inside a save
    assert checkpoint.find_latest_checkpoint(str(tmp_path)) == str(path)  # leftovers are never candidates


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.pth"
    checkpoint.atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.atomic_save({"v": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pth"]  # the temp file was removed


def test_rng_state_round_trip(tmp_path):
    checkpoint.seed_everything(123)
    np.random.randn(1)  # leaves a cached gaussian in numpy's legacy state
    state = checkpoint.get_rng_state()
    expected = draws()
    checkpoint.set_rng_state(state)
    assert draws() == expected
    checkpoint.seed_everything(0)
    assert draws() != expected
    checkpoint.atomic_save({"rng": [state]}, tmp_path / "rng.pth")
    loaded = checkpoint.load_checkpoint(tmp_path / "rng.pth")  # weights_only=True
    checkpoint.set_rng_state(loaded["rng"][0])
    assert draws() == expected


def test_seed_everything_is_deterministic():
    checkpoint.seed_everything(7)
    a = draws()
    checkpoint.seed_everything(7)
    assert draws() == a
    checkpoint.seed_everything(8)
    assert draws() != a


# ---------------------------------------------------------------------------------------------
# Safe loading and compatibility checks
# ---------------------------------------------------------------------------------------------


def test_load_checkpoint_refuses_arbitrary_class(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Evil("rm -rf")}, path)
    with pytest.raises(RuntimeError) as info:
        checkpoint.load_checkpoint(path)
    msg = str(info.value)
    assert "Evil" in msg and "--unsafe_load" in msg and str(path) in msg and "code" in msg
    ckpt = checkpoint.load_checkpoint(path, unsafe=True)
    assert isinstance(ckpt["extra"], Evil) and ckpt["extra"].payload == "rm -rf"


def test_load_checkpoint_original_release_layout(tmp_path, make_args, tiny_problem):
    model, _ = tiny_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu")
    # the original release's own args, pickled into its checkpoints (not this repo's parser)
    orig_args = argparse.Namespace(batch_size=64, epochs=800, model="mae_vit_large_patch16", lr=None, blr=1.5e-4,
                                   mask_ratio=0.75, norm_pix_loss=True, distributed=True, dist_backend="nccl",
                                   gpu=0, rank=0, world_size=64, output_dir="./output_dir", pin_mem=True)
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 399,
                "scaler": scaler.state_dict(), "args": orig_args}, path)
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["args"] == orig_args and ckpt["epoch"] == 399
    # resuming from it: no step / rng / max_accuracy entries in the original's checkpoints
    new_model, _ = tiny_problem(seed=1)
    new_opt = torch.optim.AdamW(new_model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    args = make_args("pretrain", "--resume", path, "--output_dir", tmp_path)
    start = checkpoint.resume(args, new_model, new_opt, NativeScalerWithGradNormCount(True, "cpu"))
    assert start.max_accuracy == 0.0
    assert (start.epoch, start.iteration) == (400, 0)
    for a, b in zip(model.parameters(), new_model.parameters()):
        assert torch.equal(a, b)


def test_load_checkpoint_missing_path(tmp_path):
    missing = tmp_path / "nope" / "checkpoint-7.pth"
    with pytest.raises(FileNotFoundError, match="checkpoint-7.pth"):
        checkpoint.load_checkpoint(missing)


def test_check_state_dict_compat():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    good = model.state_dict()
    assert checkpoint.check_state_dict_compat(model, good) is None
    bad = {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3), "decoder.w": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        checkpoint.check_state_dict_compat(model, bad)
    msg = str(info.value)
    assert "0.weight: checkpoint (3, 5) vs model (3, 4)" in msg
    assert "missing keys (2): 1.weight, 1.bias" in msg
    assert "unexpected keys (1): decoder.w" in msg
    assert "another architecture / patch size / image size" in msg
    ok = dict(good, **{"decoder.w": torch.zeros(1)})
    del ok["1.bias"]
    assert checkpoint.check_state_dict_compat(model, ok, allowed_missing=("1.*",),
                                              allowed_unexpected=("decoder*",)) is None
    many = {f"extra.{i}": torch.zeros(1) for i in range(25)}
    with pytest.raises(ValueError, match=r"unexpected keys \(25\): .*and 15 more"):
        checkpoint.check_state_dict_compat(model, dict(good, **many))


# ---------------------------------------------------------------------------------------------
# save_model / resume / auto-resume
# ---------------------------------------------------------------------------------------------


class Noisy(nn.Module):
    """Tiny model whose training uses every global RNG (dropout, numpy, random)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def train(model, opt, scaler, args, epochs, steps=4, start=ResumePoint(0), stop_at=None):
    """Toy training loop drawing its data from the global RNGs, from the resume point `start`;
    optionally stops mid-epoch."""
    for epoch in range(start.epoch, epochs):
        if stop_at == (epoch, None):  # killed right after checkpoint-<epoch - 1>.pth was written
            return None
        for it in range(start.iteration if epoch == start.epoch else 0, steps):
            if stop_at == (epoch, it):  # killed right after a mid-epoch checkpoint-last.pth
                return checkpoint.save_model(args, epoch, model, opt, scaler, tag="last", step=it)
            x = torch.randn(8, 6) * (1 + np.random.rand()) + random.random()
            loss = model(x).pow(2).mean()
            scaler(loss, opt, parameters=model.parameters())
            opt.zero_grad()
        checkpoint.save_model(args, epoch, model, opt, scaler, extra={"max_accuracy": float(epoch)})


@pytest.fixture
def fresh(make_args):
    """fresh(seed, output_dir, resume="") -> (model, optimizer, scaler, args) of a new process
    started with `--seed seed --output_dir output_dir --resume resume` (auto-resume on)."""
    def make(seed, output_dir, resume=""):
        run_dir.check_output_dir(str(output_dir))
        checkpoint.seed_everything(seed)
        model = Noisy()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
        scaler = NativeScalerWithGradNormCount(enabled=True, device_type="cpu")
        args = make_args("pretrain", "--output_dir", output_dir, "--resume", resume, "--seed", seed,
                         device=torch.device("cpu"))
        assert args.auto_resume and not args.unsafe_load and args.start_epoch == 0
        return model, opt, scaler, args
    return make


def test_save_model_refuses_non_finite_weights(tmp_path, make_args):
    model = nn.Linear(3, 2)
    args = make_args("pretrain", "--output_dir", tmp_path)
    checkpoint.save_model(args, 0, model, None, None)
    good = (tmp_path / "checkpoint-0.pth").read_bytes()
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(checkpoint.NonFiniteLossError, match=r"non-finite values after epoch 0, iteration 5"):
        checkpoint.save_model(args, 0, model, None, None, tag="last", step=5)
    with pytest.raises(checkpoint.NonFiniteWeightsError, match=r"after epoch 0, iteration end"):
        checkpoint.save_model(args, 0, model, None, None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0.pth"]  # nothing new, no temp file
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == good  # the good checkpoint is untouched


def test_save_load_round_trip(tmp_path, fresh, make_args):
    model, opt, scaler, args = fresh(0, tmp_path)
    train(model, opt, scaler, args, epochs=2)
    path = checkpoint.save_model(args, 5, model, opt, scaler, extra={"max_accuracy": 81.5})
    assert path == str(tmp_path / "checkpoint-5.pth")
    after_save = draws()
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["args"].device == "cpu"  # non-builtin args values are stored as text
    assert ckpt["step"] is None and len(ckpt["rng"]) == 1

    model2, opt2, scaler2, args2 = fresh(1, tmp_path, resume=path)
    start = checkpoint.resume(args2, model2, opt2, scaler2)
    assert start.max_accuracy == 81.5
    assert draws() == after_save  # RNG continues where the saving run was
    assert (start.epoch, start.iteration) == (6, 0)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert scaler2.state_dict() == scaler.state_dict()

    checkpoint.save_model(args, 5, model, opt, scaler, tag="last", step=3)
    model3, opt3, scaler3, args3 = fresh(2, tmp_path, resume=str(tmp_path / "checkpoint-last.pth"))
    start3 = checkpoint.resume(args3, model3, opt3, scaler3)
    assert (start3.epoch, start3.iteration) == (5, 3)

    model4, opt4, scaler4, args4 = fresh(3, tmp_path, resume=path)
    # evaluation: weights only, no optimizer / epoch / RNG
    start4 = checkpoint.resume(args4, model4, opt4, scaler4, eval_only=True)
    assert start4.epoch == 0 and opt4.state_dict()["state"] == {}
    assert start4 == ResumePoint(0, 0, 81.5)
    # nothing to resume from (no --resume, no --auto_resume): the start of --start_epoch
    nothing = checkpoint.resume(make_args("pretrain", "--no_auto_resume", "--output_dir", tmp_path),
                                model4, opt4, scaler4)
    assert nothing.max_accuracy == 0.0
    assert nothing == ResumePoint(0, 0, 0.0)


def test_resume_returns_resume_point_and_leaves_args_unchanged(tmp_path, make_args, capsys):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = make_args("pretrain", "--output_dir", tmp_path, "--start_epoch", 3)
    before = dict(vars(args))
    # nothing to resume from: args.start_epoch, iteration 0, no best accuracy
    start = checkpoint.resume(args, model, opt, None)
    assert type(start) is ResumePoint and start == ResumePoint(3, 0, 0.0)
    assert vars(args) == before

    path = checkpoint.save_model(args, 6, model, opt, None, extra={"max_accuracy": 42.0}, tag="last", step=2)
    start = checkpoint.resume(args, model, opt, None)  # found by --auto_resume
    assert type(start) is ResumePoint and start == ResumePoint(6, 2, 42.0)
    assert f"Auto-resume from {path}" in capsys.readouterr().out
    assert vars(args) == before  # nothing written on args ...
    assert args.resume == "" and args.start_epoch == 3  # ... not the auto-resumed path, not the epoch
    assert "start_iter" not in vars(args)

    eval_start = checkpoint.resume(args, model, opt, None, eval_only=True)
    assert eval_start == ResumePoint(3, 0, 42.0) and vars(args) == before


@pytest.mark.parametrize("stop_at", [(2, None), (1, 2)], ids=["epoch_boundary", "mid_epoch"])
def test_resume_replays_uninterrupted_run(tmp_path, fresh, stop_at):
    """Killed run + auto-resume gives bit-identical weights to a run that was never interrupted."""
    model, opt, scaler, args = fresh(0, tmp_path / "straight")
    train(model, opt, scaler, args, epochs=3)

    out = tmp_path / "interrupted"
    model_a, opt_a, scaler_a, args_a = fresh(0, out)
    train(model_a, opt_a, scaler_a, args_a, epochs=3, stop_at=stop_at)
    del model_a, opt_a, scaler_a  # the process dies here

    model_b, opt_b, scaler_b, args_b = fresh(99, out)  # restarted with the same command line
    start = checkpoint.resume(args_b, model_b, opt_b, scaler_b)  # auto-resumes
    assert (start.epoch, start.iteration) == (stop_at[0], stop_at[1] or 0)
    assert start.max_accuracy == (1.0 if stop_at[1] is None else 0.0)
    train(model_b, opt_b, scaler_b, args_b, epochs=3, start=start)
    for a, b in zip(model.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)


def fake_ckpt(path, epoch, step=None):
    checkpoint.atomic_save({"model": {}, "epoch": epoch, "step": step, "args": argparse.Namespace(x=1)}, path)


def test_find_latest_checkpoint(tmp_path, capsys, make_args):
    assert checkpoint.find_latest_checkpoint(str(tmp_path / "absent")) is None
    assert checkpoint.find_latest_checkpoint(str(tmp_path)) is None
    fake_ckpt(tmp_path / "checkpoint-9.pth", 9)
    fake_ckpt(tmp_path / "checkpoint-10.pth", 10)
    fake_ckpt(tmp_path / "checkpoint-last.pth", 11, step=5)
    fake_ckpt(tmp_path / ".checkpoint-30.pth.tmp-1234", 30)   # interrupted save: never a candidate
    fake_ckpt(tmp_path / "checkpoint-best.pth", 40)            # not a resume candidate
    (tmp_path / "checkpoint-20.pth").write_bytes(b"PK\x03\x04 truncated garbage")  # corrupt: skipped
    assert checkpoint.find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    out = capsys.readouterr().out
    assert "checkpoint-20.pth" in out and ".checkpoint-30.pth.tmp-1234" in out
    fake_ckpt(tmp_path / "checkpoint-last.pth", 10, step=7)  # epoch 10 complete is further along
    assert checkpoint.find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10.pth")

    args = make_args("pretrain", "--output_dir", tmp_path)
    assert args.auto_resume and args.resume == ""
    assert checkpoint.auto_resume(args) == str(tmp_path / "checkpoint-10.pth")
    assert args.resume == ""  # returned, not set on args
    args = make_args("pretrain", "--resume", "given.pth", "--output_dir", tmp_path)
    assert checkpoint.auto_resume(args) == "given.pth"
    args = make_args("pretrain", "--no_auto_resume", "--output_dir", tmp_path)
    assert checkpoint.auto_resume(args) == ""


def test_auto_resume_skips_checkpoints_of_another_script_or_model(tmp_path, capsys, make_args):
    """All three scripts default to ./output_dir: a finetuning run must not 'resume' from the
    pretraining checkpoints there, nor a linear probe from a finetuning run's."""
    def ckpt(name, epoch, **saved):
        checkpoint.atomic_save({"model": {}, "epoch": epoch, "args": argparse.Namespace(**saved)}, tmp_path / name)
    ckpt("checkpoint-399.pth", 399, stage="pretrain", model="mae_vit_base_patch16")
    ckpt("checkpoint-last.pth", 400, step=3, stage="finetune", model="vit_large_patch16")
    ckpt("checkpoint-7.pth", 7, stage="finetune", model="vit_base_patch16")
    ckpt("checkpoint-90.pth", 90, stage="linprobe", model="vit_base_patch16")
    finetune = make_args("finetune", "--output_dir", tmp_path, "--model", "vit_base_patch16")
    assert checkpoint.auto_resume(finetune) == str(tmp_path / "checkpoint-7.pth")
    out = capsys.readouterr().out
    assert "checkpoint-399.pth" in out and "'pretrain' run, not 'finetune'" in out
    assert "checkpoint-last.pth" in out and "'vit_large_patch16' run, not 'vit_base_patch16'" in out
    linprobe = make_args("linprobe", "--output_dir", tmp_path, "--model", "vit_base_patch16")
    assert checkpoint.auto_resume(linprobe) == str(tmp_path / "checkpoint-90.pth")
    pretrain = make_args("pretrain", "--output_dir", tmp_path, "--model", "mae_vit_large_patch16")
    assert checkpoint.auto_resume(pretrain) == ""  # nothing of its own: starts from scratch
    ckpt("checkpoint-1.pth", 1)  # the original release's checkpoints carry no stage: accepted
    assert checkpoint.auto_resume(pretrain) == str(tmp_path / "checkpoint-1.pth")


def test_check_output_dir(tmp_path):
    target = tmp_path / "a" / "b"
    run_dir.check_output_dir(str(target))
    assert target.is_dir() and os.listdir(target) == []
    (tmp_path / "file.txt").write_text("x")
    blocked = tmp_path / "file.txt" / "sub"  # can never be created, even as root
    with pytest.raises(RuntimeError, match="file.txt/sub"):
        run_dir.check_output_dir(str(blocked))
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
            run_dir.check_output_dir(str(locked))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# Save policy
# ---------------------------------------------------------------------------------------------


def test_save_checkpoints_policy(tmp_path, make_args):
    # test top-1 per epoch: improves on the best so far at epochs 1 and 3 only (5: ties, no improvement)
    accuracies = [0.0, 1.0, 0.5, 3.0, 2.0, 3.0]

    def run_epochs(folder, **kw):
        folder.mkdir()
        args = make_args("pretrain", "--output_dir", folder, "--epochs", 6,
                         **{**dict(save_freq=2, save_every_iters=0), **kw})
        model = nn.Linear(2, 2)
        max_accuracy = 0.0
        for epoch in range(args.epochs):
            max_accuracy = checkpoint.save_checkpoints(args, epoch, model, None, None,
                                                       test_acc1=accuracies[epoch], max_accuracy=max_accuracy)
        return sorted(os.listdir(folder))

    assert run_epochs(tmp_path / "a") == ["checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-4.pth",
                                          "checkpoint-5.pth", "checkpoint-best.pth"]  # + the last epoch
    best = checkpoint.load_checkpoint(tmp_path / "a" / "checkpoint-best.pth")
    assert (best["epoch"], best["max_accuracy"]) == (3, 3)
    assert run_epochs(tmp_path / "b", save_freq=0, save_every_iters=10) == [
        "checkpoint-5.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    last = checkpoint.load_checkpoint(tmp_path / "b" / "checkpoint-last.pth")
    assert (last["epoch"], last["step"]) == (5, None)  # a complete epoch
    assert last["max_accuracy"] == 3.0
    # no --output_dir: nothing written, the best is still tracked
    assert checkpoint.save_checkpoints(make_args("pretrain", "--output_dir", ""), 0, None, None, None,
                                       test_acc1=5.0) == 5.0


def test_save_checkpoints_returns_the_new_max_and_writes_best_on_improvement(tmp_path, make_args, capsys):
    args = make_args("finetune", "--output_dir", tmp_path, "--epochs", 10, "--save_freq", 1)
    model = nn.Linear(2, 2)

    def best():
        ckpt = checkpoint.load_checkpoint(tmp_path / "checkpoint-best.pth")
        return ckpt["epoch"], ckpt["max_accuracy"]

    assert checkpoint.save_checkpoints(args, 0, model, None, None, test_acc1=50.0, max_accuracy=60.0) == 60.0
    assert "Max accuracy: 60.00%" in capsys.readouterr().out
    assert not (tmp_path / "checkpoint-best.pth").exists()  # 50 < 60: no best
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint-0.pth")["max_accuracy"] == 60.0
    assert checkpoint.save_checkpoints(args, 1, model, None, None, test_acc1=70.0, max_accuracy=60.0) == 70.0
    assert "Max accuracy: 70.00%" in capsys.readouterr().out
    assert best() == (1, 70.0)
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint-1.pth")["max_accuracy"] == 70.0
    assert checkpoint.save_checkpoints(args, 2, model, None, None, test_acc1=70.0, max_accuracy=70.0) == 70.0
    assert best() == (1, 70.0)  # a tie is no improvement
    assert checkpoint.save_checkpoints(args, 3, model, None, None, test_acc1=65.0, max_accuracy=70.0) == 70.0
    assert best() == (1, 70.0)
    capsys.readouterr()
    # without a test accuracy (pretraining): the max passes through, no best, no max_accuracy entry
    assert checkpoint.save_checkpoints(args, 4, model, None, None, max_accuracy=70.0) == 70.0
    assert "Max accuracy" not in capsys.readouterr().out
    assert best() == (1, 70.0)
    assert "max_accuracy" not in checkpoint.load_checkpoint(tmp_path / "checkpoint-4.pth")
