"""One epoch of MAE pretraining.

The losses stay on the device while training: they are buffered and synced by misc.sync_losses
(one all-reduce and one device-to-host copy for the whole buffer) only at the log points, before a mid-epoch
checkpoint and at the end of the epoch. A non-finite loss is detected there and stops the run
before anything else is saved.
"""
import util.lr_sched as lr_sched
import util.misc as misc


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=None,
                    args=None):
    """Train `model` (a MaskedAutoencoderViT, possibly DDP / torch.compile wrapped) for one epoch.

    data_loader yields (samples (N, C, H, W), labels); labels are ignored. Uses args.accum_iter,
    args.mask_ratio, args.precision, args.log_freq, args.save_every_iters and args.start_iter
    (iterations of this epoch done before a mid-epoch resume; data_loader then yields only the
    remaining ones). Returns the epoch's averages over iterations and processes:
    {'loss': ..., 'lr': ...}.
    """
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    accum_iter = args.accum_iter
    log_freq = getattr(args, "log_freq", 20)
    save_every = getattr(args, "save_every_iters", 0)
    precision = getattr(args, "precision", "fp32")
    start_iter = getattr(args, "start_iter", 0)
    iters_per_epoch = start_iter + len(data_loader)  # the full epoch, also when resuming mid-epoch

    pending = []  # (iteration, lr, loss on the device) not synced yet
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad()
    batches = metric_logger.log_every(data_loader, log_freq, header, start_iter=start_iter)
    for data_iter_step, (samples, _) in enumerate(batches, start=start_iter):
        # we use a per iteration (instead of per epoch) lr scheduler
        if data_iter_step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)
        update_grad = (data_iter_step + 1) % accum_iter == 0

        samples = samples.to(device, non_blocking=True)  # (N, C, H, W)
        with misc.grad_sync(model, update_grad):
            with misc.autocast(device, precision):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss_scaler(loss / accum_iter, optimizer, parameters=model.parameters(),
                        update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad()

        metric_logger.update(lr=lr)
        pending.append((data_iter_step, lr, loss.detach()))
        done = data_iter_step + 1
        save_now = save_every > 0 and update_grad and done % save_every == 0
        if save_now or misc.is_log_point(data_iter_step, start_iter, iters_per_epoch, log_freq):
            misc.sync_losses(pending, epoch, iters_per_epoch, metric_logger, log_writer,
                             loss_name="train_loss")  # TensorBoard: every iteration
            pending = []
        if save_now:  # after the finiteness check: a checkpoint never holds diverged weights
            misc.save_model(args, epoch, misc.unwrap_model(model), optimizer, loss_scaler, tag="last",
                            step=done)

    if pending:  # a data_loader shorter than its len()
        misc.sync_losses(pending, epoch, iters_per_epoch, metric_logger, log_writer, loss_name="train_loss")
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items() if meter.count}
