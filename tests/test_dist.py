"""util/dist.py: the launcher environments (torchrun, SLURM, OpenMPI), the process group of a
single process and of two gloo processes, rank-0 printing, the DDP / torch.compile wrapping and
the gradient-sync context of gradient accumulation."""
import builtins
import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import LAUNCHER_VARS, REPO, SUBPROCESS_ENV
from util import checkpoint, dist


@pytest.fixture(autouse=True)
def restore_print(monkeypatch):
    """init_distributed_mode replaces builtins.print: undo it."""
    monkeypatch.setattr(builtins, "print", builtins.print)


def test_init_distributed_mode_single_process(monkeypatch, make_args):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    args = make_args("pretrain", "--device", "cuda" if not torch.cuda.is_available() else "cpu")
    assert (args.dist_url, args.dist_timeout, args.local_rank) == ("env://", 30, -1)
    dist.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (False, 0, 1, 0)
    assert args.device == "cpu"  # CUDA asked for but absent: falls back with a warning
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()


def test_slurm_master_addr_without_scontrol(monkeypatch):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)
    for nodelist, host in [("gpu[03-05,9]", "gpu03"), ("node7,node8", "node7"), ("a-b[1,2]", "a-b1")]:
        monkeypatch.setenv("SLURM_NODELIST", nodelist)
        assert dist._slurm_master_addr() == host


def test_launcher_env_from_torchrun_slurm_and_openmpi(monkeypatch, make_args):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    args = make_args("pretrain")
    assert (args.local_rank, args.dist_on_itp) == (-1, False)
    assert dist._launcher_env(args) is None
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)
    monkeypatch.setenv("SLURM_NODELIST", "gpu[12-13]")
    for var, value in (("SLURM_PROCID", "11"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "3")):
        monkeypatch.setenv(var, value)
    assert dist._launcher_env(args) == (11, 16, 3)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu12", "29500")
    for var, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(var, value)
    assert dist._launcher_env(args) == (5, 8, 1)  # torchrun's variables win over SLURM's
    for var, value in (("OMPI_COMM_WORLD_RANK", "6"), ("OMPI_COMM_WORLD_SIZE", "32"),
                       ("OMPI_COMM_WORLD_LOCAL_RANK", "2")):
        monkeypatch.setenv(var, value)
    assert dist._launcher_env(make_args("pretrain", "--dist_on_itp")) == (6, 32, 2)


def test_setup_for_distributed_silences_non_master(capsys):
    dist.setup_for_distributed(False)
    print("hidden")
    print("shown", force=True)
    dist.setup_for_distributed(True)
    print("master")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].endswith("] shown") and out[1].endswith("] master")
    assert out[0].startswith("[20")  # time stamp


def test_unwrap_model_wrap_model_and_grad_sync(make_args):
    model = nn.Linear(2, 2)
    args = make_args("pretrain", "--device", "cpu", distributed=False, gpu=0)
    assert not args.compile
    assert dist.wrap_model(model, args) is model and dist.unwrap_model(model) is model
    compiled = dist.wrap_model(model, make_args("pretrain", "--device", "cpu", "--compile", distributed=False, gpu=0))
    assert compiled is not model and dist.unwrap_model(compiled) is model

    class NoSync(nn.Linear):
        skipped = 0

        @contextlib.contextmanager
        def no_sync(self):
            NoSync.skipped += 1
            yield

    ddp_like = NoSync(2, 2)
    with dist.grad_sync(ddp_like, update_grad=True):
        pass
    assert NoSync.skipped == 0  # the update step all-reduces
    with dist.grad_sync(ddp_like, update_grad=False):
        pass
    assert NoSync.skipped == 1  # accumulation steps skip the all-reduce
    with dist.grad_sync(model, update_grad=False):  # no DDP: nothing to skip
        pass


WORKER = textwrap.dedent("""
    import json, os, sys, torch
    import main_pretrain
    from util import checkpoint, dist, misc
    out = sys.argv[1]
    args = main_pretrain.get_args_parser().parse_args(["--device", "cpu", "--dist_timeout", "1",
                                                       "--output_dir", out])
    dist.init_distributed_mode(args)
    meter = misc.SmoothedValue()
    meter.update(torch.tensor(float(args.rank + 1)), n=args.rank + 1)
    meter.synchronize_between_processes()
    checkpoint.seed_everything(args.rank)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = checkpoint.save_model(args, 3, model, opt, None, step=1, tag="last")
    expected = torch.rand(3).tolist()
    torch.distributed.barrier()
    resume = checkpoint.auto_resume(args)
    start = checkpoint.resume(args, model, opt, None)
    result = dict(rank=args.rank, world=args.world_size, distributed=args.distributed,
                  count=meter.count, total=meter.total, path=path, resume=resume,
                  replay=torch.rand(3).tolist() == expected, start=[start.epoch, start.iteration])
    json.dump(result, open(os.path.join(out, f"rank{args.rank}.json"), "w"))
    torch.distributed.destroy_process_group()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo(tmp_path):
    """init from torchrun-style env on CPU (gloo), meter sync, auto-resume broadcast, RNG gathered per rank."""
    env = dict(SUBPROCESS_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    ckpt_path = str(tmp_path / "checkpoint-last.pth")
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["distributed"]) == (r, 2, True)
        assert (res["count"], res["total"]) == (3, 5.0)  # 1*1 + 2*2 over 1 + 2 samples
        assert res["resume"] == ckpt_path and res["start"] == [3, 1] and res["replay"]
    assert results[0]["path"] == ckpt_path and results[1]["path"] is None
    rng = checkpoint.load_checkpoint(ckpt_path)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
