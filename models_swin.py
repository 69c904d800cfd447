"""Swin Transformer (V1) as the official SimMIM code has it: the classifiers finetuning trains and
the encoder SimMIM pretrains (mask token after the patch embedding, feature map out).

The blocks are timm's (timm.models.swin_transformer: window attention with a relative position
bias table, shifted windows with the -100 region mask, the window clipped to the stage resolution;
timm.layers: PatchEmbed, Mlp, DropPath), so the numbers are the official ones. What is written
here is only what differs from timm's SwinTransformer:
- the official layout and key names: `layers.{s}.blocks.{j}.*` and the patch merging at the END of
  a stage (`layers.{s}.downsample`, stages 0..2), a plain Linear `head`;
- `relative_position_index` and `attn_mask` kept in the state_dict (persistent, as the official
  checkpoints hold them; timm drops them);
- stochastic depth linspace(0, rate, sum(depths)) over all blocks, and the official init (every
  Linear trunc_normal(0.02, -2, 2) with zero bias, LayerNorm 1/0, the patch-embedding Conv2d left
  at PyTorch's default, tables trunc_normal(0.02)).
Tokens flow as (B, H, W, C) maps between blocks (timm's format; the same numbers as the official
(B, L, C) with L row-major).
"""
import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import swin_transformer as timm_swin


class SwinTransformerBlock(timm_swin.SwinTransformerBlock):
    """timm's Swin block; the official code keeps the window's relative_position_index and the
    shifted blocks' attn_mask in the state_dict, so both are made persistent here."""

    def _init_buffers(self):
        super()._init_buffers()
        for module, name in ((self, "attn_mask"), (self.attn, "relative_position_index")):
            buffer = getattr(module, name)
            if buffer is not None:  # unshifted blocks have no attn_mask (no key)
                module.register_buffer(name, buffer, persistent=True)


class PatchMerging(timm_swin.PatchMerging):
    """timm's 2x2 merge (channels x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], then
    LayerNorm(4C), then Linear(4C -> 2C) without bias): (B, H, W, C) -> (B, H/2, W/2, 2C).
    Registered reduction first, as the official module is, so the state_dict order matches."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        nn.Module.__init__(self)  # timm's __init__ registers the norm first
        self.dim, self.out_dim = dim, 2 * dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)


class BasicLayer(nn.Module):
    """One stage: `depth` blocks (odd ones shifted by window // 2), then the patch merging if
    `downsample`. (B, H, W, C) -> (B, H, W, C), or (B, H/2, W/2, 2C) with the merging."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias,
                 drop, attn_drop, drop_path, norm_layer, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim=dim, input_resolution=input_resolution, num_heads=num_heads,
                                 window_size=window_size, shift_size=0 if j % 2 == 0 else window_size // 2,
                                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop, attn_drop=attn_drop,
                                 drop_path=drop_path[j], norm_layer=norm_layer)
            for j in range(depth)])
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class SwinTransformer(nn.Module):
    """Swin V1 classifier: patch embedding (+ absolute position embedding if `ape`), 4 stages,
    final `norm`, mean over the tokens, `head` (Identity when num_classes is 0).
    model(x) (B, 3, img, img) -> logits (B, num_classes). The input must be exactly img_size.

    `fused_attn`: None keeps timm's choice (the explicit softmax, the official arithmetic);
    True computes the window attention with scaled_dot_product_attention (same maths, faster on
    GPUs, rounding differs)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4., qkv_bias=True,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False,
                 patch_norm=True, fused_attn=None):
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_size = patch_size
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.encoder_stride = patch_size * 2 ** (self.num_layers - 1)  # input pixels per output token

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=norm_layer if patch_norm else None,
                                      output_fmt="NHWC")
        grid = self.patch_embed.grid_size
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth rate of every block, in order over all stages (on the CPU: a model may be
        # built on the meta device)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList([
            BasicLayer(dim=embed_dim * 2 ** s, input_resolution=(grid[0] // 2 ** s, grid[1] // 2 ** s),
                       depth=depths[s], num_heads=num_heads[s], window_size=window_size, mlp_ratio=mlp_ratio,
                       qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                       drop_path=dpr[sum(depths[:s]):sum(depths[:s + 1])], norm_layer=norm_layer,
                       downsample=s < self.num_layers - 1)
            for s in range(self.num_layers)])
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if fused_attn is not None:
            for module in self.modules():
                if isinstance(module, timm_swin.WindowAttention):
                    module.fused_attn = fused_attn

    @staticmethod
    def _init_weights(m):
        """The official init (post-order over modules): Linear trunc_normal(0.02, -2, 2) and bias 0,
        LayerNorm 1/0. The patch-embedding Conv2d keeps PyTorch's default, the tables timm's
        trunc_normal(0.02) drawn at construction."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self):
        """Parameter names kept out of weight decay (the official sets)."""
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self):
        """Substrings of parameter names kept out of weight decay."""
        return {"relative_position_bias_table"}

    def forward_stages(self, x):
        """Embedded patches (B, Hp, Wp, C) -> normalised final tokens (B, L, F), L row-major."""
        if self.ape:
            x = x + self.absolute_pos_embed.view(1, x.shape[1], x.shape[2], -1)
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x.flatten(1, 2))

    def forward_features(self, x):
        """Images (B, 3, H, W) -> pooled features (B, F): the mean of the final tokens."""
        return self.forward_stages(self.patch_embed(x)).mean(dim=1)

    def forward(self, x):
        return self.head(self.forward_features(x))


class SwinTransformerForSimMIM(SwinTransformer):
    """The SimMIM Swin encoder: a learned `mask_token` replaces the masked patches right after the
    patch embedding (and its LayerNorm); every token goes through the stages; no head.
    forward(x (B, 3, H, W), mask (B, H/p, W/p) 1 = masked) -> feature map (B, F, H/32, W/32)."""

    def __init__(self, **kwargs):
        if kwargs.pop("num_classes", 0):
            raise ValueError("SwinTransformerForSimMIM has no head: num_classes must be 0")
        super().__init__(num_classes=0, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0., std=.02)

    def no_weight_decay(self):
        return super().no_weight_decay() | {"mask_token"}

    def forward(self, x, mask):
        x = self.patch_embed(x)  # (B, Hp, Wp, C)
        if mask.shape != x.shape[:3]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a patch grid of {tuple(x.shape[:3])}")
        w = mask.unsqueeze(-1).type_as(x)  # (B, Hp, Wp, 1)
        x = x * (1. - w) + self.mask_token * w
        x = self.forward_stages(x)  # (B, L, F)
        B, L, F = x.shape
        H = W = int(L ** 0.5)  # square inputs, as the official reshape
        return x.transpose(1, 2).reshape(B, F, H, W)


def _swin(defaults, kwargs):
    """SwinTransformer with the official common settings, then the factory's, then the caller's."""
    cfg = dict(patch_size=4, in_chans=3, mlp_ratio=4., qkv_bias=True, ape=False, patch_norm=True)
    cfg.update(defaults)
    cfg.update(kwargs)
    return SwinTransformer(**cfg)


def swin_tiny_patch4_window4_64(**kwargs):
    """A tiny Swin for CPUs and tests: stage resolutions 16, 8, 4, 2 at 64 px, so stages 0 and 1
    have shifted windows and stages 2 and 3 clip the window to their resolution."""
    return _swin(dict(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16),
                      window_size=4, drop_path_rate=0.1), kwargs)


def swin_base_patch4_window7_224(**kwargs):
    return _swin(dict(img_size=224, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      window_size=7, drop_path_rate=0.1), kwargs)


def swin_base_patch4_window6_192(**kwargs):
    return _swin(dict(img_size=192, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      window_size=6, drop_path_rate=0.1), kwargs)


def swin_large_patch4_window14_224(**kwargs):
    return _swin(dict(img_size=224, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                      window_size=14, drop_path_rate=0.2), kwargs)


def swin_large_patch4_window12_192(**kwargs):
    return _swin(dict(img_size=192, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                      window_size=12, drop_path_rate=0.2), kwargs)
