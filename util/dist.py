"""Distributed set-up: the launcher environments (torchrun, SLURM, OpenMPI), the process group,
rank / world-size helpers, and the DistributedDataParallel wrapping of the model.

Collectives time out after --dist_timeout minutes, so a dead or hung peer makes the others fail
instead of waiting forever. Under torchrun the workers prefix the agent's store with the restart
round, so a restarted group never reads the addresses of the dead round.
"""
import builtins
import datetime
import os
import re
import shutil
import subprocess
from contextlib import nullcontext

import torch
import torch.distributed as dist

_builtin_print = builtins.print


def setup_for_distributed(is_master):
    """Make print() time-stamped and silent on non-master ranks (unless called with force=True)."""

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            _builtin_print(f"[{now}]", *args, **kwargs)

    builtins.print = print


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def comm_device():
    """Device that collectives need: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _slurm_master_addr():
    """First host of SLURM_NODELIST, e.g. 'node[03-05,9]' -> 'node03'."""
    nodelist = os.environ.get("SLURM_NODELIST", os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    prefix, _, ranges = nodelist.split(",")[0].partition("[")
    return prefix + re.split(r"[-,\]]", ranges)[0] if ranges else prefix


def _launcher_env(args):
    """(rank, world_size, local_rank) from torchrun, OpenMPI (--dist_on_itp) or SLURM, or None
    for a plain process."""
    if args.dist_on_itp:  # OpenMPI (the original's ITP clusters)
        rank, world_size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        return rank, world_size, int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", "29500")
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), local_rank
    return None


def _elastic_agent_store(args, timeout):
    """Under torchrun, whose agent serves one TCP store for all restart rounds, a client of that
    store with keys prefixed by the round (TORCHELASTIC_RESTART_COUNT); None elsewhere.

    Without the prefix, init_process_group('env://') of a restarted group can read the gloo / NCCL
    addresses that the previous round's (dead) workers left in the store, and fail or hang.
    """
    if args.dist_url != "env://" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), args.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/mae/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed_mode(args):
    """Join the process group described by torchrun or SLURM, or set up a single process.

    Sets args.rank, args.world_size, args.gpu, args.distributed, args.dist_backend (and falls back
    to args.device = 'cpu' when CUDA is asked for but absent). A launcher with world size 1 runs
    as a plain single process. Collectives time out after args.dist_timeout minutes, so a dead
    peer makes the others fail instead of hanging.
    """
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        print(f"WARNING: --device {args.device} asked for but CUDA is not available; using the CPU")
        args.device = "cpu"
    use_cuda = str(args.device).startswith("cuda")
    env = _launcher_env(args)
    if env is None or env[1] == 1:
        args.rank, args.world_size, args.gpu = 0, 1, env[2] if env else 0
        args.distributed, args.dist_backend = False, None
        if use_cuda:
            torch.cuda.set_device(args.gpu)
        print("Not using distributed mode")
        setup_for_distributed(True)
        return
    args.rank, args.world_size, args.gpu = env
    args.distributed = True
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    print(f"| distributed init (rank {args.rank}/{args.world_size}, backend {args.dist_backend}): "
          f"{args.dist_url}, gpu {args.gpu}", flush=True)
    timeout = datetime.timedelta(minutes=args.dist_timeout)
    store = _elastic_agent_store(args, timeout)
    dist.init_process_group(backend=args.dist_backend, init_method=None if store else args.dist_url,
                            store=store, world_size=args.world_size, rank=args.rank, timeout=timeout)
    if use_cuda:
        dist.barrier(device_ids=[args.gpu])
    else:
        dist.barrier()
    setup_for_distributed(args.rank == 0)


def wrap_model(model, args):
    """DistributedDataParallel when distributed, then torch.compile with --compile.

    Compiling the DDP-wrapped model lets dynamo split graphs at DDP's gradient buckets, so the
    all-reduce overlaps the backward. Keep the bare model (model_without_ddp) for the optimizer
    and the checkpoints.
    """
    if args.distributed:
        device_ids = [args.gpu] if torch.device(args.device).type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        model = torch.compile(model)
    return model


def unwrap_model(model):
    """The bare model inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def grad_sync(model, update_grad):
    """Context for one backward: DDP all-reduces the gradients in every backward, so skip that
    (model.no_sync()) on the accumulation steps of --accum_iter, where update_grad is False."""
    if update_grad or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()
