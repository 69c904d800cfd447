"""Training and evaluation loops of MAE finetuning and linear probing, and the --finetune loader.

- load_pretrained_encoder: put a pretraining checkpoint's encoder into a models_vit classifier
  (both scripts use it).
- train_one_epoch: per-iteration lr, mixup/cutmix, gradient accumulation and clipping. As in
  pretraining the losses stay on the device: they are synced by misc.sync_losses (one
  all-reduce and one device-to-host copy for the buffer) only at the log points, before a mid-epoch checkpoint and
  at the end of the epoch; a non-finite loss found there stops the run before anything is saved.
- evaluate: top-1 / top-5 accuracy and cross-entropy, weighted by batch size and summed over
  the processes.
"""
import torch
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
from util.pos_embed import interpolate_patch_embed, interpolate_pos_embed

# Keys of a pretraining checkpoint that a classifier does not use: the decoder and the mask
# token of MaskedAutoencoderViT, `norm` when the classifier pools globally (it has `fc_norm`
# instead), `fc_norm` when it uses the cls token, and a head of another shape or layout.
UNUSED_CHECKPOINT_KEYS = ("decoder*", "mask_token", "norm.*", "fc_norm.*", "head.*")


# ---------------------------------------------------------------------------------------------
# --finetune: load a pretrained encoder
# ---------------------------------------------------------------------------------------------

def _state_dict_of(checkpoint, path):
    """checkpoint['model'] (this repo's and the original's files), or the checkpoint itself when
    it is a bare state_dict."""
    if "model" in checkpoint:
        return checkpoint["model"]
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise KeyError(f"--finetune {path}: no 'model' entry and not a state_dict (keys: {sorted(checkpoint)})")


def load_pretrained_encoder(model, path, args=None):
    """Load the encoder weights of the checkpoint at `path` into `model` (a models_vit classifier).

    As the original: a head whose shape differs from the model's is dropped, the position
    embedding is resized (bicubic) to the model's patch grid, and the weights load with
    strict=False. Stricter than the original, everything is checked BEFORE loading: the only
    keys the model may miss are head.* (plus fc_norm.* for a global-pool model, whose
    pretraining checkpoint has `norm` instead), the only keys it may ignore are those of
    UNUSED_CHECKPOINT_KEYS, and every common key must have the model's shape; otherwise a
    ValueError lists the offending keys (typically a checkpoint of another model size).
    The head is NOT initialised here (the callers draw it: std 2e-5 finetune, 0.01 linprobe).
    Returns torch's load result (missing_keys, unexpected_keys).
    """
    checkpoint = misc.load_checkpoint(path, unsafe=getattr(args, "unsafe_load", False))
    checkpoint_model = dict(_state_dict_of(checkpoint, path))
    print(f"Load pre-trained checkpoint from: {path}")

    model_state = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in checkpoint_model and k in model_state and checkpoint_model[k].shape != model_state[k].shape:
            print(f"Removing key {k} from pretrained checkpoint (shape {tuple(checkpoint_model[k].shape)} "
                  f"vs {tuple(model_state[k].shape)})")
            del checkpoint_model[k]

    interpolate_patch_embed(model, checkpoint_model)  # another patch size
    interpolate_pos_embed(model, checkpoint_model)  # another image size / patch grid

    allowed_missing = ["head.*"]
    if any(k.startswith("fc_norm.") for k in model_state):  # global pool: fc_norm starts fresh
        allowed_missing.append("fc_norm.*")
    try:
        misc.check_state_dict_compat(model, checkpoint_model, allowed_missing=allowed_missing,
                                     allowed_unexpected=UNUSED_CHECKPOINT_KEYS)
    except ValueError as e:
        raise ValueError(f"--finetune {path} does not fit --model {getattr(args, 'model', '')}: {e}") from e

    msg = model.load_state_dict(checkpoint_model, strict=False)
    print(f"Missing keys (trained from scratch): {msg.missing_keys}")
    print(f"Unused checkpoint keys: {msg.unexpected_keys}")
    return msg


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
        bare = misc.unwrap_model(model)
        bare.eval()
        bare.head.train(True)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler,
                    max_norm=None, mixup_fn=None, log_writer=None, args=None, frozen_backbone=False,
                    checkpoint_extra=None):
    """Train a classifier (possibly DDP / torch.compile wrapped) for one epoch.

    data_loader yields (samples (N, C, H, W), targets (N,)). mixup_fn (timm Mixup) turns the
    targets into soft (N, num_classes) ones; criterion must fit. max_norm: gradient clipping
    (--clip_grad). frozen_backbone: linear probe, see set_train_mode. Uses args.accum_iter,
    args.precision, args.log_freq, args.save_every_iters and args.start_iter (iterations of
    this epoch done before a mid-epoch resume; data_loader then yields only the remaining ones).
    checkpoint_extra: entries added to the mid-epoch checkpoints (e.g. {'max_accuracy': ...}).
    Returns the epoch's averages over iterations and processes: {'loss': ..., 'lr': ...}.
    """
    set_train_mode(model, frozen_backbone)
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
    lr = max(group["lr"] for group in optimizer.param_groups)
    optimizer.zero_grad()
    batches = metric_logger.log_every(data_loader, log_freq, header, start_iter=start_iter)
    for data_iter_step, (samples, targets) in enumerate(batches, start=start_iter):
        # we use a per iteration (instead of per epoch) lr scheduler
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)
            lr = max(group["lr"] for group in optimizer.param_groups)  # the head's (lr_scale 1)
        update_grad = (data_iter_step + 1) % accum_iter == 0

        samples = samples.to(device, non_blocking=True)  # (N, C, H, W)
        targets = targets.to(device, non_blocking=True)  # (N,)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)  # targets: (N, num_classes) soft labels

        with misc.grad_sync(model, update_grad):
            with misc.autocast(device, precision):
                outputs = model(samples)  # (N, num_classes)
                loss = criterion(outputs, targets)
            loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                        update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad()

        metric_logger.update(lr=lr)
        pending.append((data_iter_step, lr, loss.detach()))
        done = data_iter_step + 1
        save_now = save_every > 0 and update_grad and done % save_every == 0
        if save_now or misc.is_log_point(data_iter_step, start_iter, iters_per_epoch, log_freq):
            misc.sync_losses(pending, epoch, iters_per_epoch, metric_logger, log_writer, loss_name="loss",
                             accum_iter=accum_iter)  # TensorBoard: at accumulation boundaries
            pending = []
        if save_now:  # after the finiteness check: a checkpoint never holds diverged weights
            misc.save_model(args, epoch, misc.unwrap_model(model), optimizer, loss_scaler,
                            extra=checkpoint_extra, tag="last", step=done)

    if pending:  # a data_loader shorter than its len()
        misc.sync_losses(pending, epoch, iters_per_epoch, metric_logger, log_writer, loss_name="loss",
                         accum_iter=accum_iter)
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items() if meter.count}



# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(data_loader, model, device, args=None):
    """Cross-entropy and top-1 / top-5 accuracy (%) of `model` over data_loader.

    Each batch counts with its size, and the sums are all-reduced over the processes, so the
    result is the mean over all the images seen (with --dist_eval, DistributedSampler pads the
    last shard by repeating a few images, as in the original). Top-5 becomes top-k with
    k = number of classes when there are fewer than 5. Returns {'loss', 'acc1', 'acc5'}.
    (The original averaged the loss per batch, unweighted; the accuracies were weighted.)
    """
    criterion = torch.nn.CrossEntropyLoss()
    precision = getattr(args, "precision", "fp32")
    metric_logger = misc.MetricLogger(delimiter="  ")
    header = "Test:"

    model.eval()
    for images, target in metric_logger.log_every(data_loader, getattr(args, "log_freq", 10), header):
        images = images.to(device, non_blocking=True)  # (N, C, H, W)
        target = target.to(device, non_blocking=True)  # (N,)
        with misc.autocast(device, precision):
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
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
