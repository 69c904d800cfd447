"""A first run without surprises (issue 11, items 2 and 6): the whole run's ETA and images/s in
the progress lines, --log_dir defaulting to --output_dir, a short start-up with the flags and the
model printout in files, --help with defaults, --eval without a train/ folder, the CPU thread
default and the CPU bf16 detection."""
import argparse
import builtins
import importlib
import os
import re
import shutil

import pytest
import torch

import main_linprobe
from conftest import LAUNCHER_VARS, SCRIPTS
from util import misc, precision
from util.args import HelpFormatter, add_common_args, check_args
from util.checkpoint import atomic_save, get_rng_state, set_rng_state
from util.models import build_classifier
from util.run_dir import move_run_aside


@pytest.fixture(autouse=True)
def restore_print_and_rng(monkeypatch):
    """The scripts time-stamp print() (init_distributed_mode) and reseed the global RNGs: undo both."""
    monkeypatch.setattr(builtins, "print", builtins.print)
    state = get_rng_state()
    yield
    set_rng_state(state)


# ---------------------------------------------------------------------------------------------
# Progress: the run's ETA and images/s
# ---------------------------------------------------------------------------------------------

class FakeClock:
    """time.time() that moves only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """A FakeClock standing in for the time.time() that util.misc's progress lines read."""
    fake = FakeClock()
    monkeypatch.setattr(misc.time, "time", fake.time)
    return fake


def test_progress_lines_show_epoch_and_run_eta_and_the_epoch_images_per_s(clock, capsys, make_args):
    # epoch 1 of 5: 3 epochs after this one; 4 iterations of 8 images, 2 s each
    log = misc.TrainingLog(1, 0, 4, make_args("pretrain", "--epochs", 5, "--batch_size", 8, "--log_freq", 2), None)
    for i, _ in log.iterate([None] * 4):
        clock.now += 2.0
        log.record(i, 1e-3, torch.tensor(0.5))
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if "eta:" in line]
    # after iteration 0: 3 iterations left in the epoch (6 s), then 3 epochs of 4 (24 s more)
    assert progress[0].startswith("Epoch: [1]  [0/4]  eta: 0:00:06  run eta: 0:00:30  lr: 0.001000")
    assert progress[1].startswith("Epoch: [1]  [2/4]  eta: 0:00:02  run eta: 0:00:26")
    assert progress[2].startswith("Epoch: [1]  [3/4]  eta: 0:00:00  run eta: 0:00:24")
    assert "Epoch: [1] Total time: 0:00:08 (2.0000 s / it, 4.0 images/s)" in lines  # 32 images in 8 s


def test_last_epoch_run_eta_is_the_epoch_eta_and_evaluation_shows_none(clock, capsys, make_args):
    log = misc.TrainingLog(4, 0, 3, make_args("finetune", "--epochs", 5, "--batch_size", 2, "--log_freq", 10), None)
    for i, _ in log.iterate([None] * 3):
        clock.now += 1.0
    assert "eta: 0:00:02  run eta: 0:00:02" in capsys.readouterr().out
    for _ in misc.MetricLogger().log_every([None] * 2, 1, "Test:"):  # evaluation: no epochs, no batch size
        clock.now += 1.0
    out = capsys.readouterr().out
    assert "run eta" not in out and "images/s" not in out and "Test: Total time: 0:00:02 (1.0000 s / it)" in out


# ---------------------------------------------------------------------------------------------
# --log_dir defaults to --output_dir
# ---------------------------------------------------------------------------------------------

def resolved(script, *flags):
    parser = SCRIPTS[script].get_args_parser(add_help=True)
    args = parser.parse_args([str(f) for f in flags])
    check_args(parser, args)
    return args


@pytest.mark.parametrize("script", ["pretrain", "finetune", "linprobe"])
def test_log_dir_defaults_to_output_dir_and_an_explicit_one_wins(script, tmp_path):
    assert resolved(script, "--output_dir", tmp_path / "run").log_dir == str(tmp_path / "run")
    explicit = resolved(script, "--output_dir", tmp_path / "run", "--log_dir", tmp_path / "tb")
    assert explicit.log_dir == str(tmp_path / "tb")
    assert resolved(script, "--output_dir", tmp_path / "run", "--log_dir", "").log_dir == ""  # no TensorBoard
    assert resolved(script).log_dir == "./output_dir"  # both defaults


def test_log_writer_without_check_args_writes_into_output_dir(tmp_path, make_args):
    # a launcher calling main(args) directly skips check_args: the writer still goes to --output_dir
    args = make_args("pretrain", "--output_dir", tmp_path)
    assert args.log_dir is None
    writer = misc.create_log_writer(args)
    writer.close()
    assert args.log_dir == str(tmp_path)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert misc.create_log_writer(make_args("pretrain", "--output_dir", tmp_path, "--log_dir", "")) is None


# ---------------------------------------------------------------------------------------------
# A short start-up; the flags and the model printout in files
# ---------------------------------------------------------------------------------------------

PRETRAIN_FLAGS = ["--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", 32, "--patch_size", 8,
                  "--batch_size", 8, "--epochs", 1, "--warmup_epochs", 0, "--num_workers", 0, "--vis_freq", 0,
                  "--knn_freq", 0, "--precision", "fp32"]


@pytest.mark.slow
def test_pretrain_start_up_is_a_short_summary_with_the_details_in_files(cli, toy_data, tmp_path):
    data = toy_data(train_per_class=4, val_per_class=2, size=32, classes=("disc", "checkerboard"))
    out = tmp_path / "run"
    status, output = cli("main_pretrain.py", *PRETRAIN_FLAGS, "--data_path", data, "--output_dir", out)
    assert status == 0, output[-3000:]
    lines = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in output.splitlines()]  # without time stamps
    start_up = lines[:next(i for i, line in enumerate(lines) if line.startswith("Epoch: [0]"))]
    assert len(start_up) <= 12, "\n".join(start_up)  # was ~150 lines (every flag, the whole model)
    summary = "\n".join(start_up)
    for expected in [f"pretrain on cpu, 1 process, fp32; outputs in {out} (checkpoints, log.txt, args.txt, "
                     "model.txt, TensorBoard)",
                     f"data: {os.path.join(data, 'train')}: 8 images in 2 classes",
                     "model: mae_vit_tiny_patch16 (MaskedAutoencoderViT), 6.22 M trainable parameters (5,440 frozen); "
                     f"printout in {out / 'model.txt'}",  # the fixed sin-cos position embeddings are frozen
                     "effective batch size: 8 (8 per process x 1 accum_iter x 1 process); actual lr: 3.13e-05",
                     "optimizer: AdamW, 2 parameter groups (weight decay 0.0 / 0.05), betas (0.9, 0.95)",
                     f"Start training for 1 epochs (fp32); all flags in {out / 'args.txt'}"]:
        assert expected in summary, expected
    assert "Namespace(" not in output and "(blocks): ModuleList" not in output
    assert "Epoch: [0] Total time:" in output and "images/s)" in output

    files = set(os.listdir(out))
    assert {"args.txt", "model.txt", "run.json", "log.txt", "checkpoint-0.pth"} <= files
    assert any(name.startswith("events.out.tfevents") for name in files)  # --log_dir defaulted to --output_dir
    with open(out / "model.txt") as f:
        assert f.read().startswith("MaskedAutoencoderViT(\n  (patch_embed): PatchEmbed(")
    with open(out / "args.txt") as f:
        flags = dict(line.split(": ", 1) for line in f.read().splitlines())
    assert flags["model"] == "'mae_vit_tiny_patch16'" and flags["log_dir"] == repr(str(out))
    assert flags["lr"] == repr(3.125e-05) and flags["precision"] == "'fp32'"  # resolved values


def test_overwrite_moves_args_and_model_files_aside_with_the_run(tmp_path):
    for name in ("args.txt", "model.txt", "log.txt", "notes.md"):
        (tmp_path / name).write_text(name)
    moved = move_run_aside(str(tmp_path), "the test run")
    assert sorted(os.listdir(moved)) == ["args.txt", "log.txt", "model.txt"]
    assert sorted(os.listdir(tmp_path)) == ["notes.md", os.path.basename(moved)]  # not a run's file: kept


# ---------------------------------------------------------------------------------------------
# --help shows the defaults
# ---------------------------------------------------------------------------------------------

HELP_SCRIPTS = ["main_pretrain", "main_finetune", "main_linprobe", "main_visualize", "benchmark"]


def parser_of(name):
    module = importlib.import_module(name)
    try:
        return module.get_args_parser(add_help=True)
    except TypeError:  # main_visualize, benchmark: always with -h
        return module.get_args_parser()


@pytest.mark.parametrize("name", HELP_SCRIPTS)
def test_help_shows_every_default(name):
    parser = parser_of(name)
    assert parser.formatter_class is HelpFormatter
    for action in parser._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        formatter = parser._get_formatter()
        text = formatter._format_action(action)
        assert "default" in text, f"{name}: {action.option_strings[0]} shows no default:\n{text}"
    assert "--help" in parser.format_help()


def test_help_formatter_switches_and_values():
    parser = add_common_args(argparse.ArgumentParser(formatter_class=HelpFormatter))
    text = " ".join(parser.format_help().split())  # one line, whatever the terminal width
    assert "--epochs EPOCHS epochs to train (default: 400)" in text
    assert "--resume RESUME resume from this checkpoint (path or URL) (default: '')" in text
    assert "(mid-epoch resume) (default: 0)" in text
    assert "--compile torch.compile the model (default: off)" in text
    assert "--no_pin_mem turn --pin_mem off (default: off)" in text and "to the GPU (default: on)" in text
    assert "--lr LR learning rate (absolute lr); default: blr * effective batch / 256 --blr" in text  # said already
    assert "--patch_size PATCH_SIZE override the model's patch size --data_path" in text  # None: nothing added
    linprobe = " ".join(main_linprobe.get_args_parser(add_help=True).format_help().split())
    assert "classification (default: on)" in linprobe  # --cls_token: on for linear probing
    finetune = " ".join(SCRIPTS["finetune"].get_args_parser(add_help=True).format_help().split())
    assert "classification (default: off)" in finetune and "(default: rand-m9-mstd0.5-inc1)" in finetune


# ---------------------------------------------------------------------------------------------
# --eval reads only val/
# ---------------------------------------------------------------------------------------------

CLASSIFIER_FLAGS = ["--device", "cpu", "--num_workers", 0, "--model", "vit_tiny_patch16", "--input_size", 32,
                    "--patch_size", 16, "--nb_classes", 2, "--batch_size", 4, "--precision", "fp32"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["finetune", "linprobe"])
def test_eval_needs_no_train_folder_and_writes_nothing(script, cli, toy_data, tmp_path, make_args):
    data = tmp_path / "val_only"
    shutil.copytree(os.path.join(toy_data(train_per_class=2, val_per_class=3, size=32,
                                          classes=("disc", "checkerboard")), "val"), data / "val")
    model = build_classifier(make_args(script, *CLASSIFIER_FLAGS))
    if script == "linprobe":
        main_linprobe.add_linear_probe_head(model)
    atomic_save({"model": model.state_dict()}, tmp_path / "classifier.pth")
    out = tmp_path / "out"
    status, output = cli(f"main_{script}.py", *CLASSIFIER_FLAGS, "--eval", "--resume", tmp_path / "classifier.pth",
                         "--data_path", data, "--output_dir", out)
    assert status == 0, output[-3000:]
    assert "train" not in os.listdir(data)
    assert f"{script} --eval on cpu, 1 process, fp32; writes nothing" in output
    assert "Accuracy of the network on the 6 test images:" in output
    assert not out.exists() or os.listdir(out) == []  # no args.txt, model.txt or TensorBoard events

    status, output = cli(f"main_{script}.py", *CLASSIFIER_FLAGS, "--eval", "--resume", tmp_path / "classifier.pth",
                         "--data_path", data, "--nb_classes", 1)
    assert status == 1 and "has 2 classes but --nb_classes is 1" in output  # the val classes are checked


# ---------------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def threads(monkeypatch):
    """A fake machine: threads['cores'] cores, torch's default threads['default'] threads, no
    OMP_NUM_THREADS; threads['set'] records torch.set_num_threads calls."""
    state = {"cores": 8, "default": 8, "set": []}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(state["cores"])), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["default"])
    monkeypatch.setattr(torch, "set_num_threads", state["set"].append)
    monkeypatch.setattr(misc, "_THREADS_AT_IMPORT", 8)
    return state


def test_cpu_threads_leave_a_core_to_each_worker(threads, make_args, capsys):
    cpu = torch.device("cpu")
    assert misc.set_cpu_threads(make_args("pretrain", "--num_workers", 2), cpu) == 6
    assert "CPU threads: 6 per process (8 cores / 1 process(es) - 2 DataLoader workers" in capsys.readouterr().out
    assert misc.set_cpu_threads(make_args("pretrain", "--num_workers", 10), cpu) == 1  # at least 1
    threads["cores"] = 16  # 8 physical cores with 2 hyperthreads each: never above torch's default
    assert misc.set_cpu_threads(make_args("pretrain", "--num_workers", 2), cpu) == 8
    threads["cores"] = 2  # this project's 2-core machine, the quickstart's --num_workers 2
    assert misc.set_cpu_threads(make_args("pretrain", "--num_workers", 2), cpu) == 1
    assert threads["set"] == [6, 1, 8, 1]


def test_cpu_threads_shared_by_the_processes_of_a_node(threads, make_args, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert misc.set_cpu_threads(make_args("pretrain", "--num_workers", 1), torch.device("cpu")) == 3  # 8 / 2 - 1


def test_cpu_threads_chosen_by_the_user_or_on_a_gpu_are_kept(threads, make_args, monkeypatch, capsys):
    args = make_args("pretrain", "--num_workers", 2)
    assert misc.set_cpu_threads(args, torch.device("cuda")) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert misc.set_cpu_threads(args, torch.device("cpu")) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads["default"] = 3  # torch.set_num_threads(3) called after util.misc was imported
    assert misc.set_cpu_threads(args, torch.device("cpu")) is None
    assert threads["set"] == [] and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# bf16 on CPUs
# ---------------------------------------------------------------------------------------------

def test_native_bf16_cpu_detection_from_the_flags():
    assert precision.cpu_has_native_bf16(["fpu", "avx2", "avx512f", "avx512_bf16"])  # Cooper Lake, Zen 4
    assert precision.cpu_has_native_bf16(["avx512f", "amx_tile", "amx_bf16"])  # Sapphire Rapids
    assert not precision.cpu_has_native_bf16(["fpu", "avx2", "fma", "avx512f"])  # AVX-512 without bf16
    assert not precision.cpu_has_native_bf16([])
    assert isinstance(precision.cpu_has_native_bf16(), bool)  # this machine's own flags


@pytest.mark.parametrize("flags, expected", [({"avx2", "amx_tile", "amx_bf16"}, "bf16"), ({"avx2"}, "fp32")])
def test_auto_precision_of_a_cpu_run_follows_its_flags(flags, expected, monkeypatch, capsys, make_args):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    args = make_args("pretrain", "--device", "cpu", "--output_dir", "")
    assert misc.init_run(args) == torch.device("cpu") and args.precision == expected
    assert f"pretrain on cpu, 1 process, {expected}; no --output_dir: nothing is saved" in capsys.readouterr().out
    args = make_args("pretrain", "--device", "cpu", "--output_dir", "", "--precision", "fp32")
    misc.init_run(args)
    assert args.precision == "fp32"  # an explicit choice stays


def test_cpu_flags_come_from_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert precision.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "amx_bf16"}
    # no /proc/cpuinfo (macOS, Windows): the capabilities torch reports, where it has them
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {"avx512_bf16": True, "amx_bf16": False, "num_logical_cores": 2}, raising=False)
    assert precision.cpu_flags(str(tmp_path / "missing")) == {"avx512_bf16"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"fpu", "amx_bf16"})
    assert precision.cpu_has_native_bf16()  # the default reads cpu_flags()
