"""The run's output folder (--output_dir): the writability probe, the lock held while a run is
alive, and whose run the folder holds. A run never writes into a folder that holds files of a run
of another stage or model, nor silently continues a run whose flags were different, and a rerun
of a finished run says so and trains nothing.

The scripts call claim_output_dir(args) once before anything is built (util.misc.init_run, on
every rank: rank 0 decides, the others follow its verdict). Files in the folder:
- `run.json`: {"stage", "model"} of the run the folder belongs to, written when a run claims it;
- `.run.lock`: {"host", "pid", ...} of the live run, removed at exit; refreshed every
  HEARTBEAT_S seconds, so that a run on another host can tell a dead holder's lock;
- `replaced-<date>-<time>/`: the files of a run that --overwrite replaced (moved, never deleted).
"""
import argparse
import atexit
import datetime
import json
import os
import re
import socket
import threading
import time
import uuid

import torch.distributed as dist

from util.args import linear_scaled_lr
from util.checkpoint import (atomic_write_text, find_latest_checkpoint, load_checkpoint, pid_alive,
                             remove_stale_temp_files)
from util.dist import is_dist_avail_and_initialized, is_main_process

RUN_FILE = "run.json"
LOCK_FILE = ".run.lock"
HEARTBEAT_S = 30  # the live run touches its lock this often (from a thread)
# A lock of another host untouched for this long belongs to a dead run. Generous: the thread
# cannot run while torch.save of a large checkpoint holds the GIL.
STALE_S = 300

# Flags that change what a run computes. A rerun that would auto-resume a checkpoint saved with
# other values stops and lists them. Only the flags that both the checkpoint and this script have
# are compared: each script has its own (mask_ratio: pretraining; finetune ... mixup_mode:
# finetuning, some of them linear probing too), and the original's checkpoints hold fewer.
# 'lr' is the absolute lr, after the linear scaling rule when --lr is not given.
RESULT_ARGS = (
    "model", "input_size", "patch_size", "lr", "blr", "min_lr", "weight_decay", "warmup_epochs",
    "batch_size", "accum_iter", "world_size", "data_path", "seed",
    "mask_ratio", "norm_pix_loss", "fast_decode", "mask_patch_size", "warmup_lr", "lr_schedule", "milestones",
    "gamma",
    "finetune", "nb_classes", "global_pool", "drop_path", "clip_grad", "layer_decay", "smoothing",
    "color_jitter", "aa", "reprob", "remode", "recount", "mixup", "cutmix", "cutmix_minmax", "mixup_prob",
    "mixup_switch_prob", "mixup_mode",
)
# What a mid-epoch resume needs unchanged: the samples already seen are iteration x batch_size of
# each process's shard, in cycles of accum_iter iterations.
MID_EPOCH_ARGS = ("batch_size", "world_size", "accum_iter")
# The files a run writes into its folder (what --overwrite moves aside).
_RUN_FILES = re.compile(r"run\.json|log\.txt|args\.txt|model\.txt|checkpoint-.+\.pth.*|events\.out\.tfevents\..+"
                        r"|reconstructions"
                        r"|\..+\.tmp-.+")
_CHECKPOINT = re.compile(r"checkpoint-.+\.pth")


class RunDirError(RuntimeError):
    """The run may not use its --output_dir; the message says why and what to do."""


def check_output_dir(path):
    """Create `path` (with parents) and check it is writable; raise a clear error otherwise."""
    probe = os.path.join(path, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RuntimeError(f"output folder '{path}' is not writable ({type(e).__name__}: {e.strerror or e}); "
                           "choose another --output_dir / --log_dir") from e


# ---------------------------------------------------------------------------------------------
# The verdict: rank 0 decides, every rank follows
# ---------------------------------------------------------------------------------------------

def claim_output_dir(args):
    """Take --output_dir for this run before anything is built; call on every rank.

    Rank 0 takes the lock (a live run there stops this one, a dead one's lock is taken over),
    removes the partial files of saves killed midway (util.checkpoint.remove_stale_temp_files),
    checks that the folder holds no run of another stage or model, and compares the flags of the
    checkpoint the run would continue from with this command's. It raises RunDirError on every
    rank when the run must stop, and SystemExit(0) when that checkpoint already ends the run
    (--epochs reached: nothing is trained or written). With --overwrite, the files of a different
    run are moved into a replaced-<time>/ subfolder instead of stopping.
    """
    if not args.output_dir:
        return
    complete, error = None, None
    if is_main_process():
        try:
            complete = _claim(args)
        except Exception as e:  # noqa: BLE001 -- every rank must learn that rank 0 stops
            error = e
    if is_dist_avail_and_initialized():
        verdict = [complete, None if error is None else str(error)]
        dist.broadcast_object_list(verdict, src=0)
        complete = verdict[0]
        if verdict[1] is not None and error is None:
            raise RunDirError(verdict[1])
    if error is not None or complete:
        release_lock()
    if error is not None:
        raise error
    if complete:
        print(complete)
        raise SystemExit(0)


def _claim(args):
    """Rank 0's part of claim_output_dir: None to go on, or the banner of a complete run."""
    folder = args.output_dir
    acquire_lock(folder, args)
    remove_stale_temp_files(folder)  # under the lock: only dead processes' partial saves
    foreign = _foreign_run(folder, args)
    if foreign and not args.overwrite:
        raise RunDirError(_foreign_run_message(folder, *foreign, args))
    if foreign:
        move_run_aside(folder, f"the {foreign[1]}")
    path = args.resume or (args.auto_resume and find_latest_checkpoint(folder, unsafe=args.unsafe_load, run=args))
    saved = _saved_state(path, args)
    differences = _differences(saved[2], args) if saved else []
    if differences and not args.resume:  # auto-resume: stop, or --overwrite: start afresh
        if not args.overwrite:
            raise RunDirError(_changed_flags_message(folder, path, differences, args))
        move_run_aside(folder, f"the {_describe(args.stage, args.model)} with other flags")
        saved = None
    elif differences:
        print(f"WARNING: --resume {path} was trained with other values of flags that change the results; "
              "continuing with this command's values:\n" + "\n".join(differences))
    if saved:
        epoch, step, saved_args = saved
        _check_mid_epoch(path, epoch, step, saved_args, args)
        if step is None and epoch + 1 >= args.epochs:
            return _complete_banner(folder, path, epoch, args)
        if saved_args.get("epochs") not in (None, args.epochs):
            print(f"--epochs {args.epochs} (the run was started with --epochs {saved_args['epochs']}): the lr "
                  f"schedule is recomputed over the new length: warmup {args.warmup_epochs} epochs, then a "
                  f"half-cycle cosine to --min_lr {args.min_lr} at epoch {args.epochs}")
    _write_run_file(folder, args)
    return None


# ---------------------------------------------------------------------------------------------
# Whose run the folder holds
# ---------------------------------------------------------------------------------------------

def _describe(stage, model):
    return " run of ".join(str(x) for x in (stage, model) if x) or "unknown"


def _foreign_run(folder, args):
    """(file, 'stage run of model') of the first file in `folder` that belongs to a run of another
    stage or model, else None. run.json names the folder's run; checkpoints hold their run's args
    (the original's have no stage: only the model counts); a log.txt without run.json (an older
    run) tells pretraining (train_* only) from classification (test_acc1)."""
    found = []  # (file, stage, model)
    run_file = os.path.join(folder, RUN_FILE)
    if os.path.isfile(run_file):
        with open(run_file) as f:
            owner = json.load(f)
        found.append((run_file, owner.get("stage"), owner.get("model")))
    for name in sorted(os.listdir(folder)):
        if not _CHECKPOINT.fullmatch(name):
            continue
        try:
            saved = vars(load_checkpoint(os.path.join(folder, name), unsafe=args.unsafe_load, mmap=True)["args"])
        except Exception:  # noqa: BLE001 -- unreadable or without args: auto-resume reports it
            continue
        found.append((os.path.join(folder, name), saved.get("stage"), saved.get("model")))
    log = os.path.join(folder, "log.txt")
    if not found and os.path.isfile(log):
        with open(log) as f:
            first = f.readline()
        try:
            classifier = "test_acc1" in json.loads(first)
        except ValueError:
            classifier = None
        if classifier is not None and classifier != (args.stage != "pretrain"):
            return log, "finetune or linprobe" if classifier else "pretrain"
    for path, stage, model in found:
        if (stage is not None and stage != args.stage) or (model is not None and model != args.model):
            return path, _describe(stage, model)
    return None


def _foreign_run_message(folder, path, theirs, args):
    log_dir = " (and --log_dir)" if os.path.abspath(args.log_dir or "") == os.path.abspath(folder) else ""
    return (f"--output_dir {folder} holds another run: {path} belongs to a {theirs}, and this is a "
            f"{_describe(args.stage, args.model)}. Training here would overwrite its checkpoints and append "
            f"to its log.txt. Give this run its own folder, e.g. --output_dir {folder.rstrip('/')}_{args.stage}"
            f"{log_dir}, or pass --overwrite to move that run's files into {folder}/replaced-<time>/ "
            "and start this one there.")


def _write_run_file(folder, args):
    atomic_write_text(os.path.join(folder, RUN_FILE), json.dumps({"stage": args.stage, "model": args.model}))


def move_run_aside(folder, what):
    """Move the files of a run out of `folder` into a new `folder/replaced-<date>-<time>/` (never
    delete them). Returns that subfolder."""
    names = [n for n in sorted(os.listdir(folder)) if _RUN_FILES.fullmatch(n)]
    stamp, n = datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), 0
    while True:
        dest = os.path.join(folder, f"replaced-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.makedirs(dest)
            break
        except FileExistsError:
            n += 1
    for name in names:
        os.replace(os.path.join(folder, name), os.path.join(dest, name))
    print(f"--overwrite: moved the {len(names)} files of {what} ({', '.join(names)}) from {folder} into {dest}")
    return dest


# ---------------------------------------------------------------------------------------------
# The checkpoint the run continues from: changed flags, mid-epoch, complete
# ---------------------------------------------------------------------------------------------

def _saved_state(path, args):
    """(epoch, step, saved args as a dict) of the checkpoint at `path`, or None when there is
    none, it is a URL or it cannot be read (resume() then says why)."""
    if not path or path.startswith(("http://", "https://")) or not os.path.isfile(path):
        return None
    try:
        checkpoint = load_checkpoint(path, unsafe=args.unsafe_load, mmap=True)
        return checkpoint["epoch"], checkpoint.get("step"), vars(checkpoint.get("args") or argparse.Namespace())
    except Exception:  # noqa: BLE001 -- resume() loads it again and reports the problem
        return None


def _differences(saved, args):
    """'  --name: saved X, now Y' for each RESULT_ARGS flag that both have and whose values differ
    (a saved lr of None was derived from the blr, which is compared)."""
    now = dict(vars(args), lr=args.lr if args.lr is not None else linear_scaled_lr(args))
    compared = [name for name in RESULT_ARGS if name in saved and name in now]
    return [f"  --{name}: saved {saved[name]!r}, now {now[name]!r}" for name in compared
            if saved[name] != now[name] and not (name == "lr" and saved[name] is None)]


def _check_mid_epoch(path, epoch, step, saved, args):
    """A checkpoint saved inside an epoch resumes by skipping step x batch_size samples of each
    process's shard: refuse when the batch size, the number of processes or accum_iter changed,
    which would replay or drop samples (even with an explicit --resume)."""
    changed = [f"--{name} {saved[name]} (now {vars(args)[name]})" for name in MID_EPOCH_ARGS
               if name in saved and saved[name] != vars(args)[name]]
    if step is None or not changed:
        return
    raise RunDirError(
        f"{path} was saved in the middle of epoch {epoch}, after iteration {step} of a run with "
        f"{', '.join(changed)}: resuming it with other values would replay or skip samples of that epoch. "
        "Resume it with the saved values to finish the epoch, or --resume an end-of-epoch checkpoint "
        "(checkpoint-<epoch>.pth) to go on with the new ones.")


def _changed_flags_message(folder, path, differences, args):
    return (f"--output_dir {folder} holds a {_describe(args.stage, args.model)} whose flags differ from this "
            f"command's; auto-resume would continue {path} with the new values:\n" + "\n".join(differences) +
            f"\nUse another --output_dir for a new run, --resume {path} to continue that run with the new values "
            f"on purpose, or --overwrite to move its files into {folder}/replaced-<time>/ and start afresh.")


def _complete_banner(folder, path, epoch, args):
    rule = "=" * 100
    return (f"{rule}\nRun already complete: {path} holds epoch {epoch}, and --epochs {args.epochs} ends at "
            f"epoch {args.epochs - 1}. Nothing to train; {folder} is left as it was.\nTo train longer, raise "
            f"--epochs (the lr schedule is then recomputed over the new length).\n{rule}")


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

_held = {}  # lock path -> (token, heartbeat stop event) of the locks this process holds


def acquire_lock(folder, args):
    """Create folder/.run.lock naming this process (O_EXCL), or raise RunDirError naming the live
    run that holds it. A lock whose process is gone (same host: the pid no longer runs; another
    host: not refreshed for STALE_S seconds) is taken over, with a line saying so."""
    path = os.path.join(folder, LOCK_FILE)
    release_lock(path)  # a run earlier in this process that did not release it
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "stage": args.stage,
            "model": args.model, "started": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(3):
        if _create(path, mine):
            stop = threading.Event()
            threading.Thread(target=_heartbeat, args=(path, stop), daemon=True).start()
            _held[path] = (mine["token"], stop)
            return path
        holder = _read(path)
        if holder is None:  # released meanwhile
            continue
        stale = _stale(path, holder)
        if stale is None:
            raise RunDirError(
                f"--output_dir {folder} is in use by another live run: a "
                f"{_describe(holder.get('stage'), holder.get('model'))}, pid {holder.get('pid')} on host "
                f"{holder.get('host')}, started {holder.get('started')} (lock file {path}). Wait for it to end "
                f"or use another --output_dir; if no such run is alive, delete {path}.")
        if holder.get("pid") != os.getpid() or holder.get("host") != socket.gethostname():
            print(f"Taking over the lock {path} of pid {holder.get('pid')} on host {holder.get('host')}: {stale}")
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    raise RunDirError(f"could not take the lock {path}: other runs keep taking it")


def _create(path, content):
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path):
    """The lock's content; {} when it stays unreadable (its writer died midway), None when gone."""
    for _ in range(20):
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:  # being written: retry
            time.sleep(0.05)
    return {}


def _stale(path, holder):
    """Why the lock's holder is gone, or None while it runs."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return _heartbeat_stopped(path)
    if pid == os.getpid():
        return "this process"
    return None if pid_alive(pid) else f"process {pid} is no longer running"


def _heartbeat_stopped(path):
    """Watch a lock of another host: None as soon as it is refreshed (its run lives), the reason
    once it is STALE_S seconds old (by the filesystem's clock, which both hosts share)."""
    first, warned = None, False
    while True:
        try:
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            return "it was released"
        age = _fs_now(os.path.dirname(path)) - mtime
        if first is not None and mtime != first:
            return None
        if age > STALE_S:
            return f"not refreshed for {age:.0f} s (a live run refreshes it every {HEARTBEAT_S} s)"
        if not warned:
            print(f"{path} is held by a run on another host; waiting up to {STALE_S - age:.0f} s for a sign "
                  "of life")
            warned = True
        first = mtime
        time.sleep(1)


def _fs_now(folder):
    """The current time by the clock of the filesystem that holds `folder`."""
    probe = os.path.join(folder, f".clock-probe-{socket.gethostname()}-{os.getpid()}")
    with open(probe, "w"):
        pass
    try:
        return os.stat(probe).st_mtime
    finally:
        os.remove(probe)


def _heartbeat(path, stop):
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            return


def release_lock(path=None):
    """Remove the lock at `path` (default: every lock this process holds) if it is still ours."""
    for held in [path] if path else list(_held):
        token, stop = _held.pop(held, (None, None))
        if token is None:
            continue
        stop.set()
        holder = _read(held)
        if holder and holder.get("token") == token and holder.get("pid") == os.getpid():
            os.remove(held)


atexit.register(release_lock)
