"""One epoch of masked-image-modelling pretraining (MAE).

The losses stay on the device while training: misc.TrainingLog syncs them (one all-reduce and
one device-to-host copy for the whole buffer) only at the log points, before a mid-epoch
checkpoint and at the end of the epoch. A non-finite loss is detected there and stops the run
before anything else is saved.
"""
import util.checkpoint as ckpt
import util.lr_sched as lr_sched
import util.misc as misc
from util.dist import grad_sync, unwrap_model
from util.precision import autocast


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer, args, start_iter=0):
    """Train `model` (a MaskedAutoencoderViT, possibly DDP / torch.compile wrapped) for one epoch.

    data_loader yields (samples (N, C, H, W), labels); labels are ignored. start_iter: the
    iterations of this epoch done before a mid-epoch resume (data_loader then yields only the
    remaining ones). Uses args.accum_iter, args.mask_ratio, args.precision, args.log_freq and
    args.save_every_iters. Returns the epoch's averages over iterations and processes:
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
            lr = lr_sched.adjust_learning_rate(optimizer, log.progress(data_iter_step), args)
        update_grad = (data_iter_step + 1) % args.accum_iter == 0

        samples = samples.to(device, non_blocking=True)  # (N, C, H, W)
        with grad_sync(model, update_grad):
            with autocast(device, args.precision):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            grad_norm = loss_scaler(loss / args.accum_iter, optimizer, parameters=model.parameters(),
                                    update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad()

        log.record(data_iter_step, lr, loss, grad_norm)  # syncs at log points
        # checkpoint-last.pth every --save_every_iters; on a SIGTERM / SIGUSR1 it saves, then stops the run
        ckpt.checkpoint_step(args, log, epoch, data_iter_step + 1, update_grad, unwrap_model(model), optimizer,
                             loss_scaler)

    return log.finish()
