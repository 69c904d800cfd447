"""models_swin: the Swin V1 classifiers and the SimMIM Swin encoder against the SimMIM spec
(sections 3, 4, 8): window indices, shift masks, block arithmetic, key names and shapes, the mask
token, the feature map, the initialisation, the weight-decay sets."""
import math

import pytest
import torch
import torch.nn.functional as F

import models_swin

# the tiny factory's sizes (64 px: stage resolutions 16, 8, 4, 2; window 4)
TINY = dict(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=4)
OFFICIAL_ENCODER = dict(img_size=192, patch_size=4, in_chans=3, embed_dim=128, depths=(2, 2, 18, 2),
                        num_heads=(4, 8, 16, 32), window_size=6, mlp_ratio=4., qkv_bias=True,
                        drop_path_rate=0.0, ape=False, patch_norm=True)


def tiny_encoder(**overrides):
    return models_swin.SwinTransformerForSimMIM(**{**TINY, "drop_path_rate": 0.0, **overrides})


def hand_index(w):
    """The spec's window index: (dr + w-1)(2w-1) + (dc + w-1), d = query - key, row-major tokens."""
    idx = torch.empty(w * w, w * w, dtype=torch.long)
    for i in range(w * w):
        for j in range(w * w):
            dr, dc = i // w - j // w, i % w - j % w
            idx[i, j] = (dr + w - 1) * (2 * w - 1) + (dc + w - 1)
    return idx


def hand_regions(H, W, w, s):
    """Region id of every position of the un-rolled (H, W) grid: rows and columns sliced into
    [0, n-w), [n-w, n-s), [n-s, n) -> ids 0, 1, 2; region = 3 * row id + column id."""
    def cut(n):
        return [0 if r < n - w else 1 if r < n - s else 2 for r in range(n)]
    rows, cols = cut(H), cut(W)
    return torch.tensor([[3 * rows[r] + cols[c] for c in range(W)] for r in range(H)])


def hand_mask(H, W, w, s):
    """(nW, w*w, w*w): 0 between tokens of one region, -100 across, windows row-major."""
    reg = hand_regions(H, W, w, s)
    wins = reg.view(H // w, w, W // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)  # (nW, w*w)
    same = wins[:, :, None] == wins[:, None, :]
    return torch.where(same, 0.0, -100.0)


# --------------------------------------------------------------------------- windows
def test_relative_position_index_of_a_window():
    block = models_swin.SwinTransformerBlock(dim=8, input_resolution=(6, 6), num_heads=2, window_size=3,
                                             shift_size=1)
    idx = block.attn.relative_position_index
    assert idx.dtype == torch.int64 and idx.shape == (9, 9)
    assert torch.equal(idx, hand_index(3))
    # a few entries by hand: token 0 = (0, 0), token 8 = (2, 2); table (2*3-1)^2 = 25 rows
    assert idx[0, 0] == 12 and idx[4, 4] == 12  # d = (0, 0): the centre row 2*5 + 2
    assert idx[0, 8] == 0 and idx[8, 0] == 24  # d = (-2, -2) and (2, 2)
    assert idx[0, 1] == 11 and idx[3, 0] == 17  # d = (0, -1) and (1, 0)
    assert block.attn.relative_position_bias_table.shape == (25, 2)
    # both buffers are state_dict entries, as in the official checkpoints
    assert {"attn_mask", "attn.relative_position_index"} <= set(block.state_dict())


def test_shifted_window_mask_regions_and_minus_100():
    model = models_swin.swin_tiny_patch4_window4_64(num_classes=0)
    block = model.layers[0].blocks[1]  # 16 x 16 tokens, window 4, shift 2
    assert block.window_size == (4, 4) and block.shift_size == (2, 2)
    mask = block.attn_mask
    assert mask.shape == (16, 16, 16)  # 4 x 4 windows of 16 tokens
    assert torch.equal(mask, hand_mask(16, 16, 4, 2))
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # windows off the last window row and column hold one region: no -100
    grid = mask.view(4, 4, 16, 16)
    assert torch.all(grid[:3, :3] == 0)
    # the bottom-right window holds 4 regions of 2 x 2 tokens: each token sees 12 others at -100
    assert int((grid[3, 3] == -100).sum()) == 16 * 12
    # a last-row window (not last column) holds 2 regions of 2 x 4 tokens
    assert int((grid[3, 0] == -100).sum()) == 16 * 8
    # the region ids themselves: the slices [0, 12), [12, 14), [14, 16)
    reg = hand_regions(16, 16, 4, 2)
    assert reg[0, 0] == 0 and reg[12, 0] == 3 and reg[14, 0] == 6 and reg[0, 13] == 1 and reg[15, 15] == 8
    # stage 1 is shifted too; stages 2 and 3 clip the window to their resolution, unshifted
    assert model.layers[1].blocks[1].attn_mask.shape == (4, 16, 16)
    for s, res in ((2, 4), (3, 2)):
        for block in model.layers[s].blocks:
            assert block.window_size == (res, res) and block.shift_size == (0, 0) and block.attn_mask is None
    keys = model.state_dict()
    assert "layers.0.blocks.1.attn_mask" in keys and "layers.0.blocks.0.attn_mask" not in keys
    assert "layers.2.blocks.1.attn_mask" not in keys


def reference_block(block, x):
    """The spec's block forward (section 3) written out, with the index and mask built by hand."""
    B, H, W, C = x.shape
    w, s, heads = block.window_size[0], block.shift_size[0], block.attn.num_heads
    N, hd = w * w, C // heads
    h = block.norm1(x)
    if s:
        h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
    win = h.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)  # (B nW, N, C)
    q, k, v = block.attn.qkv(win).reshape(-1, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    logits = (q * hd ** -0.5) @ k.transpose(-2, -1)  # (B nW, heads, N, N)
    table = block.attn.relative_position_bias_table
    logits = logits + table[hand_index(w).view(-1)].view(N, N, heads).permute(2, 0, 1)
    if s:
        nW = (H // w) * (W // w)
        logits = (logits.view(B, nW, heads, N, N) + hand_mask(H, W, w, s)[None, :, None]).view(-1, heads, N, N)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C)
    out = block.attn.proj(out).view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    if s:
        out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    x = x + out
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


@pytest.mark.parametrize("shift", [0, 2])
def test_block_forward_is_the_spec_arithmetic(shift):
    torch.manual_seed(0)
    block = models_swin.SwinTransformerBlock(dim=16, input_resolution=(8, 8), num_heads=2, window_size=4,
                                             shift_size=shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()  # a bias large enough to matter
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        expected = reference_block(block, x)
        assert torch.allclose(block(x), expected, atol=1e-5)
        if shift:  # the mask matters: without it the output differs
            block.attn_mask.zero_()
            assert not torch.allclose(block(x), expected, atol=1e-3)


def test_patch_merging_channel_order_and_no_bias():
    torch.manual_seed(0)
    merge = models_swin.PatchMerging(4)
    assert list(merge.state_dict()) == ["reduction.weight", "norm.weight", "norm.bias"]
    seen = {}
    merge.norm.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    x = torch.randn(2, 4, 6, 4)
    out = merge(x)
    assert out.shape == (2, 2, 3, 8)
    expected = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    assert torch.equal(seen["x"], expected)
    assert torch.allclose(out, merge.reduction(F.layer_norm(expected, (16,))), atol=1e-6)


# --------------------------------------------------------------------------- names and shapes
def expected_keys(img, window, embed_dim, heads, depths=(2, 2, 18, 2), num_classes=0, mask_token=True):
    """name -> shape from the spec's section 8 patterns (window clipped and shift dropped when the
    stage resolution is <= the window)."""
    keys = {}
    if mask_token:
        keys["mask_token"] = (1, 1, embed_dim)
    keys.update({"patch_embed.proj.weight": (embed_dim, 3, 4, 4), "patch_embed.proj.bias": (embed_dim,),
                 "patch_embed.norm.weight": (embed_dim,), "patch_embed.norm.bias": (embed_dim,)})
    for s, depth in enumerate(depths):
        C, res = embed_dim * 2 ** s, img // 4 // 2 ** s
        w = min(window, res)
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}."
            if j % 2 == 1 and res > window:
                keys[p + "attn_mask"] = ((res // w) ** 2, w * w, w * w)
            keys.update({p + "norm1.weight": (C,), p + "norm1.bias": (C,),
                         p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads[s]),
                         p + "attn.relative_position_index": (w * w, w * w),
                         p + "attn.qkv.weight": (3 * C, C), p + "attn.qkv.bias": (3 * C,),
                         p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
                         p + "norm2.weight": (C,), p + "norm2.bias": (C,),
                         p + "mlp.fc1.weight": (4 * C, C), p + "mlp.fc1.bias": (4 * C,),
                         p + "mlp.fc2.weight": (C, 4 * C), p + "mlp.fc2.bias": (C,)})
        if s < len(depths) - 1:
            keys.update({f"layers.{s}.downsample.reduction.weight": (2 * C, 4 * C),
                         f"layers.{s}.downsample.norm.weight": (4 * C,),
                         f"layers.{s}.downsample.norm.bias": (4 * C,)})
    F_ = embed_dim * 2 ** (len(depths) - 1)
    keys.update({"norm.weight": (F_,), "norm.bias": (F_,)})
    if num_classes:
        keys.update({"head.weight": (num_classes, F_), "head.bias": (num_classes,)})
    return keys


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_simmim_swin_base_192_w6_keys_and_shapes_as_the_official_checkpoint():
    with torch.device("meta"):
        enc = models_swin.SwinTransformerForSimMIM(**OFFICIAL_ENCODER)
    sd = enc.state_dict()
    got = shapes(enc)
    # same names, shapes and order as the spec's listing (encoder. prefix and decoder left out)
    assert list(got.items()) == list(expected_keys(192, 6, 128, (4, 8, 16, 32)).items())
    # the measured totals: 365 entries / 90,055,544 values / 89,874,104 parameters with the decoder
    # (3072 x 1024 conv + 3072 bias = 3,148,800 values)
    decoder = 3072 * 1024 + 3072
    assert len(sd) == 365 - 2
    assert sum(v.numel() for v in sd.values()) == 90_055_544 - decoder
    assert sum(p.numel() for p in enc.parameters()) == 89_874_104 - decoder
    masks = {k: v.shape[0] for k, v in sd.items() if k.endswith("attn_mask")}
    assert masks["layers.0.blocks.1.attn_mask"] == 64 and masks["layers.1.blocks.1.attn_mask"] == 16
    assert masks["layers.2.blocks.17.attn_mask"] == 4 and not any(k.startswith("layers.3") for k in masks)
    assert sd["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert sd["layers.0.blocks.1.attn_mask"].dtype == torch.float32
    assert enc.num_features == 1024 and enc.patch_size == 4 and enc.encoder_stride == 32


@pytest.mark.parametrize("factory, img, window, embed_dim, heads, classes, table_rows, shifted", [
    # Swin-L 192 / w12: windows 12, 12, 12 (stage 2 unshifted), 6 -> tables 23^2 x3, 11^2
    ("swin_large_patch4_window12_192", 192, 12, 192, (6, 12, 24, 48), 1000, (529, 529, 529, 121), {0: 16, 1: 4}),
    # Swin-L 224 / w14: windows 14, 14, 14 (stage 2 unshifted), 7 -> tables 27^2 x3, 13^2
    ("swin_large_patch4_window14_224", 224, 14, 192, (6, 12, 24, 48), 1000, (729, 729, 729, 169), {0: 16, 1: 4}),
    # Swin-B 224 / w7: 56, 28, 14, 7 -> windows all 7, stage 3 unshifted
    ("swin_base_patch4_window7_224", 224, 7, 128, (4, 8, 16, 32), 1000, (169,) * 4, {0: 64, 1: 16, 2: 4}),
    ("swin_base_patch4_window6_192", 192, 6, 128, (4, 8, 16, 32), 1000, (121,) * 4, {0: 64, 1: 16, 2: 4}),
])
def test_classifier_factories_keys_and_shapes(factory, img, window, embed_dim, heads, classes, table_rows,
                                              shifted):
    with torch.device("meta"):
        model = getattr(models_swin, factory)()
    got = shapes(model)
    assert list(got.items()) == list(
        expected_keys(img, window, embed_dim, heads, num_classes=classes, mask_token=False).items())
    for s, rows in enumerate(table_rows):
        assert got[f"layers.{s}.blocks.0.attn.relative_position_bias_table"] == (rows, heads[s])
    # the shifted stages and their number of windows (attn_mask of the odd blocks only)
    masks = {int(k.split(".")[1]): v[0] for k, v in got.items() if k.endswith("attn_mask")}
    assert masks == shifted
    assert "layers.0.blocks.0.attn_mask" not in got
    assert model.num_features == 8 * embed_dim


def test_swin_large_simmim_encoder_keys():
    with torch.device("meta"):
        enc = models_swin.SwinTransformerForSimMIM(**{**OFFICIAL_ENCODER, "embed_dim": 192, "window_size": 12,
                                                      "num_heads": (6, 12, 24, 48)})
    assert list(shapes(enc).items()) == list(expected_keys(192, 12, 192, (6, 12, 24, 48)).items())
    assert shapes(enc)["layers.0.blocks.1.attn_mask"] == (16, 144, 144)
    assert shapes(enc)["layers.1.blocks.1.attn_mask"] == (4, 144, 144)
    assert enc.num_features == 1536


def test_factory_overrides_and_stochastic_depth():
    with torch.device("meta"):
        model = models_swin.swin_base_patch4_window7_224(img_size=192, window_size=6, embed_dim=64,
                                                         depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                                                         drop_path_rate=0.3, num_classes=7)
    assert model.patch_embed.img_size == (192, 192) and model.num_features == 512
    assert model.layers[0].blocks[0].window_size == (6, 6) and len(model.layers[2].blocks) == 6
    assert model.head.weight.shape == (7, 512)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
             for layer in model.layers for b in layer.blocks]
    expected = torch.linspace(0, 0.3, 12).tolist()
    assert rates == pytest.approx(expected) and rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    # the official drop-path rates of the classifiers: Swin-B 0.1, Swin-L 0.2
    with torch.device("meta"):
        for name, rate in (("swin_base_patch4_window6_192", 0.1), ("swin_large_patch4_window14_224", 0.2)):
            last = getattr(models_swin, name)().layers[3].blocks[1]
            assert last.drop_path1.drop_prob == pytest.approx(rate)


# --------------------------------------------------------------------------- SimMIM encoder
def test_mask_token_replaces_masked_tokens_after_the_patch_embedding():
    torch.manual_seed(0)
    enc = tiny_encoder().eval()
    x = torch.randn(2, 3, 64, 64)
    mask = (torch.rand(2, 16, 16) < 0.5).long()
    seen = {}
    enc.layers[0].register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        out = enc(x, mask)
        embedded = enc.patch_embed(x)  # (2, 16, 16, 32), after the patch embedding's LayerNorm
    tokens = seen["x"]
    m = mask.bool()
    assert torch.equal(tokens[m], enc.mask_token.detach().view(1, -1).expand(int(m.sum()), -1))
    assert torch.equal(tokens[~m], embedded[~m])
    assert out.shape == (2, 256, 2, 2)


def test_zero_mask_is_the_plain_forward_and_full_mask_ignores_the_image():
    torch.manual_seed(0)
    enc = tiny_encoder().eval()
    plain = models_swin.SwinTransformer(**TINY, drop_path_rate=0.0, num_classes=0).eval()
    missing, unexpected = plain.load_state_dict(enc.state_dict(), strict=False)
    assert missing == [] and unexpected == ["mask_token"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = enc(x, torch.zeros(2, 16, 16, dtype=torch.long))  # (2, 256, 2, 2)
        tokens = plain.forward_stages(plain.patch_embed(x))  # (2, 4, 256)
        assert torch.equal(fmap, tokens.transpose(1, 2).reshape(2, 256, 2, 2))
        # channel = feature, position (h, w) = token h * 2 + w; its mean is the classifier's features
        assert torch.allclose(fmap.flatten(2).mean(-1), plain(x), atol=1e-6)
        ones = torch.ones(2, 16, 16, dtype=torch.long)
        assert torch.allclose(enc(x, ones), enc(torch.randn(2, 3, 64, 64), ones), atol=1e-6)
        assert not torch.allclose(enc(x, ones), fmap, atol=1e-3)


def test_feature_map_shape_and_input_checks():
    with torch.device("meta"):
        enc = models_swin.SwinTransformerForSimMIM(**OFFICIAL_ENCODER)
        out = enc(torch.empty(2, 3, 192, 192), torch.zeros(2, 48, 48, dtype=torch.long))
    assert out.shape == (2, 1024, 6, 6)
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="mask"):
        enc(torch.randn(1, 3, 64, 64), torch.zeros(1, 8, 8))  # the 32 px mask grid, not the patch grid
    with pytest.raises(AssertionError):
        enc(torch.randn(1, 3, 96, 96), torch.zeros(1, 24, 24))  # the exact training size only
    with pytest.raises(ValueError, match="num_classes"):
        tiny_encoder(num_classes=10)


def test_grads_reach_every_parameter_and_the_mask_token_only_when_masking():
    torch.manual_seed(0)
    enc = tiny_encoder()
    x = torch.randn(2, 3, 64, 64)
    enc(x, (torch.rand(2, 16, 16) < 0.6).long()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    enc.zero_grad(set_to_none=True)
    enc(x, torch.zeros(2, 16, 16, dtype=torch.long)).square().mean().backward()
    assert enc.mask_token.grad is None or torch.all(enc.mask_token.grad == 0)


def test_no_weight_decay_sets():
    enc = tiny_encoder(ape=True)
    cls = models_swin.swin_tiny_patch4_window4_64(ape=True)
    assert enc.no_weight_decay() == {"absolute_pos_embed", "mask_token"}
    assert cls.no_weight_decay() == {"absolute_pos_embed"}
    assert enc.no_weight_decay_keywords() == cls.no_weight_decay_keywords() == {"relative_position_bias_table"}
    names = dict(enc.named_parameters())
    assert enc.no_weight_decay() <= set(names)  # the skip names are real parameter names
    tables = [n for n in names if "relative_position_bias_table" in n]
    assert len(tables) == sum(TINY["depths"])
    assert names["absolute_pos_embed"].shape == (1, 256, 32)


# --------------------------------------------------------------------------- init and classifier
def without_clamped(values):
    """timm's trunc_normal(0.02, -2, 2) turns a uniform draw of exactly -1 into erfinv = -inf,
    clamped to -2 (about 2^-24 per element, spec section 4): drop those rare +-2 entries."""
    kept = values[values.abs() < 2]
    assert values.numel() - kept.numel() <= 3 + values.numel() // 2 ** 20
    return kept


def test_init_statistics():
    torch.manual_seed(0)
    enc = tiny_encoder()  # 2.2 M Linear weights
    cls = models_swin.swin_tiny_patch4_window4_64(num_classes=1000)
    named = dict(enc.named_parameters())
    linear_w = [p for n, p in named.items() if n.endswith(("qkv.weight", "proj.weight", "fc1.weight",
                                                          "fc2.weight", "reduction.weight"))]
    w = without_clamped(torch.cat([p.detach().flatten() for p in linear_w]))
    assert abs(w.std().item() - 0.02) < 2e-4 and abs(w.mean().item()) < 1e-4 and w.abs().max() < 0.2
    # no rescaling of proj / fc2 in Swin: the last block's are as wide as its qkv
    last = enc.layers[3].blocks[1]
    for p in (last.attn.proj.weight, last.mlp.fc2.weight):
        assert abs(p.std().item() - 0.02) < 1e-3
    biases = [p for n, p in named.items() if n.endswith(".bias") and "patch_embed.proj" not in n]
    assert all(torch.all(p == 0) for p in biases)
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    tables = without_clamped(torch.cat([p.detach().flatten() for n, p in named.items()
                                        if "relative_position_bias_table" in n]))
    assert abs(tables.std().item() - 0.02) < 1.5e-3 and tables.abs().max() < 0.2
    # patch_embed.proj keeps PyTorch's Conv2d default: U(+-1/sqrt(3*4*4)) weight and bias
    bound = 1 / math.sqrt(48)
    pw, pb = enc.patch_embed.proj.weight.detach(), enc.patch_embed.proj.bias.detach()
    assert pw.abs().max() <= bound and pw.abs().max() > 0.9 * bound
    assert abs(pw.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert pb.abs().max() <= bound and pb.abs().max() > 0.5 * bound
    # a wide one-stage encoder for a 512-element mask token
    mt = models_swin.SwinTransformerForSimMIM(**{**TINY, "embed_dim": 512, "depths": (0,), "num_heads": (1,)})
    mt = mt.mask_token.detach()
    assert 0.015 < mt.std().item() < 0.025 and mt.abs().max() < 0.1
    # the head: trunc_normal(0.02) weight, zero bias, no scaling
    head = without_clamped(cls.head.weight.detach().flatten())
    assert abs(head.std().item() - 0.02) < 5e-4 and torch.all(cls.head.bias == 0)


def test_tiny_classifier_forward_and_backward_at_64px():
    torch.manual_seed(0)
    model = models_swin.swin_tiny_patch4_window4_64(num_classes=10)
    assert model.num_features == 256 and model.patch_size == 4
    x = torch.randn(3, 3, 64, 64)
    model.train()
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():  # eval is deterministic (no drop path) and pools the final tokens
        assert torch.equal(model(x), model(x))
        tokens = model.forward_stages(model.patch_embed(x))
        assert torch.allclose(model(x), model.head(tokens.mean(1)), atol=1e-6)
