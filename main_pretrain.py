"""MAE pretraining (He et al., arXiv 2111.06377): reconstruct the removed patches of images;
or, with --model simmim_*, SimMIM (Xie et al., arXiv 2111.09886): the encoder sees every patch, the
masked ones replaced by a mask token, and a linear head predicts their pixels. One script and one
engine for both: the model's second input is MAE's --mask_ratio or SimMIM's mask, drawn per sample
in the data pipeline (util/masking.py).

GPUs (one process per GPU), e.g. ViT-L on 8 GPUs:
    torchrun --nproc_per_node=8 main_pretrain.py --model mae_vit_large_patch16 --norm_pix_loss \
        --batch_size 64 --blr 1.5e-4 --epochs 800 --warmup_epochs 40 --data_path /path/to/imagenet
SimMIM ViT-B/16 as the official 800-epoch recipe (total batch 2048 = 8 GPUs x 128 x 2):
    torchrun --nproc_per_node=8 main_pretrain.py --model simmim_vit_base_patch16 --input_size 224 \
        --batch_size 128 --accum_iter 2 --blr 1e-4 --warmup_lr 5e-7 --min_lr 5e-6 --epochs 800 \
        --warmup_epochs 10 --lr_schedule multistep --milestones 700 --data_path /path/to/imagenet
A laptop CPU with a tiny model:
    python main_pretrain.py --device cpu --model mae_vit_tiny_patch16 --input_size 64 \
        --batch_size 32 --epochs 20 --warmup_epochs 2 --num_workers 2 --data_path ./data/toy

Writes to --output_dir: checkpoint-<epoch>.pth (every --save_freq epochs and the last),
log.txt (one JSON line per epoch), reconstructions/epoch_<epoch>.png (every --vis_freq
epochs and the last), args.txt (every flag) and model.txt (the model printout); TensorBoard
events to --log_dir (default: --output_dir).
"""
import os

import timm.optim
import torch

import util.checkpoint as ckpt
import util.misc as misc
from engine_pretrain import train_one_epoch
from util.args import (HelpFormatter, PretrainArgumentParser, add_common_args, add_simmim_schedule_args, check_args,
                       resolve_lr, resolve_pretrain_defaults)
from util.datasets import (build_dataset, build_eval_transform, build_pretrain_transform, build_train_loader,
                           load_and_transform)
from util.dist import is_main_process, wrap_model
from util.knn import KNNMonitor
from util.lr_decay import simmim_param_groups
from util.masking import build_simmim_transform
from util.models import build_pretrain_model, is_simmim, model_patch_size
from util.precision import NativeScalerWithGradNormCount, fast_adamw_kwargs
from util.visualize import fixed_masking, round_robin_indices, save_reconstructions


def get_args_parser(add_help=False):
    """The flags of this script; add_help=False as the original, so that its launchers can use
    it as a parent parser (argparse.ArgumentParser(parents=[get_args_parser()]))."""
    parser = PretrainArgumentParser("MAE pre-training", add_help=add_help, formatter_class=HelpFormatter)
    add_common_args(parser)
    parser.add_argument("--mask_ratio", default=None, type=float,
                        help="masking ratio (fraction of the patches removed; SimMIM: of the --mask_patch_size "
                             "blocks, rounded up); default 0.75 for MAE, 0.6 for SimMIM")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="use (per-patch) normalized pixels as targets for computing the loss")
    parser.add_argument("--fast_decode", action="store_true",
                        help="decode JPEGs at 1/2, 1/4 or 1/8 scale when the random crop allows it: the "
                             "same crop boxes and flips, slightly different pixels (see util.datasets)")
    parser.add_argument("--vis_freq", default=20, type=int,
                        help="write reconstructions every N epochs (and after the last); 0 = off")
    parser.add_argument("--vis_images", default=8, type=int, help="number of images in the reconstructions")
    parser.add_argument("--knn_freq", default=5, type=int,
                        help="kNN accuracy of the encoder's features every N epochs (and after the last) when "
                             "<data_path>/val holds labelled class folders; 0 = off (see util/knn.py)")
    parser.add_argument("--knn_train_samples", default=10000, type=int,
                        help="the kNN monitor's training images (a fixed class-balanced subset); 0 = all")
    parser.add_argument("--knn_val_samples", default=0, type=int,
                        help="cap on the kNN monitor's validation images (class-balanced); 0 = all")
    # SimMIM (--model simmim_*)
    parser.add_argument("--mask_patch_size", default=32, type=int,
                        help="SimMIM: side in pixels of the square blocks that are masked (a multiple of the "
                             "patch size)")
    parser.add_argument("--drop_path", type=float, default=None, metavar="PCT",
                        help="SimMIM: drop path rate of the encoder; default the model's (0.1 ViT, 0 Swin: the "
                             "official recipes)")
    parser.add_argument("--clip_grad", type=float, default=None, metavar="NORM",
                        help="clip the gradients' total L2 norm to NORM (0 = no clipping); default 5.0 for "
                             "SimMIM, none for MAE")
    add_simmim_schedule_args(parser)
    # the original main_pretrain.py's defaults (per GPU)
    parser.set_defaults(stage="pretrain")  # saved in checkpoints: auto-resume takes only its own
    parser.set_defaults(model="mae_vit_large_patch16", batch_size=64, epochs=400, warmup_epochs=40,
                        blr=1e-3, min_lr=0.0, weight_decay=0.05, norm_pix_loss=False)
    return parser


def build_transform(args):
    """The training transform: MAE's (util.datasets.build_pretrain_transform), or SimMIM's
    (util.masking: crop scale 0.67-1, bilinear, flip, and one mask per sample, so that the samples
    are ((img, mask), label); the mask is seeded per (seed, epoch, index) as the crop is)."""
    if is_simmim(args.model):
        return build_simmim_transform(args, model_patch_size(args))
    return build_pretrain_transform(args)


def build_optimizer(model_without_ddp, args, device):
    """MAE: AdamW(betas=(0.9, 0.95)), weight decay on all but 1-D params and biases (as the original).
    SimMIM: AdamW(betas=(0.9, 0.999)) with the official [decay, no decay] groups
    (util.lr_decay.simmim_param_groups)."""
    if is_simmim(args.model):
        param_groups = simmim_param_groups(model_without_ddp, args.weight_decay)
        return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.999), **fast_adamw_kwargs(device))
    param_groups = timm.optim.param_groups_weight_decay(model_without_ddp, args.weight_decay)
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **fast_adamw_kwargs(device))


def load_vis_images(dataset, args):
    """The fixed images of the reconstruction grids: --vis_images training images picked
    round-robin over the classes (the first of each, then the second, ...), with the eval transform
    (resize + centre crop, no randomness: the torch RNG is not touched)."""
    indices = round_robin_indices(dataset.targets, args.vis_images)
    transform = build_eval_transform(args.input_size)
    return torch.stack([load_and_transform(dataset.samples[i][0], transform) for i in indices])


def main(args):
    resolve_pretrain_defaults(args)  # --mask_ratio, --clip_grad, --lr_schedule: --model's defaults
    device = misc.init_run(args)

    dataset_train = build_dataset(True, args, build_transform(args))  # <data_path>/train
    # (index, sample_seed) pairs: a sample's augmentation depends only on (seed, epoch, index)
    sampler_train, data_loader_train = build_train_loader(args, dataset_train)
    log_writer = misc.create_log_writer(args)

    # define the model
    model = build_pretrain_model(args)  # models_mae.<args.model> or models_simmim.<args.model>
    model.to(device)
    model_without_ddp = model
    misc.print_model(model, args)  # one line; the printout goes to model.txt

    resolve_lr(args)  # lr = blr * batch_size * accum_iter * world_size / 256 (SimMIM: / 512) unless --lr
    model = wrap_model(model, args)  # DDP / torch.compile; checkpoints use model_without_ddp

    optimizer = build_optimizer(model_without_ddp, args, device)
    misc.print_optimizer(optimizer)
    loss_scaler = NativeScalerWithGradNormCount(enabled=args.precision == "fp16",
                                                     device_type=device.type)
    start = ckpt.resume(args, model_without_ddp, optimizer, loss_scaler)  # epoch and iteration to start at
    knn_monitor = KNNMonitor.create(args)  # None when off or without a labelled val/ folder

    vis_images = vis_masking = vis_noise = None
    if is_main_process() and args.output_dir and args.vis_freq > 0:
        vis_images = load_vis_images(dataset_train, args)  # (n, 3, H, W)
        vis_masking, vis_noise = fixed_masking(model_without_ddp, vis_images.shape[0], args.seed, args.mask_ratio,
                                               args.mask_patch_size)  # every epoch the same

    # start_iter > 0 only for an epoch resumed mid-way; the sampler skips the samples it saw
    for epoch, start_iter in misc.epochs_to_train(args, start, sampler_train, log_writer):
        train_stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      log_writer, args, start_iter=start_iter)

        # kNN accuracy of the encoder's features (every --knn_freq epochs; draws no random numbers)
        knn_stats = knn_monitor(model_without_ddp, epoch, device, log_writer) if knn_monitor else {}

        # log.txt before the checkpoint: a kill between the two loses no line (see log_epoch)
        misc.log_epoch(args, log_writer, epoch, train_stats, start_iter=start_iter, **knn_stats)
        ckpt.save_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler)

        if vis_images is not None and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs):
            path = os.path.join(args.output_dir, "reconstructions", f"epoch_{epoch:04d}.png")
            save_reconstructions(model_without_ddp, vis_images, path, vis_masking, vis_noise,
                                 log_writer=log_writer, step=epoch)


if __name__ == "__main__":
    parser = get_args_parser(add_help=True)
    args = parser.parse_args()
    check_args(parser, args)  # a bad flag: one line and exit status 2, as argparse
    misc.run(main, args)
