"""The model a --model name builds: lookup by name in models_mae (pretraining) and models_vit
(classifiers), shared by the training scripts, the reconstruction command and the benchmark."""
import torch

import models_mae
import models_vit


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
    """models_mae.<args.model>(img_size=args.input_size, norm_pix_loss, [patch_size])."""
    return model_from_name(models_mae, args.model, "mae_vit_", img_size=args.input_size,
                           norm_pix_loss=args.norm_pix_loss, patch_size=args.patch_size)


def build_classifier(args, **kwargs):
    """models_vit.<args.model>(num_classes=args.nb_classes, global_pool, img_size=input_size,
    [patch_size], **kwargs), e.g. drop_path_rate for finetuning."""
    return model_from_name(models_vit, args.model, "vit_", num_classes=args.nb_classes,
                           global_pool=args.global_pool, img_size=args.input_size,
                           patch_size=args.patch_size, **kwargs)


def model_patch_size(args):
    """--patch_size, else the patch size of --model's factory (models_mae for pretraining,
    models_vit for the classifiers), read off the model built without blocks on the meta device:
    no memory, no initialisation, milliseconds. A ValueError names an unknown --model."""
    if args.patch_size is not None:
        return args.patch_size
    pretrain = args.stage == "pretrain"
    module, prefix = (models_mae, "mae_vit_") if pretrain else (models_vit, "vit_")
    with torch.device("meta"):
        model = model_from_name(module, args.model, prefix, depth=0, decoder_depth=0 if pretrain else None)
    return model.patch_embed.patch_size[0]
