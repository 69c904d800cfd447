"""Fixtures shared by the test modules: one torch thread, the scripts' real argument parsers,
generated toy image folders, tiny models, and the subprocess runner of the end-to-end tests.

`pytest -m "not slow"` leaves out the chain test, the multi-process (torchrun / gloo) tests, the
fault-injection (SIGKILL) tests and the longer end-to-end runs: about a minute on 2 cores.
"""
import builtins
import os
import runpy
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
from util.checkpoint import load_checkpoint
from util.toy_data import make_toy_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_linprobe}

# Variables of a launcher (torchrun, SLURM) that would turn a test's run into a distributed one.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")
# The environment of every subprocess: no launcher, one OpenMP thread (the in-process runs use one
# torch thread too, so both compute the same bits), unbuffered output.
SUBPROCESS_ENV = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
SUBPROCESS_ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the chain, multi-process, SIGKILL and longer end-to-end tests "
                                       "(deselect with -m 'not slow')")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread: on a small, shared CPU, 2+ OpenMP threads per process can be 10-100x
    slower for these tiny models (spinning threads competing with the other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_args():
    """make_args(script, *flags, **fields): the Namespace of `python main_<script>.py flags`
    from the script's real parser (script: 'pretrain', 'finetune' or 'linprobe'), then `fields`
    set on it (values a run resolves, e.g. precision='fp32', lr=1e-3, distributed=False)."""
    def make(script, *flags, **fields):
        args = SCRIPTS[script].get_args_parser().parse_args([str(f) for f in flags])
        vars(args).update(fields)
        return args
    return make


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """toy_data(**kwargs) -> the path of a generated ImageFolder root (train/ and val/, see
    util.toy_data.make_toy_dataset), made once per set of arguments in the session."""
    made = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            made[key] = make_toy_dataset(str(tmp_path_factory.mktemp("toy")), **kwargs)
        return made[key]
    return make


@pytest.fixture(scope="session")
def tiny_mae():
    """tiny_mae(**overrides): a MaskedAutoencoderViT of 32 px images in 8 px patches (16 of
    them), 1 encoder block of width 32 and 1 decoder block of width 16."""
    def build(**overrides):
        kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                      decoder_depth=1, decoder_num_heads=2)
        return models_mae.MaskedAutoencoderViT(**{**kwargs, **overrides})
    return build


@pytest.fixture(scope="session")
def tiny_vit():
    """tiny_vit(**overrides): a global-pool models_vit classifier of 32 px images in 16 px patches,
    2 blocks of width 32, 5 classes."""
    def build(**overrides):
        kwargs = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                      global_pool=True)
        return models_vit.vit_tiny_patch16(**{**kwargs, **overrides})
    return build


@pytest.fixture(scope="session")
def tiny_problem():
    """tiny_problem(seed=0) -> (model, data): a 2-layer MLP (6 -> 8 -> 3) drawn with torch seed
    `seed`, and 4 batches of 5 (input, target) pairs drawn after it."""
    def make(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        data = [(torch.randn(5, 6), torch.randn(5, 3)) for _ in range(4)]
        return model, data
    return make


@pytest.fixture(scope="session")
def run_script():
    """run_script(script, *flags, timeout=300, check=True) -> (exit status, stdout + stderr) of
    `python script flags` run in the repo root in a subprocess with SUBPROCESS_ENV: the command
    line as a user types it. check=True asserts the exit status 0, showing the output's end."""
    def run(script, *flags, timeout=300, check=True):
        cmd = [sys.executable, script, *map(str, flags)]
        proc = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                              timeout=timeout)
        output = proc.stdout + proc.stderr
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"
        return proc.returncode, output
    return run


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(script, *flags) -> (exit status, stdout + stderr + warnings) of `python script flags`,
    run in this process (runpy, as __main__, without a launcher's variables): the command line
    without the interpreter's start-up. An uncaught exception counts as exit status 1, as in a
    shell."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    real_print = builtins.print

    def run(script, *args):
        monkeypatch.setattr(builtins, "print", builtins.print)  # the scripts time-stamp print()
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        capsys.readouterr()
        status = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what the interpreter would print before exiting with status 1
                builtins.print = real_print
                traceback.print_exc()
                status = 1
        captured = capsys.readouterr()
        shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
        return status, captured.out + captured.err + shown

    return run


def assert_same_training_state(path_a, path_b):
    """Model, optimizer (state and param groups), epoch/step and every rank's RNG states equal
    bit for bit."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for name in state_a[i]:
            assert torch.equal(state_a[i][name], state_b[i][name]), f"optimizer state {i}.{name} differs"
    assert len(a["rng"]) == len(b["rng"])
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"])
        assert torch.equal(ra["numpy"]["key"], rb["numpy"]["key"]) and ra["numpy"]["pos"] == rb["numpy"]["pos"]
        assert ra["python"] == rb["python"]
