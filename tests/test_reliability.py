"""End-to-end fault tests: every fault of the reliability issue, provoked for real through the
command lines of main_pretrain.py / main_finetune.py / main_linprobe.py.

- Processes are really killed: SIGKILL in the middle of a checkpoint save and in the middle of
  an epoch, SIGKILL of one rank of a 2-process gloo run under torchrun, SIGSTOP of one rank (a
  hung peer); the resumed runs must equal an uninterrupted run bit for bit.
- Files are really broken: a truncated JPEG, a text file named .jpg, a checkpoint holding a
  pickled object whose unpickling runs code, a checkpoint of another architecture, an output
  folder below a regular file, a learning rate that makes the loss NaN.

The runs that are killed, the reference runs, the epoch-boundary resume (with 2 loader
workers) and the distributed runs are real subprocesses. The reruns after a kill and the error
cases run the script's command line in this process (`runpy` of the script as __main__ with
sys.argv set: `python main_*.py <flags>` without the interpreter start-up, which costs more
than these runs); an uncaught exception there counts as exit status 1, as in a shell.
"""
import argparse
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SUBPROCESS_ENV, assert_same_training_state
from util.checkpoint import atomic_save, find_latest_checkpoint, load_checkpoint

PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "16", "--batch_size", "4",
            "--device", "cpu", "--num_workers", "0", "--vis_freq", "0", "--precision", "fp32", "--seed", "0",
            "--warmup_epochs", "1", "--save_freq", "1", "--log_freq", "1"]
CLASSIFY = ["--model", "vit_tiny_patch16", "--input_size", "32", "--patch_size", "16", "--nb_classes", "4",
            "--batch_size", "8", "--device", "cpu", "--num_workers", "0", "--precision", "fp32", "--seed", "0",
            "--warmup_epochs", "0", "--save_freq", "1", "--log_freq", "1"]
FINAL_NAMES = re.compile(r"checkpoint-(\d+|last|best)\.pth|log\.txt|run\.json|args\.txt|model\.txt|"
                         r"events\.out\.tfevents\..*")

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc to find the ranks")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def flags(base, data, out, *extra):
    return [*base, "--data_path", str(data), "--output_dir", str(out), "--log_dir", str(out), *map(str, extra)]


def command(script, *args):
    return [sys.executable, script, *map(str, args)]


def start(cmd, log_path, env=None):
    """Popen in its own session (so the whole group can be killed), output to log_path."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env or SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_group(proc):
    """SIGKILL the session started by start() (also a SIGSTOPped member) and reap its leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def stop_torchrun(proc):
    """SIGKILL torchrun's workers (they run in sessions of their own), then torchrun."""
    for pid in children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stop_group(proc)


def wait_for(condition, proc, what, timeout=90):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def temp_files(folder):
    """Files of a save in progress (or of an interrupted one): anything but final names."""
    return [n for n in os.listdir(folder) if not FINAL_NAMES.fullmatch(n)]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def children(parent):
    """{pid: environ} of the live processes whose parent is `parent` (torchrun's workers)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                pairs = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry)] = {k.decode(): v.decode(errors="replace") for k, v in pairs}
    return found


def worker(parent, rank, restart=0):
    """pid of torchrun's worker with RANK=rank in its restart round `restart`, or None."""
    for pid, env in children(parent).items():
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(restart):
            return pid
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Shared runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(toy_data):
    """4 classes x (4 train + 2 val) images of 32 px: 4 iterations per epoch at batch 4."""
    return toy_data(train_per_class=4, val_per_class=2, size=32)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """(uninterrupted, one_epoch): 2 epochs straight, and 1 epoch alone (run side by side)."""
    uninterrupted = tmp_path_factory.mktemp("uninterrupted")
    one_epoch = tmp_path_factory.mktemp("one_epoch")
    procs = [start(command("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", epochs)), f"{out}.log")
             for out, epochs in ((uninterrupted, 2), (one_epoch, 1))]
    for proc, out in zip(procs, (uninterrupted, one_epoch)):
        assert proc.wait(timeout=150) == 0, open(f"{out}.log").read()[-3000:]
    assert {"checkpoint-0.pth", "checkpoint-1.pth"} <= set(os.listdir(uninterrupted))
    return uninterrupted, one_epoch


# ---------------------------------------------------------------------------------------------
# Exact resume and auto-resume
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_at_epoch_boundary_is_bit_exact(reference, data, tmp_path, run_script):
    """1 epoch, stop, then `--epochs 2` in the same folder (auto-resume, 2 loader workers) equals
    2 epochs straight: model, optimizer, RNG states, and the logged loss of epoch 1."""
    uninterrupted, one_epoch = reference
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    status, log = run_script("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", 2, "--num_workers", 2),
                             timeout=150, check=False)
    assert status == 0, log[-3000:]
    assert f"Auto-resume from {out / 'checkpoint-0.pth'}" in log
    assert "continuing at epoch 1, iteration 0" in log
    assert_same_training_state(out / "checkpoint-1.pth", uninterrupted / "checkpoint-1.pth")
    resumed_log, straight_log = (read_log_lines(d / "log.txt") for d in (out, uninterrupted))
    assert resumed_log == straight_log  # epoch 0 from the first run, epoch 1 identical numbers
    assert all("knn_top1" in line for line in straight_log)  # the kNN monitor ran at both epochs


def read_log_lines(path):
    """log.txt's lines as dicts, without the timings (knn_seconds), which vary run to run."""
    lines = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in line.items() if k != "knn_seconds"} for line in lines]


def kill_during_save(cmd, out, target, log_path):
    """Start `cmd` (a run writing into `out`), SIGKILL it while a temp file of the checkpoint
    `target` is open, after checkpoint-last.pth exists. Returns True if the kill landed inside
    the save (its temp file is left over), False if it came just after the rename."""
    before = set(temp_files(out))
    proc = start(cmd, log_path)
    try:
        wait_for(lambda: (out / "checkpoint-last.pth").exists()
                 and any(target in n for n in set(temp_files(out)) - before), proc, f"a save of {target}")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        stop_group(proc)
    assert proc.returncode == -signal.SIGKILL
    return any(target in n for n in set(temp_files(out)) - before)


def kill_during_save_of(target, data, out, tmp_path):
    """A `--epochs 2 --save_every_iters 1` run SIGKILLed inside a save of `target` (up to 3
    tries, each rerun auto-resuming). Returns the command."""
    out.mkdir(exist_ok=True)
    cmd = command("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", 2, "--save_every_iters", 1))
    for attempt in range(3):
        if kill_during_save(cmd, out, target, tmp_path / f"killed-{attempt}.log"):
            return cmd
    pytest.fail(f"3 kills in a row missed the save of {target} (the temp file was already renamed)")


@pytest.mark.slow
def test_sigkill_mid_save_mid_epoch_then_resume_is_bit_exact(reference, data, tmp_path, cli):
    """`--save_every_iters 1`: SIGKILL the run while it writes checkpoint-last.pth in the middle
    of epoch 0, then rerun the same command line: the final name always holds a complete
    checkpoint, the rerun auto-resumes from it mid-epoch, and the end result equals the
    uninterrupted run's bit for bit."""
    uninterrupted, _ = reference
    out = tmp_path / "run"
    cmd = kill_during_save_of("checkpoint-last", data, out, tmp_path)
    last = out / "checkpoint-last.pth"
    assert not (out / "checkpoint-0.pth").exists()  # still inside epoch 0
    ckpt = load_checkpoint(last)  # complete: the previous save
    epoch, step = ckpt["epoch"], ckpt["step"]
    assert epoch == 0 and step in (1, 2, 3), (epoch, step)
    assert find_latest_checkpoint(str(out)) == str(last)  # the leftover temp file is no candidate

    status, log = cli("main_pretrain.py", *cmd[2:])
    assert status == 0, log[-3000:]
    assert f"Auto-resume from {last}" in log and f"continuing at epoch 0, iteration {step}" in log
    assert "the partial file of a save interrupted in process" in log  # the kill's temp file is removed
    assert not [name for name in os.listdir(out) if ".tmp-" in name]
    for name in ("checkpoint-0.pth", "checkpoint-1.pth"):
        assert_same_training_state(out / name, uninterrupted / name)


@pytest.mark.slow
def test_sigkill_mid_save_of_the_epoch_checkpoint_then_resume(reference, data, tmp_path, cli):
    """SIGKILL inside the save of checkpoint-0.pth (the end of epoch 0); the rerun must finish
    with the uninterrupted run's weights."""
    uninterrupted, _ = reference
    out = tmp_path / "run"
    cmd = kill_during_save_of("checkpoint-0", data, out, tmp_path)
    assert not (out / "checkpoint-0.pth").exists()  # never a half-written file under the final name
    last = load_checkpoint(out / "checkpoint-last.pth")
    assert (last["epoch"], last["step"]) == (0, 4)  # saved after the last iteration of epoch 0

    status, log = cli("main_pretrain.py", *cmd[2:])
    assert status == 0, log[-3000:]
    assert "continuing at epoch 0, iteration 4" in log
    assert_same_training_state(out / "checkpoint-1.pth", uninterrupted / "checkpoint-1.pth")


# ---------------------------------------------------------------------------------------------
# Non-finite loss
# ---------------------------------------------------------------------------------------------

NAN_MESSAGE = "Loss is nan at epoch 1, iteration 1"  # --lr 1e30: the step of iteration 0 blows up


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(reference, data, tmp_path, cli):
    _, one_epoch = reference
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(one_epoch / "checkpoint-0.pth", out)
    digest = sha256(out / "checkpoint-0.pth")
    # another --lr on purpose: named by --resume (auto-resume stops on a changed lr)
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", 2, "--lr", 1e30,
                                                 "--resume", out / "checkpoint-0.pth"))
    assert status == 1, log[-3000:]
    assert "continuing at epoch 1, iteration 0" in log
    assert f"ERROR: {NAN_MESSAGE}" in log and "Traceback" not in log  # one clear line
    assert sha256(out / "checkpoint-0.pth") == digest  # untouched, byte for byte
    assert not (out / "checkpoint-1.pth").exists() and not (out / "log.txt").exists()
    assert temp_files(out) == []


@pytest.mark.slow
def test_non_finite_loss_with_save_every_iters_leaves_a_resumable_checkpoint(reference, data, tmp_path, cli):
    _, one_epoch = reference
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(one_epoch / "checkpoint-0.pth", out)
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", 2, "--lr", 1e30,
                                                 "--save_every_iters", 1, "--resume", out / "checkpoint-0.pth"))
    assert status == 1 and NAN_MESSAGE in log, log[-3000:]
    # the user follows the advice: rerun with a sane lr, auto-resuming from the last good checkpoint
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", 2, "--save_every_iters", 1))
    assert status == 0, log[-2000:]


# ---------------------------------------------------------------------------------------------
# Clear errors before anything is lost
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, base", [("main_pretrain.py", PRETRAIN), ("main_finetune.py", CLASSIFY),
                                          ("main_linprobe.py", CLASSIFY)])
def test_unwritable_output_dir_fails_before_training(data, tmp_path, cli, script, base):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    out = blocker / "sub"
    status, log = cli(script, *flags(base, data, out, "--epochs", 1))
    assert status == 1
    assert f"output folder '{out}' is not writable" in log
    assert "Model =" not in log and "Start training" not in log  # nothing was built or trained
    assert blocker.read_text() == "a regular file"


@pytest.mark.parametrize("layout, script, message", [
    ("missing", "main_pretrain.py", "does not exist"),
    ("no_val", "main_finetune.py", "no 'val' folder in"),
    ("empty_class", "main_pretrain.py", "class folder(s) with no images in"),
], ids=["missing_data_path", "missing_val_folder", "empty_class_folder"])
def test_bad_dataset_layout_fails_with_a_clear_message(data, tmp_path, cli, layout, script, message):
    root = tmp_path / "data"
    if layout == "no_val":
        shutil.copytree(os.path.join(data, "train"), root / "train")
    elif layout == "empty_class":
        shutil.copytree(data, root)
        (root / "train" / "zebra").mkdir()
    base = PRETRAIN if script == "main_pretrain.py" else CLASSIFY
    status, log = cli(script, *flags(base, root, tmp_path / "out", "--epochs", 1))
    assert status == 1 and message in log, log[-2000:]
    assert str(root) in log and "Start training" not in log
    if layout == "empty_class":
        assert "zebra" in log


@pytest.fixture
def data_with_bad_images(data, tmp_path):
    """The toy data plus a truncated JPEG and a text file named .jpg in train/disc/ (18 images)."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    truncated = root / "train" / "disc" / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    text = root / "train" / "disc" / "notes.jpg"
    text.write_text("not an image\n")
    return root, truncated, text


def test_bad_images_fail_naming_the_file_or_are_skipped(data_with_bad_images, tmp_path, cli):
    root, truncated, text = data_with_bad_images
    epoch = ["--epochs", 1, "--batch_size", 6]  # 3 iterations: every one of the 18 images is read
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, root, tmp_path / "strict", *epoch))
    assert status == 1
    assert f"cannot read image {truncated}: " in log or f"cannot read image {text}: " in log, log[-2000:]
    assert "--skip_bad_images" in log
    assert not (tmp_path / "strict" / "checkpoint-0.pth").exists()

    out = tmp_path / "skip"
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, root, out, *epoch, "--skip_bad_images"))
    assert status == 0, log[-3000:]
    assert re.search(f"skipping unreadable image {re.escape(str(truncated))}: image file is truncated", log)
    assert f"skipping unreadable image {text}: " in log
    assert (out / "checkpoint-0.pth").exists() and "train_loss" in (out / "log.txt").read_text()


def test_resume_missing_file_names_it(data, tmp_path, cli):
    missing = tmp_path / "nowhere" / "checkpoint-7.pth"
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, data, tmp_path / "out", "--epochs", 1,
                                                 "--resume", missing))
    assert status == 1 and "FileNotFoundError" in log and str(missing) in log, log[-2000:]
    assert "Start training" not in log


def test_checkpoint_of_another_architecture_names_the_differences(reference, data, tmp_path, cli):
    _, one_epoch = reference
    pretrained = one_epoch / "checkpoint-0.pth"  # mae_vit_tiny_patch16: width 192, patch 16
    status, log = cli("main_finetune.py", *flags(CLASSIFY, data, tmp_path / "ft", "--epochs", 1,
                                                 "--finetune", pretrained, "--model", "vit_small_patch16"))
    assert status == 1 and "shape mismatches" in log, log[-2000:]
    assert "patch_embed.proj.weight: checkpoint (192, 3, 16, 16) vs model (384, 3, 16, 16)" in log
    assert "cls_token: checkpoint (1, 1, 192) vs model (1, 1, 384)" in log
    assert "Start training" not in log

    digest = sha256(pretrained)
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, data, tmp_path / "pt", "--epochs", 2,
                                                 "--resume", pretrained, "--patch_size", 8))
    assert status == 1 and "shape mismatches" in log, log[-2000:]
    assert "patch_embed.proj.weight: checkpoint (192, 3, 16, 16) vs model (192, 3, 8, 8)" in log
    assert "pos_embed: checkpoint (1, 5, 192) vs model (1, 17, 192)" in log
    assert "Start training" not in log and sha256(pretrained) == digest


# ---------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------

EVIL_MODULE = '''
def touch(path):
    """Runs when the checkpoint is unpickled: any code could stand here."""
    with open(path, "w") as f:
        f.write("code ran")
    return "payload"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return touch, (self.marker,)
'''


def test_checkpoint_with_arbitrary_code_is_refused(reference, data, tmp_path, cli, monkeypatch):
    _, one_epoch = reference
    (tmp_path / "mae_evil_payload.py").write_text(EVIL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here, as for a user who has the module
    payload = __import__("mae_evil_payload")
    marker = tmp_path / "code-ran.txt"
    model = load_checkpoint(one_epoch / "checkpoint-0.pth")["model"]
    evil = tmp_path / "evil.pth"
    torch.save({"model": model, "evil": payload.Payload(str(marker))}, evil)

    status, log = cli("main_finetune.py", *flags(CLASSIFY, data, tmp_path / "ft", "--epochs", 1,
                                                 "--finetune", evil))
    assert status == 1, log[-2000:]
    assert f"Refused to load checkpoint '{evil}'" in log and "mae_evil_payload.touch" in log
    assert "--unsafe_load" in log and "arbitrary code" in log
    assert not marker.exists()

    # a foreign checkpoint dropped into the output folder is not run by auto-resume; being the only
    # checkpoint there, the run stops rather than start from scratch over it
    out = tmp_path / "pt"
    out.mkdir()
    shutil.copy(evil, out / "checkpoint-3.pth")
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", 1))
    assert status == 1, log[-2000:]
    assert f"skipping unreadable checkpoint '{out / 'checkpoint-3.pth'}'" in log and "Auto-resume" not in log
    assert "only unreadable ones" in log and "mae_evil_payload.touch" in log
    assert not marker.exists()

    # knowingly overridden: it loads (and the payload does run)
    status, log = cli("main_finetune.py", *flags(CLASSIFY, data, tmp_path / "ft2", "--epochs", 1,
                                                 "--finetune", evil, "--unsafe_load"))
    assert status == 0, log[-2000:]
    assert f"Load pre-trained checkpoint from: {evil}" in log
    assert marker.read_text() == "code ran"


def original_release_checkpoint(ours, path):
    """What the original main_pretrain.py (torch 1.8, fp16 on GPUs) saved: model, optimizer
    (int steps, torch 1.8 param group keys), epoch, an enabled GradScaler's state, argparse args;
    no 'rng' and no 'step'."""
    optimizer = ours["optimizer"]
    groups = [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")}
              for g in optimizer["param_groups"]]
    state = {i: {"step": int(s["step"]), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
             for i, s in optimizer["state"].items()}
    args = argparse.Namespace(
        batch_size=64, epochs=800, accum_iter=1, model="mae_vit_tiny_patch16", input_size=32, mask_ratio=0.75,
        norm_pix_loss=True, weight_decay=0.05, lr=None, blr=1.5e-4, min_lr=0.0, warmup_epochs=40,
        data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir", log_dir="./output_dir",
        device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=64,
        local_rank=-1, dist_on_itp=False, dist_url="env://", distributed=True, rank=0, gpu=0,
        dist_backend="nccl")
    torch.save({"model": ours["model"], "optimizer": {"state": state, "param_groups": groups}, "epoch": 3,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 0},
                "args": args}, path)
    return path


def test_original_release_checkpoint_loads_safely(reference, data, tmp_path, cli):
    _, one_epoch = reference
    ours = load_checkpoint(one_epoch / "checkpoint-0.pth")
    original = original_release_checkpoint(ours, tmp_path / "checkpoint-3.pth")

    out = tmp_path / "pt"
    status, log = cli("main_pretrain.py", *flags(PRETRAIN, data, out, "--epochs", 5, "--resume", original))
    assert status == 0, log[-3000:]
    assert "continuing at epoch 4, iteration 0" in log and "holds no RNG state" in log
    resumed = load_checkpoint(out / "checkpoint-4.pth")
    assert resumed["epoch"] == 4 and resumed["args"].epochs == 5
    # the optimizer state came back: 4 steps of the original + the 4 of epoch 4
    assert {int(s["step"]) for s in resumed["optimizer"]["state"].values()} == {8}
    assert not torch.equal(resumed["model"]["blocks.0.attn.qkv.weight"], ours["model"]["blocks.0.attn.qkv.weight"])

    status, log = cli("main_finetune.py", *flags(CLASSIFY, data, tmp_path / "ft", "--epochs", 1,
                                                 "--finetune", original))
    assert status == 0, log[-3000:]
    assert f"Load pre-trained checkpoint from: {original}" in log and "Refused" not in log


# ---------------------------------------------------------------------------------------------
# Best-accuracy tracking across --resume (finetune: tests/test_finetune.py; linear probe here)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,extra", [
    ("main_finetune.py", ["--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--drop_path", "0.1"]),
    ("main_linprobe.py", ["--cls_token"])])
@pytest.mark.slow
def test_finetune_and_linprobe_resume_is_bit_exact(reference, data, tmp_path, run_script, script, extra):
    """Finetuning draws from every RNG (mixup/cutmix on numpy, RandAugment and random erasing on
    python/torch, drop path on torch), the probe from its weak augmentation: 2 epochs straight
    equal 1 epoch, then a restart that auto-resumes for the second, bit for bit. (Epoch 0 is the
    warmup, whose lr does not depend on --epochs, so the 1-epoch run stands for a run of 2 killed
    after its first epoch.)"""
    _, one_epoch = reference
    common = [*CLASSIFY, "--finetune", one_epoch / "checkpoint-0.pth", "--data_path", data, *extra,
              "--warmup_epochs", 1]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    procs = [start(command(script, *common, "--output_dir", out, "--log_dir", out, "--epochs", epochs),
                   f"{out}.log") for out, epochs in ((straight, 2), (resumed, 1))]
    for proc, out in zip(procs, (straight, resumed)):
        assert proc.wait(timeout=150) == 0, open(f"{out}.log").read()[-3000:]
    status, log = run_script(script, *common, "--output_dir", resumed, "--log_dir", resumed, "--epochs", 2,
                             timeout=150, check=False)
    assert status == 0, log[-3000:]
    assert "continuing at epoch 1, iteration 0" in log
    assert_same_training_state(resumed / "checkpoint-1.pth", straight / "checkpoint-1.pth")
    assert open(resumed / "log.txt").read() == open(straight / "log.txt").read()


def test_linprobe_resume_continues_best_accuracy(reference, data, tmp_path, cli):
    _, one_epoch = reference
    out = tmp_path / "lin"
    common = flags(CLASSIFY, data, out, "--finetune", one_epoch / "checkpoint-0.pth")
    status, log = cli("main_linprobe.py", *common, "--epochs", 1)
    assert status == 0, log[-3000:]
    ckpt = load_checkpoint(out / "checkpoint-0.pth")
    assert 0.0 <= ckpt["max_accuracy"] <= 100.0
    ckpt["max_accuracy"] = 101.0  # impossible: only a restored value can be printed
    atomic_save(ckpt, out / "checkpoint-0.pth")

    status, log = cli("main_linprobe.py", *common, "--epochs", 2)  # auto-resume
    assert status == 0, log[-3000:]
    assert "continuing at epoch 1, iteration 0" in log and "Max accuracy: 101.00%" in log
    assert load_checkpoint(out / "checkpoint-1.pth")["max_accuracy"] == 101.0
    best = out / "checkpoint-best.pth"  # written only when the top-1 improved: never in epoch 1
    assert not best.exists() or load_checkpoint(best)["epoch"] == 0


# ---------------------------------------------------------------------------------------------
# Distributed faults (2 processes, gloo on the CPU)
# ---------------------------------------------------------------------------------------------

# batch 2 per rank (the last --batch_size given wins): 4 iterations per epoch on each of 2 ranks
DIST = [*PRETRAIN, "--batch_size", "2", "--save_every_iters", "1"]


def torchrun(max_restarts, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={max_restarts}", "main_pretrain.py", *map(str, args)]


@pytest.mark.slow
@needs_proc
def test_torchrun_sigkilled_rank_ends_the_group_and_keeps_checkpoints_whole(data, tmp_path):
    out = tmp_path / "run"
    proc = start(torchrun(0, *flags(DIST, data, out, "--epochs", 50, "--dist_timeout", 0.5)), tmp_path / "log")
    try:
        wait_for(lambda: (out / "checkpoint-last.pth").exists() and worker(proc.pid, 1) is not None,
                 proc, "training to start")
        os.kill(worker(proc.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        try:
            status = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun still running 90 s after a rank was killed")
        assert time.monotonic() - killed < 90
    finally:
        stop_torchrun(proc)
    log = (tmp_path / "log").read_text()
    assert status != 0 and re.search(r"exitcode\s*:\s*-9", log), log[-3000:]  # torchrun names the killed rank
    assert "Training time" not in log
    latest = find_latest_checkpoint(str(out))  # every checkpoint there loads
    assert latest == str(out / "checkpoint-last.pth") and load_checkpoint(latest)["epoch"] < 50


@pytest.mark.slow
@needs_proc
def test_hung_rank_makes_the_other_fail_on_the_collective_timeout(data, tmp_path):
    """SIGSTOP rank 1 (alive, sockets open, never answering): rank 0 must give up after
    --dist_timeout (0.15 min = 9 s) instead of waiting forever. Launched as torchrun would (env
    vars), without torchrun's agent, which would kill the survivor itself."""
    out = tmp_path / "run"
    env = dict(SUBPROCESS_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    cmd = command("main_pretrain.py", *flags(DIST, data, out, "--epochs", 50, "--dist_timeout", 0.15))
    procs = [start(cmd, tmp_path / f"rank{r}.log", env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in (0, 1)]
    try:
        wait_for(lambda: (out / "checkpoint-last.pth").exists(), procs[0], "training to start")
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            status = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still waiting 60 s after rank 1 hung (--dist_timeout 0.15 min)")
        waited = time.monotonic() - stopped
    finally:
        for proc in procs:
            stop_group(proc)
    log = (tmp_path / "rank0.log").read_text()
    assert status != 0 and re.search(r"[Tt]imed out", log), log[-3000:]
    assert 5 < waited < 60  # the timeout (9 s), not a connection error, ended it
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] < 50


@pytest.mark.slow
@needs_proc
def test_torchrun_restart_resumes_from_the_latest_checkpoint(data, tmp_path):
    """`--max-restarts=1`: SIGKILL rank 1 mid-epoch; the restarted group auto-resumes from the
    latest checkpoint and finishes. torchrun's agent keeps one store for all restart rounds; the
    workers prefix their keys with the round (util.dist._elastic_agent_store), else the restarted
    group can read the dead round's gloo addresses and fail or hang."""
    out = tmp_path / "run"
    proc = start(torchrun(1, *flags(DIST, data, out, "--epochs", 2, "--dist_timeout", 0.5)), tmp_path / "log",
                 env=SUBPROCESS_ENV)
    try:
        wait_for(lambda: (out / "checkpoint-last.pth").exists() and worker(proc.pid, 1) is not None,
                 proc, "training to start")
        os.kill(worker(proc.pid, 1), signal.SIGKILL)
        try:
            status = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            status = None
    finally:
        stop_torchrun(proc)
    log = (tmp_path / "log").read_text()
    assert status == 0, log[-3000:]
    resumed = re.search(r"Auto-resume from (\S+)\n.*?continuing at epoch (\d+), iteration (\d+)", log, re.S)
    assert resumed and resumed.group(1).startswith(str(out / "checkpoint-")), log[-3000:]
    assert (int(resumed.group(2)), int(resumed.group(3))) != (0, 0)  # not from scratch
    assert log.count("Start training") == 2 and "Training time" in log  # one restart, then to the end
    final = load_checkpoint(out / "checkpoint-1.pth")
    assert final["epoch"] == 1 and len(final["rng"]) == 2
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {8}  # 2 epochs x 4, none twice
