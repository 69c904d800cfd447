"""The model a --model name builds: lookup by name in models_mae / models_simmim (pretraining)
and models_vit / models_swin (classifiers), shared by the training scripts, the reconstruction
command and the benchmark."""
import torch

import models_mae
import models_simmim
import models_swin
import models_vit

SIMMIM_PREFIX = "simmim_"  # --model simmim_* pretrains with SimMIM (models_simmim), mae_vit_* with MAE
SIMMIM_CLASSIFIER_PREFIXES = ("beit_", "swin_")  # the classifiers a SimMIM encoder is finetuned / probed as


def is_simmim(name):
    """True for the SimMIM pretraining models (models_simmim.simmim_*)."""
    return name.startswith(SIMMIM_PREFIX)


def model_from_name(module, name, prefix, **kwargs):
    """module.<name>(**kwargs): the model that --model names, e.g.
    model_from_name(models_vit, "vit_base_patch16", "vit_", num_classes=10).

    The choices are module's attributes whose names start with `prefix`; another name raises a
    ValueError listing them. Keyword arguments that are None are left out, so the factory's
    default holds (e.g. patch_size=args.patch_size when --patch_size is not given).
    """
    names = sorted(n for n in vars(module) if n.startswith(prefix))
    if name not in names:
        raise ValueError(f"unknown --model {name!r}; choose one of: {', '.join(names)}")
    return getattr(module, name)(**{k: v for k, v in kwargs.items() if v is not None})


def build_pretrain_model(args):
    """models_mae.<args.model>(img_size=args.input_size, norm_pix_loss, [patch_size]), or for a
    simmim_* name models_simmim.<args.model>(img_size=args.input_size, [patch_size],
    [drop_path_rate=args.drop_path]) (None: the factory's default, 0.1 ViT, 0 Swin)."""
    if is_simmim(args.model):
        return model_from_name(models_simmim, args.model, SIMMIM_PREFIX, img_size=args.input_size,
                               patch_size=args.patch_size, drop_path_rate=args.drop_path)
    return model_from_name(models_mae, args.model, "mae_vit_", img_size=args.input_size,
                           norm_pix_loss=args.norm_pix_loss, patch_size=args.patch_size)


# The classifiers --model names in finetuning and linear probing: MAE's ViTs, and the models that
# SimMIM's checkpoints finetune (the BEiT-style ViT of models_vit, the Swin of models_swin).
CLASSIFIER_SOURCES = ((models_vit, "vit_"), (models_vit, "beit_"), (models_swin, "swin_"))


def classifier_source(name):
    """(module, prefix) of the classifier family whose prefix starts `name`; the MAE ViTs'
    (models_vit, 'vit_') for any other name, so that model_from_name's error lists those."""
    return next(((m, p) for m, p in CLASSIFIER_SOURCES if name.startswith(p)), CLASSIFIER_SOURCES[0])


def build_classifier(args, **kwargs):
    """models_vit.<args.model>(num_classes=args.nb_classes, global_pool, img_size=input_size,
    [patch_size], **kwargs), e.g. drop_path_rate for finetuning; the same for beit_* (models_vit)
    and, without global_pool, for swin_* (models_swin: mean pooling is its only head, and a
    --cls_token is refused: it has no cls token)."""
    module, prefix = classifier_source(args.model)
    pooling = dict(global_pool=args.global_pool)
    if module is models_swin:
        if not args.global_pool:
            raise ValueError(f"--model {args.model} has no cls token (it classifies the mean of its "
                             "final tokens): --cls_token applies to the vit_* / beit_* models")
        pooling = {}
    return model_from_name(module, args.model, prefix, num_classes=args.nb_classes, img_size=args.input_size,
                           patch_size=args.patch_size, **pooling, **kwargs)


def model_patch_size(args):
    """--patch_size, else the patch size of --model's factory (models_mae for pretraining,
    models_vit / models_swin for the classifiers), read off the model built without blocks on the meta device:
    no memory, no initialisation, milliseconds. A ValueError names an unknown --model."""
    if args.patch_size is not None:
        return args.patch_size
    if args.stage == "pretrain" and is_simmim(args.model):
        return simmim_patch_size(args.model)
    pretrain = args.stage == "pretrain"
    module, prefix = (models_mae, "mae_vit_") if pretrain else classifier_source(args.model)
    no_blocks = dict(depths=(0, 0, 0, 0)) if module is models_swin else dict(depth=0)
    with torch.device("meta"):
        model = model_from_name(module, args.model, prefix, decoder_depth=0 if pretrain else None, **no_blocks)
    return model.patch_embed.patch_size[0]


def simmim_patch_size(name):
    """The encoder patch size of models_simmim.<name> (16 ViT, 4 Swin), read off the model built
    without blocks on the meta device, as model_patch_size does for MAE (an unknown name: the
    ValueError of model_from_name)."""
    no_blocks = {"depths": (0, 0, 0, 0)} if name.startswith("simmim_swin_") else {"depth": 0}
    with torch.device("meta"):
        return model_from_name(models_simmim, name, SIMMIM_PREFIX, **no_blocks).patch_size
