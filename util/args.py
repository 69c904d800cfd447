"""Command-line flags shared by main_pretrain.py, main_finetune.py and main_linprobe.py, and the
linear scaling rule of the learning rate.

The defaults are those of the original main_pretrain.py; the finetune and linear-probe scripts
change theirs with parser.set_defaults(...). check_args stops a run on flags it cannot train
with, before anything is built.
"""
import sys

from PIL import Image

import models_mae
from util.models import model_patch_size


def add_common_args(parser):
    """Add the shared flags to an argparse.ArgumentParser and return it."""
    # optimisation
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * world_size)")
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="accumulate gradients over this many iterations (keeps the effective batch "
                             "under memory limits)")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=None, metavar="LR",
                        help="learning rate (absolute lr); default: blr * effective batch / 256")
    parser.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * effective batch / 256")
    parser.add_argument("--min_lr", type=float, default=0.0, metavar="LR",
                        help="lower lr bound for the cosine schedule (reached at the last epoch)")
    parser.add_argument("--warmup_epochs", type=int, default=40, metavar="N", help="epochs of linear lr warmup")

    # model and data
    parser.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                        help="name of the model to train")
    parser.add_argument("--input_size", default=224, type=int, help="image size (pixels)")
    parser.add_argument("--patch_size", default=None, type=int, help="override the model's patch size")
    parser.add_argument("--data_path", default="./data", type=str,
                        help="dataset root holding train/ and val/ ImageFolder trees")
    parser.add_argument("--num_workers", default=10, type=int)
    add_loader_args(parser)

    # output, logging and checkpoints
    parser.add_argument("--output_dir", default="./output_dir", help="where to save checkpoints and log.txt")
    parser.add_argument("--log_dir", default="./output_dir", help="where to write tensorboard logs")
    parser.add_argument("--log_freq", default=20, type=int, help="print metrics every N iterations")
    parser.add_argument("--save_freq", default=20, type=int,
                        help="save checkpoint-<epoch>.pth every N epochs (the last epoch is always saved); "
                             "default 20 for pretraining, 1 for finetuning and linear probing, as the original")
    parser.add_argument("--keep_last", default=0, type=int, metavar="K",
                        help="after each checkpoint-<epoch>.pth, delete the older numbered ones beyond the K "
                             "newest (checkpoint-best.pth and checkpoint-last.pth are kept); 0 = keep all")
    parser.add_argument("--save_every_iters", default=0, type=int,
                        help="if > 0, refresh checkpoint-last.pth every N iterations (mid-epoch resume)")
    parser.add_argument("--resume", default="", help="resume from this checkpoint (path or URL)")
    parser.add_argument("--auto_resume", action="store_true",
                        help="when --resume is empty, resume from the most advanced checkpoint in output_dir")
    parser.add_argument("--no_auto_resume", action="store_false", dest="auto_resume")
    parser.set_defaults(auto_resume=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="when --output_dir holds another run (another stage or model, or flags that change "
                             "the results), move its files into <output_dir>/replaced-<time>/ and start afresh "
                             "there instead of stopping")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--unsafe_load", action="store_true",
                        help="load checkpoints with weights_only=False; this can run arbitrary code, "
                             "use it only for files you trust")

    # device, precision and reproducibility
    parser.add_argument("--device", default="cuda", help="device to use for training / testing")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: bf16 on a CUDA GPU that supports it, fp16 on older GPUs, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")

    # distributed training
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int, dest="local_rank")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--dist_on_itp", action="store_true",
                        help="take rank and world size from OpenMPI's OMPI_COMM_WORLD_* variables")
    parser.add_argument("--dist_timeout", default=30, type=float,
                        help="minutes a collective may wait for a peer before the run fails")
    return parser


def add_loader_args(parser):
    """Add the flags that util.datasets' build_dataset and DataLoaders read besides the data path,
    the workers and the batch size (also used by benchmark.py's data rows)."""
    parser.add_argument("--pin_mem", action="store_true",
                        help="pin CPU memory in the DataLoader for faster transfer to the GPU")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="skip images that fail to decode (with a warning) instead of stopping")
    parser.add_argument("--max_image_pixels", default=Image.MAX_IMAGE_PIXELS, type=int, metavar="N",
                        help="Pillow's decompression-bomb limit: it warns above N pixels and refuses "
                             "images above 2N; 0 = no limit (default: Pillow's)")
    return parser


def add_classifier_args(parser):
    """Add the flags main_finetune.py and main_linprobe.py share (the classifier and its start)."""
    parser.add_argument("--finetune", default="", help="initialise from this pretraining checkpoint")
    parser.add_argument("--global_pool", action="store_true")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="use the class token instead of global pooling for classification")
    parser.add_argument("--nb_classes", default=1000, type=int, help="number of classification types")
    parser.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint)")
    parser.add_argument("--dist_eval", action="store_true", default=False,
                        help="distributed evaluation (faster; a few images may count twice)")
    return parser


def effective_batch_size(args):
    """The images of one optimizer step over all processes: batch_size * accum_iter * world_size."""
    return args.batch_size * args.accum_iter * args.world_size


def linear_scaled_lr(args):
    """blr * effective batch / 256."""
    return args.blr * effective_batch_size(args) / 256


def resolve_lr(args):
    """Derive the absolute lr from the base lr when --lr is not given (linear scaling rule)."""
    eff_batch_size = effective_batch_size(args)
    if args.lr is None:
        args.lr = linear_scaled_lr(args)
    print("base lr: %.2e" % (args.lr * 256 / eff_batch_size))
    print("actual lr: %.2e" % args.lr)
    print("accumulate grad iterations: %d" % args.accum_iter)
    print("effective batch size: %d" % eff_batch_size)
    return args.lr


def check_args(parser, args):
    """Stop with parser.error (one line, exit status 2, as argparse does) on flags a run cannot
    train with: counts and sizes below 1, --input_size not divisible by the patch size and, for
    pretraining, a --mask_ratio outside [0, 1) or one that leaves no visible or no masked patch.
    Prints a warning when --warmup_epochs is above --epochs. Call right after parse_args."""
    for name in ("batch_size", "epochs", "accum_iter", "log_freq", "input_size", "patch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.max_image_pixels < 0:
        parser.error(f"--max_image_pixels must be >= 0 (0 = no limit), got {args.max_image_pixels}")
    try:
        patch = model_patch_size(args)  # --patch_size, else --model's
    except ValueError as e:  # unknown --model
        parser.error(str(e))
    if args.input_size % patch:
        parser.error(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    if "mask_ratio" in vars(args):  # pretraining only
        check_mask_ratio(parser, args.mask_ratio, (args.input_size // patch) ** 2)
    if args.warmup_epochs > args.epochs:
        print(f"Warning: --warmup_epochs {args.warmup_epochs} is above --epochs {args.epochs}: the lr "
              f"only reaches {args.epochs / args.warmup_epochs:.0%} of its peak and never decays",
              file=sys.stderr)


def check_mask_ratio(parser, mask_ratio, num_patches):
    """parser.error unless 0 <= mask_ratio < 1 leaves at least one visible and one masked patch
    of the num_patches of an image (models_mae.num_visible_patches: the model's own count)."""
    if not 0 <= mask_ratio < 1:  # also NaN
        parser.error(f"--mask_ratio must be in [0, 1), got {mask_ratio}")
    visible = models_mae.num_visible_patches(num_patches, mask_ratio)
    if visible < 1:
        parser.error(f"--mask_ratio {mask_ratio} leaves no visible patch of the {num_patches} of an "
                     "image: lower it or use more patches (--input_size / --patch_size)")
    if visible == num_patches:
        parser.error(f"--mask_ratio {mask_ratio} masks none of the {num_patches} patches of an image: "
                     "the loss would have nothing to reconstruct (MAE uses 0.75)")
