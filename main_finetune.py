"""MAE end-to-end finetuning (He et al., arXiv 2111.06377, Sec. A.2) of a ViT classifier.

ViT-B from the released pretrained encoder on 4 nodes x 8 GPUs (effective batch 1024):
    torchrun --nproc_per_node=8 --nnodes=4 ... main_finetune.py --batch_size 32 \
        --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --epochs 100 --blr 5e-4 \
        --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 \
        --cutmix 1.0 --dist_eval --data_path /path/to/imagenet
Evaluate a finetuned checkpoint:
    python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 \
        --batch_size 16 --data_path /path/to/imagenet

SimMIM (Xie et al., arXiv 2111.09886; SPEC-simmim sections 9, 10): --model beit_* (the BEiT-style
ViT, mean pooling) or swin_* with --finetune a SimMIM checkpoint (main_pretrain.py --model simmim_*,
or an official one) takes SimMIM's recipe, picked by the model name: the official checkpoint
conversion, its layer ids and weight-decay sets, lr = blr x effective batch / 512 (--warmup_lr and
--min_lr scaled alike), a per-iteration warmup from --warmup_lr then a cosine counted from
iteration 0, AdamW (0.9, 0.999), --clip_grad 5.0 by default, the head kept at its init. ViT-B/16:
    torchrun --nproc_per_node=8 main_finetune.py --model beit_base_patch16 --finetune simmim_pretrain.pth \
        --batch_size 128 --accum_iter 2 --epochs 100 --warmup_epochs 20 --blr 1.25e-3 --warmup_lr 2.5e-7 \
        --min_lr 2.5e-7 --layer_decay 0.65 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --data_path /path/to/imagenet

Outputs (--output_dir): the checkpoints checkpoint-<epoch>.pth (every epoch as the original;
--save_freq N for fewer, --keep_last K keeps the K newest) and checkpoint-best.pth (the best test
top-1 so far: the weights, no optimizer state), and log.txt with one JSON line of train_* and
test_* metrics per epoch, args.txt (every flag) and model.txt (the model printout). TensorBoard
events go to --log_dir (default: --output_dir). --eval reads only <data_path>/val and writes nothing.
"""
import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import util.checkpoint as ckpt
import util.lr_decay as lrd
import util.misc as misc
from engine_finetune import evaluate, train_one_epoch
from util.args import (FinetuneArgumentParser, HelpFormatter, add_classifier_args, add_common_args,
                       add_simmim_schedule_args, check_args, follows_simmim, resolve_finetune_defaults, resolve_lr)
from util.checkpoint import load_pretrained_encoder
from util.datasets import build_classification_loaders, build_transform
from util.dist import wrap_model
from util.models import build_classifier
from util.precision import NativeScalerWithGradNormCount, fast_adamw_kwargs


def get_args_parser(add_help=False):
    """The flags of this script; add_help=False as the original, so that its launchers can use
    it as a parent parser (argparse.ArgumentParser(parents=[get_args_parser()]))."""
    parser = FinetuneArgumentParser("MAE fine-tuning for image classification", add_help=add_help,
                                    formatter_class=HelpFormatter)
    add_common_args(parser)
    # model
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    # optimizer
    parser.add_argument("--clip_grad", type=float, default=None, metavar="NORM",
                        help="clip gradient norm (default: none for vit_*, 5.0 for SimMIM's beit_* / swin_*)")
    parser.add_argument("--layer_decay", type=float, default=0.75,
                        help="layer-wise lr decay from ELECTRA/BEiT (SimMIM's recipes: 0.65 ViT-B, 0.9 / 0.8 "
                             "Swin-B 100 / 800 epochs, 0.7 Swin-L)")
    add_simmim_schedule_args(parser)  # beit_* / swin_*: --warmup_lr, --lr_schedule (cosine), --milestones, --gamma
    # augmentation
    parser.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                        help="color jitter factor (enabled only when not using auto augment)")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                        help='auto augment policy, e.g. "v0" or "original" (default: rand-m9-mstd0.5-inc1)')
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    # random erase
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase prob")
    parser.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    parser.add_argument("--recount", type=int, default=1, help="random erase count")
    parser.add_argument("--resplit", action="store_true", default=False,
                        help="do not random erase the first (clean) augmentation split (unused, as in the original)")
    # mixup / cutmix
    parser.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0")
    parser.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0")
    parser.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                        help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    parser.add_argument("--mixup_prob", type=float, default=1.0,
                        help="probability of performing mixup or cutmix when either/both is enabled")
    parser.add_argument("--mixup_switch_prob", type=float, default=0.5,
                        help="probability of switching to cutmix when both mixup and cutmix are enabled")
    parser.add_argument("--mixup_mode", type=str, default="batch",
                        help='how to apply mixup/cutmix params: per "batch", "pair" or "elem"')
    add_classifier_args(parser)  # --finetune, --global_pool / --cls_token, --nb_classes, --eval, --dist_eval
    # the original main_finetune.py's defaults (per GPU)
    parser.set_defaults(stage="finetune")  # saved in checkpoints: auto-resume takes only its own
    parser.set_defaults(save_freq=1)  # checkpoint-<epoch>.pth after every epoch, as the original
    parser.set_defaults(model="vit_large_patch16", batch_size=64, epochs=50, warmup_epochs=5, blr=1e-3,
                        weight_decay=0.05, min_lr=1e-6, global_pool=True)
    parser.set_defaults(warmup_lr=2.5e-7)  # SimMIM's finetuning recipes (all five)
    return parser


def build_criterion(args, mixup_fn=None):
    """Soft-target CE with mixup/cutmix (the labels are already smoothed by Mixup), else
    label-smoothing CE when --smoothing > 0, else plain CE."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_mixup(args):
    """timm Mixup when --mixup, --cutmix or --cutmix_minmax is set, else None."""
    if not (args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None):
        return None
    print("Mixup is activated!")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def init_from_pretrained(model, args):
    """--finetune: the encoder of a pretraining checkpoint, then head.weight ~ trunc_normal(std 2e-5).
    SimMIM's classifiers (beit_*, swin_*) keep the head of their init, as the official code does."""
    load_pretrained_encoder(model, args.finetune, unsafe=args.unsafe_load)
    if not follows_simmim(args):
        trunc_normal_(model.head.weight, std=2e-5)  # manually initialize fc layer


def build_optimizer(model_without_ddp, args, device):
    """AdamW (betas 0.9, 0.999) with layer-wise lr decay. MAE (vit_*): the original's groups
    (util.lr_decay.param_groups_lrd: layer ids 0..depth + 1, lr_scale = decay^(depth + 1 - id)).
    SimMIM (beit_*, swin_*): the official groups (util.lr_decay.simmim_param_groups_lrd: the layer
    ids of the ViT or the Swin, scale = decay^(num_layers - 1 - id), its weight-decay sets), whose
    lrs SimMIM's schedule sets (single layer decay: util.lr_sched.SimMIMLRSchedule)."""
    if follows_simmim(args):
        param_groups = lrd.simmim_param_groups_lrd(model_without_ddp, args.lr, args.weight_decay, args.layer_decay)
        return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.999), **fast_adamw_kwargs(device))
    param_groups = lrd.param_groups_lrd(model_without_ddp, args.weight_decay,
                                        no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                        layer_decay=args.layer_decay)
    return torch.optim.AdamW(param_groups, lr=args.lr, **fast_adamw_kwargs(device))


def main(args):
    resolve_finetune_defaults(args)  # beit_* / swin_*: --clip_grad 5.0, --lr_schedule cosine (a launcher's parser)
    device = misc.init_run(args, training=not args.eval)  # --eval writes nothing: --output_dir is not claimed

    # <data_path>/train with RandAugment + random erasing, <data_path>/val resized + centre-cropped
    sampler_train, data_loader_train, data_loader_val = build_classification_loaders(args, build_transform)
    log_writer = misc.create_log_writer(args, training=not args.eval)

    mixup_fn = build_mixup(args)

    model = build_classifier(args, drop_path_rate=args.drop_path)  # models_vit / models_swin.<args.model>
    if args.finetune and not args.eval:
        init_from_pretrained(model, args)
    model.to(device)
    model_without_ddp = model
    n_parameters = misc.print_model(model, args)  # one line; the printout goes to model.txt

    resolve_lr(args)  # lr = blr * batch_size * accum_iter * world_size / 256 (SimMIM: / 512) unless --lr
    model = wrap_model(model, args)  # DDP / torch.compile; checkpoints use model_without_ddp

    optimizer = build_optimizer(model_without_ddp, args, device)  # layer-wise lr decay
    loss_scaler = NativeScalerWithGradNormCount(enabled=args.precision == "fp16", device_type=device.type)
    criterion = build_criterion(args, mixup_fn)
    print("criterion = %s" % str(criterion))

    start = ckpt.resume(args, model_without_ddp, optimizer, loss_scaler, eval_only=args.eval)
    if args.eval:
        return evaluate(data_loader_val, model, device, args)  # prints the accuracy

    max_accuracy = start.max_accuracy  # the best test top-1 before a resumed run
    max_norm = (args.clip_grad or None) if follows_simmim(args) else args.clip_grad  # SimMIM: 0 = no clipping

    # start_iter > 0 only for an epoch resumed mid-way; the sampler skips the samples it saw
    for epoch, start_iter in misc.epochs_to_train(args, start, sampler_train, log_writer):
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      log_writer, args, start_iter, max_accuracy, max_norm=max_norm,
                                      mixup_fn=mixup_fn)

        # evaluate before saving: the checkpoint then holds this epoch's max_accuracy and the
        # RNG state an uninterrupted run would have at the next epoch
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
