"""Learning-rate schedule of MAE: linear warmup, then half-cycle cosine decay."""
import math


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
