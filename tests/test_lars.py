"""LARS (util/lars.py) against values worked out by hand."""
import io
import math

import torch

from util.lars import LARS


def param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def close(t, expected):
    torch.testing.assert_close(t.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def step_with(opt, grads):
    for p, g in grads.items():
        p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
    opt.step()


# A 2x2 weight W = [[3, 0], [0, 4]] (||W|| = 5) with gradient G = [[0, 12], [0, 0]], and a bias
# b = [1, -2] with gradient [0.5, 0.25]; weight_decay 1, trust 0.13, lr 0.5, momentum 0.9.
W0, G = [[3.0, 0.0], [0.0, 4.0]], [[0.0, 12.0], [0.0, 0.0]]
B0, GB = [1.0, -2.0], [0.5, 0.25]
LR, WD, TRUST, MOM = 0.5, 1.0, 0.13, 0.9


def make_lars():
    w, b = param(W0), param(B0)
    opt = LARS([w, b], lr=LR, weight_decay=WD, momentum=MOM, trust_coefficient=TRUST)
    return w, b, opt


def test_weight_two_steps_by_hand():
    w, b, opt = make_lars()

    # step 1: dp = G + 1 * W = [[3, 12], [0, 4]], ||dp|| = sqrt(9 + 144 + 16) = 13
    # q = 0.13 * 5 / 13 = 0.05; mu = q * dp = [[0.15, 0.6], [0, 0.2]]; W -= 0.5 * mu
    step_with(opt, {w: G, b: GB})
    close(opt.state[w]["mu"], [[0.15, 0.6], [0.0, 0.2]])
    close(w, [[2.925, -0.3], [0.0, 3.9]])

    # step 2: W1 = [[2.925, -0.3], [0, 3.9]]; dp = G + W1 = [[2.925, 11.7], [0, 3.9]]
    norm_w1 = math.sqrt(2.925 ** 2 + 0.3 ** 2 + 3.9 ** 2)
    norm_dp = math.sqrt(2.925 ** 2 + 11.7 ** 2 + 3.9 ** 2)
    q = 0.13 * norm_w1 / norm_dp
    mu2 = [[0.9 * 0.15 + q * 2.925, 0.9 * 0.6 + q * 11.7], [0.0, 0.9 * 0.2 + q * 3.9]]
    step_with(opt, {w: G, b: GB})
    close(opt.state[w]["mu"], mu2)
    close(w, [[2.925 - 0.5 * mu2[0][0], -0.3 - 0.5 * mu2[0][1]],
              [0.0, 3.9 - 0.5 * mu2[1][1]]])


def test_bias_gets_no_trust_scaling_and_no_weight_decay():
    w, b, opt = make_lars()
    # 1-D: dp = grad exactly. step 1: mu = [0.5, 0.25]; b = [1 - 0.25, -2 - 0.125]
    step_with(opt, {w: G, b: GB})
    close(opt.state[b]["mu"], [0.5, 0.25])
    close(b, [0.75, -2.125])
    # step 2: mu = 0.9 * [0.5, 0.25] + [0.5, 0.25] = [0.95, 0.475]; b -= 0.5 * mu
    step_with(opt, {w: G, b: GB})
    close(opt.state[b]["mu"], [0.95, 0.475])
    close(b, [0.275, -2.3625])


def test_zero_weight_uses_trust_one():
    w = param([[0.0, 0.0], [0.0, 0.0]])
    opt = LARS([w], lr=0.5, weight_decay=1.0, momentum=0.9, trust_coefficient=0.13)
    # ||W|| = 0 -> q = 1: dp = G + 0 = [[1, 2], [3, 4]] unscaled; W = -0.5 * dp
    step_with(opt, {w: [[1.0, 2.0], [3.0, 4.0]]})
    close(opt.state[w]["mu"], [[1.0, 2.0], [3.0, 4.0]])
    close(w, [[-0.5, -1.0], [-1.5, -2.0]])


def test_zero_gradient_uses_trust_one_and_keeps_momentum():
    w = param([[3.0, 0.0], [0.0, 4.0]])
    opt = LARS([w], lr=0.5, weight_decay=0.0, momentum=0.9, trust_coefficient=0.1)
    # step 1: dp = [[0, 5], [0, 0]], q = 0.1 * 5 / 5 = 0.1 -> mu = [[0, 0.5], [0, 0]]
    step_with(opt, {w: [[0.0, 5.0], [0.0, 0.0]]})
    close(w, [[3.0, -0.25], [0.0, 4.0]])
    # step 2: zero gradient, ||dp|| = 0 -> q = 1 (no 0/0 NaN); mu = 0.9 * mu = [[0, 0.45], [0, 0]]
    step_with(opt, {w: [[0.0, 0.0], [0.0, 0.0]]})
    assert torch.isfinite(w).all()
    close(opt.state[w]["mu"], [[0.0, 0.45], [0.0, 0.0]])
    close(w, [[3.0, -0.25 - 0.225], [0.0, 4.0]])


def test_first_zero_gradient_step_leaves_weight_unchanged():
    w = param([[3.0, 0.0], [0.0, 4.0]])
    opt = LARS([w], lr=0.5, weight_decay=0.0, momentum=0.9, trust_coefficient=0.1)
    step_with(opt, {w: [[0.0, 0.0], [0.0, 0.0]]})
    close(opt.state[w]["mu"], [[0.0, 0.0], [0.0, 0.0]])
    close(w, [[3.0, 0.0], [0.0, 4.0]])


def test_param_without_grad_is_untouched():
    w, b, opt = make_lars()
    step_with(opt, {w: G, b: None})
    close(b, B0)
    assert b not in opt.state
    close(w, [[2.925, -0.3], [0.0, 3.9]])


def test_momentum_buffer_round_trips_through_state_dict():
    w, b, opt = make_lars()
    step_with(opt, {w: G, b: GB})
    sd = opt.state_dict()
    close(sd["state"][0]["mu"], [[0.15, 0.6], [0.0, 0.2]])
    close(sd["state"][1]["mu"], [0.5, 0.25])
    assert sd["param_groups"][0]["trust_coefficient"] == TRUST

    # a fresh optimizer resumed from the state dict continues exactly like the original one
    w2, b2 = param(w.tolist()), param(b.tolist())
    opt2 = LARS([w2, b2], lr=0.0)
    buffer = io.BytesIO()  # as a checkpoint does (state_dict() holds live references)
    torch.save(sd, buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    assert opt2.param_groups[0]["lr"] == LR and opt2.param_groups[0]["momentum"] == MOM
    step_with(opt, {w: G, b: GB})
    step_with(opt2, {w2: G, b2: GB})
    torch.testing.assert_close(w2, w, rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)
    close(b2, [0.275, -2.3625])


def test_param_groups_with_lr_scale_and_scheduled_lr():
    w, b = param(W0), param(B0)
    groups = [{"params": [w], "lr_scale": 0.5}, {"params": [b], "lr_scale": 1.0, "weight_decay": 0.0}]
    opt = LARS(groups, lr=0, weight_decay=WD, momentum=MOM, trust_coefficient=TRUST)
    for g in opt.param_groups:  # what util.lr_sched does every iteration
        g["lr"] = 1.0 * g["lr_scale"]
    step_with(opt, {w: G, b: GB})
    # W gets lr 0.5 (the same update as above), b gets lr 1: b = [1 - 0.5, -2 - 0.25]
    close(w, [[2.925, -0.3], [0.0, 3.9]])
    close(b, [0.5, -2.25])


def test_float32_linear_probe_step_runs_and_closure_returns_loss():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False, eps=1e-6), torch.nn.Linear(8, 3))
    opt = LARS(head.parameters(), lr=0.1, weight_decay=0.0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        return loss

    w0 = head[1].weight.detach().clone()
    loss = opt.step(closure)
    assert loss.ndim == 0 and torch.isfinite(loss)
    g = head[1].weight.grad
    # weight moved by lr * trust * ||W|| * G / ||G|| (first step, zero wd)
    expected = w0 - 0.1 * 0.001 * w0.norm() * g / g.norm()
    torch.testing.assert_close(head[1].weight.detach(), expected)
    assert head[1].weight.dtype == torch.float32
