"""Checkpoints: atomic save, safe load, RNG state, compatibility checks, resume and auto-resume,
the save policy, the non-finite guards that decide whether a checkpoint may be written, and the
--finetune loading of a pretrained encoder into a classifier. The output folder itself (probe,
lock, whose run it holds) is util/run_dir.py's.

Rules followed here:
- checkpoints are written atomically (temp file + fsync + os.replace), by rank 0 only, and hold
  every rank's RNG state so that a resumed run continues like an uninterrupted one;
- weights that hold a NaN or an infinity are never written;
- checkpoints are loaded with torch.load(weights_only=True) unless the user knowingly opts out.
"""
import argparse
import errno
import fnmatch
import math
import os
import pathlib
import pickle
import random
import re
import socket
import sys
import zipfile
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import models_simmim
import models_swin
import models_vit
from util import preemption
from util.dist import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from util.pos_embed import interpolate_patch_embed, interpolate_pos_embed

# ---------------------------------------------------------------------------------------------
# Non-finite guards
# ---------------------------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    """Raised by the training engines when the loss becomes NaN or infinite."""

    def __init__(self, loss, epoch, iteration):
        self.loss, self.epoch, self.iteration = loss, epoch, iteration
        super().__init__(f"Loss is {loss} at epoch {epoch}, iteration {iteration}; stopping training. "
                         "Try --precision bf16 or fp32, a lower --blr, or --clip_grad, and resume from "
                         "the last checkpoint.")

    def __reduce__(self):
        return type(self), (self.loss, self.epoch, self.iteration)


class NonFiniteWeightsError(NonFiniteLossError):
    """Raised by save_model instead of writing weights that hold a NaN or an infinity (an update
    that diverged after the last finite loss, e.g. at the last iteration of an epoch)."""

    def __init__(self, epoch, iteration):
        self.loss, self.epoch, self.iteration = "finite", epoch, iteration
        RuntimeError.__init__(self, f"The weights hold non-finite values after epoch {epoch}, iteration "
                              f"{iteration}; not saving them, stopping training. Try --precision bf16 or "
                              "fp32, a lower --blr, or --clip_grad, and resume from the last checkpoint.")

    def __reduce__(self):
        return type(self), (self.epoch, self.iteration)


def check_finite_weights(model, epoch, iteration):
    """Raise NonFiniteWeightsError when a parameter of model holds a NaN or an infinity (one
    device-to-host sync)."""
    params = [p.detach() for p in model.parameters()]
    if params and not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
        raise NonFiniteWeightsError(epoch, iteration)


# ---------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------


def seed_everything(seed):
    """Seed torch (CPU and all GPUs), numpy's global RNG and python's random (pass seed + rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def get_rng_state():
    """States of torch (CPU, every CUDA device), numpy's global RNG and python's random.

    Holds only tensors and python builtins, so a checkpoint containing it loads with
    weights_only=True.
    """
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what get_rng_state() returned (CUDA states for the devices present)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(_as_tuples(state["python"]))
    if torch.cuda.is_available() and "cuda" in state:
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def _as_tuples(x):
    """random.setstate needs tuples; a state that went through some serialisers has lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------


def _path_globals():
    """(class, pickled name) pairs of the pathlib paths that the original's SLURM launcher
    (submitit) left in args: under the names of Python <= 3.12 ('pathlib.PosixPath') and 3.13
    ('pathlib._local.PosixPath'); the other OS's concrete path (which cannot be instantiated
    here) comes back as its pure flavour."""
    here_posix = os.name != "nt"
    classes = {"PurePath": pathlib.PurePath, "PurePosixPath": pathlib.PurePosixPath,
               "PureWindowsPath": pathlib.PureWindowsPath, "Path": pathlib.Path,
               "PosixPath": pathlib.PosixPath if here_posix else pathlib.PurePosixPath,
               "WindowsPath": pathlib.PureWindowsPath if here_posix else pathlib.WindowsPath}
    return [(cls, f"{module}.{name}") for name, cls in classes.items() for module in ("pathlib", "pathlib._local")]


# Types a checkpoint of this repo or of the original release may hold besides tensors and python
# builtins: the original scripts pickled their argparse.Namespace under 'args', with pathlib
# paths in it when launched by its submitit_*.py (torch rebuilds both without running code).
SAFE_GLOBALS = [argparse.Namespace, *_path_globals()]
_CKPT_NAME = re.compile(r"checkpoint-(\d+|last)\.pth")
_NUMBERED_CKPT = re.compile(r"checkpoint-(\d+)\.pth")
# `.<name>.tmp-<host>-<pid>` of atomic_save, and `.<name>.tmp-<pid>` of earlier versions
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def _fsync_dir(folder):
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hostname():
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())


def _no_space(error):
    """Whether error, or an exception it was raised from (torch.save wraps the OSError of a
    failed write in a RuntimeError), is a full disk or quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def temp_path(path):
    """Where an atomic write of `path` goes first: `.<name>.tmp-<host>-<pid>` in the same folder
    (remove_stale_temp_files recognises it)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.tmp-{_hostname()}-{os.getpid()}")


def atomic_save(obj, path):
    """torch.save `obj` so that `path` always holds either the old file or the complete new one.

    Writes `.<name>.tmp-<host>-<pid>` in the same folder, fsyncs it, renames it onto `path` with
    os.replace (atomic on POSIX and Windows) and fsyncs the folder so the rename survives a crash.
    A temp file left by a killed process is removed at the next start (remove_stale_temp_files).
    A full disk raises OSError(ENOSPC) naming `path`; the previous file stays.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _no_space(e):
            kept = "the previous one is unchanged" if os.path.exists(path) else "nothing was written"
            raise OSError(errno.ENOSPC, f"no space left on the device to write '{path}' ({kept}): free some "
                          "space (e.g. --keep_last) or choose another --output_dir") from e
        raise
    _fsync_dir(folder)


def atomic_write_text(path, text):
    """Write `text` to `path` the way atomic_save writes a checkpoint: a temp file in the same
    folder, fsynced, then renamed onto `path`."""
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pid_alive(pid):
    """Whether process `pid` runs on this host (a process of another user counts as alive)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_stale_temp_files(folder):
    """Remove the temp files of atomic_save in `folder` whose process is gone: a save killed
    midway leaves one (as large as a checkpoint). Only files named by this host are judged; a
    live process's save, or another host's on a shared filesystem, is left alone. Call on rank 0
    before training. Returns the removed paths."""
    removed = []
    names = os.listdir(folder) if os.path.isdir(folder) else []
    for name in sorted(names):
        match = _TEMP_NAME.fullmatch(name)
        if not match or match["host"] not in (None, _hostname()) or pid_alive(int(match["pid"])):
            continue
        path = os.path.join(folder, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        print(f"Removed '{path}': the partial file of a save interrupted in process {match['pid']}, "
              "which is no longer running")
        removed.append(path)
    return removed


def _plain(value):
    """Reduce an args value to python builtins so the checkpoint stays weights_only-loadable."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)  # paths, devices, dtypes, ...


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra=None, tag=None, step=None,
               rng=True):
    """Write {output_dir}/checkpoint-{tag or epoch}.pth atomically on rank 0.

    Every rank must call it: the RNG states of all ranks are gathered into 'rng' (list by rank);
    rng=False leaves them out (with optimizer and loss_scaler None: what evaluation needs).
    step: iterations completed inside `epoch` (None = the epoch is complete).
    Returns the path on rank 0, None on the other ranks. Raises NonFiniteWeightsError, writing
    nothing, when the weights hold a NaN or an infinity.
    """
    check_finite_weights(model_without_ddp, epoch, "end" if step is None else step)
    states = [get_rng_state()] if rng else None
    if rng and is_dist_avail_and_initialized():
        states = [None] * get_world_size()
        dist.all_gather_object(states, get_rng_state())
    if not is_main_process():
        return None
    checkpoint = {
        "model": model_without_ddp.state_dict(),
        "epoch": epoch,
        "step": step,
        "args": argparse.Namespace(**{k: _plain(v) for k, v in vars(args).items()}),
    }
    if rng:
        checkpoint["rng"] = states
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
    if loss_scaler is not None:
        checkpoint["scaler"] = loss_scaler.state_dict()
    checkpoint.update(extra or {})
    path = os.path.join(args.output_dir, f"checkpoint-{tag if tag is not None else epoch}.pth")
    atomic_save(checkpoint, path)
    return path


class CorruptCheckpointError(RuntimeError):
    """load_checkpoint: the file is empty, truncated or corrupt, or not a PyTorch checkpoint."""


class UnsafeCheckpointError(RuntimeError):
    """load_checkpoint: the checkpoint refers to types that the safe loader does not allow."""


def _file_kind(path):
    """'empty', 'zip' (torch.save's format since torch 1.6), 'legacy' (a pickle: the format
    before) or 'other' (not written by torch.save), from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "zip"
    return "legacy" if head.startswith(b"\x80") else "other"


def _data_pkl(path):
    """The name of the pickle inside a zip checkpoint ('<archive>/data.pkl'), or None."""
    with zipfile.ZipFile(path) as archive:
        return next((n for n in archive.namelist() if n.endswith("data.pkl")), None)


def _unsafe_globals_in(path):
    """torch's static scan of a zip checkpoint's pickle: the globals it refers to that the safe
    loader does not allow (with SAFE_GLOBALS allowed)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip, a truncated archive, torch < 2.6 (no such function)
        return []


def _refused_globals(error, path):
    """The globals that made the safe loader refuse `path`: named in torch's message (or the
    exception it chains), else found by torch's static scan of the pickle: torch's wording
    varies ('Unsupported global: GLOBAL x.Y ...', 'unsupported GLOBAL posix.system whose module
    posix is blocked', or no name at all)."""
    for e in (error, error.__cause__, error.__context__):
        match = e is not None and re.search(r"GLOBAL (\S+)", str(e))
        if match:
            return [match.group(1)]
    return _unsafe_globals_in(path)


def _refusal(path, refused, error):
    what = ", ".join(refused) if refused else "an object (" + str(error).strip().splitlines()[-1] + ")"
    return (f"Refused to load checkpoint '{path}': it refers to {what}, which is not on the allow-list of "
            "safe types. Unpickling arbitrary objects can run arbitrary code. If you trust this file, pass "
            "--unsafe_load (load_checkpoint(..., unsafe=True)) to load it with weights_only=False.")


def _damage(path, kind, error):
    """The message of a file that torch.load could not read (`error`) for another reason than an
    unsafe type: not a PyTorch checkpoint, or truncated / corrupt."""
    detail = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    if kind == "zip" and zipfile.is_zipfile(path) and _data_pkl(path) is None:
        return f"'{path}' is not a PyTorch checkpoint: a zip archive without data.pkl ({detail})"
    if kind == "legacy" and "magic number" in str(error):
        return f"'{path}' is not a PyTorch checkpoint: a pickle without torch.save's header ({detail})"
    return (f"checkpoint '{path}' is truncated or corrupt ({detail}): a save or a copy that did not "
            "complete? Use another checkpoint, or copy this one again.")


def load_checkpoint(path, unsafe=False, mmap=False):
    """Load a checkpoint (file path or http(s) URL) onto the CPU, safely by default.

    Uses torch.load(weights_only=True) with SAFE_GLOBALS allowed; unsafe=True (--unsafe_load)
    uses weights_only=False, which can execute code stored in the file. mmap: memory-map a file
    of torch's zip format (a legacy-format file is read normally).
    Raises FileNotFoundError; CorruptCheckpointError for a file that is empty, not a PyTorch
    checkpoint (a JPEG, text), or truncated / corrupt; UnsafeCheckpointError naming the types
    that the safe loader refused. Each message names the file.
    """
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=not unsafe)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(_refusal(path, _refused_globals(e, path), e)) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: '{path}'")
    kind = _file_kind(path)
    if kind == "empty":
        raise CorruptCheckpointError(f"checkpoint '{path}' is empty (0 bytes): a save or a copy that never "
                                     "completed? Use another checkpoint, or copy this one again.")
    if kind == "other":
        raise CorruptCheckpointError(f"'{path}' is not a PyTorch checkpoint (it does not start like a file "
                                     "written by torch.save): is it the file you meant?")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        refused = [] if unsafe else _refused_globals(e, path)
        if refused:
            raise UnsafeCheckpointError(_refusal(path, refused, e)) from e
        raise CorruptCheckpointError(_damage(path, kind, e)) from e
    except (OSError, ImportError, MemoryError):  # permissions, a missing module (unsafe load), ...
        raise
    except Exception as e:  # torch's reader: RuntimeError, EOFError, KeyError, ...
        raise CorruptCheckpointError(_damage(path, kind, e)) from e


def _truncated(items, limit=10):
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def check_state_dict_compat(model, state_dict, allowed_missing=(), allowed_unexpected=()):
    """Raise ValueError listing missing / unexpected keys and shape mismatches, else return None.

    allowed_missing / allowed_unexpected are fnmatch patterns such as 'head.*' or 'decoder*'.
    """
    model_state = model.state_dict()

    def allowed(key, patterns):
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    missing = [k for k in model_state if k not in state_dict and not allowed(k, allowed_missing)]
    unexpected = [k for k in state_dict if k not in model_state and not allowed(k, allowed_unexpected)]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in state_dict.items()
                  if k in model_state and torch.is_tensor(v) and v.shape != model_state[k].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = ["checkpoint does not fit the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_truncated(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_truncated(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines += [f"    {m}" for m in mismatched[:10]]
        if len(mismatched) > 10:
            lines.append(f"    ... and {len(mismatched) - 10} more")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        lines.append("  hint: keys start with 'module.': the state_dict was saved from a DDP wrapper")
    lines.append("  hint: checkpoint of another architecture / patch size / image size?")
    raise ValueError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

class ResumePoint(NamedTuple):
    """Where a run starts: the first epoch to train, the iterations of that epoch already done
    (a mid-epoch checkpoint; the sampler skips their samples) and, for classifiers, the best
    test top-1 before it."""
    epoch: int
    iteration: int = 0
    max_accuracy: float = 0.0


def resume(args, model_without_ddp, optimizer, loss_scaler, eval_only=False):
    """Load the checkpoint to continue from: --resume, or with --auto_resume the most advanced
    checkpoint of this run in --output_dir (see auto_resume). Call on every rank.

    Loads the model and, unless eval_only (--eval: weights only), the optimizer, the scaler and
    the RNG states. Returns the ResumePoint; ResumePoint(args.start_epoch) when there is nothing
    to resume from.
    """
    path = auto_resume(args)
    if not path:
        return ResumePoint(args.start_epoch)
    checkpoint = load_checkpoint(path, unsafe=args.unsafe_load)
    if "model" not in checkpoint:
        raise KeyError(f"checkpoint '{path}' has no 'model' entry (keys: {sorted(checkpoint)})")
    check_state_dict_compat(model_without_ddp, checkpoint["model"])
    model_without_ddp.load_state_dict(checkpoint["model"])
    print(f"Resume checkpoint {path}")
    max_accuracy = checkpoint.get("max_accuracy", 0.0)
    if optimizer is None or "optimizer" not in checkpoint or eval_only:
        if not eval_only and optimizer is not None:  # e.g. checkpoint-best.pth: weights only
            print(f"'{path}' holds no optimizer state: training starts from its weights at epoch {args.start_epoch}")
        return ResumePoint(args.start_epoch, 0, max_accuracy)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if loss_scaler is not None and "scaler" in checkpoint:
        loss_scaler.load_state_dict(checkpoint["scaler"])
    step = checkpoint.get("step")
    start = ResumePoint(checkpoint["epoch"] + 1 if step is None else checkpoint["epoch"], step or 0, max_accuracy)
    _restore_rng(checkpoint.get("rng"))
    print(f"With optim & sched: epoch {checkpoint['epoch']}, step {step}; "
          f"continuing at epoch {start.epoch}, iteration {start.iteration}")
    return start


def _restore_rng(states):
    if not states:
        print("checkpoint holds no RNG state: keeping the current seeding")
    elif len(states) != get_world_size():
        print(f"checkpoint holds RNG states of {len(states)} ranks but the world size is now "
              f"{get_world_size()}: keeping the current seeding (the run will not replay exactly)")
    else:
        set_rng_state(states[get_rank()])


def _progress(checkpoint):
    """(epoch, step) ordering key; a complete epoch counts as after all of its steps."""
    step = checkpoint.get("step")
    return checkpoint["epoch"], math.inf if step is None else step


def _other_run(checkpoint, run):
    """Why a checkpoint is not one of run's (a different --model or script), or None.
    run: the current args; a checkpoint without a saved stage/model (the original's) matches."""
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    for key in ("stage", "model"):
        mine, theirs = getattr(run, key), saved.get(key)
        if theirs is not None and mine != theirs:
            return f"it was written by a {theirs!r} run, not {mine!r} ({key})"
    return None


class UnreadableCheckpointsError(RuntimeError):
    """find_latest_checkpoint: every checkpoint in the folder is unreadable."""


def _rename_aside(path, suffix):
    """Rename path to path + suffix (+ '-1', '-2', ... when taken), never overwriting; returns
    the new path."""
    new, i = path + suffix, 0
    while os.path.exists(new):
        i += 1
        new = f"{path}{suffix}-{i}"
    os.rename(path, new)
    return new


def find_latest_checkpoint(output_dir, unsafe=False, run=None):
    """Path of the checkpoint-<int>.pth / checkpoint-last.pth with the most progress, or None
    (never checkpoint-best.pth). With run (the current args), checkpoints of another script or
    model are skipped with a warning (e.g. pretraining checkpoints in the folder a finetuning run
    writes to). Unreadable checkpoints are skipped with a warning; when there are only
    unreadable ones, UnreadableCheckpointsError lists them (rather than a start from scratch
    over them); else the corrupt ones among them are renamed to <name>.corrupt (kept to inspect,
    never overwritten by the saves that follow). Call on rank 0."""
    if not os.path.isdir(output_dir):
        return None
    best, best_progress, unreadable = None, None, {}
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _TEMP_NAME.fullmatch(name):  # a process still alive, or another host's
            print(f"WARNING: '{path}' is the temp file of a save in progress or interrupted; it is ignored")
        if not _CKPT_NAME.fullmatch(name):
            continue
        try:
            checkpoint = load_checkpoint(path, unsafe=unsafe, mmap=True)
            progress = _progress(checkpoint)
        except Exception as e:  # corrupt / truncated / foreign file
            print(f"WARNING: skipping unreadable checkpoint '{path}': {type(e).__name__}: {e}")
            unreadable[path] = e
            continue
        other = run is not None and _other_run(checkpoint, run)
        if other:
            print(f"WARNING: auto-resume skips '{path}': {other}")
            continue
        if best_progress is None or progress > best_progress:
            best, best_progress = path, progress
    if unreadable and best is None:
        raise UnreadableCheckpointsError(
            f"auto-resume found no readable checkpoint in '{output_dir}', only unreadable ones:\n"
            + "".join(f"  {type(e).__name__}: {e}\n" for e in unreadable.values())
            + "Not starting from scratch over them: pass --resume with a good checkpoint, --unsafe_load for "
            "files you trust, or move them away (or set --output_dir elsewhere) to start from scratch.")
    for path, e in unreadable.items():
        if isinstance(e, CorruptCheckpointError):
            print(f"Renamed the unreadable '{path}' to '{_rename_aside(path, '.corrupt')}'")
    return best


def auto_resume(args):
    """The checkpoint to resume from: --resume when given, else with --auto_resume the latest
    checkpoint of this run (script and model) in --output_dir, else "".

    Call on every rank after init_distributed_mode: rank 0 chooses and broadcasts its choice.
    """
    if not args.auto_resume or args.resume or not args.output_dir:
        return args.resume
    choice = [None]
    if is_main_process():
        try:
            choice[0] = find_latest_checkpoint(args.output_dir, unsafe=args.unsafe_load, run=args)
        except UnreadableCheckpointsError as e:  # every rank stops with it
            choice[0] = e
    if is_dist_avail_and_initialized():
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], UnreadableCheckpointsError):
        raise choice[0]
    if choice[0]:
        print(f"Auto-resume from {choice[0]}")
    return choice[0] or ""


# ---------------------------------------------------------------------------------------------
# Save policy
# ---------------------------------------------------------------------------------------------

def mid_epoch_save_due(args, done, update_grad):
    """Whether the training engines refresh checkpoint-last.pth after `done` iterations of an
    epoch: every --save_every_iters iterations, at an optimizer step (never inside an
    accumulation cycle, so a resume restarts at a cycle boundary)."""
    return args.save_every_iters > 0 and update_grad and done % args.save_every_iters == 0


def checkpoint_step(args, log, epoch, done, update_grad, model_without_ddp, optimizer, loss_scaler, extra=None):
    """The training engines' checkpointing after iteration `done` (1-based) of `epoch`, at an
    optimizer step (update_grad): checkpoint-last.pth every --save_every_iters iterations, and on
    a SIGTERM / SIGUSR1 that all ranks agree on (util.preemption.stop_requested) the same save,
    then preemption.Preempted is raised. The losses buffered in `log` (a misc.TrainingLog) are
    synced first, so a non-finite loss stops the run before diverged weights are saved.
    extra: entries added to the checkpoint (e.g. {'max_accuracy': ...}). All ranks call it."""
    if not update_grad:
        return
    stop = preemption.stop_requested(done, log.iters_per_epoch, args.accum_iter)  # signal number or 0
    if not (stop or mid_epoch_save_due(args, done, update_grad)):
        return
    log.sync()
    path = None
    if args.output_dir:
        path = save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra=extra, tag="last", step=done)
    if stop:
        raise preemption.Preempted(stop, epoch, done, path)


def save_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler, test_acc1=None, max_accuracy=0.0):
    """The end-of-epoch checkpoints: checkpoint-<epoch>.pth every --save_freq epochs (every
    epoch by default for the classifiers, 20 for pretraining, as the original) and at the last
    one, then with --keep_last K the older numbered ones beyond the K newest are deleted;
    checkpoint-last.pth with --save_every_iters (so it is never older than the epoch
    checkpoints). Nothing is written without --output_dir. All ranks call it.

    Classifiers pass this epoch's test top-1 and the best before it: the best so far is printed,
    held by every checkpoint as 'max_accuracy' and returned, and checkpoint-best.pth is written
    when this epoch beats the previous best, with what evaluation and --finetune need (model,
    args, epoch, step None, max_accuracy) and no optimizer, scaler or RNG state.
    """
    improved = test_acc1 is not None and test_acc1 > max_accuracy
    extra = None
    if test_acc1 is not None:
        max_accuracy = max(max_accuracy, test_acc1)
        extra = {"max_accuracy": max_accuracy}
        print(f"Max accuracy: {max_accuracy:.2f}%")
    if not args.output_dir:
        return max_accuracy
    state = dict(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer,
                 loss_scaler=loss_scaler, epoch=epoch, extra=extra)
    if (args.save_freq > 0 and epoch % args.save_freq == 0) or epoch + 1 == args.epochs:
        path = save_model(**state)
        if path and args.keep_last > 0:  # rank 0, after a successful save
            remove_old_checkpoints(args.output_dir, args.keep_last, path)
    if args.save_every_iters > 0:  # keep checkpoint-last.pth current
        save_model(**state, tag="last")
    if improved:
        save_model(args, epoch, model_without_ddp, None, None, extra=extra, tag="best", rng=False)
    return max_accuracy


def remove_old_checkpoints(output_dir, keep, newest):
    """--keep_last: delete the numbered checkpoint-<epoch>.pth of output_dir beyond the `keep`
    of the highest epochs, never `newest` (the path just written); checkpoint-best.pth,
    checkpoint-last.pth and files set aside are never touched. Returns the deleted paths."""
    numbered = sorted(((int(m[1]), name) for name in os.listdir(output_dir)
                       if (m := _NUMBERED_CKPT.fullmatch(name))), reverse=True)
    removed = []
    for _, name in numbered[keep:]:
        path = os.path.join(output_dir, name)
        if os.path.abspath(path) == os.path.abspath(newest):
            continue
        os.remove(path)
        removed.append(path)
    if removed:
        print(f"--keep_last {keep}: deleted {', '.join(os.path.basename(p) for p in removed)}")
    return removed


def set_aside_diverged_checkpoint(output_dir, error):
    """A checkpoint-last.pth saved at the very iteration whose loss was non-finite holds the
    diverged weights: rename it so that auto-resume falls back to the last good checkpoint.
    error: the NonFiniteLossError that stopped the run."""
    if not output_dir:
        return
    path = os.path.join(output_dir, "checkpoint-last.pth")
    if not os.path.isfile(path):
        return
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except Exception:  # unreadable: leave it, auto-resume skips it with a warning
        return
    if (ckpt.get("epoch"), ckpt.get("step")) == (error.epoch, error.iteration):
        os.replace(path, path + ".nonfinite")
        sys.stderr.write(f"{path} was saved after the last finite loss; moved to {path}.nonfinite\n")


# ---------------------------------------------------------------------------------------------
# --finetune: load a pretrained encoder into a classifier
# ---------------------------------------------------------------------------------------------

# Keys of a pretraining checkpoint that a classifier does not use: the decoder and the mask
# token of MaskedAutoencoderViT, `norm` when the classifier pools globally (it has `fc_norm`
# instead), `fc_norm` when it uses the cls token, and a head of another shape or layout.
UNUSED_CHECKPOINT_KEYS = ("decoder*", "mask_token", "norm.*", "fc_norm.*", "head.*")


def _state_dict_of(checkpoint, path):
    """checkpoint['model'] (this repo's and the original's files), or the checkpoint itself when
    it is a bare state_dict."""
    if "model" in checkpoint:
        return checkpoint["model"]
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise KeyError(f"--finetune {path}: no 'model' entry and not a state_dict (keys: {sorted(checkpoint)})")


def load_pretrained_encoder(model, path, unsafe=False):
    """Load the encoder weights of the checkpoint at `path` into `model` (a models_vit classifier).

    As the original: a head whose shape differs from the model's is dropped, the position
    embedding is resized (bicubic) to the model's patch grid, and the weights load with
    strict=False. Stricter than the original, everything is checked BEFORE loading: the only
    keys the model may miss are head.* (plus fc_norm.* for a global-pool model, whose
    pretraining checkpoint has `norm` instead), the only keys it may ignore are those of
    UNUSED_CHECKPOINT_KEYS, and every common key must have the model's shape; otherwise a
    ValueError lists the offending keys (typically a checkpoint of another model size).
    The head is NOT initialised here (the callers draw it: std 2e-5 finetune, 0.01 linprobe).
    Returns torch's load result (missing_keys, unexpected_keys).
    SimMIM's classifiers (models_vit.beit_*, models_swin.swin_*) take SimMIM checkpoints through
    the official conversion instead (_load_simmim_encoder), checked the same way.
    """
    checkpoint = load_checkpoint(path, unsafe=unsafe)
    checkpoint_model = dict(_state_dict_of(checkpoint, path))
    print(f"Load pre-trained checkpoint from: {path}")
    if is_simmim_classifier(model):
        return _load_simmim_encoder(model, checkpoint_model, path)

    model_state = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in checkpoint_model and k in model_state and checkpoint_model[k].shape != model_state[k].shape:
            print(f"Removing key {k} from pretrained checkpoint (shape {tuple(checkpoint_model[k].shape)} "
                  f"vs {tuple(model_state[k].shape)})")
            del checkpoint_model[k]

    interpolate_patch_embed(model, checkpoint_model)  # another patch size
    interpolate_pos_embed(model, checkpoint_model)  # another image size / patch grid

    allowed_missing = ["head.*"]
    if any(k.startswith("fc_norm.") for k in model_state):  # global pool: fc_norm starts fresh
        allowed_missing.append("fc_norm.*")
    return _check_and_load(model, checkpoint_model, checkpoint_model, path, _method_hint(checkpoint_model, False),
                           allowed_missing=allowed_missing, allowed_unexpected=UNUSED_CHECKPOINT_KEYS)


def _check_and_load(model, state, checked, path, hint, **allowed):
    """Load `state` into model with strict=False after check_state_dict_compat(model, checked,
    **allowed) passed (checked: the keys the checkpoint offered, state: those it loads); a misfit
    raises a ValueError naming the checkpoint, the model, the offending keys and `hint`. Prints
    the missing and unused keys; returns torch's load result."""
    try:
        check_state_dict_compat(model, checked, **allowed)
    except ValueError as e:
        raise ValueError(f"--finetune {path} does not fit the {type(model).__name__}: {e}{hint}") from e
    msg = model.load_state_dict(state, strict=False)
    print(f"Missing keys (trained from scratch): {msg.missing_keys}")
    print(f"Unused checkpoint keys: {msg.unexpected_keys}")
    return msg


# A SimMIM pretraining checkpoint's keys (its `encoder.` prefix removed) that its finetune
# classifiers do not take: the mask token, the ViT's final `norm` (mean pooling: fc_norm starts
# fresh, SPEC-simmim section 9), the shared relative position table (copied into every block), the
# buffers the model computes for its own size, and a head of another shape.
SIMMIM_UNUSED_CHECKPOINT_KEYS = ("mask_token", "norm.*", "rel_pos_bias.*", "*relative_position_index",
                                 "*relative_coords_table", "*attn_mask", "head.*")


def is_simmim_classifier(model):
    """True for the classifiers SimMIM's checkpoints finetune: models_vit.BeitClassifier (beit_*)
    and models_swin.SwinTransformer (swin_*)."""
    return isinstance(model, (models_vit.BeitClassifier, models_swin.SwinTransformer))


def _encoder_keys(checkpoint_model):
    """The keys a SimMIM checkpoint offers a classifier: without a DDP `module.` prefix, and only
    the `encoder.*` ones (prefix removed) when it has any (a pretraining checkpoint)."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in checkpoint_model]
    if any(k.startswith("encoder.") for k in keys):
        keys = [k[len("encoder."):] for k in keys if k.startswith("encoder.")]
    return keys


def _method_hint(checkpoint_model, simmim_model):
    """A last line for a refusal when the checkpoint is of the other method's pretraining."""
    keys = _encoder_keys(checkpoint_model)
    if not simmim_model and any(k.startswith(("encoder.", "module.encoder.")) for k in checkpoint_model):
        return ("\n  hint: a SimMIM checkpoint (encoder.* keys): finetune it with --model beit_* (ViT encoder) "
                "or swin_* (Swin encoder)")
    if simmim_model and ("pos_embed" in keys or any(k.startswith("decoder_") for k in keys)):
        return "\n  hint: a MAE checkpoint (pos_embed, decoder_*): finetune it with --model vit_*"
    return ""


def _load_simmim_encoder(model, checkpoint_model, path):
    """load_pretrained_encoder for SimMIM's classifiers (beit_*, swin_*): the checkpoint (this
    project's SimMIM pretraining, or an official {'model': ...} with encoder.* keys, or a finetuned
    one) goes through models_simmim.finetune_state_dict (SPEC-simmim section 9: decoder dropped,
    the ViT's shared relative position table copied into every block, tables resized by the
    geometric cubic rule to the model's window / patch grid; it prints what it discards). Checked
    before loading as MAE's: the model may miss only head.* and fc_norm.*, the checkpoint's keys
    that the model does not take must be SIMMIM_UNUSED_CHECKPOINT_KEYS, and every shape must
    match; otherwise a ValueError lists the offending keys. Loaded with strict=False; the head
    keeps the model's init (official: no re-draw after loading). Returns torch's load result."""
    state = models_simmim.finetune_state_dict(checkpoint_model, model)
    discarded = {k: None for k in _encoder_keys(checkpoint_model) if k not in state}  # what the check sees
    return _check_and_load(model, state, {**discarded, **state}, path, _method_hint(checkpoint_model, True),
                           allowed_missing=("head.*", "fc_norm.*"), allowed_unexpected=SIMMIM_UNUSED_CHECKPOINT_KEYS)
