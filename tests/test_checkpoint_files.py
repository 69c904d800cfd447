"""Checkpoint files (issue 10, section 3): the save policy (every epoch for the classifiers,
--keep_last), the temp files of killed saves, a weights-only checkpoint-best.pth, log.txt across
interruptions, the messages of unreadable files on every loading path, auto-resume over
unreadable checkpoints, pathlib paths in args, and a full disk."""
import argparse
import builtins
import errno
import io
import json
import os
import pathlib
import pickle
import re
import socket
import subprocess
import sys
import zipfile

import pytest
import torch
from PIL import Image
from torch import nn

import main_finetune
import main_pretrain
import main_visualize
from util import checkpoint, misc
from util.checkpoint import ResumePoint
from util.precision import NativeScalerWithGradNormCount

NUMBERED = re.compile(r"checkpoint-\d+\.pth")


def numbered(folder):
    return sorted((n for n in os.listdir(folder) if NUMBERED.fullmatch(n)), key=lambda n: int(n[11:-4]))


def read_log(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


def dead_pid():
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------
# Save policy: every epoch for the classifiers, --keep_last
# ---------------------------------------------------------------------------------------------

def test_classifiers_save_every_epoch_pretraining_every_20(tmp_path, make_args):
    assert make_args("finetune").save_freq == 1 and make_args("linprobe").save_freq == 1  # as the original
    assert make_args("pretrain").save_freq == 20
    assert make_args("finetune").keep_last == 0  # keep all, as the original
    args = make_args("finetune", "--output_dir", tmp_path, "--epochs", 4)
    for epoch in range(3):
        checkpoint.save_checkpoints(args, epoch, nn.Linear(2, 2), None, None, test_acc1=1.0, max_accuracy=2.0)
    assert numbered(tmp_path) == ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth"]


def test_keep_last_deletes_older_numbered_checkpoints_only(tmp_path, make_args, capsys):
    args = make_args("finetune", "--output_dir", tmp_path, "--epochs", 6, "--keep_last", 2, "--save_every_iters", 10)
    (tmp_path / "checkpoint-1.pth.corrupt").write_bytes(b"set aside")
    max_accuracy = 0.0
    for epoch, acc in enumerate([5.0, 1.0, 2.0, 3.0, 4.0, 0.5]):  # the best stays epoch 0's
        max_accuracy = checkpoint.save_checkpoints(args, epoch, nn.Linear(2, 2), None, None, test_acc1=acc,
                                                   max_accuracy=max_accuracy)
        assert numbered(tmp_path) == [f"checkpoint-{e}.pth" for e in range(max(0, epoch - 1), epoch + 1)]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1.pth.corrupt", "checkpoint-4.pth", "checkpoint-5.pth",
                                            "checkpoint-best.pth", "checkpoint-last.pth"]
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint-best.pth")["epoch"] == 0
    assert "--keep_last 2: deleted checkpoint-0.pth" in capsys.readouterr().out
    # the checkpoint just written is never deleted, even below a higher epoch's
    (tmp_path / "checkpoint-9.pth").write_bytes(b"a longer run's")
    checkpoint.save_model(args, 2, nn.Linear(2, 2), None, None)
    checkpoint.remove_old_checkpoints(str(tmp_path), 1, str(tmp_path / "checkpoint-2.pth"))
    assert numbered(tmp_path) == ["checkpoint-2.pth", "checkpoint-9.pth"]


# ---------------------------------------------------------------------------------------------
# Temp files of saves killed midway
# ---------------------------------------------------------------------------------------------

def test_temp_files_of_dead_processes_are_removed(tmp_path, monkeypatch, capsys):
    host, dead = socket.gethostname(), dead_pid()
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.path.basename(src)), real_replace(src, dst)))
    checkpoint.atomic_save({"v": 1}, tmp_path / "checkpoint-1.pth")
    assert renamed == [f".checkpoint-1.pth.tmp-{host}-{os.getpid()}"]  # the host is in the name

    names = {"ours_dead": f".checkpoint-3.pth.tmp-{host}-{dead}",
             "old_name_dead": f".checkpoint-4.pth.tmp-{dead}",  # the name of earlier versions
             "ours_alive": f".checkpoint-5.pth.tmp-{host}-{os.getpid()}",
             "other_host": f".checkpoint-6.pth.tmp-another-{host}-{dead}",  # a shared filesystem
             "unrelated": ".checkpoint-7.pth.tmp-notes"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    removed = checkpoint.remove_stale_temp_files(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in ("ours_dead", "old_name_dead"))
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint-1.pth", names["ours_alive"], names["other_host"],
                                                   names["unrelated"]])
    out = capsys.readouterr().out
    assert f"Removed '{tmp_path / names['ours_dead']}'" in out and f"process {dead}" in out


# ---------------------------------------------------------------------------------------------
# checkpoint-best.pth: what evaluation needs
# ---------------------------------------------------------------------------------------------

def test_best_checkpoint_holds_what_evaluation_needs(tmp_path, make_args, tiny_vit, capsys):
    torch.manual_seed(0)
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    args = make_args("finetune", "--output_dir", tmp_path, "--epochs", 2)
    checkpoint.save_checkpoints(args, 0, model, opt, NativeScalerWithGradNormCount(False, "cpu"),
                                test_acc1=40.0)
    best_path = tmp_path / "checkpoint-best.pth"
    best = checkpoint.load_checkpoint(best_path)
    assert set(best) == {"model", "args", "epoch", "step", "max_accuracy"}  # no optimizer / scaler / rng
    assert (best["epoch"], best["step"], best["max_accuracy"]) == (0, None, 40.0)
    assert {"optimizer", "scaler", "rng"} <= set(checkpoint.load_checkpoint(tmp_path / "checkpoint-0.pth"))
    assert best_path.stat().st_size < 0.6 * (tmp_path / "checkpoint-0.pth").stat().st_size

    # --eval --resume checkpoint-best.pth
    evaluated = tiny_vit()
    eval_args = make_args("finetune", "--eval", "--resume", best_path, "--output_dir", tmp_path / "eval")
    start = checkpoint.resume(eval_args, evaluated, torch.optim.AdamW(evaluated.parameters()), None, eval_only=True)
    assert start.max_accuracy == 40.0
    # --finetune checkpoint-best.pth
    finetuned = tiny_vit()
    checkpoint.load_pretrained_encoder(finetuned, best_path)
    for loaded in (evaluated, finetuned):
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    # auto-resume never picks it
    os.remove(tmp_path / "checkpoint-0.pth")
    assert checkpoint.find_latest_checkpoint(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------
# log.txt across interruptions
# ---------------------------------------------------------------------------------------------

def test_a_resumed_epoch_line_says_it_is_partial(tmp_path, make_args):
    args = make_args("finetune", "--output_dir", tmp_path)
    misc.log_epoch(args, None, 0, {"loss": 1.0}, {"acc1": 50.0, "acc5": 90.0, "loss": 1.5}, 0, n_parameters=7)
    misc.log_epoch(args, None, 1, {"loss": 0.5}, {"acc1": 60.0, "acc5": 95.0, "loss": 1.2}, 3, n_parameters=7)
    whole, partial = read_log(tmp_path)
    assert "partial_epoch_from_iter" not in whole and "start_iter" not in whole
    assert partial["partial_epoch_from_iter"] == 3 and partial["epoch"] == 1 and partial["n_parameters"] == 7


def test_a_resume_drops_the_lines_of_the_epochs_trained_again(tmp_path, make_args, capsys):
    lines = [json.dumps({"train_loss": 1.0 / (e + 1), "epoch": e}) for e in range(5)]
    (tmp_path / "log.txt").write_text("\n".join(lines[:2] + ["not json"] + lines[2:]) + "\n")
    args = make_args("pretrain", "--output_dir", tmp_path)
    misc.trim_log(args, ResumePoint(0))  # from scratch: nothing touched
    assert (tmp_path / "log.txt").read_text().count("\n") == 6
    misc.trim_log(args, ResumePoint(3))  # checkpoint of epoch 2: epochs 3 and 4 are trained again
    assert (tmp_path / "log.txt").read_text().splitlines() == lines[:2] + ["not json"] + lines[2:3]
    assert "dropped the lines of epochs [3, 4]" in capsys.readouterr().out
    misc.trim_log(args, ResumePoint(2, 5))  # mid-epoch 2: its line will be written again
    assert (tmp_path / "log.txt").read_text().splitlines() == lines[:2] + ["not json"]
    assert os.listdir(tmp_path) == ["log.txt"]  # no temp file left


class Killed(BaseException):
    """A kill right after the epoch's log line, before its checkpoint."""


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_the_epoch_line_is_written_before_the_checkpoint(script, tmp_path, toy_data, monkeypatch, capsys):
    """A kill between the log line and the checkpoint loses no line (the rerun drops and rewrites
    it, above); the start removes the partial files of dead saves."""
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".checkpoint-0.pth.tmp-{socket.gethostname()}-{dead_pid()}"
    stale.write_bytes(b"partial")
    data = toy_data(train_per_class=2, val_per_class=1, size=32, classes=("horizontal_stripes", "disc"))
    flags = ["--device", "cpu", "--num_workers", "0", "--input_size", "32", "--patch_size", "16", "--batch_size", "2",
             "--epochs", "1", "--warmup_epochs", "0", "--data_path", data, "--output_dir", out, "--log_dir", ""]
    module = {"pretrain": main_pretrain, "finetune": main_finetune}[script]
    flags += (["--model", "mae_vit_tiny_patch16", "--vis_freq", "0"] if script == "pretrain"
              else ["--model", "vit_tiny_patch16", "--nb_classes", "2"])

    def killed(*args, **kwargs):
        raise Killed()
    monkeypatch.setattr(checkpoint, "save_checkpoints", killed)
    monkeypatch.setattr(builtins, "print", builtins.print)  # init_distributed_mode replaces it
    with pytest.raises(Killed):
        misc.run(module.main, module.get_args_parser().parse_args([str(f) for f in flags]))
    (line,) = read_log(out)
    assert line["epoch"] == 0 and "train_loss" in line
    assert not stale.exists() and not numbered(out)
    assert f"Removed '{stale}'" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Unreadable files: the same message on every loading path
# ---------------------------------------------------------------------------------------------

def write_bad_file(path, kind):
    """A file that is not a readable checkpoint; returns the phrase its message must hold."""
    if kind == "empty":
        path.write_bytes(b"")
        return "is empty"
    if kind == "jpeg":
        Image.new("RGB", (8, 8), "red").save(path, format="JPEG")
        return "is not a PyTorch checkpoint"
    if kind == "text":
        path.write_text("model: vit_base_patch16\nepoch: 3\n")
        return "is not a PyTorch checkpoint"
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 1}, buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return "is truncated or corrupt"


@pytest.mark.parametrize("kind", ["empty", "jpeg", "text", "truncated"])
def test_unreadable_file_says_why_with_the_path_on_every_loading_path(kind, tmp_path, make_args, tiny_vit,
                                                                      capsys):
    path = tmp_path / "checkpoint-1.pth"
    phrase = write_bad_file(path, kind)
    model = tiny_vit()
    loaders = {
        "load_checkpoint": lambda: checkpoint.load_checkpoint(path),
        "--resume": lambda: checkpoint.resume(make_args("finetune", "--resume", path, "--output_dir", tmp_path),
                                              model, torch.optim.AdamW(model.parameters()), None),
        "--finetune": lambda: checkpoint.load_pretrained_encoder(model, path),
        "visualize": lambda: main_visualize.main(["--checkpoint", str(path), "--data_path", str(tmp_path)]),
    }
    for name, load in loaders.items():
        with pytest.raises(RuntimeError) as info:
            load()
        message = str(info.value)
        assert phrase in message and str(path) in message and "--unsafe_load" not in message, (name, message)
        assert isinstance(info.value, checkpoint.CorruptCheckpointError)
    with pytest.raises(RuntimeError, match="only unreadable"):  # auto-resume: see below
        checkpoint.find_latest_checkpoint(str(tmp_path))
    assert f"{path}' {phrase}" in capsys.readouterr().out


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


class Odd:
    """An arbitrary class."""


def test_unsafe_refusal_names_the_refused_type(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked.pth"
    torch.save({"model": {}, "x": Evil()}, blocked)  # torch: "unsupported GLOBAL posix.system whose module ..."
    with pytest.raises(RuntimeError) as info:
        checkpoint.load_checkpoint(blocked)
    assert f"{os.system.__module__}.system" in str(info.value) and "--unsafe_load" in str(info.value)
    assert str(blocked) in str(info.value) and isinstance(info.value, checkpoint.UnsafeCheckpointError)

    odd = tmp_path / "odd.pth"
    torch.save({"model": {}, "args": argparse.Namespace(x=Odd())}, odd)
    real_load = torch.load

    def reworded(*args, **kwargs):  # a torch whose messages no longer name the type
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError:
            pass
        raise pickle.UnpicklingError("Weights only load failed: this file holds an unsupported object.")
    monkeypatch.setattr(torch, "load", reworded)
    with pytest.raises(RuntimeError) as info:
        checkpoint.load_checkpoint(odd)
    assert f"{__name__}.Odd" in str(info.value) and "--unsafe_load" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Auto-resume over unreadable checkpoints
# ---------------------------------------------------------------------------------------------

def test_auto_resume_stops_when_it_finds_only_unreadable_checkpoints(tmp_path, make_args, capsys):
    write_bad_file(tmp_path / "checkpoint-3.pth", "truncated")
    write_bad_file(tmp_path / "checkpoint-last.pth", "empty")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError) as info:  # UnreadableCheckpointsError
        checkpoint.auto_resume(make_args("pretrain", "--output_dir", tmp_path))
    message = str(info.value)
    assert "only unreadable" in message and "Not starting from scratch" in message
    assert f"{tmp_path / 'checkpoint-3.pth'}' is truncated or corrupt" in message
    assert f"{tmp_path / 'checkpoint-last.pth'}' is empty" in message
    assert sorted(os.listdir(tmp_path)) == before  # nothing is saved: nothing is moved
    with pytest.raises(SystemExit) as exit_info:  # a script ends with the message, exit status 1
        misc.run(checkpoint.auto_resume, make_args("pretrain", "--output_dir", tmp_path))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("ERROR: auto-resume found no readable checkpoint")


def test_a_corrupt_checkpoint_is_renamed_aside_before_the_run_saves(tmp_path, make_args, capsys):
    args = make_args("pretrain", "--output_dir", tmp_path)
    good = checkpoint.save_model(args, 2, nn.Linear(2, 2), None, None)
    write_bad_file(tmp_path / "checkpoint-last.pth", "truncated")
    corrupt = (tmp_path / "checkpoint-last.pth").read_bytes()
    (tmp_path / "checkpoint-last.pth.corrupt").write_bytes(b"an earlier one")
    assert checkpoint.auto_resume(args) == good
    assert not (tmp_path / "checkpoint-last.pth").exists()  # the next save cannot overwrite it
    assert (tmp_path / "checkpoint-last.pth.corrupt").read_bytes() == b"an earlier one"  # never overwritten
    assert (tmp_path / "checkpoint-last.pth.corrupt-1").read_bytes() == corrupt
    assert "checkpoint-last.pth.corrupt-1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# pathlib paths in args (the original's submitit launcher)
# ---------------------------------------------------------------------------------------------

def rewrite_pickle(path, old, new):
    """Replace bytes in the pickle of a zip checkpoint (to write names another Python or OS uses)."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)


def test_pathlib_paths_in_args_load_without_unsafe_load(tmp_path):
    saved = argparse.Namespace(job_dir=pathlib.PosixPath("/checkpoint/me/experiments/1234"),
                               output_dir=pathlib.Path("/checkpoint/me/experiments/1234"),
                               shared=pathlib.PurePosixPath("/checkpoint/me"), win=pathlib.PureWindowsPath("C:/runs"))
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 399, "args": saved}, path)
    assert checkpoint.load_checkpoint(path)["args"] == saved
    assert checkpoint.find_latest_checkpoint(str(tmp_path)) == str(path)
    # Python 3.13 pickles 'pathlib._local.PosixPath'; a checkpoint saved on Windows holds WindowsPath
    rewrite_pickle(path, b"cpathlib\nPosixPath\n", b"cpathlib._local\nPosixPath\n")
    rewrite_pickle(path, b"cpathlib\nPureWindowsPath\n", b"cpathlib\nWindowsPath\n")
    loaded = checkpoint.load_checkpoint(path)["args"]
    assert loaded.job_dir == saved.job_dir and loaded.win == pathlib.PureWindowsPath("C:/runs")


# ---------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "torch_runtimeerror"])
def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(wrapped, tmp_path, make_args, monkeypatch):
    args = make_args("pretrain", "--output_dir", tmp_path, "--epochs", 3, "--save_every_iters", 5)
    checkpoint.save_checkpoints(args, 0, nn.Linear(2, 2), None, None)
    previous = (tmp_path / "checkpoint-last.pth").read_bytes()

    def full(obj, f):
        f.write(b"PK\x03\x04 the first bytes")
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if not wrapped:
            raise error
        try:  # how torch.save reports a failed write of the file object
            raise error
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as info:
        checkpoint.save_model(args, 1, nn.Linear(2, 2), None, None, tag="last", step=3)
    assert info.value.errno == errno.ENOSPC
    assert "no space left" in str(info.value) and str(tmp_path / "checkpoint-last.pth") in str(info.value)
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0.pth", "checkpoint-last.pth"]  # no temp file
