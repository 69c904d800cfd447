"""Logging (SmoothedValue, MetricLogger, the on-device loss buffer of the training engines) and
the small plumbing the three main scripts share (init_run, the epochs, the TensorBoard writer,
log.txt, run). Mixed precision is in util/precision.py.

Metrics stay on their device until printed: a training step never waits for the host.
"""
import datetime
import json
import math
import os
import sys
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

import util.preemption as preemption
from util.args import resolve_log_dir
from util.checkpoint import (NonFiniteLossError, UnreadableCheckpointsError, atomic_write_text, seed_everything,
                             set_aside_diverged_checkpoint)
from util.dist import (comm_device, get_rank, get_world_size, init_distributed_mode, is_dist_avail_and_initialized,
                       is_main_process)
from util.precision import resolve_precision
from util.run_dir import RunDirError, check_output_dir, claim_output_dir, release_lock

# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def _to_floats(values):
    """Python floats of a list of numbers and 0-d tensors, with one device->host copy."""
    tensors = [v.detach().float().reshape(()) for v in values if torch.is_tensor(v)]
    if tensors:
        tensors = [t.to(tensors[0].device) for t in tensors]
    host = iter(torch.stack(tensors).cpu().tolist() if tensors else [])
    return [next(host) if torch.is_tensor(v) else float(v) for v in values]


class SmoothedValue:
    """Track a series of values; report smoothed values over a window and the global average.

    update() accepts python numbers or 0-d tensors. Tensors stay on their device and are summed
    there, so updating every step costs no host-device sync; values become python floats only
    when they are read (median, avg, global_avg, max, value, str).
    """

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0  # python float, or a float64 0-d tensor once a tensor was added
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        if torch.is_tensor(value):
            value = value.detach()
            self.total = self.total + value.to(torch.float64) * n
        else:
            self.total += value * n
        self.deque.append(value)
        self.count += n

    def synchronize_between_processes(self):
        """All-reduce count and total (the window stays per-process)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, float(self.total)], dtype=torch.float64, device=comm_device())
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        # torch's median of an even count is the lower middle value, as the original printed
        return torch.tensor(_to_floats(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(_to_floats(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return float(self.total) / self.count

    @property
    def max(self):
        return max(_to_floats(self.deque))

    @property
    def value(self):
        return _to_floats([self.deque[-1]])[0]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def is_log_point(i, start_iter, iters_per_epoch, log_freq):
    """Whether MetricLogger.log_every prints after iteration i of an epoch that it joined at
    start_iter: every log_freq iterations, the first and the last. The training engines sync
    their losses at these iterations, so the printed meters are up to date."""
    return i % log_freq == 0 or i == start_iter or i == iters_per_epoch - 1


class MetricLogger:
    """A dict of SmoothedValue meters plus a logging iterator for the training loops."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if v is None:
                continue
            assert isinstance(v, (float, int)) or (torch.is_tensor(v) and v.numel() == 1), (k, v)
            self.meters[k].update(v)

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        # meters that saw no value yet (e.g. an epoch resumed after its last iteration) are skipped
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items()
                                   if meter.count)

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def averages(self):
        """{name: global average} of the meters that saw a value (the epoch's stats)."""
        return {name: meter.global_avg for name, meter in self.meters.items() if meter.count}

    def log_every(self, iterable, print_freq, header=None, start_iter=0, epochs_after=None, images_per_iter=None):
        """Yield the items of `iterable`, printing progress every print_freq iterations.

        start_iter: iterations of this epoch already done before `iterable` (mid-epoch resume);
        `iterable` yields the remaining ones, and the printed index / ETA count from start_iter.
        epochs_after: the epochs the run trains after this one; when given, each progress line
        also shows the whole run's ETA ("run eta"): this epoch's remaining iterations plus
        epochs_after full epochs, all at this epoch's average time per iteration so far (the
        evaluation and checkpoints between epochs are not counted). images_per_iter: the images
        of one iteration over all processes (batch_size x world size); when given, the closing
        "Total time" line shows the images per second of the epoch.
        """
        header = header or ""
        total = start_iter + len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        show_mem = torch.cuda.is_available() and torch.cuda.is_initialized()
        start_time = end = time.time()
        i = start_iter
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if is_log_point(i, start_iter, total, print_freq):
                left = total - i - 1  # iterations left in this epoch
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {_duration(iter_time.global_avg * left)}"]
                if epochs_after is not None:
                    parts.append(f"run eta: {_duration(iter_time.global_avg * (left + epochs_after * total))}")
                parts += [str(self), f"time: {iter_time}", f"data: {data_time}"]
                if show_mem:
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
                print(self.delimiter.join(p for p in parts if p))
            i += 1
            end = time.time()
        done = i - start_iter
        total_time = time.time() - start_time
        speed = f", {done * images_per_iter / total_time:.1f} images/s" if images_per_iter and total_time > 0 else ""
        print(f"{header} Total time: {_duration(total_time)} ({total_time / max(done, 1):.4f} s / it{speed})")


def _duration(seconds):
    """h:mm:ss of a number of seconds (whole seconds, as the original's ETA); 'd days, h:mm:ss'
    past a day."""
    return str(datetime.timedelta(seconds=int(seconds)))


class TrainingLog:
    """What the training engines log in an epoch, without a host-device sync per step.

    The loss (and the gradient norm) of each iteration stays on the device in a buffer; at the
    log points of MetricLogger.log_every, before a mid-epoch checkpoint and at the end of the
    epoch, sync() averages the buffer over the processes (one all-reduce and one device-to-host
    copy for all of it), raises NonFiniteLossError naming the first non-finite loss's epoch and
    iteration, and logs each iteration: the 'loss' and 'lr' meters, and on rank 0 (log_writer
    set) the TensorBoard scalars `loss_name`, 'lr' and 'grad_norm' at the iterations that end
    an accumulation cycle of --accum_iter (as the original), at x = epoch_1000x, the original's
    units, which calibrate curves of different batch sizes.

    start_iter: the iterations of the epoch done before a mid-epoch resume; iters_per_epoch:
    the whole epoch's. Uses args.accum_iter, args.log_freq, and args.epochs and args.batch_size
    (the run's ETA and the images/s that iterate() prints).
    """

    def __init__(self, epoch, start_iter, iters_per_epoch, args, log_writer=None, loss_name="loss"):
        self.meters = MetricLogger(delimiter="  ")
        self.meters.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        self.epoch, self.start_iter, self.iters_per_epoch = epoch, start_iter, iters_per_epoch
        self.accum_iter, self.log_freq = args.accum_iter, args.log_freq
        self.epochs, self.batch_size = args.epochs, args.batch_size
        self.log_writer, self.loss_name = log_writer, loss_name
        self.pending = []  # (iteration, lr, loss (0-d tensor), grad norm (0-d tensor) or None)

    def iterate(self, data_loader):
        """(iteration, batch) pairs from start_iter on, printing progress at the log points."""
        header = f"Epoch: [{self.epoch}]"
        batches = self.meters.log_every(data_loader, self.log_freq, header, start_iter=self.start_iter,
                                        epochs_after=max(self.epochs - self.epoch - 1, 0),
                                        images_per_iter=self.batch_size * get_world_size())
        return enumerate(batches, start=self.start_iter)

    def progress(self, iteration):
        """The fractional epoch at `iteration`, where the per-iteration lr schedule is read."""
        return self.epoch + iteration / self.iters_per_epoch

    def record(self, iteration, lr, loss, grad_norm=None, sync=False):
        """Buffer one iteration (grad_norm: what the loss scaler returned, None inside an
        accumulation cycle); sync at the log points, or now with sync=True."""
        self.meters.update(lr=lr)
        norm = None if grad_norm is None else grad_norm.detach()
        self.pending.append((iteration, lr, loss.detach(), norm))
        if sync or is_log_point(iteration, self.start_iter, self.iters_per_epoch, self.log_freq):
            self.sync()

    def sync(self):
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        losses = torch.stack([loss.float() for _, _, loss, _ in pending])  # (B,) on the device
        norms = [norm.float().to(losses.device) for *_, norm in pending if norm is not None]
        values = torch.cat([losses, torch.stack(norms)]) if norms else losses  # (B + optimizer steps,)
        if get_world_size() > 1:
            dist.all_reduce(values)
            values = values / get_world_size()
        values = values.tolist()
        norm_values = iter(values[len(pending):])
        for (i, lr, _, norm), value in zip(pending, values):
            grad_norm = None if norm is None else next(norm_values)
            if not math.isfinite(value):
                raise NonFiniteLossError(value, self.epoch, i)
            self.meters.update(loss=value)
            if self.log_writer is not None and (i + 1) % self.accum_iter == 0:
                epoch_1000x = int(self.progress(i) * 1000)
                self.log_writer.add_scalar(self.loss_name, value, epoch_1000x)
                self.log_writer.add_scalar("lr", lr, epoch_1000x)
                if grad_norm is not None:
                    self.log_writer.add_scalar("grad_norm", grad_norm, epoch_1000x)

    def finish(self):
        """Sync what is left (a data_loader shorter than its len()), print and return the
        epoch's averages over iterations and processes: {'loss': ..., 'lr': ...}."""
        self.sync()
        print("Averaged stats:", self.meters)
        return self.meters.averages()


# ---------------------------------------------------------------------------------------------
# Scripts (main_pretrain, main_finetune, main_linprobe)
# ---------------------------------------------------------------------------------------------


def init_run(args, training=True):
    """The common start of the three training scripts; returns the torch.device to train on.

    In order: join the process group or set up a single process (init_distributed_mode), resolve
    --log_dir (default: --output_dir), check that --output_dir and --log_dir are writable (rank
    0), claim --output_dir when training (util.run_dir.claim_output_dir: its lock, and a stop
    before anything is built when it holds another run, or this run with other flags, or this run
    already complete; it removes there the partial files of saves killed midway), resolve
    args.precision for the device, choose the CPU threads (set_cpu_threads), print one line on
    the device, processes, precision and outputs (the full flags go to args.txt: write_run_files),
    seed torch / numpy / random with seed + rank (each rank its own masking noise, drop path and
    mixup draws) and turn on cudnn.benchmark.
    """
    init_distributed_mode(args)
    resolve_log_dir(args)
    if is_main_process():
        for folder in {args.output_dir, args.log_dir} - {None, ""}:
            check_output_dir(folder)

    if training:
        claim_output_dir(args)

    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device)
    set_cpu_threads(args, device)
    print(_run_line(args, device, training))
    seed_everything(args.seed + get_rank())
    torch.backends.cudnn.benchmark = True
    return device


def _run_line(args, device, training):
    """'<stage> on <device>, N process(es), <precision>; <where the outputs go>'."""
    stage = getattr(args, "stage", "run") + ("" if training else " --eval")
    if not training:
        outputs = "writes nothing"
    elif not args.output_dir:
        outputs = "no --output_dir: nothing is saved"
    else:
        outputs = f"outputs in {args.output_dir} (checkpoints, log.txt, args.txt, model.txt"
        outputs += ", TensorBoard)" if args.log_dir == args.output_dir else ")"
        if args.log_dir != args.output_dir:
            outputs += f", TensorBoard in {args.log_dir}" if args.log_dir else ", no TensorBoard (--log_dir '')"
    world = get_world_size()
    return f"{stage} on {device}, {world} process{'es' if world > 1 else ''}, {args.precision}; {outputs}"


# torch's thread count when this module was imported: a different count at init_run means that
# the caller chose one (torch.set_num_threads), which set_cpu_threads then keeps
_THREADS_AT_IMPORT = torch.get_num_threads()


def set_cpu_threads(args, device):
    """On the CPU, unless the user chose (OMP_NUM_THREADS set, or torch.set_num_threads called
    since this module was imported): torch.set_num_threads(max(1, min(torch's default, cores //
    processes on this node - num_workers))), leaving a core to each DataLoader worker, and say so
    in one line.

    Why: torch's default (one thread per core) makes each process's OpenMP threads compete with
    the DataLoader workers and any other work for the same cores. Measured on 2 shared cores
    (README quickstart, --num_workers 2): 2.9-6.3 s per iteration with the default 2 threads
    against 0.53-0.75 s with 1. Returns the threads set, or None when left as they were."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() != _THREADS_AT_IMPORT:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    default = torch.get_num_threads()
    threads = max(1, min(default, cores // local_processes - args.num_workers))
    print(f"CPU threads: {threads} per process ({cores} cores / {local_processes} process(es) - "
          f"{args.num_workers} DataLoader workers, at least 1, at most torch's default {default}, which was "
          "several times slower when the cores are shared). Set OMP_NUM_THREADS to choose.")
    torch.set_num_threads(threads)
    return threads


def print_model(model, args=None):
    """Print one line: the model's class, its number of trainable parameters and, when the run
    writes its files (write_run_files), where the full printout is (model.txt). Returns the
    number of trainable parameters."""
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    name = getattr(args, "model", None) or type(model).__name__
    where = write_run_files(args, "model.txt", str(model) + "\n") if args is not None else None
    frozen = f" ({total - n_parameters:,} frozen)" if total != n_parameters else ""
    print(f"model: {name} ({type(model).__name__}), {n_parameters / 1e6:.2f} M trainable parameters{frozen}"
          + (f"; printout in {where}" if where else ""))
    return n_parameters


def print_optimizer(optimizer):
    """Print the optimizer on one line: its class, parameter groups, weight decays and settings
    (the full printout of torch is ~15 lines a group)."""
    groups = optimizer.param_groups
    decays = sorted({g["weight_decay"] for g in groups if "weight_decay" in g})
    settings = [f"{k} {optimizer.defaults[k]}" for k in ("betas", "eps", "momentum", "trust_coefficient")
                if optimizer.defaults.get(k) is not None]
    settings += [k for k in ("fused", "foreach") if optimizer.defaults.get(k)]
    print(f"optimizer: {type(optimizer).__name__}, {len(groups)} parameter group{'s' if len(groups) > 1 else ''}"
          f" (weight decay {' / '.join(map(str, decays))}), " + ", ".join(settings))


def write_run_files(args, name, text):
    """Write `text` to {output_dir}/{name} atomically (rank 0 of a training run with an
    --output_dir; --eval writes nothing) and return its path, else None."""
    if not (args.output_dir and is_main_process() and not getattr(args, "eval", False)):
        return None
    path = os.path.join(args.output_dir, name)
    atomic_write_text(path, text)
    return path


def _args_text(args):
    """One 'name: value' line per flag (values as Python literals), in the parser's order."""
    return "".join(f"{name}: {value!r}\n" for name, value in vars(args).items())


def epochs_to_train(args, start, sampler, log_writer=None):
    """The epochs from the resume point `start` (a checkpoint.ResumePoint) to --epochs, as
    (epoch, start_iter) pairs; start_iter > 0 only for an epoch resumed mid-way. Sets the
    sampler's epoch, skipping the samples that a resumed epoch already saw. Prints the start and,
    after the last epoch, the training time, then closes the TensorBoard writer. A resumed run
    first drops from log.txt the lines of the epochs it trains again (trim_log). While the epochs
    run (their evaluation and saves included), SIGTERM / SIGUSR1 stop training at the next
    optimizer step (util.preemption; run() ends the script)."""
    trim_log(args, start)
    where = write_run_files(args, "args.txt", _args_text(args))  # resolved: lr, precision, world size
    print(f"Start training for {args.epochs} epochs ({args.precision})" + (f"; all flags in {where}" if where else ""))
    start_time = time.time()
    preemption.install()
    try:
        for epoch in range(start.epoch, args.epochs):
            start_iter = start.iteration if epoch == start.epoch else 0
            sampler.set_epoch(epoch, start=start_iter * args.batch_size)
            yield epoch, start_iter
    finally:  # also when the generator is dropped after an exception (e.g. Preempted)
        preemption.uninstall()
    print("Training time {}".format(str(datetime.timedelta(seconds=int(time.time() - start_time)))))
    if log_writer is not None:
        log_writer.close()


def create_log_writer(args, training=True):
    """A TensorBoard SummaryWriter on args.log_dir (default: --output_dir, resolve_log_dir) on
    rank 0 when training, else None."""
    if not (is_main_process() and resolve_log_dir(args) and training):
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported here: only the scripts need it
    return SummaryWriter(log_dir=args.log_dir)


def log_epoch(args, log_writer, epoch, train_stats, test_stats=None, start_iter=0, **extra):
    """The end of an epoch: the test metrics to TensorBoard (perf/test_acc1, perf/test_acc5,
    perf/test_loss at x = epoch) and one JSON line {train_*, test_*, epoch, **extra} to log.txt.
    An epoch resumed mid-way (start_iter > 0) averaged only its iterations from start_iter on:
    its line says so with "partial_epoch_from_iter": start_iter.

    The scripts call it before the epoch's checkpoint, so that a kill between the two loses no
    line; the line of an epoch that a resumed run trains again is dropped then (trim_log)."""
    if log_writer is not None and test_stats:
        for name in ("acc1", "acc5", "loss"):
            log_writer.add_scalar(f"perf/test_{name}", test_stats[name], epoch)
    log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in (test_stats or {}).items()},
                 "epoch": epoch, **extra}
    if start_iter:
        log_stats["partial_epoch_from_iter"] = start_iter
    write_log(args, log_stats, log_writer)


def _logged_epoch(line):
    """The "epoch" of a log.txt line, or None (not JSON, no epoch)."""
    try:
        epoch = json.loads(line).get("epoch")
    except (ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def trim_log(args, start):
    """A resumed run (start: the checkpoint.ResumePoint, past epoch 0 iteration 0) trains the
    epochs from start.epoch on again: drop their lines from {output_dir}/log.txt (rank 0), so
    that each epoch keeps one line. They are left by the interrupted run: log_epoch writes an
    epoch's line before its checkpoint, and pretraining saves every --save_freq epochs. The file
    is rewritten atomically; a run that starts from scratch leaves it as it is. epochs_to_train
    calls it before the first epoch."""
    path = os.path.join(args.output_dir, "log.txt") if args.output_dir else ""
    if not (is_main_process() and (start.epoch or start.iteration) and os.path.isfile(path)):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    dropped = [e for e in map(_logged_epoch, lines) if e is not None and e >= start.epoch]
    if not dropped:
        return
    kept = [line.rstrip("\n") + "\n" for line in lines
            if _logged_epoch(line) is None or _logged_epoch(line) < start.epoch]
    atomic_write_text(path, "".join(kept))
    print(f"log.txt: dropped the lines of epochs {sorted(set(dropped))}, which this run trains again "
          f"(it resumes at epoch {start.epoch}, iteration {start.iteration})")


def write_log(args, log_stats, log_writer=None):
    """Append log_stats as one JSON line to {output_dir}/log.txt (rank 0), after flushing the
    TensorBoard writer."""
    if not (args.output_dir and is_main_process()):
        return
    if log_writer is not None:
        log_writer.flush()
    with open(os.path.join(args.output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
        f.write(json.dumps(log_stats) + "\n")


def run(main_fn, args):
    """Run a script's main_fn(args): a NonFiniteLossError, a RunDirError (util.run_dir) or an
    UnreadableCheckpointsError (auto-resume found only unreadable checkpoints) ends it with one
    clear message on stderr (rank 0) and exit status 1; a SIGTERM / SIGUSR1 that stopped
    training (util.preemption, checkpoint-last.pth saved) with one line on stderr (rank 0) saying
    where a rerun resumes, and exit status 128 + the signal number (non-zero: torchrun
    --max-restarts and a SLURM requeue rerun it). The signal handlers are restored, the lock of
    --output_dir released and the process group destroyed either way."""
    status = 0
    try:
        main_fn(args)
    except NonFiniteLossError as e:
        if is_main_process():
            sys.stderr.write(f"ERROR: {e}\n")
            set_aside_diverged_checkpoint(args.output_dir, e)
        sys.exit(1)
    except (RunDirError, UnreadableCheckpointsError) as e:  # --output_dir holds another run, a live one
        # or only unreadable checkpoints: nothing was touched
        if is_main_process():
            sys.stderr.write(f"ERROR: {e}\n")
        sys.exit(1)
    except preemption.Preempted as e:
        if is_main_process():
            sys.stderr.write(e.line(auto_resumes=args.auto_resume and not args.resume) + "\n")
        preemption.wait_for_peers()  # leave together, after rank 0's save
        status = e.exit_status
    finally:
        preemption.uninstall()
        release_lock()  # the lock of --output_dir (util.run_dir)
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()
    if status:  # outside the except clause: its traceback (and the DataLoaders) are freed first
        sys.exit(status)
