"""util/lr_sched.adjust_learning_rate against values worked out by hand."""
import math

import pytest
import torch

from util.lr_sched import adjust_learning_rate


def make_optimizer():
    p1, p2, p3 = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    return torch.optim.SGD([{"params": [p1]},
                            {"params": [p2], "lr_scale": 0.5},
                            {"params": [p3], "lr_scale": 0.25}], lr=123.0)


@pytest.fixture(scope="module")
def args(make_args):
    """lr 0.1 (resolved), min_lr 0.001, 5 warmup epochs of 25."""
    return make_args("pretrain", "--min_lr", 0.001, "--warmup_epochs", 5, "--epochs", 25, lr=0.1)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),                      # warmup start
    (2.5, 0.05),                     # warmup middle
    (1.0 + 3 / 10, 0.1 * 1.3 / 5),   # fractional epoch: iter 3 of 10 in epoch 1
    (5.0, 0.1),                      # warmup end = cosine start
    (10.0, 0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    (15.0, 0.001 + 0.099 * 0.5),     # cosine middle
    (25.0, 0.001),                   # end of schedule = min_lr
])
def test_schedule_values(epoch, expected, args):
    opt = make_optimizer()
    lr = adjust_learning_rate(opt, epoch, args)
    assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected, expected * 0.5, expected * 0.25],
                                                                rel=1e-12, abs=1e-15)


def test_warmup_rises_and_cosine_falls(args):
    opt = make_optimizer()
    lrs = [adjust_learning_rate(opt, e / 10, args) for e in range(0, 250)]
    warm, cos = lrs[:51], lrs[50:]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a > b for a, b in zip(cos, cos[1:]))
    assert min(lrs) >= 0.0 and max(lrs) == pytest.approx(0.1)


def test_no_warmup_starts_at_lr(make_args):
    args = make_args("pretrain", "--min_lr", 0.0, "--warmup_epochs", 0, "--epochs", 10, lr=2.0)
    opt = make_optimizer()
    assert adjust_learning_rate(opt, 0.0, args) == pytest.approx(2.0)
    assert opt.param_groups[1]["lr"] == pytest.approx(1.0)
