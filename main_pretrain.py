"""MAE pretraining (He et al., arXiv 2111.06377): reconstruct the removed patches of images.

GPUs (one process per GPU), e.g. ViT-L on 8 GPUs:
    torchrun --nproc_per_node=8 main_pretrain.py --model mae_vit_large_patch16 --norm_pix_loss \
        --batch_size 64 --blr 1.5e-4 --epochs 800 --warmup_epochs 40 --data_path /path/to/imagenet
A laptop CPU with a tiny model:
    python main_pretrain.py --device cpu --model mae_vit_tiny_patch16 --input_size 64 \
        --batch_size 32 --epochs 20 --warmup_epochs 2 --num_workers 2 --data_path ./data/toy

Writes to --output_dir: checkpoint-<epoch>.pth (every --save_freq epochs and the last),
log.txt (one JSON line per epoch), reconstructions/epoch_<epoch>.png (every --vis_freq
epochs and the last); TensorBoard events to --log_dir.
"""
import argparse
import os

import timm.optim
import torch

import util.checkpoint as ckpt
import util.misc as misc
from engine_pretrain import train_one_epoch
from util.args import add_common_args, check_args, resolve_lr
from util.datasets import (build_dataset, build_eval_transform, build_pretrain_transform, build_train_loader,
                           load_and_transform)
from util.dist import is_main_process, wrap_model
from util.models import build_pretrain_model
from util.precision import NativeScalerWithGradNormCount, fast_adamw_kwargs
from util.visualize import save_reconstructions


def get_args_parser(add_help=False):
    """The flags of this script; add_help=False as the original, so that its launchers can use
    it as a parent parser (argparse.ArgumentParser(parents=[get_args_parser()]))."""
    parser = argparse.ArgumentParser("MAE pre-training", add_help=add_help)
    add_common_args(parser)
    parser.add_argument("--mask_ratio", default=0.75, type=float,
                        help="masking ratio (fraction of the patches removed)")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="use (per-patch) normalized pixels as targets for computing the loss")
    parser.add_argument("--fast_decode", action="store_true",
                        help="decode JPEGs at 1/2, 1/4 or 1/8 scale when the random crop allows it: the "
                             "same crop boxes and flips, slightly different pixels (see util.datasets)")
    parser.add_argument("--vis_freq", default=20, type=int,
                        help="write reconstructions every N epochs (and after the last); 0 = off")
    parser.add_argument("--vis_images", default=8, type=int, help="number of images in the reconstructions")
    # the original main_pretrain.py's defaults (per GPU)
    parser.set_defaults(stage="pretrain")  # saved in checkpoints: auto-resume takes only its own
    parser.set_defaults(model="mae_vit_large_patch16", batch_size=64, epochs=400, warmup_epochs=40,
                        blr=1e-3, min_lr=0.0, weight_decay=0.05, norm_pix_loss=False)
    return parser


def build_optimizer(model_without_ddp, args, device):
    """AdamW(betas=(0.9, 0.95)), weight decay on all but 1-D params and biases (as the original)."""
    param_groups = timm.optim.param_groups_weight_decay(model_without_ddp, args.weight_decay)
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **fast_adamw_kwargs(device))


def load_vis_images(dataset, args):
    """The fixed images of the reconstruction grids: --vis_images training images spread evenly
    over the (sorted) train folder, with the eval transform (resize + centre crop, no randomness:
    the torch RNG is not touched)."""
    n = min(args.vis_images, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    transform = build_eval_transform(args.input_size)
    return torch.stack([load_and_transform(dataset.samples[i][0], transform) for i in indices])


def main(args):
    device = misc.init_run(args)

    dataset_train = build_dataset(True, args, build_pretrain_transform(args))  # <data_path>/train
    # (index, sample_seed) pairs: a sample's augmentation depends only on (seed, epoch, index)
    sampler_train, data_loader_train = build_train_loader(args, dataset_train)
    log_writer = misc.create_log_writer(args)

    # define the model
    model = build_pretrain_model(args)  # models_mae.<args.model>
    model.to(device)
    model_without_ddp = model
    misc.print_model(model)

    resolve_lr(args)  # lr = blr * batch_size * accum_iter * world_size / 256 unless --lr
    model = wrap_model(model, args)  # DDP / torch.compile; checkpoints use model_without_ddp

    optimizer = build_optimizer(model_without_ddp, args, device)
    print(optimizer)
    loss_scaler = NativeScalerWithGradNormCount(enabled=args.precision == "fp16",
                                                     device_type=device.type)
    start = ckpt.resume(args, model_without_ddp, optimizer, loss_scaler)  # epoch and iteration to start at

    vis_images = vis_noise = None
    if is_main_process() and args.output_dir and args.vis_freq > 0:
        vis_images = load_vis_images(dataset_train, args)  # (n, 3, H, W)
        generator = torch.Generator().manual_seed(args.seed)  # same masks at every epoch
        vis_noise = torch.rand(vis_images.shape[0], model_without_ddp.patch_embed.num_patches,
                               generator=generator)  # (n, L)

    # start_iter > 0 only for an epoch resumed mid-way; the sampler skips the samples it saw
    for epoch, start_iter in misc.epochs_to_train(args, start, sampler_train, log_writer):
        train_stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      log_writer, args, start_iter=start_iter)

        # log.txt before the checkpoint: a kill between the two loses no line (see log_epoch)
        misc.log_epoch(args, log_writer, epoch, train_stats, start_iter=start_iter)
        ckpt.save_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler)

        if vis_images is not None and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs):
            path = os.path.join(args.output_dir, "reconstructions", f"epoch_{epoch:04d}.png")
            save_reconstructions(model_without_ddp, vis_images, path, args.mask_ratio, vis_noise,
                                 log_writer=log_writer, step=epoch)


if __name__ == "__main__":
    parser = get_args_parser(add_help=True)
    args = parser.parse_args()
    check_args(parser, args)  # a bad flag: one line and exit status 2, as argparse
    misc.run(main, args)
