"""One epoch of masked-image-modelling pretraining, MAE or SimMIM: one loop for both. The model's
second input is what masks the images: MAE's --mask_ratio (the model draws its mask) or SimMIM's
mask, drawn per sample in the data pipeline (batches of ((images, masks), labels)).

The losses stay on the device while training: misc.TrainingLog syncs them (one all-reduce and
one device-to-host copy for the whole buffer) only at the log points, before a mid-epoch
checkpoint and at the end of the epoch. A non-finite loss is detected there and stops the run
before anything else is saved.
"""
import torch

import util.checkpoint as ckpt
import util.lr_sched as lr_sched
import util.misc as misc
from util.dist import grad_sync, unwrap_model
from util.precision import autocast


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer, args, start_iter=0):
    """Train `model` (a MaskedAutoencoderViT or a SimMIM, possibly DDP / torch.compile wrapped) for
    one epoch.

    data_loader yields (samples, labels); labels are ignored. samples: images (N, C, H, W) for MAE,
    or (images, masks (N, H/p, W/p)) for SimMIM. start_iter: the iterations of this epoch done
    before a mid-epoch resume (data_loader then yields only the remaining ones). Uses
    args.accum_iter, args.mask_ratio, args.clip_grad (None or 0: no clipping), args.precision,
    args.log_freq, args.save_every_iters and the lr schedule's flags (util.lr_sched.set_lr).
    Returns the epoch's averages over iterations and processes:
    {'loss': ..., 'lr': ...}. After a SIGTERM / SIGUSR1 (util.preemption) it saves
    checkpoint-last.pth at the next optimizer step and raises preemption.Preempted.
    """
    model.train(True)
    log = misc.TrainingLog(epoch, start_iter, start_iter + len(data_loader), args, log_writer,
                           loss_name="train_loss")
    optimizer.zero_grad()
    for data_iter_step, (samples, _) in log.iterate(data_loader):
        # we use a per iteration (instead of per epoch) lr scheduler, set at each accumulation cycle's start
        if data_iter_step % args.accum_iter == 0 or data_iter_step == start_iter:
            lr = lr_sched.set_lr(optimizer, epoch, data_iter_step, log.iters_per_epoch, args)
        update_grad = (data_iter_step + 1) % args.accum_iter == 0

        # MAE: images and its mask ratio; SimMIM: images and their masks from the data pipeline
        images, masking = samples if isinstance(samples, (tuple, list)) else (samples, args.mask_ratio)
        images = images.to(device, non_blocking=True)  # (N, C, H, W)
        if isinstance(masking, torch.Tensor):
            masking = masking.to(device, non_blocking=True)  # (N, H/p, W/p), 1 = masked
        with grad_sync(model, update_grad):
            with autocast(device, args.precision):
                loss, _, _ = model(images, masking)
            grad_norm = loss_scaler(loss / args.accum_iter, optimizer, clip_grad=args.clip_grad or None,
                                    parameters=model.parameters(), update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad()

        log.record(data_iter_step, lr, loss, grad_norm)  # syncs at log points
        # checkpoint-last.pth every --save_every_iters; on a SIGTERM / SIGUSR1 it saves, then stops the run
        ckpt.checkpoint_step(args, log, epoch, data_iter_step + 1, update_grad, unwrap_model(model), optimizer,
                             loss_scaler)

    return log.finish()
