"""MAE linear probing (He et al., arXiv 2111.06377, Sec. A.3): a linear classifier on frozen features.

The head is BatchNorm1d(D, affine=False) + Linear (the BatchNorm, without affine parameters,
only normalises the features and is the same as a linear layer at inference); everything else is
frozen and trained with LARS. ViT-B from the released pretrained encoder on 4 nodes x 8 GPUs
(effective batch 16384):
    torchrun --nproc_per_node=8 --nnodes=4 ... main_linprobe.py --batch_size 512 \
        --model vit_base_patch16 --cls_token --finetune mae_pretrain_vit_base.pth --epochs 90 \
        --blr 0.1 --weight_decay 0.0 --dist_eval --data_path /path/to/imagenet
A SimMIM encoder: --model beit_* (or swin_*) with --finetune a SimMIM checkpoint, probed the same
way (MAE's protocol: LARS, blr x batch / 256) on the mean of its last block's patch tokens
(resolve_probe_pooling).

As finetuning, it writes checkpoint-<epoch>.pth, checkpoint-best.pth, log.txt, args.txt and
model.txt to --output_dir and TensorBoard events to --log_dir (default: --output_dir); --eval reads
only <data_path>/val.
"""
import argparse

import torch
from timm.layers import trunc_normal_

import util.checkpoint as ckpt
import util.misc as misc
from engine_finetune import evaluate, train_one_epoch
from util.args import HelpFormatter, add_classifier_args, add_common_args, check_args, resolve_lr
from util.checkpoint import load_pretrained_encoder
from util.datasets import build_classification_loaders, build_linprobe_transform
from util.dist import wrap_model
from util.lars import LARS
from util.models import SIMMIM_CLASSIFIER_PREFIXES, build_classifier
from util.precision import NativeScalerWithGradNormCount


def get_args_parser(add_help=False):
    """The flags of this script; add_help=False as the original, so that its launchers can use
    it as a parent parser (argparse.ArgumentParser(parents=[get_args_parser()]))."""
    parser = argparse.ArgumentParser("MAE linear probing for image classification", add_help=add_help,
                                     formatter_class=HelpFormatter)
    add_common_args(parser)
    add_classifier_args(parser)  # --finetune, --global_pool / --cls_token, --nb_classes, --eval, --dist_eval
    # the original main_linprobe.py's defaults (per GPU)
    parser.set_defaults(stage="linprobe")  # saved in checkpoints: auto-resume takes only its own
    parser.set_defaults(save_freq=1)  # checkpoint-<epoch>.pth after every epoch, as the original
    parser.set_defaults(model="vit_large_patch16", batch_size=512, epochs=90, warmup_epochs=10, blr=0.1,
                        weight_decay=0.0, min_lr=0.0, global_pool=False)
    return parser


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
    load_pretrained_encoder(model, args.finetune, unsafe=args.unsafe_load)
    trunc_normal_(model.head.weight, std=0.01)  # manually initialize fc layer: following MoCo v3


def resolve_probe_pooling(args):
    """SimMIM's classifiers (beit_*, swin_*) are probed on the mean of the LAST block's patch tokens
    (then the classifier's fc_norm, a LayerNorm frozen at weight 1 / bias 0, for beit_*; Swin's own
    final norm), whatever --global_pool / --cls_token say: SimMIM's loss reads only the patch
    tokens, so the ViT's cls token output is never trained, and Swin has no cls token. (The
    SimMIM authors probe the average-pooled tokens of an intermediate ViT layer; the official code
    has no probe script.) Sets args.global_pool = True for them, saying so; returns args."""
    if args.model.startswith(SIMMIM_CLASSIFIER_PREFIXES) and not args.global_pool:
        print(f"{args.model}: probing the mean of the last block's patch tokens (--global_pool); a SimMIM "
              "encoder's cls token output is never trained")
        args.global_pool = True
    return args


def main(args):
    resolve_probe_pooling(args)  # beit_* / swin_*: mean-pooled patch tokens
    device = misc.init_run(args, training=not args.eval)  # --eval writes nothing: --output_dir is not claimed

    # <data_path>/train with weak augmentation (TF-style RandomResizedCrop + flip), <data_path>/val
    sampler_train, data_loader_train, data_loader_val = build_classification_loaders(args, build_linprobe_transform)
    log_writer = misc.create_log_writer(args, training=not args.eval)

    model = build_classifier(args)  # models_vit / models_swin.<args.model>
    if args.finetune and not args.eval:
        init_from_pretrained(model, args)
    add_linear_probe_head(model)  # BatchNorm (no affine) + the Linear; freeze all but the head
    model.to(device)
    model_without_ddp = model
    n_parameters = misc.print_model(model, args)  # one line; the printout goes to model.txt

    resolve_lr(args)  # lr = blr * batch_size * accum_iter * world_size / 256 unless --lr
    model = wrap_model(model, args)  # DDP / torch.compile; checkpoints use model_without_ddp

    optimizer = LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    misc.print_optimizer(optimizer)
    loss_scaler = NativeScalerWithGradNormCount(enabled=args.precision == "fp16", device_type=device.type)
    start = ckpt.resume(args, model_without_ddp, optimizer, loss_scaler, eval_only=args.eval)
    if args.eval:
        return evaluate(data_loader_val, model, device, args)  # prints the accuracy

    max_accuracy = start.max_accuracy  # the best test top-1 before a resumed run
    criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))

    # start_iter > 0 only for an epoch resumed mid-way; the sampler skips the samples it saw
    for epoch, start_iter in misc.epochs_to_train(args, start, sampler_train, log_writer):
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      log_writer, args, start_iter, max_accuracy, frozen_backbone=True)

        test_stats = evaluate(data_loader_val, model, device, args)  # prints the accuracy
        # log.txt before the checkpoint: a kill between the two loses no line (see log_epoch)
        misc.log_epoch(args, log_writer, epoch, train_stats, test_stats, start_iter, n_parameters=n_parameters)
        max_accuracy = ckpt.save_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler,
                                             test_acc1=test_stats["acc1"], max_accuracy=max_accuracy)


if __name__ == "__main__":
    parser = get_args_parser(add_help=True)
    args = parser.parse_args()
    check_args(parser, args)  # a bad flag: one line and exit status 2, as argparse
    misc.run(main, args)
