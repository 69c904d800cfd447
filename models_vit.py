"""Vision Transformer classifiers for MAE finetuning and linear probing.

timm's VisionTransformer with the pooling the MAE release uses:
- global_pool=True: mean of the patch tokens (cls excluded), then `fc_norm`; the model has
  no `norm` parameters (the MAE finetuning default).
- global_pool=False: `norm`, then the cls token (the linear-probing default).
Then `head`. State_dict names match the original's `mae_finetuned_vit_*.pth`.
"""
from functools import partial

import torch.nn as nn
import timm.models.vision_transformer


class VisionTransformer(timm.models.vision_transformer.VisionTransformer):
    """timm VisionTransformer with MAE's global-pool switch; model(x) returns logits."""

    def __init__(self, global_pool=False, **kwargs):
        # timm's 'avg' pooling averages the patch tokens only and swaps `norm` for `fc_norm`,
        # which is exactly MAE's global pooling; 'token' is norm + cls token.
        super().__init__(global_pool="avg" if global_pool else "token", **kwargs)
        # the original release initialises pos_embed and cls_token before loading weights;
        # they are overwritten by --finetune checkpoints, so timm's init is kept as is.


def _vit(defaults, kwargs):
    cfg = dict(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(defaults)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def vit_tiny_patch16(**kwargs):
    return _vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


def vit_small_patch16(**kwargs):
    return _vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


def vit_base_patch16(**kwargs):
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


def vit_large_patch16(**kwargs):
    return _vit(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


def vit_huge_patch14(**kwargs):
    return _vit(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)
