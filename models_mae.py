"""Masked Autoencoder with a Vision Transformer backbone (He et al., arXiv 2111.06377).

The encoder sees only the visible patches (25% at the default mask ratio); a light decoder
gets the encoded visible patches plus a shared, learned mask token for every removed patch
and regresses the pixels of the removed patches. Names, shapes and initialisation match the
original release, so its checkpoints load here with strict=True.

Shapes: N batch, C channels, H x W image, p patch size, L = (H/p)*(W/p) patches,
K = int(L * (1 - mask_ratio)) visible patches, D encoder width, Dd decoder width.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.pos_embed import get_2d_sincos_pos_embed


def num_visible_patches(num_patches, mask_ratio):
    """K, the patches of an image the encoder sees: int(L * (1 - mask_ratio)), as the original."""
    return int(num_patches * (1 - mask_ratio))


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        # --- encoder ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos embedding: a frozen Parameter (in the state_dict, never trained)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # --- decoder ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        grid_size = self.patch_embed.grid_size  # (H/p, W/p)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        decoder_pos_embed = get_2d_sincos_pos_embed(
            self.decoder_pos_embed.shape[-1], grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))

        # patch_embed is a conv; initialise it like a Linear of shape (D, C*p*p)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        nn.init.normal_(self.cls_token, std=.02)
        nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)  # the fused qkv as one matrix, as the original
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs):
        """imgs: (N, C, H, W) -> (N, L, p*p*C), pixels ordered (p, q, c) inside a patch."""
        p = self.patch_embed.patch_size[0]
        N, C, H, W = imgs.shape
        assert H % p == 0 and W % p == 0, f"image {H}x{W} is not divisible by patch size {p}"
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x, grid_size=None):
        """x: (N, L, p*p*C) -> imgs (N, C, H, W); exact inverse of patchify.
        grid_size (h, w) defaults to the model's patch grid."""
        p = self.patch_embed.patch_size[0]
        h, w = grid_size if grid_size is not None else self.patch_embed.grid_size
        N, L, D = x.shape
        assert L == h * w, f"{L} patches do not fill a {h}x{w} grid"
        C = D // (p * p)
        x = x.reshape(N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, C, h * p, w * p)

    # ------------------------------------------------------------------ masking
    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking by argsort of uniform noise (small noise is kept).

        x: (N, L, D); noise: optional (N, L) in [0, 1) replacing the random draw.
        Returns x_masked (N, K, D), mask (N, L) with 0 kept / 1 removed in the original
        patch order, ids_restore (N, L).
        """
        N, L, D = x.shape
        len_keep = num_visible_patches(L, mask_ratio)
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))

        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to patch order
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, x, mask_ratio, noise=None):
        """x: (N, C, H, W) -> latent (N, 1+K, D), mask (N, L), ids_restore (N, L)."""
        x = self.patch_embed(x)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, K, D)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_features(self, imgs):
        """The encoder on every patch, no masking (the kNN monitor's features; no RNG drawn):
        imgs (N, C, H, W) -> tokens (N, 1+L, D) after the final norm, the cls token first."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (N, L, D)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1+L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x, ids_restore):
        """x: (N, 1+K, D), ids_restore: (N, L) -> pred (N, L, p*p*C)."""
        x = self.decoder_embed(x)  # (N, 1+K, Dd)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)  # (N, L-K, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), no cls
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)  # (N, 1+L, Dd), cls first
        x = x + self.decoder_pos_embed

        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # (N, 1+L, p*p*C)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """imgs: (N, C, H, W); pred: (N, L, p*p*C); mask: (N, L), 1 = removed.
        Mean squared error per patch, averaged over the removed patches only."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the original
            target = (target - mean) / (var + 1.e-6)**.5
        loss = (pred.float() - target) ** 2
        loss = loss.mean(dim=-1)  # (N, L), mean loss per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs: (N, C, H, W) -> loss (scalar), pred (N, L, p*p*C), mask (N, L)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _mae(defaults, kwargs):
    """Build a MaskedAutoencoderViT from a factory's defaults, overridden by kwargs."""
    cfg = dict(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
               decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    cfg.update(defaults)
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


def mae_vit_tiny_patch16_dec128d4b(**kwargs):
    """ViT-Ti/16 encoder (192 wide, 12 deep, 3 heads) with a 128-wide, 4-deep, 4-head decoder:
    for CPUs and small datasets (a decoder narrower and shallower than the encoder, as in MAE)."""
    return _mae(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                     decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4), kwargs)


def mae_vit_small_patch16_dec256d4b(**kwargs):
    """ViT-S/16 encoder (384/12/6) with a 256-wide, 4-deep, 8-head decoder."""
    return _mae(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                     decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8), kwargs)


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _mae(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _mae(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _mae(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)


# recommended names
mae_vit_tiny_patch16 = mae_vit_tiny_patch16_dec128d4b
mae_vit_small_patch16 = mae_vit_small_patch16_dec256d4b
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b  # decoder: 512 dim, 8 blocks
