"""Training and evaluation loops of MAE finetuning and linear probing.

- train_one_epoch: per-iteration lr, mixup/cutmix, gradient accumulation and clipping. As in
  pretraining the losses stay on the device: misc.TrainingLog syncs them (one all-reduce and
  one device-to-host copy for the buffer) only at the log points, before a mid-epoch checkpoint
  and at the end of the epoch; a non-finite loss found there stops the run before anything is
  saved.
- evaluate: top-1 / top-5 accuracy and cross-entropy, weighted by batch size and summed over
  the processes.
"""
import torch
from timm.utils import accuracy

import util.checkpoint as ckpt
import util.lr_sched as lr_sched
import util.misc as misc
from util.dist import grad_sync, unwrap_model
from util.precision import autocast


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def set_train_mode(model, frozen_backbone=False):
    """model.train(); with frozen_backbone (linear probe) everything but model.head goes back to
    eval mode, so the frozen encoder computes deterministic features (no dropout / drop path)
    while the head's BatchNorm uses and updates batch statistics. The original calls
    model.train(True) on the whole model; its linear-probe encoder has no dropout, drop path or
    BatchNorm, so the two agree there."""
    model.train(True)
    if frozen_backbone:
        bare = unwrap_model(model)
        bare.eval()
        bare.head.train(True)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, log_writer, args,
                    start_iter=0, max_accuracy=0.0, max_norm=None, mixup_fn=None, frozen_backbone=False):
    """Train a classifier (possibly DDP / torch.compile wrapped) for one epoch.

    data_loader yields (samples (N, C, H, W), targets (N,)). start_iter: the iterations of this
    epoch done before a mid-epoch resume (data_loader then yields only the remaining ones).
    mixup_fn (timm Mixup) turns the targets into soft (N, num_classes) ones; criterion must fit.
    max_norm: gradient clipping (--clip_grad). frozen_backbone: linear probe, see set_train_mode.
    Uses args.accum_iter, args.precision, args.log_freq, args.save_every_iters and the lr schedule's
    flags (util.lr_sched.set_lr: MAE's, or SimMIM's when args.lr_schedule is set).
    max_accuracy: the best test top-1 so far, which the mid-epoch checkpoints hold.
    Returns the epoch's averages over iterations and processes:
    {'loss': ..., 'lr': ...}. After a SIGTERM / SIGUSR1 (util.preemption) it saves
    checkpoint-last.pth at the next optimizer step and raises preemption.Preempted.
    """
    set_train_mode(model, frozen_backbone)
    log = misc.TrainingLog(epoch, start_iter, start_iter + len(data_loader), args, log_writer, loss_name="loss")
    optimizer.zero_grad()
    for data_iter_step, (samples, targets) in log.iterate(data_loader):
        samples = samples.to(device, non_blocking=True)  # (N, C, H, W)
        targets = targets.to(device, non_blocking=True)  # (N,)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)  # targets: (N, num_classes) soft labels

        # we use a per iteration (instead of per epoch) lr scheduler, set at each accumulation cycle's start
        if data_iter_step % args.accum_iter == 0 or data_iter_step == start_iter:
            lr = lr_sched.set_lr(optimizer, epoch, data_iter_step, log.iters_per_epoch, args)  # MAE's or SimMIM's
        update_grad = (data_iter_step + 1) % args.accum_iter == 0
        with grad_sync(model, update_grad):
            with autocast(device, args.precision):
                outputs = model(samples)  # (N, num_classes)
                loss = criterion(outputs, targets)
            grad_norm = loss_scaler(loss / args.accum_iter, optimizer, clip_grad=max_norm,
                                    parameters=model.parameters(), update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad()

        log.record(data_iter_step, lr, loss, grad_norm)  # syncs at log points
        # checkpoint-last.pth every --save_every_iters; on a SIGTERM / SIGUSR1 it saves, then stops the run
        ckpt.checkpoint_step(args, log, epoch, data_iter_step + 1, update_grad, unwrap_model(model), optimizer,
                             loss_scaler, extra={"max_accuracy": max_accuracy})

    return log.finish()


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(data_loader, model, device, args):
    """Cross-entropy and top-1 / top-5 accuracy (%) of `model` over data_loader.

    Each batch counts with its size, and the sums are all-reduced over the processes, so the
    result is the mean over all the images seen (with --dist_eval, DistributedSampler pads the
    last shard by repeating a few images, as in the original). Top-5 becomes top-k with
    k = number of classes when there are fewer than 5. Prints the accuracies and returns
    {'loss', 'acc1', 'acc5'}.
    (The original averaged the loss per batch, unweighted; the accuracies were weighted.)
    """
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = misc.MetricLogger(delimiter="  ")
    header = "Test:"

    model.eval()
    for images, target in metric_logger.log_every(data_loader, args.log_freq, header):
        images = images.to(device, non_blocking=True)  # (N, C, H, W)
        target = target.to(device, non_blocking=True)  # (N,)
        with autocast(device, args.precision):
            output = model(images)  # (N, num_classes)
            loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        batch_size = images.shape[0]
        metric_logger.meters["loss"].update(loss.detach(), n=batch_size)
        metric_logger.meters["acc1"].update(acc1, n=batch_size)
        metric_logger.meters["acc5"].update(acc5, n=batch_size)

    metric_logger.synchronize_between_processes()
    print("* Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss {losses.global_avg:.3f}"
          .format(top1=metric_logger.acc1, top5=metric_logger.acc5, losses=metric_logger.loss))
    print(f"Accuracy of the network on the {len(data_loader.dataset)} test images: "
          f"{metric_logger.acc1.global_avg:.1f}%")
    return metric_logger.averages()
