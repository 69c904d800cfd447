"""Reruns into an --output_dir that already holds a run (util.run_dir): a run never overwrites or
appends to another stage's or model's files, never shares its folder with a live run, never
silently continues a run whose flags were different or mid-epoch with another batch size, and a
rerun of a finished run says so and writes nothing.

The scripts run in this process through their command lines (the `cli` fixture of
test_reliability.py: runpy as __main__); the lock test names a second live process (a `sleep`)
as the holder of a folder's lock, then kills it.
"""
import argparse
import builtins
import hashlib
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import LAUNCHER_VARS, REPO
from test_reliability import CLASSIFY, PRETRAIN, flags
from util import run_dir
from util.checkpoint import atomic_save, load_checkpoint

TINY = [*PRETRAIN, "--batch_size", "8"]  # 16 training images: 2 iterations per epoch
CLASSIFIER = [*CLASSIFY, "--warmup_epochs", "1"]


def snapshot(folder):
    """{relative path: sha256} of every file below `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.fixture(scope="module")
def data(toy_data):
    """4 classes x (4 train + 2 val) images of 32 px."""
    return toy_data(train_per_class=4, val_per_class=2, size=32)


def run_once(script, *args):
    """`python script args` in this process, for the module's shared runs (cli is per test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "print", builtins.print)  # the scripts time-stamp print()
        for var in LAUNCHER_VARS:
            mp.delenv(var, raising=False)
        mp.setattr(sys, "argv", [script, *map(str, args)])
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """The folder of a finished 1-epoch pretraining run of mae_vit_tiny_patch16 at batch 8."""
    out = tmp_path_factory.mktemp("pretrained")
    run_once("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1))
    assert {"checkpoint-0.pth", "log.txt", "run.json"} <= set(os.listdir(out))
    return out


@pytest.fixture(scope="module")
def finetuned(data, pretrained, tmp_path_factory):
    """The folder of a finished 1-epoch finetuning run of vit_tiny_patch16 from `pretrained`."""
    out = tmp_path_factory.mktemp("finetuned")
    pretrained_checkpoint = pretrained / "checkpoint-0.pth"
    run_once("main_finetune.py", *flags(CLASSIFIER, data, out, "--epochs", 1, "--finetune", pretrained_checkpoint))
    assert {"checkpoint-0.pth", "log.txt"} <= set(os.listdir(out))
    return out


def copy_of(folder, tmp_path, name="out"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


# ---------------------------------------------------------------------------------------------
# Another run's folder
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("evidence", ["run.json", "checkpoint args"])
def test_another_model_stops_and_overwrite_moves_the_other_run_aside(pretrained, data, tmp_path, cli, evidence):
    out = copy_of(pretrained, tmp_path)
    if evidence == "checkpoint args":  # a folder of an older version, or of the original release
        os.remove(out / "run.json")
    before = snapshot(out)
    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1, "--model", "mae_vit_small_patch16"))
    assert status == 1, log[-3000:]
    assert f"--output_dir {out} holds another run" in log and "pretrain run of mae_vit_tiny_patch16" in log
    assert "this is a pretrain run of mae_vit_small_patch16" in log
    assert f"--output_dir {out}_pretrain (and --log_dir)" in log and "--overwrite" in log
    assert "Traceback" not in log and "Model =" not in log and "Start training" not in log
    assert snapshot(out) == before  # nothing of the other run touched, no file added

    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1, "--model", "mae_vit_small_patch16",
                                                 "--overwrite"))
    assert status == 0, log[-3000:]
    aside = [n for n in os.listdir(out) if n.startswith("replaced-")]
    assert len(aside) == 1 and "--overwrite: moved the" in log and str(out / aside[0]) in log
    kept = {name[len(aside[0]) + 1:]: digest for name, digest in snapshot(out).items() if name.startswith(aside[0])}
    assert kept == before  # every file of the other run, byte for byte
    assert load_checkpoint(out / "checkpoint-0.pth")["args"].model == "mae_vit_small_patch16"
    assert json.loads((out / "run.json").read_text()) == {"stage": "pretrain", "model": "mae_vit_small_patch16"}
    assert len((out / "log.txt").read_text().splitlines()) == 1


@pytest.mark.parametrize("evidence", ["checkpoints", "log.txt only"])
def test_finetune_into_the_pretraining_folder_stops_naming_the_fix(pretrained, finetuned, data, tmp_path, cli,
                                                                   evidence):
    out = copy_of(pretrained, tmp_path, "output_dir")
    if evidence == "log.txt only":  # a pretraining run of an older version killed before its first save
        for name in os.listdir(out):
            if name != "log.txt":
                os.remove(out / name)
    before = snapshot(out)
    status, log = cli("main_finetune.py", *flags(CLASSIFIER, data, out, "--epochs", 1,
                                                 "--finetune", pretrained / "checkpoint-0.pth"))
    assert status == 1, log[-3000:]
    assert f"--output_dir {out} holds another run" in log and "this is a finetune run of vit_tiny_patch16" in log
    assert f"e.g. --output_dir {out}_finetune (and --log_dir)" in log and "--overwrite" in log
    assert "Start training" not in log and snapshot(out) == before

    # evaluating writes nothing to --output_dir: allowed there
    status, log = cli("main_finetune.py", *flags(CLASSIFIER, data, out, "--eval", "--resume",
                                                 finetuned / "checkpoint-0.pth"))
    assert status == 0 and "Accuracy of the network" in log, log[-3000:]
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

def test_second_live_run_stops_and_a_dead_runs_lock_is_taken_over(data, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "600"])  # a live process on this host holds the folder's lock
    lock = {"host": socket.gethostname(), "pid": holder.pid, "token": "x", "stage": "pretrain",
            "model": "mae_vit_tiny_patch16", "started": "2024-05-01T12:00:00"}
    (out / ".run.lock").write_text(json.dumps(lock))
    try:
        status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1))
        assert status == 1, log[-3000:]
        assert (f"--output_dir {out} is in use by another live run: a pretrain run of mae_vit_tiny_patch16, pid "
                f"{holder.pid} on host {socket.gethostname()}, started 2024-05-01T12:00:00") in log
        assert str(out / ".run.lock") in log and "Start training" not in log
        assert os.listdir(out) == [".run.lock"] and json.loads((out / ".run.lock").read_text()) == lock
    finally:
        holder.kill()  # dies without releasing the lock
        holder.wait()
    assert json.loads((out / ".run.lock").read_text())["pid"] == holder.pid

    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1))
    assert status == 0, log[-3000:]
    assert f"Taking over the lock {out / '.run.lock'} of pid {holder.pid}" in log
    assert f"process {holder.pid} is no longer running" in log
    assert (out / "checkpoint-0.pth").exists() and not (out / ".run.lock").exists()  # released at exit


def test_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_dir, "STALE_S", 2)
    run = argparse.Namespace(stage="pretrain", model="mae_vit_tiny_patch16")
    lock = tmp_path / ".run.lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "stage": "finetune", "model": "vit_base_patch16"}))
    stop = threading.Event()

    def heartbeat():  # the live run on the other host
        while not stop.wait(0.3):
            os.utime(lock)
    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(run_dir.RunDirError, match="in use by another live run: a finetune run of "
                                                      "vit_base_patch16, pid 1 on host elsewhere"):
            run_dir.acquire_lock(str(tmp_path), run)
    finally:
        stop.set()
        beating.join()
    old = time.time() - 10  # its host died 10 s ago
    os.utime(lock, (old, old))
    assert run_dir.acquire_lock(str(tmp_path), run) == str(lock)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    printed = capsys.readouterr().out
    assert f"Taking over the lock {lock} of pid 1 on host elsewhere: not refreshed for " in printed
    run_dir.release_lock()
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# Changed flags, a finished run, more epochs, a mid-epoch checkpoint
# ---------------------------------------------------------------------------------------------

def test_changed_flags_stop_auto_resume_and_warn_with_an_explicit_resume(finetuned, pretrained, data, tmp_path, cli):
    out = copy_of(finetuned, tmp_path)
    before = snapshot(out)
    rerun = flags(CLASSIFIER, data, out, "--epochs", 2, "--finetune", pretrained / "checkpoint-0.pth",
                  "--blr", 2e-3, "--reprob", 0.5)
    status, log = cli("main_finetune.py", *rerun)
    assert status == 1, log[-3000:]
    assert f"--output_dir {out} holds a finetune run of vit_tiny_patch16 whose flags differ" in log
    assert "  --blr: saved 0.001, now 0.002" in log and "  --reprob: saved 0.25, now 0.5" in log
    assert "  --lr: saved 3.125e-05, now 6.25e-05" in log  # blr x 8 / 256
    assert f"--resume {out / 'checkpoint-0.pth'} to continue" in log
    assert "Start training" not in log and snapshot(out) == before

    status, log = cli("main_finetune.py", *rerun, "--resume", out / "checkpoint-0.pth")
    assert status == 0, log[-3000:]
    assert "WARNING: --resume" in log and "  --blr: saved 0.001, now 0.002" in log
    assert "continuing at epoch 1, iteration 0" in log
    assert load_checkpoint(out / "checkpoint-1.pth")["args"].blr == 2e-3


def test_finished_run_rerun_says_complete_and_writes_nothing(pretrained, data, tmp_path, cli):
    out = copy_of(pretrained, tmp_path)
    before = snapshot(out)
    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1))
    assert status == 0, log[-3000:]
    assert f"Run already complete: {out / 'checkpoint-0.pth'} holds epoch 0, and --epochs 1 ends at epoch 0" in log
    assert "Model =" not in log and "Start training" not in log
    assert snapshot(out) == before and not (out / ".run.lock").exists()


def test_raised_epochs_continue_with_the_schedule_recomputed(pretrained, data, tmp_path, cli):
    out = copy_of(pretrained, tmp_path)
    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 2))
    assert status == 0, log[-3000:]
    assert ("--epochs 2 (the run was started with --epochs 1): the lr schedule is recomputed over the new "
            "length: warmup 1 epochs, then a half-cycle cosine to --min_lr 0.0 at epoch 2") in log
    assert "continuing at epoch 1, iteration 0" in log and (out / "checkpoint-1.pth").exists()


@pytest.mark.slow
def test_mid_epoch_checkpoint_with_another_batch_size_is_refused(pretrained, data, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = load_checkpoint(pretrained / "checkpoint-0.pth")
    checkpoint["step"] = 1  # as --save_every_iters 1 leaves it after iteration 1 of epoch 0, at batch 8
    atomic_save(checkpoint, out / "checkpoint-last.pth")
    before = snapshot(out)

    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1, "--batch_size", 16))
    assert status == 1 and "  --batch_size: saved 8, now 16" in log, log[-3000:]  # auto-resume
    assert snapshot(out) == before

    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1, "--batch_size", 16,
                                                 "--resume", out / "checkpoint-last.pth"))
    assert status == 1, log[-3000:]
    assert (f"{out / 'checkpoint-last.pth'} was saved in the middle of epoch 0, after iteration 1 of a run with "
            "--batch_size 8 (now 16): resuming it with other values would replay or skip samples") in log
    assert "Start training" not in log and snapshot(out) == before

    # --overwrite: the run of batch 8 is moved aside, this one starts afresh at batch 16
    status, log = cli("main_pretrain.py", *flags(TINY, data, out, "--epochs", 1, "--batch_size", 16, "--overwrite"))
    assert status == 0 and "Auto-resume" not in log, log[-3000:]
    (aside,) = [n for n in os.listdir(out) if n.startswith("replaced-")]
    assert snapshot(out / aside) == before
    assert load_checkpoint(out / "checkpoint-0.pth")["args"].batch_size == 16
