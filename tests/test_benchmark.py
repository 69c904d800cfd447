"""Tests for benchmark.py: the CLI end to end on a tiny model, the analytic FLOPs, the
baseline's explicit attention, the all-tokens (encoder w/ mask tokens) variant, the SimMIM modes
(ViT and Swin: FLOPs, models, masks, optimizer, CLI), the model lookup and data pipeline taken
from util/, and the peak-memory column."""
import argparse
import json
import os
import resource

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import benchmark
import models_mae
import models_simmim
import models_vit
from util import models as util_models
from util.lr_decay import simmim_param_groups
from util.datasets import ImageFolderDataset, PretrainTransform, SeededSampler

# conftest's tiny_mae (img 32, patch 8, depth 1, 2 heads, decoder depth 1 with 2 heads) of width
# 8 and decoder width 4, built after torch.manual_seed(0).
# img 32, patch 8 -> L = 16 patches of p*p*C = 192 values; mask 0.75 -> K = 4 visible
TINY = dict(embed_dim=8, decoder_embed_dim=4)


def tiny_args(**overrides):
    args = dict(model="mae_vit_tiny_patch16", input_size=32, patch_size=8,
                model_kwargs=dict(embed_dim=8, depth=2, num_heads=2, decoder_embed_dim=4,
                                  decoder_depth=1, decoder_num_heads=2),
                num_classes=10, drop_path=0.0, mask_ratio=0.75, batch_size=2, seed=0,
                simmim_vit_model=None, simmim_swin_model="simmim_swin_tiny_patch4_window4_64",
                simmim_input_size=None, mask_patch_size=None)
    args.update(overrides)
    return argparse.Namespace(**args)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------

def test_flops_formula_by_hand():
    # block on T=5 tokens, D=8: 2*5*(3*64 + 64 + 8*64) + 2*2*25*8 = 7680 + 800
    assert benchmark.block_flops(5, 8) == 8480
    # T=17, D=4: 2*17*(12*16) + 4*289*4 = 6528 + 4624
    assert benchmark.block_flops(17, 4) == 11152
    # MAE, L=16, ppC=192, D=8, depth 1, Dd=4, decoder depth 1, K=4:
    # patch 2*16*192*8 = 49152, encoder block(5, 8) = 8480, decoder_embed 2*5*8*4 = 320,
    # decoder block(17, 4) = 11152, decoder_pred 2*16*4*192 = 24576
    assert benchmark.mae_forward_flops(16, 192, 8, 1, 4, 1) == 93680
    # all tokens: encoder block(17, 8) = 2*17*768 + 4*289*8 = 35360, decoder_embed 2*17*8*4 = 1088
    assert benchmark.mae_forward_flops(16, 192, 8, 1, 4, 1, all_tokens=True) == 121328
    # ViT: patch 49152 + block(17, 8) 35360 + head 2*8*10
    assert benchmark.vit_forward_flops(16, 192, 8, 1, 10) == 84672


def test_train_flops_read_off_the_models(tiny_mae, tiny_vit):
    torch.manual_seed(0)
    mae = tiny_mae(**TINY)
    assert benchmark.train_flops_per_image(mae, "fast", 0.75) == 3 * 93680
    assert benchmark.train_flops_per_image(mae, "baseline", 0.75) == 3 * 93680
    assert benchmark.train_flops_per_image(benchmark.AllTokensMAE(mae), "all_tokens", 0.75) == 3 * 121328
    vit = tiny_vit(patch_size=8, embed_dim=8, depth=1, num_classes=10)
    assert benchmark.train_flops_per_image(vit, "finetune", 0.75) == 3 * 84672


def test_flops_formula_matches_torch_flop_counter(tiny_mae):
    """torch's counter on the real forward (explicit attention, so q k^T and attn v are matmuls
    it sees) = the formula + decoder_pred on the cls row, which the formula leaves out."""
    torch.manual_seed(0)
    mae = tiny_mae(**TINY, depth=2, decoder_depth=2)
    benchmark.use_explicit_attention(mae)
    n = 3
    with FlopCounterMode(display=False) as counter:
        mae(torch.randn(n, 3, 32, 32))
    formula = benchmark.mae_forward_flops(16, 192, 8, 2, 4, 2)
    assert counter.get_total_flops() == n * (formula + 2 * 4 * 192)

    wrapper = benchmark.AllTokensMAE(mae)
    with FlopCounterMode(display=False) as counter:
        wrapper(torch.randn(n, 3, 32, 32))
    formula = benchmark.mae_forward_flops(16, 192, 8, 2, 4, 2, all_tokens=True)
    assert counter.get_total_flops() == n * (formula + 2 * 4 * 192)


# ---------------------------------------------------------------------------------------------
# Baseline: explicit attention, original optimizer
# ---------------------------------------------------------------------------------------------

def test_explicit_attention_is_softmax_qkT_v(tiny_mae):
    torch.manual_seed(0)
    attn = tiny_mae(**TINY).blocks[0].attn
    x = torch.randn(2, 5, 8)
    B, T, D = x.shape
    h, d = attn.num_heads, D // attn.num_heads
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, T, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, T, d)
    weights = torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1)
    by_hand = attn.proj((weights @ v).transpose(1, 2).reshape(B, T, D))

    fused = attn(x)
    assert benchmark.use_explicit_attention(attn) == 1
    explicit = attn(x)
    torch.testing.assert_close(explicit, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, by_hand, rtol=1e-5, atol=1e-6)


def test_baseline_model_never_calls_sdpa(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*a, **kw):
        calls.append(1)
        return sdpa(*a, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)

    args = tiny_args()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    torch.manual_seed(0)
    fast = benchmark.build_model(args, "fast")
    torch.manual_seed(0)
    baseline = benchmark.build_model(args, "baseline")
    attns = [m for m in baseline.modules() if hasattr(m, "fused_attn")]
    assert len(attns) == 2 + 1  # encoder + decoder blocks
    assert all(m.fused_attn is False for m in attns)
    assert all(m.fused_attn for m in fast.modules() if hasattr(m, "fused_attn"))

    loss_fast, pred_fast, _ = fast(imgs, noise=noise)
    assert len(calls) == 3
    loss_base, pred_base, _ = baseline(imgs, noise=noise)
    assert len(calls) == 3  # no new SDPA call: the baseline computed attention explicitly
    torch.testing.assert_close(pred_base, pred_fast, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_base, loss_fast, rtol=1e-4, atol=1e-6)

    vit = benchmark.build_model(args, "finetune_baseline")
    assert isinstance(vit, models_vit.VisionTransformer)
    assert all(m.fused_attn is False for m in vit.modules() if hasattr(m, "fused_attn"))


def test_optimizers_fast_vs_original():
    args = tiny_args()
    cpu = torch.device("cpu")
    mae = benchmark.build_model(args, "fast")
    fast = benchmark.build_optimizer(mae, "fast", cpu)
    base = benchmark.build_optimizer(mae, "baseline", cpu)
    assert fast.defaults["fused"] is True and fast.defaults["betas"] == (0.9, 0.95)
    assert base.defaults["foreach"] is False and not base.defaults["fused"]
    # weight decay groups: 1-D params none, the frozen sin-cos pos embeds not trained at all
    trained = {id(p): g["weight_decay"] for g in fast.param_groups for p in g["params"]}
    assert id(mae.pos_embed) not in trained and id(mae.decoder_pos_embed) not in trained
    assert trained[id(mae.blocks[0].norm1.weight)] == 0.0
    assert trained[id(mae.blocks[0].attn.qkv.weight)] == 0.05
    assert trained[id(mae.cls_token)] == 0.05  # 3-D: decayed, as the original

    vit = benchmark.build_model(args, "finetune")
    groups = benchmark.build_optimizer(vit, "finetune", cpu).param_groups
    assert {g["lr_scale"] for g in groups} == {0.75 ** k for k in range(4)}  # 2 blocks -> 3 layers + head


# ---------------------------------------------------------------------------------------------
# All tokens (encoder w/ mask tokens)
# ---------------------------------------------------------------------------------------------

def test_all_tokens_encoder_sees_every_patch(tiny_mae):
    torch.manual_seed(0)
    mae = tiny_mae(**TINY)
    wrapper = benchmark.AllTokensMAE(mae)
    seen = []
    mae.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(("enc", inp[0].shape)))
    mae.decoder_blocks[0].register_forward_hook(lambda m, inp, out: seen.append(("dec", inp[0].shape)))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)

    _, _, mask_mae = mae(imgs, noise=noise)
    assert seen == [("enc", (2, 1 + 4, 8)), ("dec", (2, 1 + 16, 4))]
    seen.clear()
    loss, pred, mask = wrapper(imgs, noise=noise)
    assert seen == [("enc", (2, 1 + 16, 8)), ("dec", (2, 1 + 16, 4))]
    assert torch.equal(mask, mask_mae)  # the same patches are removed
    assert pred.shape == (2, 16, 192) and torch.isfinite(loss)

    loss.backward()
    assert wrapper.mask_token.grad is not None and wrapper.mask_token.grad.abs().sum() > 0
    # MAE's loss on the removed patches of the same mask
    torch.testing.assert_close(loss, mae.forward_loss(imgs, pred, mask))


def test_all_tokens_replaces_removed_patches_by_the_mask_token(tiny_mae):
    """Removed patches enter the encoder as the mask token: their pixels do not matter."""
    torch.manual_seed(0)
    mae = tiny_mae(**TINY)
    wrapper = benchmark.AllTokensMAE(mae)
    imgs, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    _, pred, mask = wrapper(imgs, noise=noise)
    removed = (mask[0] == 1).nonzero()[0, 0].item()
    row, col = divmod(removed, 4)
    other = imgs.clone()
    other[0, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 5.0
    _, pred_other, _ = wrapper(other, noise=noise)
    torch.testing.assert_close(pred_other, pred)
    visible = (mask[0] == 0).nonzero()[0, 0].item()
    row, col = divmod(visible, 4)
    other = imgs.clone()
    other[0, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 5.0
    assert not torch.allclose(wrapper(other, noise=noise)[1], pred)


# ---------------------------------------------------------------------------------------------
# SimMIM modes
# ---------------------------------------------------------------------------------------------

# the SimMIM ViT of tiny_args: img 32, patch 8 -> L = 16 patches, width 8, 2 blocks
TINY_SIMMIM_VIT = dict(img_size=32, patch_size=8, embed_dim=8, depth=2, num_heads=2)
# a two-stage Swin at 32 px: 8x8 tokens of width 8 (window 4: four windows), then 4x4 of 16 (one)
SMALL_SWIN = dict(img_size=32, patch_size=4, embed_dim=8, depths=(1, 1), windows=(4, 4))


def test_simmim_flops_formulas_by_hand():
    # SimMIM ViT, L=16, ppC=192, D=8, depth 1: patch 2*16*192*8 = 49152, block(17, 8) = 35360,
    # decoder 1x1 conv 2*16*8*192 = 49152
    assert benchmark.simmim_vit_forward_flops(16, 192, 8, 1) == 133664
    # a windowed block, 64 tokens of width 8 in 4 windows of 16: linear 2*64*(4*64 + 2*8*32) = 98304,
    # attention 4 windows x 2*2*16*16*8 = 32768
    assert benchmark.block_flops(64, 8, window_tokens=16) == 98304 + 4 * 8192
    assert benchmark.block_flops(17, 4, window_tokens=None) == benchmark.block_flops(17, 4)
    # Swin: patch embed 2*64*48*8 = 49152; stage 0 block(64, 8, T_w 16) = 131072;
    # merging 2*16*32*16 = 16384; stage 1 (4x4, C 16, one window of 16) linear
    # 2*16*(4*256 + 2*16*64) = 98304 + attention 2*2*16*16*16 = 16384; decoder (stride 4*2 = 8)
    # on the final 4x4 map of width 16: 2*16*16*(8*8*3) = 98304
    assert benchmark.swin_forward_flops(**SMALL_SWIN) == 49152 + 131072 + 16384 + 114688 + 98304


def test_simmim_flops_match_torch_flop_counter():
    """torch's counter on the real forwards (explicit attention: q k^T and attn v are matmuls it
    sees) = the formulas exactly: every matrix product is counted, the rest is not a matmul."""
    torch.manual_seed(0)
    n = 3
    vit = models_simmim.simmim_vit_tiny_patch16(**TINY_SIMMIM_VIT)
    benchmark.use_explicit_attention(vit)
    with FlopCounterMode(display=False) as counter:
        vit(torch.randn(n, 3, 32, 32), torch.randint(0, 2, (n, 4, 4)))
    assert counter.get_total_flops() == n * benchmark.simmim_vit_forward_flops(16, 192, 8, 2)

    swin = models_simmim.simmim_swin_tiny_patch4_window4_64(embed_dim=8, depths=(1, 1), num_heads=(1, 2))
    benchmark.use_explicit_attention(swin)
    with FlopCounterMode(display=False) as counter:
        swin(torch.randn(n, 3, 64, 64), torch.randint(0, 2, (n, 16, 16)))
    # 64 px: 16x16 tokens in 16 windows of 4x4 (shift none: one block per stage), then 8x8 in 4
    formula = benchmark.swin_forward_flops(64, 4, 8, (1, 1), (4, 4))
    assert counter.get_total_flops() == n * formula

    # the default tiny Swin: shifted blocks, windows clipped to the stage resolution (4, 4, 4, 2)
    swin = models_simmim.simmim_swin_tiny_patch4_window4_64()
    with FlopCounterMode(display=False) as counter:
        swin(torch.randn(1, 3, 64, 64), torch.randint(0, 2, (1, 16, 16)))
    formula = benchmark.swin_forward_flops(64, 4, 32, (2, 2, 2, 2), (4, 4, 4, 2))
    assert counter.get_total_flops() == formula
    assert benchmark.train_flops_per_image(swin, "simmim_swin", 0.75) == 3 * formula


def test_simmim_train_flops_read_off_the_models():
    torch.manual_seed(0)
    vit = models_simmim.simmim_vit_tiny_patch16(**TINY_SIMMIM_VIT)
    # 2 blocks: patch 49152 + 2 x block(17, 8) 35360 + decoder 49152
    assert benchmark.train_flops_per_image(vit, "simmim_vit", 0.75) == 3 * 169024
    assert benchmark.train_flops_per_image(vit, "simmim_vit_baseline", 0.75) == 3 * 169024
    with torch.device("meta"):  # the official sizes with fewer blocks, no memory
        swin_b = models_simmim.simmim_swin_base_patch4_window6_192(depths=(1, 1, 2, 1))
        swin_l = models_simmim.simmim_swin_large_patch4_window12_192(depths=(1, 1, 1, 1))
    dims = benchmark._swin_dims(swin_b.encoder)
    assert dims == dict(img_size=192, patch_size=4, embed_dim=128, depths=[1, 1, 2, 1], windows=[6, 6, 6, 6],
                        mlp_ratio=4.0, in_chans=3)
    assert benchmark._swin_dims(swin_l.encoder)["windows"] == [12, 12, 12, 6]  # stage 4 clipped (spec 3)
    flops = benchmark.train_flops_per_image(swin_b, "simmim_swin", 0.75)
    assert flops == 3 * benchmark.swin_forward_flops(192, 4, 128, (1, 1, 2, 1), (6, 6, 6, 6))
    # the published encoder figures (multiply-accumulates): Swin-B at 224 15.4 G (Swin paper, Table 1),
    # ViT-B/16 17.6 G (DeiT); the formulas less their decoder conv, in MACs
    swin_b_224 = benchmark.swin_forward_flops(224, 4, 128, (2, 2, 18, 2), (7, 7, 7, 7)) - 2 * 49 * 1024 * 3072
    assert swin_b_224 / 2 == pytest.approx(15.4e9, rel=0.01)
    vit_b = benchmark.simmim_vit_forward_flops(196, 768, 768, 12) - 2 * 196 * 768 * 768
    assert vit_b / 2 == pytest.approx(17.6e9, rel=0.01)


def test_simmim_models_masks_and_optimizer():
    cpu = torch.device("cpu")
    args = tiny_args()
    torch.manual_seed(0)
    fast = benchmark.build_model(args, "simmim_vit")
    assert isinstance(fast.encoder, models_simmim.VisionTransformerForSimMIM)
    # the encoder of --model's size with tiny_args' encoder kwargs, at --input_size / --patch_size
    assert benchmark.mode_model_name(args, "simmim_vit") == "simmim_vit_tiny_patch16"
    assert fast.patch_size == 8 and fast.encoder.patch_embed.img_size == (32, 32)
    assert fast.encoder.embed_dim == 8 and len(fast.encoder.blocks) == 2
    assert benchmark.attention_kind(fast) == "sdpa"
    baseline = benchmark.build_model(args, "simmim_vit_baseline")
    assert benchmark.attention_kind(baseline) == "explicit"
    swin = benchmark.build_model(args, "simmim_swin")
    assert swin.encoder.patch_embed.img_size == (64, 64)  # the factory's own size
    assert benchmark.attention_kind(swin) == "explicit"  # main_pretrain's Swin: timm's explicit default
    swin32 = benchmark.build_model(tiny_args(simmim_input_size=32), "simmim_swin_baseline")
    assert swin32.encoder.patch_embed.img_size == (32, 32)

    # masks: MaskGenerator(64, 32, 4, 0.6): 2x2 blocks, ceil(2.4) = 3 masked, each 8x8 patches
    imgs, masks = benchmark.synthetic_batch(args, "simmim_swin", swin, cpu)
    assert imgs.shape == (2, 3, 64, 64) and masks.shape == (2, 16, 16) and masks.dtype == torch.int64
    assert masks.sum(dim=(1, 2)).tolist() == [192, 192]
    blocks = masks.reshape(2, 2, 8, 2, 8)
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))  # whole 32 px blocks
    assert torch.equal(benchmark.simmim_masks(args, swin, cpu), masks)  # seeded with --seed
    masks16 = benchmark.simmim_masks(tiny_args(mask_patch_size=16), swin, cpu)  # 4x4 blocks, 10 masked
    assert masks16.sum(dim=(1, 2)).tolist() == [160, 160]
    vit112 = benchmark.build_model(tiny_args(input_size=112, patch_size=16), "simmim_vit")
    with pytest.raises(ValueError, match="not divisible.*--mask_patch_size"):
        benchmark.simmim_masks(args, vit112, cpu)
    assert benchmark.simmim_masks(tiny_args(mask_patch_size=16), vit112, cpu).shape == (2, 7, 7)

    # AdamW as main_pretrain builds it for SimMIM: simmim_param_groups, betas (0.9, 0.999)
    for mode, model in (("simmim_vit", fast), ("simmim_swin", swin)):
        opt = benchmark.build_optimizer(model, mode, cpu)
        assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.999)
        expected = simmim_param_groups(model, 0.05)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
        assert [[id(p) for p in g["params"]] for g in opt.param_groups] == \
            [[id(p) for p in g["params"]] for g in expected]
        base = benchmark.build_optimizer(model, mode + "_baseline", cpu)
        assert base.defaults["foreach"] is False and not base.defaults["fused"]
        assert base.defaults["betas"] == (0.9, 0.999)


def test_simmim_model_names_and_errors(capsys):
    args = tiny_args(model="mae_vit_base_patch16_dec512d8b")
    assert benchmark.simmim_name(args, "vit") == "simmim_vit_base_patch16"
    assert benchmark.simmim_name(tiny_args(simmim_vit_model="simmim_vit_base_patch16"), "vit") == \
        "simmim_vit_base_patch16"
    with pytest.raises(ValueError, match="--simmim_vit_model 'simmim_vit_large_patch16' \\(from --model "
                                         "mae_vit_large_patch16\\)") as error:
        benchmark.simmim_name(tiny_args(model="mae_vit_large_patch16"), "vit")
    assert "simmim_vit_base_patch16, simmim_vit_tiny_patch16" in str(error.value)
    with pytest.raises(ValueError, match="--simmim_swin_model 'simmim_vit_tiny_patch16'") as error:
        benchmark.simmim_name(tiny_args(simmim_swin_model="simmim_vit_tiny_patch16"), "swin")
    choices = str(error.value).split("choose one of: ")[1].split(", ")
    assert choices == ["simmim_swin_base_patch4_window6_192", "simmim_swin_large_patch4_window12_192",
                       "simmim_swin_tiny_patch4_window4_64"]  # only the Swins

    # the CLI stops before running any row
    args = parsed_args("--device", "cpu", "--modes", "fast,simmim_swin", "--simmim_swin_model", "simmim_swin_huge")
    with pytest.raises(SystemExit, match="unknown --simmim_swin_model 'simmim_swin_huge'; choose one of"):
        benchmark.main(args)
    assert "running" not in capsys.readouterr().out


def test_cli_simmim_modes(tmp_path, monkeypatch, capsys):
    """Two SimMIM rows on tiny models on the CPU (the ViT of --model at 32 px; the tiny Swin at
    --simmim_input_size 32, the original's way): named, positive, FLOPs from the formulas, every
    step clipped at 5 (the four rows together: the slow CLI smoke below)."""
    clips = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *a, **kw):
        clips.append(max_norm)
        return clip(parameters, max_norm, *a, **kw)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    out = tmp_path / "bench.json"
    args = parsed_args("--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", "32",
                       "--patch_size", "8", "--model_kwargs", json.dumps(dict(depth=1, decoder_depth=1)),
                       "--batch_size", "2", "--steps", "1", "--warmup", "1",
                       "--modes", "simmim_vit,simmim_swin_baseline",
                       "--simmim_swin_model", "simmim_swin_tiny_patch4_window4_64", "--simmim_input_size", "32",
                       "--json", str(out))
    benchmark.main(args)
    assert clips == [5.0] * 2 * 2  # 2 modes x (1 + 1) steps

    vit, swin = json.loads(out.read_text())["rows"]
    assert (vit["mode"], vit["model"]) == ("simmim_vit", "simmim_vit_tiny_patch16")
    assert (swin["mode"], swin["model"]) == ("simmim_swin_baseline", "simmim_swin_tiny_patch4_window4_64")
    for r in (vit, swin):
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0 and r["batch"] == 2
        assert r["precision"] == "fp32" and r["memory_mb"] > 0
    assert vit["attention"] == "sdpa" and swin["attention"] == "explicit"
    assert vit["speedup_vs_baseline"] is None and swin["speedup_vs_baseline"] == 1.0
    vit_flops = 3 * benchmark.simmim_vit_forward_flops(16, 192, 192, 1)  # tiny ViT width 192, depth 1
    assert vit["train_gflops_per_image"] == pytest.approx(vit_flops / 1e9)
    swin_flops = 3 * benchmark.swin_forward_flops(32, 4, 32, (2, 2, 2, 2), (4, 4, 2, 1))
    assert swin["train_gflops_per_image"] == pytest.approx(swin_flops / 1e9)
    table = capsys.readouterr().out
    assert "simmim_swin_tiny_patch4_window4_64" in table and "simmim_swin_baseline" in table


def test_speedups_against_the_baseline_of_the_same_task():
    modes = ["fast", "baseline", "all_tokens", "finetune", "finetune_baseline", "simmim_vit",
             "simmim_vit_baseline", "simmim_swin", "fast+data"]
    rows = [dict(mode=m, step_ms=float(10 + i)) for i, m in enumerate(modes)]
    benchmark.add_speedups(rows)
    speedup = {r["mode"]: r["speedup_vs_baseline"] for r in rows}
    assert speedup["fast"] == 11 / 10 and speedup["all_tokens"] == 11 / 12 and speedup["baseline"] == 1.0
    assert speedup["finetune"] == 14 / 13 and speedup["finetune_baseline"] == 1.0
    assert speedup["simmim_vit"] == 16 / 15 and speedup["simmim_vit_baseline"] == 1.0
    assert speedup["simmim_swin"] is None  # no simmim_swin_baseline row
    assert speedup["fast+data"] is None  # data-bound: not compared


# ---------------------------------------------------------------------------------------------
# Helpers and the CLI
# ---------------------------------------------------------------------------------------------

def test_vit_name_maps_every_mae_factory():
    assert benchmark.vit_name("mae_vit_base_patch16_dec512d8b") == "vit_base_patch16"
    assert benchmark.vit_name("mae_vit_huge_patch14") == "vit_huge_patch14"
    for name in dir(models_mae):
        if name.startswith("mae_vit"):
            assert benchmark.vit_name(name) in models_vit.__dict__, name
    with pytest.raises(SystemExit):
        benchmark.parse_modes("fast,turbo")
    assert benchmark.parse_modes("all") == list(benchmark.ALL_MODES)


def test_models_come_from_util_models():
    assert benchmark.model_from_name is util_models.model_from_name
    args = tiny_args()
    mae = benchmark.build_mae(args)
    assert isinstance(mae, models_mae.MaskedAutoencoderViT)
    assert mae.patch_embed.patch_size == (8, 8) and mae.patch_embed.num_patches == 16
    assert len(mae.blocks) == 2 and mae.decoder_embed.out_features == 4

    # no --patch_size: the factory's (16), or --model_kwargs' when it has one
    mae = benchmark.build_mae(tiny_args(patch_size=None))
    assert mae.patch_embed.patch_size == (16, 16) and mae.patch_embed.num_patches == 4
    kwargs = dict(tiny_args().model_kwargs, patch_size=4)
    mae = benchmark.build_mae(tiny_args(patch_size=None, model_kwargs=kwargs))
    assert mae.patch_embed.patch_size == (4, 4)
    assert benchmark.build_mae(tiny_args(model_kwargs=kwargs)).patch_embed.patch_size == (8, 8)

    vit = benchmark.build_vit(tiny_args(drop_path=0.2))
    assert isinstance(vit, models_vit.VisionTransformer)
    assert vit.head.out_features == 10 and vit.global_pool and len(vit.blocks) == 2
    assert vit.patch_embed.patch_size == (8, 8) and vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)

    with pytest.raises(ValueError, match="mae_vit_tiny_patch16") as error:
        benchmark.build_mae(tiny_args(model="mae_vit_nano_patch16"))
    assert "mae_vit_nano_patch16" in str(error.value) and "mae_vit_base_patch16" in str(error.value)


def parsed_args(*argv):
    """The benchmark's own parser, and what main() sets before running modes."""
    args = benchmark.get_args_parser().parse_args(list(argv))
    args.distributed = False
    args.precision = "fp32"
    args.input_hw = (args.input_size, args.input_size)
    return args


def test_data_pipeline_is_util_datasets(tmp_path):
    benchmark.make_jpegs(str(tmp_path), 10, (48, 40))
    args = parsed_args("--device", "cpu", "--data_path", str(tmp_path), "--input_size", "32",
                       "--batch_size", "4", "--num_workers", "0")
    assert args.pin_mem is True and args.skip_bad_images is False and args.fast_decode is False
    dataset, sampler, loader = benchmark.build_data(args)
    assert isinstance(dataset, ImageFolderDataset) and dataset.root == str(tmp_path / "train")
    assert len(dataset) == 10 and dataset.classes == ["synthetic"]
    assert isinstance(dataset.transform, PretrainTransform) and not dataset.transform.fast_decode
    assert dataset.transform.size == (32, 32)
    assert isinstance(sampler, SeededSampler) and isinstance(sampler.sampler, torch.utils.data.RandomSampler)
    assert len(loader) == 2 and loader.drop_last and not loader.pin_memory  # pinned only for CUDA

    batches = benchmark.endless(sampler, loader)
    first = [next(batches) for _ in range(2)]
    assert sampler.epoch == 0
    assert [tuple(x.shape) for x, _ in first] == [(4, 3, 32, 32)] * 2
    assert all(torch.equal(y, torch.zeros(4, dtype=torch.long)) for _, y in first)
    next(batches)
    assert sampler.epoch == 1  # a new epoch, a new order and new augmentations

    # the same images and augmentations as the DataLoader main_pretrain builds (seed, epoch 0)
    _, sampler2, loader2 = benchmark.build_data(args)
    sampler2.set_epoch(0)
    for (x, _), (x2, _) in zip(first, loader2):
        assert torch.equal(x, x2)

    fast = parsed_args("--data_path", str(tmp_path), "--batch_size", "4", "--num_workers", "0",
                       "--fast_decode", "--no_pin_mem")
    assert benchmark.build_data(fast)[0].transform.fast_decode and fast.pin_mem is False


def test_data_pipeline_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (40, 40)).save(flat / "a.jpg")
    with pytest.raises(FileNotFoundError, match="train"):  # an ImageFolder root is required
        benchmark.build_data(parsed_args("--data_path", str(flat)))
    benchmark.make_jpegs(str(tmp_path / "few"), 3, (40, 40))
    with pytest.raises(ValueError, match="fewer than one batch"):
        benchmark.build_data(parsed_args("--data_path", str(tmp_path / "few"), "--batch_size", "4",
                                         "--num_workers", "0"))


def test_memory_column_filled_on_cpu(capsys):
    """On the CPU a mode's memory is the process's max RSS so far, in MB: a positive number,
    between getrusage's figure before the mode and after it, and printed in the table."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args = parsed_args("--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", "32",
                       "--patch_size", "8", "--model_kwargs", json.dumps(dict(depth=1, decoder_depth=1)),
                       "--batch_size", "2", "--steps", "1", "--warmup", "1", "--modes", "fast")
    report = benchmark.main(args)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (row,) = report["rows"]
    assert row["memory_kind"] == "cpu_max_rss"
    assert isinstance(row["memory_mb"], float) and row["memory_mb"] > 0
    assert before <= row["memory_mb"] <= after
    out = capsys.readouterr().out
    assert "max RSS so far MB" in out and f"{row['memory_mb']:.0f}" in out.split("fast", 1)[1]
    assert any("max resident set so far" in note for note in report["notes"])

    table = benchmark.format_table([dict(row, memory_mb=None)])
    assert "n/a" in table  # what an unfilled column would print


def test_memory_on_cuda_is_max_memory_allocated(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    cuda = torch.device("cuda")
    benchmark.reset_peak_memory(cuda)
    assert calls == ["reset"]
    assert benchmark.peak_memory(cuda) == (3.0, "cuda_max_allocated")
    benchmark.reset_peak_memory(torch.device("cpu"))
    assert calls == ["reset"]  # nothing to reset on the CPU
    mb, kind = benchmark.peak_memory(torch.device("cpu"))
    assert kind == "cpu_max_rss"
    assert mb == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_make_jpegs(tmp_path):
    out = benchmark.make_jpegs(str(tmp_path), 3, (50, 30))
    files = sorted(os.listdir(out))
    assert files == ["img_00000.jpg", "img_00001.jpg", "img_00002.jpg"]
    arrays = []
    for f in files:
        with Image.open(os.path.join(out, f)) as img:
            assert img.format == "JPEG" and img.size == (50, 30) and img.mode == "RGB"
            arrays.append(torch.from_numpy(np.asarray(img, dtype=np.float32)))
    assert all(a.std() > 5 for a in arrays)  # not flat
    assert not torch.equal(arrays[0], arrays[1])


@pytest.mark.slow
def test_cli_smoke_all_modes_and_data(tmp_path, run_script):
    benchmark.make_jpegs(str(tmp_path / "jpegs"), 8, (64, 48))
    out = tmp_path / "bench.json"
    # run_script asserts the exit status 0
    _, output = run_script("benchmark.py", "--device", "cpu", "--model", "mae_vit_tiny_patch16",
                           "--input_size", "32", "--patch_size", "8",
                           "--model_kwargs", json.dumps(dict(depth=2, decoder_depth=1)),
                           "--batch_size", "4", "--steps", "2", "--warmup", "1", "--modes", "all",
                           "--data_path", tmp_path / "jpegs", "--num_workers", "1", "--n", "8", "--fast_decode",
                           "--num_classes", "10", "--simmim_swin_model", "simmim_swin_tiny_patch4_window4_64",
                           "--simmim_input_size", "32", "--json", out, timeout=180)
    assert "MAE saving" in output and "speedup" in output and "SimMIM / MAE step" in output

    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == ["fast", "baseline", "all_tokens", "finetune", "finetune_baseline", "simmim_vit",
                          "simmim_vit_baseline", "simmim_swin", "simmim_swin_baseline", "fast+data"]
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0
        assert r["batch"] == 4 and r["mfu"] is None  # no MFU on the CPU
        assert r["memory_kind"] == "cpu_max_rss" and r["memory_mb"] > 0
    # the process's max RSS so far: it never goes down from one row to the next
    memory = [r["memory_mb"] for r in rows.values()]
    assert memory == sorted(memory)
    assert "max RSS so far MB" in output
    assert rows["baseline"]["precision"] == "fp32" and rows["baseline"]["attention"] == "explicit"
    assert rows["fast"]["attention"] == "sdpa" and rows["fast"]["precision"] == "fp32"
    assert rows["baseline"]["speedup_vs_baseline"] == 1.0
    assert rows["finetune_baseline"]["speedup_vs_baseline"] == 1.0
    assert rows["all_tokens"]["train_gflops_per_image"] > rows["fast"]["train_gflops_per_image"]
    assert rows["finetune"]["model"] == "vit_tiny_patch16"
    assert rows["simmim_vit_baseline"]["model"] == "simmim_vit_tiny_patch16"
    assert rows["simmim_swin"]["model"] == "simmim_swin_tiny_patch4_window4_64"
    assert rows["simmim_vit_baseline"]["speedup_vs_baseline"] == 1.0
    assert rows["simmim_swin_baseline"]["speedup_vs_baseline"] == 1.0
    assert [rows[m]["attention"] for m in ("simmim_vit", "simmim_vit_baseline", "simmim_swin_baseline")] == \
        ["sdpa", "explicit", "explicit"]
    data = report["data"]
    assert data["transform_images_per_s_per_core"] > 0 and data["loader_images_per_s_per_worker"] > 0
    assert data["images"] == 8 and data["fast_decode"] is True
    assert report["torch"] == torch.__version__ and "benchmark.py" in report["command"]
    assert report["device"]
