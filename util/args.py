"""Command-line flags shared by main_pretrain.py, main_finetune.py and main_linprobe.py, and the
linear scaling rule of the learning rate.

The defaults are those of the original main_pretrain.py; the finetune and linear-probe scripts
change theirs with parser.set_defaults(...). check_args stops a run on flags it cannot train
with, before anything is built.
"""
import argparse
import copy
import sys

from PIL import Image

import models_mae
from util.models import SIMMIM_CLASSIFIER_PREFIXES, SIMMIM_PREFIX, is_simmim, model_patch_size

SIMMIM_RECIPE_PREFIXES = (SIMMIM_PREFIX, *SIMMIM_CLASSIFIER_PREFIXES)  # the --model names that take SimMIM's recipe


class HelpFormatter(argparse.HelpFormatter):
    """--help with each flag's default: ' (default: X)' after its help, also for the flags that
    have no help text (argparse.ArgumentDefaultsHelpFormatter shows those without one). Switches
    say 'on' / 'off' (a --no_x switch is on when x defaults to False); nothing is added when the
    help already speaks of the default or the default is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = _default_text(action)
        if default is None or "default" in text.lower():
            return text
        return f"{text} (default: {default})".strip()

    def _format_action(self, action):
        if not action.help and action.option_strings:  # argparse prints no help column then
            action = copy.copy(action)
            action.help = self._get_help_string(action) or None
        return super()._format_action(action)


def _default_text(action):
    """What --help shows as an action's default (a %-format for argparse), or None."""
    if action.default in (None, argparse.SUPPRESS) or not action.option_strings or action.dest == "help":
        return None
    if isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool):  # store_true / _false
        return "on" if bool(action.default) == action.const else "off"
    return "''" if action.default == "" else "%(default)s"


def add_common_args(parser):
    """Add the shared flags to an argparse.ArgumentParser and return it."""
    # optimisation
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * world_size)")
    parser.add_argument("--epochs", default=400, type=int, help="epochs to train")
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="accumulate gradients over this many iterations (keeps the effective batch "
                             "under memory limits)")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
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
    parser.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes per process")
    add_loader_args(parser)

    # output, logging and checkpoints
    parser.add_argument("--output_dir", default="./output_dir", help="where to save checkpoints and log.txt")
    parser.add_argument("--log_dir", default=None,
                        help="where to write TensorBoard events (default: --output_dir; '' = none)")
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
    parser.add_argument("--no_auto_resume", action="store_false", dest="auto_resume", help="turn --auto_resume off")
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
    parser.add_argument("--seed", default=0, type=int, help="seed of the model init, masking and augmentation")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: bf16 on a CUDA GPU that supports it, fp16 on older GPUs, bf16 on a CPU with "
                             "native bf16 (AVX512-BF16 / AMX), else fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")

    # distributed training
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int, dest="local_rank",
                        help="set by older launchers (torch.distributed.launch); torchrun sets LOCAL_RANK")
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
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="turn --pin_mem off")
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
    parser.add_argument("--global_pool", action="store_true",
                        help="classify the mean of the patch tokens (normalised by fc_norm)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="use the class token instead of global pooling for classification")
    parser.add_argument("--nb_classes", default=1000, type=int, help="number of classification types")
    parser.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint)")
    parser.add_argument("--dist_eval", action="store_true", default=False,
                        help="distributed evaluation (faster; a few images may count twice)")
    return parser


def add_simmim_schedule_args(parser):
    """Add the flags of SimMIM's lr schedule (util.lr_sched.SimMIMLRSchedule): per iteration, a
    linear warmup from --warmup_lr, then a cosine to --min_lr or steps of --gamma at --milestones."""
    parser.add_argument("--warmup_lr", type=float, default=5e-7, metavar="LR",
                        help="SimMIM: the lr the warmup starts from, a base value scaled like --blr "
                             "(x effective batch / 512); default: the official config's default; its recipes set their own "
                             "(e.g. 1e-6 for Swin-B 100-epoch pretraining, 2.5e-7 for finetuning: see the README)")
    parser.add_argument("--lr_schedule", default=None, choices=["cosine", "multistep"],
                        help="SimMIM's schedule after the warmup: cosine (to --min_lr, counted from iteration "
                             "0) or multistep (x --gamma at each of --milestones); default cosine for SimMIM "
                             "models; MAE has its own (warmup from 0, then a half-cycle cosine)")
    parser.add_argument("--milestones", type=int, nargs="*", default=[], metavar="EPOCH",
                        help="SimMIM multistep: the epochs at which the lr is multiplied by --gamma")
    parser.add_argument("--gamma", type=float, default=0.1, help="SimMIM multistep: the lr factor per milestone")
    return parser


class PretrainArgumentParser(argparse.ArgumentParser):
    """main_pretrain's parser: after parsing, the flags whose default depends on --model (None in
    the parser) get it (resolve_pretrain_defaults), so that every Namespace it returns is complete.
    A launcher's parser built with parents=[...] does not do this; main_pretrain.main does it."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        return resolve_pretrain_defaults(namespace), extras


def resolve_pretrain_defaults(args):
    """Fill the pretraining flags left None with --model's default: --mask_ratio 0.75 (MAE) or 0.6
    (SimMIM), --clip_grad none (MAE) or 5.0 (SimMIM), --lr_schedule none (MAE's own schedule) or
    'cosine' (SimMIM). Idempotent; returns args."""
    simmim = is_simmim(args.model)
    if args.mask_ratio is None:
        args.mask_ratio = 0.6 if simmim else 0.75
    if simmim and args.clip_grad is None:
        args.clip_grad = 5.0
    if simmim and args.lr_schedule is None:
        args.lr_schedule = "cosine"
    return args


class FinetuneArgumentParser(argparse.ArgumentParser):
    """main_finetune's parser: after parsing, the flags whose default depends on --model get it
    (resolve_finetune_defaults), as PretrainArgumentParser does for pretraining."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        return resolve_finetune_defaults(namespace), extras


def resolve_finetune_defaults(args):
    """Fill the finetuning flags left None with --model's default: for SimMIM's classifiers
    (beit_*, swin_*) --clip_grad 5.0 and --lr_schedule 'cosine' (the official recipes); MAE's
    (vit_*) keep None: no clipping, MAE's own schedule. Idempotent; returns args."""
    if follows_simmim(args):
        if args.clip_grad is None:
            args.clip_grad = 5.0
        if args.lr_schedule is None:
            args.lr_schedule = "cosine"
    return args


def check_finetune_args(parser, args):
    """parser.error on finetuning flags the --model cannot use: SimMIM's schedule flags with a MAE
    ViT (vit_*), a negative --clip_grad or misplaced --milestones with SimMIM's classifiers, and
    --cls_token with a Swin (no cls token)."""
    resolve_finetune_defaults(args)
    if not follows_simmim(args):
        if args.lr_schedule is not None or args.milestones:
            parser.error(f"--lr_schedule / --milestones are SimMIM flags (--model beit_* / swin_*); {args.model} "
                         "follows MAE's schedule (linear warmup from 0, then a half-cycle cosine)")
        return
    if args.clip_grad < 0:
        parser.error(f"--clip_grad must be >= 0 (0 = no clipping), got {args.clip_grad}")
    if args.model.startswith("swin_") and not args.global_pool:
        parser.error(f"--model {args.model} has no cls token (it classifies the mean of its final tokens): "
                     "--cls_token applies to the vit_* / beit_* models")
    check_simmim_schedule_args(parser, args)


def effective_batch_size(args):
    """The images of one optimizer step over all processes: batch_size * accum_iter * world_size."""
    return args.batch_size * args.accum_iter * args.world_size


def follows_simmim(args):
    """True when --model takes SimMIM's recipe: its pretraining models (simmim_*) and the
    classifiers its checkpoints finetune (beit_*, swin_*). Not in linear probing, which is MAE's
    protocol (LARS, blr x batch / 256) for every model."""
    return args.model.startswith(SIMMIM_RECIPE_PREFIXES) and getattr(args, "stage", None) != "linprobe"


def base_batch_size(args):
    """The batch that --blr is quoted for: 256 (MAE's rule), 512 for SimMIM's recipes (official:
    lr = BASE_LR * total batch / 512, WARMUP_LR and MIN_LR likewise)."""
    return 512 if follows_simmim(args) else 256


def linear_scaled_lr(args):
    """blr * effective batch / 256 (SimMIM: / 512, base_batch_size)."""
    return args.blr * effective_batch_size(args) / base_batch_size(args)


def simmim_lrs(args):
    """(lr, warmup_lr, min_lr) of SimMIM's schedule: the absolute lr (--lr, else blr * effective
    batch / 512), and --warmup_lr and --min_lr scaled by the same effective batch / 512, as the
    official main does (they are base values, also with an explicit --lr)."""
    lr = args.lr if args.lr is not None else linear_scaled_lr(args)
    scale = effective_batch_size(args) / base_batch_size(args)
    return lr, args.warmup_lr * scale, args.min_lr * scale


def resolve_lr(args):
    """Derive the absolute lr from the base lr when --lr is not given (linear scaling rule), and
    print both with the effective batch on one line (SimMIM's recipes: also the scaled warmup and
    minimum lr, simmim_lrs)."""
    eff_batch_size = effective_batch_size(args)
    base = base_batch_size(args)
    if args.lr is None:
        args.lr = linear_scaled_lr(args)
    processes = f"{args.world_size} process" + ("es" if args.world_size > 1 else "")
    line = (f"effective batch size: {eff_batch_size} ({args.batch_size} per process x {args.accum_iter} accum_iter "
            f"x {processes}); actual lr: {args.lr:.2e} (base lr {args.lr * base / eff_batch_size:.2e} "
            f"x {eff_batch_size} / {base})")
    if getattr(args, "lr_schedule", None) is not None:  # SimMIM's schedule
        _, warmup_lr, min_lr = simmim_lrs(args)
        line += (f"; warmup lr {warmup_lr:.2e}, min lr {min_lr:.2e} (--warmup_lr {args.warmup_lr:.2e}, "
                 f"--min_lr {args.min_lr:.2e} x {eff_batch_size} / {base})")
    print(line)
    return args.lr


def resolve_log_dir(args):
    """--log_dir defaults to --output_dir (TensorBoard events beside log.txt); an explicit
    --log_dir, '' included (no TensorBoard), is kept. Idempotent; check_args and
    util.misc.init_run call it (a launcher may call a script's main(args) without check_args)."""
    if args.log_dir is None:
        args.log_dir = args.output_dir
    return args.log_dir


def check_args(parser, args):
    """Stop with parser.error (one line, exit status 2, as argparse does) on flags a run cannot
    train with: counts and sizes below 1, --input_size not divisible by the patch size and, for
    pretraining, a --mask_ratio outside [0, 1) or one that leaves no visible or no masked patch
    (SimMIM: check_simmim_pretrain_args; finetuning: check_finetune_args). Prints a warning when --warmup_epochs is above --epochs.
    Resolves --log_dir (resolve_log_dir). Call right after parse_args."""
    resolve_log_dir(args)
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
        resolve_pretrain_defaults(args)
        if is_simmim(args.model):
            check_simmim_pretrain_args(parser, args, patch)
        else:
            check_mae_pretrain_args(parser, args)
            check_mask_ratio(parser, args.mask_ratio, (args.input_size // patch) ** 2)
    elif getattr(args, "stage", None) == "finetune":
        check_finetune_args(parser, args)
    if args.warmup_epochs > args.epochs:
        print(f"Warning: --warmup_epochs {args.warmup_epochs} is above --epochs {args.epochs}: the lr "
              f"only reaches {args.epochs / args.warmup_epochs:.0%} of its peak and never decays",
              file=sys.stderr)


def check_mae_pretrain_args(parser, args):
    """parser.error on SimMIM's flags given to a MAE run (MAE has no drop path in pretraining, and
    one lr schedule: linear warmup from 0, then a half-cycle cosine by fractional epoch)."""
    for name in ("drop_path", "lr_schedule"):
        if getattr(args, name) is not None:
            parser.error(f"--{name} is a SimMIM flag (--model simmim_*); {args.model} does not use it")
    if args.milestones:
        parser.error(f"--milestones is a SimMIM flag (--model simmim_* --lr_schedule multistep); "
                     f"{args.model} does not use it")


def check_simmim_pretrain_args(parser, args, patch):
    """parser.error on flags a SimMIM pretraining run cannot use: a --mask_ratio outside (0, 1]
    (ceil(blocks x ratio) blocks are masked: any ratio > 0 masks one), an --input_size not made of
    whole --mask_patch_size blocks or blocks not made of whole patches (util.masking.MaskGenerator),
    MAE-only flags, a negative --clip_grad, --milestones without multistep or before the warmup ends."""
    if not 0 < args.mask_ratio <= 1:  # also NaN
        parser.error(f"--mask_ratio must be in (0, 1] for SimMIM, got {args.mask_ratio}")
    if args.mask_patch_size < 1 or args.mask_patch_size % patch:
        parser.error(f"--mask_patch_size {args.mask_patch_size} is not a multiple of the patch size {patch}")
    if args.input_size % args.mask_patch_size:
        parser.error(f"--input_size {args.input_size} is not divisible by --mask_patch_size {args.mask_patch_size}")
    for name in ("norm_pix_loss", "fast_decode"):
        if getattr(args, name):
            parser.error(f"--{name} is a MAE flag; SimMIM ({args.model}) does not use it")
    if args.clip_grad < 0:
        parser.error(f"--clip_grad must be >= 0 (0 = no clipping), got {args.clip_grad}")
    check_simmim_schedule_args(parser, args)


def check_simmim_schedule_args(parser, args):
    """parser.error on --milestones with the cosine schedule, or a first milestone inside the
    warmup (util.lr_sched.SimMIMLRSchedule refuses it)."""
    if args.milestones and args.lr_schedule != "multistep":
        parser.error(f"--milestones is for --lr_schedule multistep (not {args.lr_schedule})")
    if args.milestones and min(args.milestones) < args.warmup_epochs:
        parser.error(f"--milestones {min(args.milestones)} falls inside the --warmup_epochs {args.warmup_epochs}")


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
