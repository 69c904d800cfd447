"""Learning-rate schedules: MAE's (linear warmup, then half-cycle cosine decay, by fractional epoch)
and SimMIM's (per iteration: warmup from warmup_lr, then cosine or multistep; SimMIMLRSchedule)."""
import bisect
import math

from util.args import simmim_lrs


def adjust_learning_rate(optimizer, epoch, args):
    """Set the lr of every param group for a fractional `epoch`; return the base lr.

    epoch = epoch_index + iter / iters_per_epoch. The lr rises linearly from 0 to args.lr over
    args.warmup_epochs, then follows a half cosine from args.lr down to args.min_lr at args.epochs.
    A group with an 'lr_scale' (layer-wise lr decay) gets lr * lr_scale.
    """
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    return lr


def set_lr(optimizer, epoch, data_iter_step, iters_per_epoch, args):
    """The one place where the training loops pick their schedule: set every group's lr for
    iteration data_iter_step of `epoch` (iters_per_epoch iterations) and return the base lr.

    MAE's (args.lr_schedule None or absent): adjust_learning_rate at the fractional epoch
    epoch + data_iter_step / iters_per_epoch. SimMIM's (args.lr_schedule 'cosine' or 'multistep'):
    SimMIMLRSchedule with args.lr and --warmup_lr / --min_lr scaled by the effective batch / 512
    (util.args.simmim_lrs), --epochs, --warmup_epochs, --milestones, --gamma, --accum_iter.
    """
    if getattr(args, "lr_schedule", None) is None:
        return adjust_learning_rate(optimizer, epoch + data_iter_step / iters_per_epoch, args)
    lr, warmup_lr, min_lr = simmim_lrs(args)
    schedule = SimMIMLRSchedule(lr, warmup_lr, min_lr, args.epochs, args.warmup_epochs, iters_per_epoch,
                                args.lr_schedule, args.milestones, args.gamma, args.accum_iter)
    return schedule.set_lr(optimizer, epoch, data_iter_step)


# ---------------------------------------------------------------------------------------------
# SimMIM (SPEC-simmim sections 6 and 10): per-iteration warmup from warmup_lr, then cosine or
# multistep, stepped after the optimizer (one update of lag), single layer decay.
# ---------------------------------------------------------------------------------------------

def simmim_lr(t, base_lr, warmup_lr, min_lr, warmup_iters, total_iters, schedule="cosine", milestones=(),
              gamma=0.1):
    """The lr the official SimMIM scheduler sets with step_update(t), t in data iterations (global,
    0-based); the same formulas as timm 0.4's CosineLRScheduler and the repo's MultiStepLRScheduler.

    t < warmup_iters: warmup_lr + t * (base_lr - warmup_lr) / warmup_iters.
    cosine: min_lr + (base_lr - min_lr) * (1 + cos(pi * t / total_iters)) / 2 for t < total_iters,
        min_lr after. t counts from 0 including the warmup, so the cosine is already a little below
        base_lr when the warmup ends.
    multistep: base_lr * gamma ** (number of milestones <= t); milestones in iterations (bisect_right:
        at t = milestone the lr is already multiplied by gamma); min_lr unused.
    """
    if t < warmup_iters:
        return warmup_lr + t * ((base_lr - warmup_lr) / warmup_iters)
    if schedule == "cosine":
        if t >= total_iters:
            return min_lr
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t / total_iters))
    if schedule == "multistep":
        return base_lr * gamma ** bisect.bisect_right(list(milestones), t)
    raise ValueError(f"unknown lr schedule {schedule!r}: expected 'cosine' or 'multistep'")


def simmim_lr_index(epoch, data_iter_step, iters_per_epoch, accum_iter=1):
    """The t whose simmim_lr(t) the optimizer step of (epoch, data_iter_step) runs with.

    The official loop calls step_update(epoch * n + idx) after optimizer.step() (n = iters_per_epoch,
    idx = the data iteration that ended the accumulation cycle), so a step runs with the lr of the
    previous update: iteration t with lr(t - 1) when accum_iter = 1, and the first step with lr(0)
    (the scheduler sets warmup_lr = lr(0) at construction). Micro-batches left over at an epoch's end
    (n not divisible by accum_iter) make no step.
    """
    cycle = data_iter_step // accum_iter  # this step's accumulation cycle within the epoch
    if cycle > 0:
        return epoch * iters_per_epoch + cycle * accum_iter - 1
    last_of_previous_epoch = (epoch - 1) * iters_per_epoch + (iters_per_epoch // accum_iter) * accum_iter - 1
    return max(last_of_previous_epoch, 0)


class SimMIMLRSchedule:
    """SimMIM's lr schedule in iterations, from epoch-based settings (official build_scheduler):
    total = int(epochs * n), warmup = int(warmup_epochs * n), milestones = [m * n] (n = data
    iterations per epoch). Stateless: set_lr(optimizer, epoch, data_iter_step) can be called at any
    iteration (resume is exact).

    Single layer decay (the behaviour of timm 0.4, which the published results were trained with):
    a group with lr_scale s warms up from the unscaled warmup_lr to base_lr * s, and the cosine ends
    at the unscaled min_lr. (timm >= 0.6 would multiply all three by s again: base_lr * s^2.)
    """

    def __init__(self, base_lr, warmup_lr, min_lr, epochs, warmup_epochs, iters_per_epoch, schedule="cosine",
                 milestones=(), gamma=0.1, accum_iter=1):
        if schedule not in ("cosine", "multistep"):
            raise ValueError(f"unknown lr schedule {schedule!r}: expected 'cosine' or 'multistep'")
        self.base_lr, self.warmup_lr, self.min_lr = base_lr, warmup_lr, min_lr
        self.schedule, self.gamma = schedule, gamma
        self.iters_per_epoch, self.accum_iter = iters_per_epoch, accum_iter
        self.total_iters = int(epochs * iters_per_epoch)
        self.warmup_iters = int(warmup_epochs * iters_per_epoch)
        self.milestones = sorted(int(m * iters_per_epoch) for m in milestones)
        if schedule == "multistep" and self.milestones and self.warmup_iters > self.milestones[0]:
            raise ValueError(f"the warmup ({warmup_epochs} epochs) ends after the first milestone "
                             f"({min(milestones)} epochs)")

    def lr_at(self, t, lr_scale=1.0):
        """simmim_lr(t) of a group with lr_scale (single decay: only base_lr is scaled)."""
        return simmim_lr(t, self.base_lr * lr_scale, self.warmup_lr, self.min_lr, self.warmup_iters,
                         self.total_iters, self.schedule, self.milestones, self.gamma)

    def set_lr(self, optimizer, epoch, data_iter_step):
        """Set every group's lr for the optimizer step of (epoch, data_iter_step), with the official
        one-update lag (simmim_lr_index); return the lr of scale 1 (for logging)."""
        t = simmim_lr_index(epoch, data_iter_step, self.iters_per_epoch, self.accum_iter)
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(t, group.get("lr_scale", 1.0))
        return self.lr_at(t)

    def __repr__(self):
        return (f"{type(self).__name__}({self.schedule}, base_lr={self.base_lr}, warmup_lr={self.warmup_lr}, "
                f"min_lr={self.min_lr}, warmup_iters={self.warmup_iters}, total_iters={self.total_iters}, "
                f"milestones={self.milestones}, gamma={self.gamma})")
