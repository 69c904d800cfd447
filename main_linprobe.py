"""MAE linear probing (He et al., arXiv 2111.06377, Sec. A.3): a linear classifier on frozen features.

The head is BatchNorm1d(D, affine=False) + Linear (the BatchNorm, without affine parameters,
only normalises the features and is the same as a linear layer at inference); everything else is
frozen and trained with LARS. ViT-B from the released pretrained encoder on 4 nodes x 8 GPUs
(effective batch 16384):
    torchrun --nproc_per_node=8 --nnodes=4 ... main_linprobe.py --batch_size 512 \
        --model vit_base_patch16 --cls_token --finetune mae_pretrain_vit_base.pth --epochs 90 \
        --blr 0.1 --weight_decay 0.0 --dist_eval --data_path /path/to/imagenet

Writes to --output_dir: checkpoint-<epoch>.pth (every --save_freq epochs and the last),
checkpoint-best.pth (when the test top-1 improves), log.txt (one JSON line per epoch with the
train_* and test_* metrics); TensorBoard events to --log_dir.
"""
import argparse
import datetime
import time

import torch
from timm.layers import trunc_normal_

import models_vit
import util.misc as misc
from engine_finetune import evaluate, load_pretrained_encoder, train_one_epoch
from util.args import add_common_args, resolve_lr
from util.datasets import (build_dataset, build_linprobe_transform, build_train_loader, build_val_loader,
                           check_num_classes)
from util.lars import LARS


def get_args_parser():
    parser = argparse.ArgumentParser("MAE linear probing for image classification", add_help=True)
    add_common_args(parser)
    parser.add_argument("--patch_size", default=None, type=int, help="override the model's patch size")
    parser.add_argument("--finetune", default="", help="initialise from this pretraining checkpoint")
    parser.add_argument("--global_pool", action="store_true")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="use the class token instead of global pooling for classification")
    parser.add_argument("--nb_classes", default=1000, type=int, help="number of classification types")
    parser.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint)")
    parser.add_argument("--dist_eval", action="store_true", default=False,
                        help="distributed evaluation (faster; a few images may count twice)")
    # the original main_linprobe.py's defaults (per GPU)
    parser.set_defaults(stage="linprobe")  # saved in checkpoints: auto-resume takes only its own
    parser.set_defaults(model="vit_large_patch16", batch_size=512, epochs=90, warmup_epochs=10, blr=0.1,
                        weight_decay=0.0, min_lr=0.0, global_pool=False)
    return parser


def build_model(args):
    """models_vit.<args.model>(num_classes, global_pool, img_size=input_size, [patch_size])."""
    return misc.model_from_name(models_vit, args.model, "vit_", num_classes=args.nb_classes,
                                global_pool=args.global_pool, img_size=args.input_size,
                                patch_size=getattr(args, "patch_size", None))


def add_linear_probe_head(model):
    """In place: model.head -> Sequential(BatchNorm1d(D, affine=False, eps=1e-6), head), and every
    parameter outside model.head frozen. Returns model."""
    model.head = torch.nn.Sequential(
        torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def init_from_pretrained(model, args):
    """--finetune: the encoder of a pretraining checkpoint, then head.weight ~ trunc_normal(std 0.01)."""
    load_pretrained_encoder(model, args.finetune, args)
    trunc_normal_(model.head.weight, std=0.01)  # manually initialize fc layer: following MoCo v3


def main(args):
    device = misc.init_run(args)

    # linear probe: weak augmentation (TF-style RandomResizedCrop + flip)
    dataset_train = build_dataset(True, args, build_linprobe_transform(True, args))  # <data_path>/train
    dataset_val = build_dataset(False, args, build_linprobe_transform(False, args))  # <data_path>/val
    print(dataset_train)
    print(dataset_val)
    check_num_classes(dataset_train, args.nb_classes)
    sampler_train, data_loader_train = build_train_loader(args, dataset_train)
    data_loader_val = build_val_loader(args, dataset_val)
    log_writer = misc.create_log_writer(args)

    model = build_model(args)
    if args.finetune and not args.eval:
        init_from_pretrained(model, args)
    add_linear_probe_head(model)  # BatchNorm (no affine) + the Linear; freeze all but the head
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("Model = %s" % str(model_without_ddp))
    print("number of params (M): %.2f" % (n_parameters / 1.0e6))

    resolve_lr(args)  # lr = blr * batch_size * accum_iter * world_size / 256 unless --lr
    model = misc.wrap_model(model, args)  # DDP / torch.compile; checkpoints use model_without_ddp

    optimizer = LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print(optimizer)
    loss_scaler = misc.NativeScalerWithGradNormCount(enabled=args.precision == "fp16", device_type=device.type)
    criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))

    resumed = misc.load_model(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer,
                              loss_scaler=loss_scaler)
    max_accuracy = resumed.get("max_accuracy", 0.0)

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, args)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    print(f"Start training for {args.epochs} epochs ({args.precision})")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch)
        if epoch == args.start_epoch and args.start_iter:
            sampler_train.set_start(args.start_iter * args.batch_size)  # mid-epoch resume
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch,
                                      loss_scaler, max_norm=None, log_writer=log_writer, args=args,
                                      frozen_backbone=True, checkpoint_extra={"max_accuracy": max_accuracy})
        args.start_iter = 0

        test_stats = evaluate(data_loader_val, model, device, args)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        misc.save_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler,
                              extra={"max_accuracy": max_accuracy}, improved=improved)

        if log_writer is not None:
            log_writer.add_scalar("perf/test_acc1", test_stats["acc1"], epoch)
            log_writer.add_scalar("perf/test_acc5", test_stats["acc5"], epoch)
            log_writer.add_scalar("perf/test_loss", test_stats["loss"], epoch)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        misc.write_log(args, log_stats, log_writer)

    total_time = time.time() - start_time
    print("Training time {}".format(str(datetime.timedelta(seconds=int(total_time)))))
    if log_writer is not None:
        log_writer.close()
    return {"max_accuracy": max_accuracy}


if __name__ == "__main__":
    misc.run(main, get_args_parser().parse_args())
