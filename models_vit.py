"""Vision Transformer classifiers for MAE finetuning and linear probing.

timm's VisionTransformer with the pooling the MAE release uses:
- global_pool=True: mean of the patch tokens (cls excluded), then `fc_norm`; the model has
  no `norm` parameters (the MAE finetuning default).
- global_pool=False: `norm`, then the cls token (the linear-probing default).
Then `head`. State_dict names match the original's `mae_finetuned_vit_*.pth`.
"""
from functools import partial

import torch.nn as nn
import timm.models.beit
import timm.models.vision_transformer
from timm.layers import trunc_normal_


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


class BeitClassifier(timm.models.beit.Beit):
    """The BEiT-style ViT classifier that SimMIM finetunes (the official code's "vit"; spec
    section 9): timm's Beit without an absolute position embedding, with a relative position bias
    table of its own in every block (cls rows included), layer scale, and (global_pool=True, the
    official) the mean of the patch tokens -> `fc_norm` -> `head`; global_pool=False: `norm` ->
    the cls token -> `head`. model(x) returns logits.

    As the official model: `blocks.{i}.attn.relative_position_index` is in the state_dict;
    the patch-embedding conv is trunc_normal(0.02)/0 like the Linears (timm leaves it at
    PyTorch's default); head trunc_normal(0.02) x 0.001; no_weight_decay() is the official
    {pos_embed, cls_token} (the tables ARE decayed; timm's own set would exempt them)."""

    def __init__(self, global_pool=True, **kwargs):
        super().__init__(global_pool="avg" if global_pool else "token", use_abs_pos_emb=False,
                         use_rel_pos_bias=True, use_shared_rel_pos_bias=False, **kwargs)
        for blk in self.blocks:
            blk.attn.register_buffer("relative_position_index", blk.attn.relative_position_index,
                                     persistent=True)
        trunc_normal_(self.patch_embed.proj.weight, std=.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}


def _beit(defaults, kwargs):
    cfg = dict(img_size=224, mlp_ratio=4, qkv_bias=True, init_values=0.1, drop_path_rate=0.1,
               head_init_scale=0.001, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(defaults)
    cfg.update(kwargs)
    return BeitClassifier(**cfg)


def beit_tiny_patch16(**kwargs):
    """BEiT-style ViT-Ti/16 (192 wide, 12 deep, 3 heads): the finetune model of simmim_vit_tiny_patch16."""
    return _beit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


def beit_base_patch16(**kwargs):
    """BEiT-style ViT-B/16: the finetune model of simmim_vit_base_patch16 (official: 224 px, drop path 0.1,
    layer decay 0.65)."""
    return _beit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)
