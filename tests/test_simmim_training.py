"""SimMIM's training pieces against SPEC-simmim: the mask generator (section 5), the pretraining
transform, the lr schedules with the official one-update lag (section 6), the weight-decay sets of
pretraining (section 6, against the measured group sizes of the section 8 key lists) and the
finetuning layer ids and groups (section 10, single layer decay)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from util.datasets import ImageFolderDataset, seeded_rngs
from util.lr_decay import (get_layer_id_for_simmim_vit, get_layer_id_for_swin, simmim_param_group_names,
                           simmim_param_group_names_lrd, simmim_param_groups, simmim_param_groups_lrd)
from util.lr_sched import SimMIMLRSchedule, simmim_lr, simmim_lr_index
from util.masking import MaskGenerator, SimMIMTransform, build_simmim_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Key lists of SPEC section 8 (pretraining) and the finetune models of section 9
# ---------------------------------------------------------------------------------------------

def vit_keys(prefix="encoder.", finetune=False, dim=768, depth=12, heads=12, grid=14):
    """[(name, shape, is_parameter)] of the SimMIM ViT-B/16 (pretrain) or the BEiT-style finetune ViT."""
    rows = (2 * grid - 1) ** 2 + 3
    keys = [("cls_token", (1, 1, dim))] + ([] if finetune else [("mask_token", (1, 1, dim))])
    keys += [("patch_embed.proj.weight", (dim, 3, 16, 16)), ("patch_embed.proj.bias", (dim,))]
    if not finetune:
        keys += [("rel_pos_bias.relative_position_bias_table", (rows, heads)),
                 ("rel_pos_bias.relative_position_index", (grid * grid + 1,) * 2)]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [(b + "gamma_1", (dim,)), (b + "gamma_2", (dim,)), (b + "norm1.weight", (dim,)),
                 (b + "norm1.bias", (dim,)), (b + "attn.q_bias", (dim,)), (b + "attn.v_bias", (dim,))]
        if finetune:
            keys += [(b + "attn.relative_position_bias_table", (rows, heads)),
                     (b + "attn.relative_position_index", (grid * grid + 1,) * 2)]
        keys += [(b + "attn.qkv.weight", (3 * dim, dim)), (b + "attn.proj.weight", (dim, dim)),
                 (b + "attn.proj.bias", (dim,)), (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
                 (b + "mlp.fc1.weight", (4 * dim, dim)), (b + "mlp.fc1.bias", (4 * dim,)),
                 (b + "mlp.fc2.weight", (dim, 4 * dim)), (b + "mlp.fc2.bias", (dim,))]
    if finetune:
        keys += [("fc_norm.weight", (dim,)), ("fc_norm.bias", (dim,)), ("head.weight", (1000, dim)),
                 ("head.bias", (1000,))]
        return [(n, s, "index" not in n) for n, s in keys]
    keys += [("norm.weight", (dim,)), ("norm.bias", (dim,))]
    keys = [(prefix + n, s) for n, s in keys] + [("decoder.0.weight", (16 * 16 * 3, dim, 1, 1)),
                                                  ("decoder.0.bias", (16 * 16 * 3,))]
    return [(n, s, "index" not in n) for n, s in keys]


def swin_keys(prefix="encoder.", finetune=False, dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
              img=192, window=6):
    """[(name, shape, is_parameter)] of the SimMIM Swin-B (pretrain, window 6 at 192) or its classifier."""
    keys = [] if finetune else [("mask_token", (1, 1, dim))]
    keys += [("patch_embed.proj.weight", (dim, 3, 4, 4)), ("patch_embed.proj.bias", (dim,)),
             ("patch_embed.norm.weight", (dim,)), ("patch_embed.norm.bias", (dim,))]
    res = img // 4
    for s, (depth, h) in enumerate(zip(depths, heads)):
        c, w = dim * 2 ** s, min(window, res)
        for j in range(depth):
            b = f"layers.{s}.blocks.{j}."
            if j % 2 and res > window:
                keys += [(b + "attn_mask", ((res // w) ** 2, w * w, w * w))]
            keys += [(b + "norm1.weight", (c,)), (b + "norm1.bias", (c,)),
                     (b + "attn.relative_position_bias_table", ((2 * w - 1) ** 2, h)),
                     (b + "attn.relative_position_index", (w * w, w * w)),
                     (b + "attn.qkv.weight", (3 * c, c)), (b + "attn.qkv.bias", (3 * c,)),
                     (b + "attn.proj.weight", (c, c)), (b + "attn.proj.bias", (c,)),
                     (b + "norm2.weight", (c,)), (b + "norm2.bias", (c,)),
                     (b + "mlp.fc1.weight", (4 * c, c)), (b + "mlp.fc1.bias", (4 * c,)),
                     (b + "mlp.fc2.weight", (c, 4 * c)), (b + "mlp.fc2.bias", (c,))]
        if s < len(depths) - 1:
            d = f"layers.{s}.downsample."
            keys += [(d + "reduction.weight", (2 * c, 4 * c)), (d + "norm.weight", (4 * c,)),
                     (d + "norm.bias", (4 * c,))]
        res //= 2
    f = dim * 2 ** (len(depths) - 1)
    keys += [("norm.weight", (f,)), ("norm.bias", (f,))]
    if finetune:
        keys += [("head.weight", (1000, f)), ("head.bias", (1000,))]
    else:
        keys = [(prefix + n, s) for n, s in keys] + [("decoder.0.weight", (32 * 32 * 3, f, 1, 1)),
                                                      ("decoder.0.bias", (32 * 32 * 3,))]
    return [(n, s, n.split(".")[-1] not in ("relative_position_index", "attn_mask")) for n, s in keys]


def module_from_keys(keys):
    """An nn.Module whose named_parameters() / named_buffers() are the given keys (meta tensors)."""
    root = nn.Module()
    for name, shape, is_param in keys:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        tensor = torch.empty(shape, device="meta")
        if is_param:
            module.register_parameter(leaf, nn.Parameter(tensor))
        else:
            module.register_buffer(leaf, tensor)
    return root


def test_key_lists_match_spec_counts():
    """The key lists reproduce SPEC section 8's entry and value counts (so the groups below are
    computed on the official names)."""
    for keys, entries, values, params in ((vit_keys(), 190, 86_295_529, 86_256_720),
                                          (swin_keys(), 365, 90_055_544, 89_874_104)):
        model = module_from_keys(keys)
        assert len(model.state_dict()) == entries
        assert sum(t.numel() for t in model.state_dict().values()) == values
        assert sum(p.numel() for p in model.parameters()) == params


# ---------------------------------------------------------------------------------------------
# Mask generator (section 5)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, patch, grid, rand, count", [
    (192, 4, 48, 6, 22),   # Swin: 36 blocks, ceil(21.6) = 22
    (224, 16, 14, 7, 30),  # ViT: 49 blocks, ceil(29.4) = 30
])
def test_mask_counts_and_blocks(size, patch, grid, rand, count):
    gen = MaskGenerator(size, mask_patch_size=32, model_patch_size=patch, mask_ratio=0.6)
    assert (gen.token_count, gen.mask_count, gen.scale) == (rand * rand, count, 32 // patch)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = gen(rng)
        assert mask.shape == (grid, grid) and mask.dtype == np.int64
        assert set(np.unique(mask)) <= {0, 1}
        s = 32 // patch
        blocks = mask.reshape(rand, s, rand, s)  # each 32 px block constant at the patch grid
        assert (blocks == blocks[:, :1, :, :1]).all()
        assert blocks[:, 0, :, 0].sum() == count
        assert mask.sum() == count * s * s


def test_mask_count_rounds_up_float_product():
    assert 36 * 0.6 < 21.6 and int(36 * 0.6) == 21  # the float product is just below 21.6
    assert MaskGenerator(192, 32, 4, 0.6).mask_count == 22
    assert MaskGenerator(64, 32, 4, 0.5).mask_count == 2
    assert MaskGenerator(64, 32, 4, 0.0).mask_count == 0


def test_mask_blocks_uniform():
    """Every block is masked with probability mask_count / token_count (a uniform subset)."""
    gen = MaskGenerator(192, 32, 32, 0.6)  # model patch = block: the (6, 6) block grid itself
    rng = np.random.default_rng(1)
    freq = np.mean([gen(rng) for _ in range(3000)], axis=0)  # (6, 6)
    assert freq.shape == (6, 6)
    assert np.abs(freq - 22 / 36).max() < 0.05  # binomial std ~0.009


def test_mask_rng_and_per_sample_seeding():
    gen = MaskGenerator(224, 32, 16, 0.6)
    assert (gen(np.random.default_rng(5)) == gen(np.random.default_rng(5))).all()
    with seeded_rngs(123):
        a = gen()
    with seeded_rngs(123):
        b = gen()
    with seeded_rngs(124):
        c = gen()
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=200, mask_patch_size=32, model_patch_size=4), "not divisible by the mask patch"),
    (dict(input_size=192, mask_patch_size=32, model_patch_size=12), "not divisible by the model"),
    (dict(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=1.5), "mask ratio"),
])
def test_mask_size_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskGenerator(**kwargs)


# ---------------------------------------------------------------------------------------------
# Pretraining transform (section 5)
# ---------------------------------------------------------------------------------------------

def test_transform_equals_official_ops():
    """Under the same torch seed: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3, bilinear), flip,
    ToTensor, Normalize, done by hand; the mask at the patch grid."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120), dtype=np.uint8)).convert("L")
    transform = SimMIMTransform(64, model_patch_size=4, mask_patch_size=32, mask_ratio=0.6)
    for seed in range(6):
        torch.manual_seed(seed)
        out, mask = transform(img, np.random.default_rng(seed))
        torch.manual_seed(seed)
        rgb = img.convert("RGB")
        i, j, h, w = _rrc_params(rgb)
        ref = F.resized_crop(rgb, i, j, h, w, [64, 64], InterpolationMode.BILINEAR)
        if torch.rand(1) < 0.5:
            ref = F.hflip(ref)
        ref = F.normalize(F.to_tensor(ref), MEAN, STD)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        assert torch.equal(out, ref)
        assert mask.shape == (16, 16) and mask.dtype == torch.int64
        assert int(mask.sum()) == 3 * 64  # ceil(4 * 0.6) = 3 of the 2x2 blocks, 8x8 patches each


def _rrc_params(img):
    from torchvision import transforms
    return transforms.RandomResizedCrop.get_params(img, (0.67, 1.0), (3.0 / 4.0, 4.0 / 3.0))


def test_transform_crop_scale(monkeypatch):
    """The crop boxes are drawn with scale (0.67, 1) and ratio (3/4, 4/3): every box covers at
    least ~67% of the image (up to pixel rounding)."""
    from torchvision import transforms
    draws, get_params = [], transforms.RandomResizedCrop.get_params

    def spy(img, scale, ratio):
        box = get_params(img, scale, ratio)
        draws.append((scale, ratio, box))
        return box
    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(spy))
    transform = SimMIMTransform(32, model_patch_size=4)
    img = Image.new("RGB", (100, 100))
    torch.manual_seed(0)
    for _ in range(100):
        transform(img, np.random.default_rng(0))
    assert len(draws) == 100
    assert all(scale == (0.67, 1.0) and ratio == pytest.approx((0.75, 4 / 3))
               for scale, ratio, _ in draws)
    areas = [h * w / 1e4 for _, _, (_, _, h, w) in draws]
    assert min(areas) >= 0.66 and max(areas) <= 1.0 and max(areas) - min(areas) > 0.2


def test_build_simmim_transform_and_dataset(make_args, toy_data):
    """Through ImageFolderDataset with (index, seed) items: (img, mask) pairs, the same for the same
    seed (mask included), another mask for another seed."""
    args = make_args("pretrain", "--input_size", 32, "--mask_ratio", 0.6)
    transform = build_simmim_transform(args, model_patch_size=4)
    assert transform.mask_generator.mask_count == 1  # ceil(1 * 0.6) of the single 32 px block
    args = make_args("pretrain", "--input_size", 64, "--mask_ratio", 0.6)
    transform = build_simmim_transform(args, model_patch_size=16)
    data = toy_data(train_per_class=2, val_per_class=1, size=32, classes=("horizontal_stripes", "disc"))
    dataset = ImageFolderDataset(os.path.join(data, "train"), transform)
    (img, mask), label = dataset[(1, 77)]
    assert img.shape == (3, 64, 64) and mask.shape == (4, 4) and mask.dtype == torch.int64
    assert int(mask.sum()) == 3 * 4 and label == 0
    (img2, mask2), _ = dataset[(1, 77)]
    assert torch.equal(img, img2) and torch.equal(mask, mask2)
    masks = {tuple(dataset[(1, s)][0][1].flatten().tolist()) for s in range(20)}
    assert len(masks) > 1


# ---------------------------------------------------------------------------------------------
# lr schedules (section 6)
# ---------------------------------------------------------------------------------------------

COS = dict(base_lr=1.0, warmup_lr=0.01, min_lr=0.001, warmup_iters=20, total_iters=100)


@pytest.mark.parametrize("t, expected", [
    (0, 0.01),                               # warmup starts at warmup_lr
    (10, 0.01 + 10 * 0.99 / 20),             # warmup middle
    (19, 0.01 + 19 * 0.99 / 20),
    (20, 0.001 + 0.5 * 0.999 * (1 + math.cos(math.pi * 0.2))),  # cosine counted from step 0
    (50, 0.001 + 0.5 * 0.999),
    (99, 0.001 + 0.5 * 0.999 * (1 + math.cos(math.pi * 0.99))),
    (100, 0.001), (150, 0.001),              # min_lr from T on
])
def test_cosine_values(t, expected):
    assert simmim_lr(t, **COS) == pytest.approx(expected, rel=1e-12)


def test_cosine_below_base_after_warmup():
    """The cosine phase never reaches base_lr: with a warmup of 20% of T the lr even drops when the
    warmup ends (0.9505 at t = 19, 0.9046 at t = 20)."""
    assert max(simmim_lr(t, **COS) for t in range(150)) < 1.0
    assert simmim_lr(20, **COS) < simmim_lr(19, **COS)


def test_multistep_values():
    """Swin-B 800 ep: base 1e-4, warmup 10 ep from 5e-7, milestone 700, gamma 0.1 (n = 10)."""
    sched = SimMIMLRSchedule(1e-4, 5e-7, 5e-6, epochs=800, warmup_epochs=10, iters_per_epoch=10,
                             schedule="multistep", milestones=[700], gamma=0.1)
    assert (sched.warmup_iters, sched.total_iters, sched.milestones) == (100, 8000, [7000])
    assert sched.lr_at(0) == 5e-7
    assert sched.lr_at(50) == pytest.approx(5e-7 + 50 * (1e-4 - 5e-7) / 100, rel=1e-12)
    assert sched.lr_at(100) == 1e-4 and sched.lr_at(6999) == 1e-4
    assert sched.lr_at(7000) == pytest.approx(1e-5, rel=1e-12)  # x0.1 exactly at 700 * n
    assert sched.lr_at(7999) == sched.lr_at(9000) == sched.lr_at(7000)  # min_lr unused
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert sched.set_lr(opt, 700, 0) == 1e-4  # runs with lr(6999): the one-update lag
    assert sched.set_lr(opt, 700, 1) == pytest.approx(1e-5, rel=1e-12)
    with pytest.raises(ValueError, match="first milestone"):
        SimMIMLRSchedule(1e-4, 0, 0, 800, 10, 10, "multistep", milestones=[5])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        SimMIMLRSchedule(1e-4, 0, 0, 800, 10, 10, "step")


@pytest.mark.parametrize("epoch, step, n, accum, expected", [
    (0, 0, 10, 1, 0), (0, 1, 10, 1, 0), (0, 2, 10, 1, 1), (1, 0, 10, 1, 9), (3, 7, 10, 1, 36),
    (0, 0, 10, 2, 0), (0, 1, 10, 2, 0), (0, 2, 10, 2, 1), (0, 5, 10, 2, 3), (1, 0, 10, 2, 9),
    (1, 0, 5, 2, 3),   # 5 iterations, cycles end at 1, 3; the 5th micro-batch makes no step
    (1, 2, 5, 2, 6),
])
def test_lag_index(epoch, step, n, accum, expected):
    assert simmim_lr_index(epoch, step, n, accum) == expected


def test_schedule_lag_through_set_lr():
    """Iteration t runs with lr(t - 1), iterations 0 and 1 both with warmup_lr."""
    sched = SimMIMLRSchedule(1.0, 0.01, 0.001, epochs=10, warmup_epochs=2, iters_per_epoch=10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=5.0)
    used = [sched.set_lr(opt, t // 10, t % 10) for t in range(100)]
    assert used[0] == used[1] == 0.01
    assert used[1:] == [simmim_lr(t, **COS) for t in range(99)]
    assert opt.param_groups[0]["lr"] == used[-1]


def test_single_layer_decay_group_lrs():
    """A group with lr_scale s: warmup from the unscaled warmup_lr to base * s, floor the unscaled
    min_lr (timm 0.4), not base * s^2 (timm >= 0.6)."""
    sched = SimMIMLRSchedule(1.0, 0.01, 0.001, epochs=10, warmup_epochs=2, iters_per_epoch=10)
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr_scale": 1.0, "lr": 1.0},
                             {"params": [p2], "lr_scale": 0.25, "lr": 0.25}], lr=1.0)
    sched.set_lr(opt, 0, 0)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    sched.set_lr(opt, 1, 1)  # lr(10): warmup middle
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 + 10 * (0.25 - 0.01) / 20, rel=1e-12)
    sched.set_lr(opt, 5, 1)  # lr(50)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.001 + 0.5 * (0.25 - 0.001), rel=1e-12)
    sched.set_lr(opt, 11, 0)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.001]


# ---------------------------------------------------------------------------------------------
# Weight-decay sets of pretraining (section 6)
# ---------------------------------------------------------------------------------------------

def test_pretrain_groups_vit():
    model = module_from_keys(vit_keys())
    decay, no_decay = simmim_param_group_names(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert (len(decay["params"]), len(no_decay["params"])) == (52, 137)
    assert {"encoder.mask_token", "encoder.rel_pos_bias.relative_position_bias_table",
            "encoder.patch_embed.proj.weight", "decoder.0.weight"} <= set(decay["params"])
    assert sum(n.startswith("encoder.blocks.") for n in decay["params"]) == 48
    assert {"encoder.cls_token", "encoder.blocks.0.gamma_1", "encoder.blocks.3.attn.q_bias",
            "encoder.norm.weight", "decoder.0.bias"} <= set(no_decay["params"])
    groups = simmim_param_groups(model, 0.05)
    assert [len(g["params"]) for g in groups] == [52, 137] and groups[1]["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    assert groups[0]["params"][0] is params[decay["params"][0]]


def test_pretrain_groups_swin():
    model = module_from_keys(swin_keys())
    decay, no_decay = simmim_param_group_names(model, 0.05)
    assert (len(decay["params"]), len(no_decay["params"])) == (125, 205)
    tables = [n for n in decay["params"] if n.endswith("relative_position_bias_table")]
    assert len(tables) == 24  # the keyword 'encoder.relative_position_bias_table' never matches
    assert sum(n.endswith("downsample.reduction.weight") for n in decay["params"]) == 3
    assert "encoder.mask_token" in no_decay["params"] and "decoder.0.weight" in decay["params"]


def test_pretrain_groups_skip_frozen_and_unknown():
    model = module_from_keys(vit_keys())
    model.encoder.cls_token.requires_grad_(False)
    decay, no_decay = simmim_param_group_names(model)
    assert "encoder.cls_token" not in decay["params"] + no_decay["params"]
    with pytest.raises(ValueError, match="neither a ViT"):
        simmim_param_groups(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay of finetuning (section 10)
# ---------------------------------------------------------------------------------------------

def test_vit_layer_ids():
    assert [get_layer_id_for_simmim_vit(n, 14) for n in
            ("cls_token", "mask_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight",
             "blocks.11.mlp.fc2.bias", "rel_pos_bias.relative_position_bias_table", "fc_norm.weight",
             "head.weight", "norm.bias")] == [0, 0, 0, 0, 1, 12, 13, 13, 13, 13]


def test_swin_layer_ids():
    depths = [2, 2, 18, 2]
    ids = {n: get_layer_id_for_swin(n, depths) for n in
           ("patch_embed.proj.weight", "patch_embed.norm.bias", "layers.0.blocks.0.attn.qkv.weight",
            "layers.0.blocks.1.norm1.weight", "layers.0.downsample.reduction.weight",
            "layers.1.blocks.0.mlp.fc1.weight", "layers.1.downsample.norm.weight",
            "layers.2.blocks.0.norm2.bias", "layers.2.blocks.17.attn.proj.weight",
            "layers.2.downsample.norm.bias", "layers.3.blocks.0.norm1.weight", "layers.3.blocks.1.mlp.fc2.bias",
            "norm.weight", "head.bias")}
    assert list(ids.values()) == [0, 0, 1, 2, 2, 3, 4, 5, 22, 22, 23, 24, 25, 25]


def test_vit_finetune_groups():
    model = module_from_keys(vit_keys(finetune=True))
    groups = simmim_param_group_names_lrd(model, base_lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    assert list(groups)[:4] == ["layer_0_no_decay", "layer_0_decay", "layer_1_no_decay", "layer_1_decay"]
    assert len(groups) == 28 and list(groups)[-2:] == ["layer_13_no_decay", "layer_13_decay"]
    assert groups["layer_0_no_decay"]["params"] == ["cls_token", "patch_embed.proj.bias"]
    assert groups["layer_0_decay"]["params"] == ["patch_embed.proj.weight"]
    # ViT finetune: the per-block tables ARE decayed (no keyword)
    assert "blocks.4.attn.relative_position_bias_table" in groups["layer_5_decay"]["params"]
    assert len(groups["layer_5_decay"]["params"]) == 5 and len(groups["layer_5_no_decay"]["params"]) == 11
    assert groups["layer_13_decay"]["params"] == ["head.weight"]
    assert set(groups["layer_13_no_decay"]["params"]) == {"fc_norm.weight", "fc_norm.bias", "head.bias"}
    for name, g in groups.items():
        layer = int(name.split("_")[1])
        assert g["lr_scale"] == pytest.approx(0.65 ** (13 - layer), rel=1e-12)
        assert g["lr"] == pytest.approx(1e-3 * 0.65 ** (13 - layer), rel=1e-12)  # single decay
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.05)
    tensors = simmim_param_groups_lrd(model, 1e-3, 0.05, 0.65)
    assert sum(len(g["params"]) for g in tensors) == len(list(model.parameters()))
    assert tensors[0]["params"][0] is model.cls_token and "names" not in tensors[0]


def test_swin_finetune_groups():
    model = module_from_keys(swin_keys(finetune=True, img=224, window=7))
    groups = simmim_param_group_names_lrd(model, base_lr=1.25e-3, weight_decay=0.05, layer_decay=0.9)
    ids = sorted({int(n.split("_")[1]) for n in groups})
    assert ids == list(range(26))
    assert "layers.0.downsample.reduction.weight" in groups["layer_2_decay"]["params"]
    assert "layers.2.downsample.norm.weight" in groups["layer_22_no_decay"]["params"]
    assert "layers.2.blocks.17.attn.qkv.weight" in groups["layer_22_decay"]["params"]
    # Swin finetune: the tables are NOT decayed (keyword relative_position_bias_table)
    assert "layers.3.blocks.1.attn.relative_position_bias_table" in groups["layer_24_no_decay"]["params"]
    assert groups["layer_25_decay"]["params"] == ["head.weight"]
    assert groups["layer_0_decay"]["params"] == ["patch_embed.proj.weight"]
    for name, g in groups.items():
        layer = int(name.split("_")[1])
        assert g["lr"] == pytest.approx(1.25e-3 * 0.9 ** (25 - layer), rel=1e-12)
    decayed = [n for name, g in groups.items() if name.endswith("_decay") and "no_decay" not in name
               for n in g["params"]]
    assert len(decayed) == 96 + 3 + 1 + 1  # block matrices, reductions, patch_embed, head


@pytest.mark.parametrize("module, factory, kind, sizes", [
    ("models_simmim", "simmim_vit_base_patch16", "pretrain", [52, 137]),
    ("models_simmim", "simmim_swin_base_patch4_window6_192", "pretrain", [125, 205]),
    ("models_vit", "beit_base_patch16", "finetune", 28),
    ("models_swin", "swin_base_patch4_window7_224", "finetune", 52),
])
def test_groups_of_the_real_models(module, factory, kind, sizes):
    """The same groups on the project's models (built on the meta device) as on the spec's key lists."""
    factory = getattr(pytest.importorskip(module), factory, None)
    if factory is None:
        pytest.skip("factory not written yet")
    with torch.device("meta"):
        model = factory()
    if kind == "pretrain":
        expected = module_from_keys(vit_keys() if "vit" in factory.__name__ else swin_keys())
        groups = simmim_param_group_names(model)
        assert [len(g["params"]) for g in groups] == sizes
        assert groups == simmim_param_group_names(expected)
    else:
        groups = simmim_param_group_names_lrd(model, 1e-3, 0.05, 0.65)
        assert len(groups) == sizes
        keys = (vit_keys(finetune=True) if "beit" in factory.__name__
                else swin_keys(finetune=True, img=224, window=7))
        expected = simmim_param_group_names_lrd(module_from_keys(keys), 1e-3, 0.05, 0.65)
        assert {k: sorted(g["params"]) for k, g in groups.items()} == \
            {k: sorted(g["params"]) for k, g in expected.items()}
