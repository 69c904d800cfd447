"""Layer-wise lr decay param groups (util/lr_decay.py) on a tiny 12-block timm ViT."""
import math

import pytest
import torch

from util.lr_decay import get_layer_id_for_vit, param_group_names_lrd, param_groups_lrd

DEPTH = 12
NUM_LAYERS = DEPTH + 1  # 13
# conftest's tiny_vit (a timm VisionTransformer, 32 px, 16 px patches, global average pool) 48
# wide with 12 blocks of 3 heads and 10 classes; built after torch.manual_seed(0)
VIT = dict(embed_dim=48, depth=DEPTH, num_heads=3, num_classes=10)


@pytest.fixture(scope="module")
def model(tiny_vit):
    torch.manual_seed(0)
    return tiny_vit(**VIT)


def adjust_lr(optimizer, lr):
    """util.lr_sched.adjust_learning_rate's per-group rule at a given lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def group_of(groups, p):
    """The single group dict that holds tensor p."""
    found = [g for g in groups if any(q is p for q in g["params"])]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("name, layer", [
    ("cls_token", 0),
    ("pos_embed", 0),
    ("patch_embed.proj.weight", 0),
    ("patch_embed.proj.bias", 0),
    ("blocks.0.norm1.weight", 1),
    ("blocks.0.attn.qkv.weight", 1),
    ("blocks.0.mlp.fc2.bias", 1),
    ("blocks.5.attn.proj.weight", 6),
    ("blocks.11.mlp.fc1.weight", 12),
    ("blocks.11.norm2.bias", 12),
    ("fc_norm.weight", 13),
    ("fc_norm.bias", 13),
    ("norm.weight", 13),
    ("head.weight", 13),
    ("head.bias", 13),
])
def test_layer_id(name, layer):
    assert get_layer_id_for_vit(name, NUM_LAYERS) == layer


def test_groups_names_scales_and_decay(model):
    names = param_group_names_lrd(model, weight_decay=0.05,
                                  no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75)
    # group names, in the original's parameter order: layer 0 first, the head's layer last, where
    # the original's head (registered before fc_norm) puts the decay group first
    expected_keys = ["layer_0_no_decay", "layer_0_decay"]
    for layer in range(1, DEPTH + 1):
        expected_keys += [f"layer_{layer}_no_decay", f"layer_{layer}_decay"]
    expected_keys += [f"layer_{NUM_LAYERS}_decay", f"layer_{NUM_LAYERS}_no_decay"]
    assert list(names) == expected_keys

    # cls_token and pos_embed are 3-D but in no_weight_decay(): no decay, layer 0
    assert names["layer_0_no_decay"]["params"] == ["cls_token", "pos_embed", "patch_embed.proj.bias"]
    assert names["layer_0_decay"]["params"] == ["patch_embed.proj.weight"]
    assert names["layer_1_decay"]["params"] == [
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"]
    assert names["layer_12_no_decay"]["params"] == [
        "blocks.11.norm1.weight", "blocks.11.norm1.bias", "blocks.11.attn.qkv.bias",
        "blocks.11.attn.proj.bias", "blocks.11.norm2.weight", "blocks.11.norm2.bias",
        "blocks.11.mlp.fc1.bias", "blocks.11.mlp.fc2.bias"]
    assert names["layer_13_no_decay"]["params"] == ["head.bias", "fc_norm.weight", "fc_norm.bias"]
    assert names["layer_13_decay"]["params"] == ["head.weight"]

    for key, group in names.items():
        layer = int(key.split("_")[1])
        assert group["lr_scale"] == pytest.approx(0.75 ** (13 - layer), rel=1e-12)
        assert group["weight_decay"] == (0.0 if key.endswith("no_decay") else 0.05)
    assert names["layer_13_decay"]["lr_scale"] == 1.0
    assert names["layer_0_decay"]["lr_scale"] == pytest.approx(0.75 ** 13)


def test_tensor_groups_match_names_and_cover_every_param_once(model):
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    names = param_group_names_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    params = dict(model.named_parameters())

    assert all(set(g) == {"lr_scale", "weight_decay", "params"} for g in groups)
    assert len(groups) == len(names)
    for g, (key, named) in zip(groups, names.items()):
        assert g["lr_scale"] == named["lr_scale"] and g["weight_decay"] == named["weight_decay"]
        assert [id(p) for p in g["params"]] == [id(params[n]) for n in named["params"]]

    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_one_dim_params_get_no_weight_decay_even_without_list(model):
    groups = param_groups_lrd(model, weight_decay=0.3, no_weight_decay_list=[], layer_decay=0.5)
    for name, p in model.named_parameters():
        g = group_of(groups, p)
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.3), name
    # without the list, cls_token / pos_embed (3-D) do get decay
    assert group_of(groups, model.cls_token)["weight_decay"] == 0.3
    assert group_of(groups, model.pos_embed)["lr_scale"] == pytest.approx(0.5 ** 13)


def test_frozen_params_are_excluded(tiny_vit):
    torch.manual_seed(0)
    m = tiny_vit(**VIT)
    m.pos_embed.requires_grad_(False)  # as MAE's fixed sin-cos embedding
    for p in m.blocks[3].parameters():
        p.requires_grad_(False)
    names = param_group_names_lrd(m, 0.05, m.no_weight_decay(), 0.75)
    grouped = [n for g in names.values() for n in g["params"]]
    assert "pos_embed" not in grouped
    assert not any(n.startswith("blocks.3.") for n in grouped)
    assert "layer_4_decay" not in names and "layer_4_no_decay" not in names
    assert sorted(grouped) == sorted(n for n, p in m.named_parameters() if p.requires_grad)


def test_agrees_with_timm_layer_decay(model):
    """timm's group_matcher-based layer decay gives each parameter the same scale and decay."""
    from timm.optim import param_groups_layer_decay
    ours = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    theirs = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.75)
    for p in model.parameters():
        a, b = group_of(ours, p), group_of(theirs, p)
        assert a["lr_scale"] == pytest.approx(b["lr_scale"], rel=1e-12)
        assert a["weight_decay"] == b["weight_decay"]


def test_adamw_accepts_groups_and_schedule_sets_scaled_lr(make_args, tiny_vit):
    torch.manual_seed(0)
    model = tiny_vit(**VIT)  # stepped below: not the shared fixture
    try:
        from util.lr_sched import adjust_learning_rate
    except ImportError:
        adjust_learning_rate = None
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    assert len(opt.param_groups) == 2 * (NUM_LAYERS + 1)

    if adjust_learning_rate is not None:
        args = make_args("finetune", "--min_lr", 1e-6, "--warmup_epochs", 5, "--epochs", 50, lr=4e-3)
        adjust_learning_rate(opt, 5.0, args)  # end of warmup: the peak lr
    else:
        adjust_lr(opt, 4e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(4e-3 * g["lr_scale"], rel=1e-9)
    head_group = group_of(opt.param_groups, model.head.weight)
    assert head_group["lr"] == pytest.approx(4e-3)
    assert group_of(opt.param_groups, model.patch_embed.proj.weight)["lr"] == pytest.approx(
        4e-3 * 0.75 ** 13)

    # one real step: weight decay reaches only the decay groups, lr follows the scale
    x = torch.randn(2, 3, 32, 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        assert not torch.equal(p, before[n]) or p.grad is None or not p.grad.any(), n
    # AdamW's first step moves each entry by about lr_scale * lr: the head moves far more
    head_move = (model.head.weight - before["head.weight"]).abs().max().item()
    embed_move = (model.patch_embed.proj.weight - before["patch_embed.proj.weight"]).abs().max().item()
    assert head_move == pytest.approx(4e-3, rel=0.05)
    assert embed_move == pytest.approx(4e-3 * 0.75 ** 13, rel=0.05)
    assert math.isclose(head_move / embed_move, 0.75 ** -13, rel_tol=0.1)
