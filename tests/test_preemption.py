"""util/preemption.py: SIGTERM / SIGUSR1 stop training at the next optimizer step with that step
saved in checkpoint-last.pth, one line says where a rerun resumes, the exit status is 128 + the
signal number, and the rerun continues bit for bit.

Real signals are sent to real processes: to this one (the handlers, both engines, a signal
during the evaluation between two epochs, a second signal during the save; the in-process runs
of the scripts are `python main_*.py <flags>` without the interpreter start-up), to a small
child process holding DataLoader workers, and (slow) to the whole process group of a
main_pretrain.py run with 2 loader workers, and to one rank of a 2-process torchrun.
"""
import builtins
import os
import re
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import engine_finetune
import engine_pretrain
import util.misc as misc
import util.preemption as preemption
from conftest import LAUNCHER_VARS, REPO, SUBPROCESS_ENV
from util.checkpoint import ResumePoint, load_checkpoint
from util.precision import NativeScalerWithGradNormCount

PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", 32, "--patch_size", 16, "--device", "cpu",
            "--vis_freq", 0, "--precision", "fp32", "--seed", 0, "--warmup_epochs", 1, "--log_freq", 1]
CLASSIFY = ["--model", "vit_tiny_patch16", "--input_size", 32, "--patch_size", 16, "--nb_classes", 4,
            "--batch_size", 8, "--device", "cpu", "--num_workers", 0, "--precision", "fp32", "--seed", 0,
            "--warmup_epochs", 1, "--log_freq", 1]
LINE = re.compile(r"Stopped by (SIG\w+) at epoch (\d+), iteration (\d+): saved (\S+); "
                  r"a rerun of the same command resumes there\.")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def restore_handlers():
    """Whatever a test leaves installed is restored (and SIGTERM never reaches pytest unhandled:
    send() checks for a handler first)."""
    yield
    preemption.uninstall()


def send(signum):
    """Send `signum` to this process, once a Python handler is there to catch it (else fail
    instead of ending pytest), and let the handler run."""
    assert callable(signal.getsignal(signum)), f"no handler for {signal.Signals(signum).name}"
    os.kill(os.getpid(), signum)
    time.sleep(0.001)


def flags(base, data, out, *extra):
    return [*base, "--data_path", data, "--output_dir", out, "--log_dir", out, *extra]


@pytest.fixture
def script(monkeypatch, capfd):
    """script(name, *flags) -> (exit status, output) of `python name flags` run in this process."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)

    def run(name, *args):
        monkeypatch.setattr(builtins, "print", builtins.print)  # the scripts time-stamp print()
        monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
        capfd.readouterr()
        status = 0
        try:
            runpy.run_path(os.path.join(REPO, name), run_name="__main__")
        except SystemExit as e:
            status = e.code or 0
        captured = capfd.readouterr()
        return status, captured.out + captured.err
    return run


def assert_same_state(path_a, path_b):
    """Epoch / step, weights, optimizer state and every rank's RNG states equal bit for bit."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    assert all(torch.equal(state_a[i][name], state_b[i][name]) for i in state_a for name in state_a[i])
    assert len(a["rng"]) == len(b["rng"])
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]


def optimizer_steps(checkpoint):
    return {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}


def children(parent):
    """pids of the live (not zombie) processes whose parent is `parent` (Linux /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == parent and state != "Z":
            found.append(int(entry))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_line(proc, log_path, pattern, timeout=120):
    """Wait until the output of `proc` in log_path (a Path) matches `pattern`."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log_path.read_text()):
        assert proc.poll() is None, f"ended ({proc.returncode}) before {pattern!r}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {pattern!r}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The handlers and the agreement between ranks
# ---------------------------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
def test_handlers_record_the_first_signal_in_the_main_process_only():
    default = signal.getsignal(signal.SIGTERM)
    preemption.install()
    pid = os.fork()  # a child forked after install(), as a DataLoader worker is: it ignores both
    if pid == 0:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        os._exit(0 if preemption.received() == 0 else 3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert preemption.received() == 0

    send(signal.SIGUSR1)
    send(signal.SIGTERM)  # a repeat changes nothing: the first signal is the one reported
    assert preemption.received() == signal.SIGUSR1
    assert preemption.stop_requested(4, 10, 2) == signal.SIGUSR1  # one process: no exchange needed
    preemption.uninstall()
    assert signal.getsignal(signal.SIGTERM) == default
    assert preemption.received() == 0  # forgotten: a later loop in this process does not stop at once

    stopped = preemption.Preempted(signal.SIGTERM, 3, 7, "/runs/a/checkpoint-last.pth")
    assert stopped.exit_status == 143 and preemption.Preempted(signal.SIGUSR1, 0, 1).exit_status == 138
    assert LINE.fullmatch(stopped.line()).groups() == ("SIGTERM", "3", "7", "/runs/a/checkpoint-last.pth")
    assert stopped.line(auto_resumes=False).endswith("rerun with --resume /runs/a/checkpoint-last.pth "
                                                     "to continue there.")


@pytest.mark.parametrize("accum_iter, iters, exchanges", [(1, 32, [8, 16, 24, 32]), (4, 30, [8, 16, 24, 28]),
                                                          (16, 40, [16, 32])])
def test_ranks_exchange_the_flag_every_8_iterations_and_at_the_epoch_end(monkeypatch, accum_iter, iters,
                                                                          exchanges):
    """Distributed, stop_requested all-reduces (MAX) the signal numbers only every 8 iterations
    (in whole optimizer steps) and at the epoch's last optimizer step: a stop agreed by all ranks
    without a host-device sync per step. Here a peer reports SIGTERM at every exchange."""
    calls = []

    def all_reduce(flag, op):
        assert op == torch.distributed.ReduceOp.MAX
        calls.append(done)
        flag.fill_(max(int(flag), signal.SIGTERM))  # the peer's signal

    monkeypatch.setattr(preemption, "get_world_size", lambda: 2)
    monkeypatch.setattr(preemption, "comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(preemption.dist, "all_reduce", all_reduce)
    answers = {}
    for done in range(accum_iter, iters + 1, accum_iter):  # the optimizer steps of an epoch
        answers[done] = preemption.stop_requested(done, iters, accum_iter)
    assert calls == exchanges
    assert {done for done, signum in answers.items() if signum} == set(exchanges)
    assert {answers[done] for done in exchanges} == {signal.SIGTERM}


# ---------------------------------------------------------------------------------------------
# The engines stop at the next optimizer step and save it
# ---------------------------------------------------------------------------------------------

class SignalAt:
    """A data loader of `batches` that sends `signum` to this process just before it yields the
    batch of iteration `index`; counts the batches it yields."""

    def __init__(self, batches, index, signum):
        self.batches, self.index, self.signum, self.yielded = batches, index, signum, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.index:
                send(self.signum)
            self.yielded += 1
            yield batch


def engine_run(stage, tmp_path, make_args, tiny_mae, tiny_vit, loader):
    """train_one_epoch of `stage` at epoch 3 with --accum_iter 2, saving into tmp_path."""
    torch.manual_seed(0)
    args = make_args(stage, "--accum_iter", 2, "--epochs", 5, "--warmup_epochs", 1, "--log_freq", 100,
                     "--output_dir", tmp_path, precision="fp32", lr=1e-3, distributed=False)
    model = tiny_mae() if stage == "pretrain" else tiny_vit(num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    if stage == "pretrain":
        return engine_pretrain.train_one_epoch(model, loader, optimizer, "cpu", 3, scaler, None, args)
    return engine_finetune.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, optimizer, "cpu", 3,
                                           scaler, None, args, max_accuracy=42.5)


@pytest.mark.parametrize("stage, signum", [("pretrain", signal.SIGUSR1), ("finetune", signal.SIGTERM)])
def test_engine_stops_at_the_next_optimizer_step_and_saves_it(tmp_path, make_args, tiny_mae, tiny_vit,
                                                              stage, signum):
    """With --accum_iter 2, a signal during iteration 2 (inside an accumulation cycle) stops the
    epoch after iteration 3, its optimizer step, with checkpoint-last.pth at step 4."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([i % 4, (i + 1) % 4])) for i in range(8)]
    loader = SignalAt(batches, index=2, signum=signum)
    preemption.install()
    with pytest.raises(preemption.Preempted) as stop:
        engine_run(stage, tmp_path, make_args, tiny_mae, tiny_vit, loader)
    path = tmp_path / "checkpoint-last.pth"
    assert (stop.value.signum, stop.value.epoch, stop.value.step, stop.value.path) == (signum, 3, 4, str(path))
    assert loader.yielded == 4  # not a batch more
    checkpoint = load_checkpoint(path)
    assert (checkpoint["epoch"], checkpoint["step"]) == (3, 4) and optimizer_steps(checkpoint) == {2}
    if stage == "finetune":
        assert checkpoint["max_accuracy"] == 42.5


def test_second_signal_during_the_save_leaves_a_loadable_checkpoint(tmp_path, make_args, tiny_mae, tiny_vit,
                                                                     monkeypatch):
    """SIGTERM and SIGUSR1 arrive while checkpoint-last.pth is being written (its temp file
    open) after a SIGUSR1 stopped the run: the save completes, the file loads, no temp file is
    left, and the run reports the first signal."""
    real_save = torch.save
    seen = []

    def save_interrupted(obj, f, *args, **kwargs):
        seen.append(sorted(os.listdir(tmp_path)))  # the temp file is open
        send(signal.SIGTERM)
        send(signal.SIGUSR1)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_interrupted)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.zeros(2, dtype=torch.long)) for _ in range(6)]
    preemption.install()
    with pytest.raises(preemption.Preempted) as stop:
        engine_run("pretrain", tmp_path, make_args, tiny_mae, tiny_vit, SignalAt(batches, 0, signal.SIGUSR1))
    assert stop.value.signum == signal.SIGUSR1 and stop.value.step == 2
    assert len(seen) == 1 and any(n.startswith(".checkpoint-last.pth.tmp-") for n in seen[0])
    assert [n for n in os.listdir(tmp_path) if "checkpoint" in n] == ["checkpoint-last.pth"]  # no temp file
    checkpoint = load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert (checkpoint["epoch"], checkpoint["step"]) == (3, 2) and optimizer_steps(checkpoint) == {1}


class Sampler:
    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start


def test_a_signal_between_epochs_stops_at_the_first_optimizer_step_of_the_next(tmp_path, make_args, tiny_mae):
    """epochs_to_train installs the handlers for the epochs: a signal after an epoch's training
    (during its evaluation or end-of-epoch save) stops the run at the first optimizer step of
    the next epoch; the previous handlers are back once the epochs are done with."""
    default = signal.getsignal(signal.SIGTERM)
    torch.manual_seed(0)
    args = make_args("pretrain", "--epochs", 3, "--warmup_epochs", 1, "--log_freq", 100, "--output_dir", tmp_path,
                     precision="fp32", lr=1e-3, distributed=False)
    model = tiny_mae()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scaler = NativeScalerWithGradNormCount(enabled=False, device_type="cpu")
    batches = [(torch.randn(2, 3, 32, 32), torch.zeros(2)) for _ in range(4)]
    epochs = misc.epochs_to_train(args, ResumePoint(0), Sampler())
    with pytest.raises(preemption.Preempted) as stop:
        for epoch, start_iter in epochs:
            engine_pretrain.train_one_epoch(model, batches, optimizer, "cpu", epoch, scaler, None, args, start_iter)
            send(signal.SIGTERM)  # as during the evaluation or the end-of-epoch save
    assert (stop.value.epoch, stop.value.step) == (1, 1)
    checkpoint = load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 1) and optimizer_steps(checkpoint) == {5}
    epochs.close()
    assert signal.getsignal(signal.SIGTERM) == default


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(toy_data):
    """4 classes x (4 train + 2 val) images of 32 px."""
    return toy_data(train_per_class=4, val_per_class=2, size=32)


@pytest.mark.slow
def test_signal_during_evaluation_stops_the_next_epoch_and_the_rerun_is_bit_exact(data, tmp_path, script,
                                                                                     monkeypatch):
    """main_finetune.py: a SIGTERM during the evaluation of epoch 0 stops the run at the first
    optimizer step of epoch 1 (exit status 143, one line, checkpoint-last.pth at epoch 1, step 1
    with the best accuracy); rerunning the same command resumes there and ends with the weights,
    optimizer state and RNG states of an uninterrupted run."""
    default = signal.getsignal(signal.SIGTERM)
    reference, out = tmp_path / "reference", tmp_path / "run"
    status, log = script("main_finetune.py", *flags(CLASSIFY, data, reference, "--epochs", 2))
    assert status == 0, log[-3000:]

    real_evaluate = engine_finetune.evaluate

    def evaluate_then_signal(*args, **kwargs):
        stats = real_evaluate(*args, **kwargs)
        send(signal.SIGTERM)  # as if it came during the evaluation
        return stats

    command = flags(CLASSIFY, data, out, "--epochs", 2)
    with monkeypatch.context() as patch:
        patch.setattr(engine_finetune, "evaluate", evaluate_then_signal)
        status, log = script("main_finetune.py", *command)
    last = out / "checkpoint-last.pth"
    assert status == 143, log[-3000:]
    assert LINE.search(log).groups() == ("SIGTERM", "1", "1", str(last)) and "Traceback" not in log
    assert "SIGTERM received" in log
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 1)
    assert checkpoint["max_accuracy"] == load_checkpoint(out / "checkpoint-0.pth")["max_accuracy"]
    assert signal.getsignal(signal.SIGTERM) == default  # restored when the script ended

    status, log = script("main_finetune.py", *command)
    assert status == 0, log[-3000:]
    assert "continuing at epoch 1, iteration 1" in log
    assert_same_state(out / "checkpoint-1.pth", reference / "checkpoint-1.pth")
    assert load_checkpoint(out / "checkpoint-1.pth")["max_accuracy"] == \
        load_checkpoint(reference / "checkpoint-1.pth")["max_accuracy"]


WORKERS = textwrap.dedent("""
    import os, signal, time
    import torch
    from util.preemption import worker_init_fn

    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            return os.getpid()

    loader = torch.utils.data.DataLoader(Pids(), batch_size=1, num_workers=2, persistent_workers=True,
                                         worker_init_fn=worker_init_fn)
    batches = iter(loader)
    pids = sorted({int(next(batches)) for _ in range(4)})
    print(*pids, flush=True)
    for pid in pids:  # as a cluster does: every process of the job gets the signals
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    assert sorted({int(next(batches)) for _ in range(4)}) == pids  # the workers still serve
    raise RuntimeError("uncaught, with the workers alive")
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_loader_workers_ignore_the_signals_and_never_outlive_the_main_process(tmp_path):
    """DataLoader workers (worker_init_fn) ignore SIGTERM / SIGUSR1, which SLURM and torchrun
    send to them too; a process that then dies of an uncaught exception with the workers alive
    still exits at once (multiprocessing's exit function would SIGTERM them in vain and wait
    forever) and leaves none behind."""
    proc = subprocess.run([sys.executable, "-c", WORKERS], cwd=REPO, env=dict(SUBPROCESS_ENV, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "RuntimeError: uncaught, with the workers alive" in proc.stderr, proc.stderr
    assert "killed by signal" not in proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_sigterm_to_the_process_group_saves_the_step_and_the_rerun_is_bit_exact(data, tmp_path, script):
    """main_pretrain.py with 2 loader workers, one epoch of 8 iterations: SIGTERM to its whole
    process group (the main process and its workers, as SLURM and torchrun send it) mid-epoch.
    It stops at the next optimizer step: exit status 143, one line naming the checkpoint and the
    step, checkpoint-last.pth at that step, no worker left; rerunning the same command resumes
    there and ends bit-identical to an uninterrupted run (both run in this process)."""
    out, reference = tmp_path / "run", tmp_path / "reference"
    command = flags(PRETRAIN, data, out, "--batch_size", 2, "--num_workers", 2, "--epochs", 1)
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "main_pretrain.py", *map(str, command)], cwd=REPO,
                                env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(proc, log_path, r"Epoch: \[0\]\s+\[2/8\]")
        workers = children(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    assert status == 143, log[-3000:]
    assert len(workers) == 2 and not any(alive(pid) for pid in workers)  # they exited with it
    lines = LINE.findall(log)
    assert len(lines) == 1 and "Traceback" not in log, log[-3000:]
    name, epoch, step, path = lines[0]
    assert (name, path) == ("SIGTERM", str(out / "checkpoint-last.pth"))
    checkpoint = load_checkpoint(path)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, int(step)) and int(step) < 8
    assert optimizer_steps(checkpoint) == {int(step)}

    status, log = script("main_pretrain.py", *command)
    assert status == 0, log[-3000:]
    assert f"continuing at epoch 0, iteration {step}" in log
    status, log = script("main_pretrain.py", *flags(PRETRAIN, data, reference, "--batch_size", 2,
                                                    "--num_workers", 0, "--epochs", 1))
    assert status == 0, log[-3000:]
    assert_same_state(out / "checkpoint-0.pth", reference / "checkpoint-0.pth")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_torchrun_signal_to_one_rank_stops_both_at_the_same_step(toy_data, tmp_path):
    """A 2-process torchrun (gloo, --max-restarts=1), one epoch of 16 iterations per rank; SIGTERM
    to rank 1 only. Both ranks stop at the same exchange (iteration 8 or 16), rank 0 writes a
    checkpoint holding both ranks' RNG states at that step, the group exits 143 and torchrun
    restarts it; the restart resumes at that step and finishes with every optimizer step done
    once."""
    data = toy_data(train_per_class=8, val_per_class=1, size=32)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", "main_pretrain.py",
               *map(str, flags(PRETRAIN, data, out, "--batch_size", 1, "--num_workers", 0, "--epochs", 1,
                               "--dist_timeout", 1))]
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_line(proc, log_path, r"Epoch: \[0\]\s+\[\s*1/16\]")
        rank1 = [pid for pid in children(proc.pid)
                 if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)
        status = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            for pid in children(proc.pid):  # the workers run in sessions of their own
                os.kill(pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    assert status == 0, log[-4000:]
    assert "rank 1: SIGTERM received" in log and "rank 0: SIGTERM received" not in log
    lines = LINE.findall(log)
    assert len(lines) == 1, log[-4000:]
    _, epoch, step, path = lines[0]
    assert epoch == "0" and step in ("8", "16") and path == str(out / "checkpoint-last.pth")
    assert f"continuing at epoch 0, iteration {step}" in log and log.count("Start training") == 2
    stopped = load_checkpoint(path)
    assert (stopped["epoch"], stopped["step"]) == (0, int(step)) and len(stopped["rng"]) == 2
    assert optimizer_steps(stopped) == {int(step)}
    assert optimizer_steps(load_checkpoint(out / "checkpoint-0.pth")) == {16}
