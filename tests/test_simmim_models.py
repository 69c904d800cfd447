"""SimMIM models (models_simmim) and the BEiT-style finetune classifiers (models_vit.beit_*): the
loss, the decoder layout, the relative position index, names and shapes against the official
checkpoints (SPEC-simmim.md section 8), the official-name mapping, the pretrain -> finetune
conversion with the geometric cubic table resize, and the initialisation laws (section 4)."""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models_simmim
import models_swin
import models_vit
from models_simmim import SimMIM, VisionTransformerForSimMIM

TRUNC_1SIGMA_STD = 0.53956  # std of N(0, 1) truncated at +-1


def tiny_simmim_vit(**overrides):
    """32 px images in 8 px patches (4x4 grid), width 32, 2 heads, 2 blocks, no drop path."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    return models_simmim.simmim_vit_tiny_patch16(**{**cfg, **overrides})


def spec_index(gh, gw):
    """The relative position index of spec section 2, entry by entry (cls first)."""
    n = gh * gw
    num_rel = (2 * gh - 1) * (2 * gw - 1) + 3
    idx = torch.zeros(n + 1, n + 1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i, gw), divmod(j, gw)
            idx[i + 1, j + 1] = (ri - rj + gh - 1) * (2 * gw - 1) + (ci - cj + gw - 1)
    idx[0, :] = num_rel - 3
    idx[:, 0] = num_rel - 2
    idx[0, 0] = num_rel - 1
    return idx


# --------------------------------------------------------------------------- loss and decoder
def test_loss_by_hand_on_two_images():
    """L1 summed over the masked pixels and the 3 channels, / (masked pixels + 1e-5), / 3."""
    model = tiny_simmim_vit(img_size=16, patch_size=8)  # 2x2 patch grid of 8x8 pixels
    imgs = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    rec = torch.empty_like(imgs)
    rec[0] = torch.tensor([1., -2., 3.]).view(3, 1, 1)  # |error| 1, 2, 3 on every pixel of image 0
    rec[1] = 0.5  # |error| 0.5 on every pixel and channel of image 1
    mask = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]]])  # 1 and 3 masked patches of 64 pixels
    # (64 * (1+2+3) + 3 * 64 * 3 * 0.5) / (4 * 64 + 1e-5) / 3
    expected = (384 + 288) / (256 + 1e-5) / 3
    loss = model.forward_loss(imgs, rec, mask)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert abs(loss.item() - 672 / 256 / 3) > 1e-9  # the 1e-5 is there
    # the unmasked pixels do not count
    rec2 = rec.clone()
    rec2[0, :, 8:, :] = 100.
    rec2[1, :, 8:, :8] = -100.
    assert model.forward_loss(imgs, rec2, mask).item() == pytest.approx(expected, rel=1e-12)
    # no masked pixel: 0, not NaN
    assert model.forward_loss(imgs, rec, torch.zeros_like(mask)).item() == 0.0


def test_forward_returns_loss_reconstruction_and_mask():
    torch.manual_seed(0)
    model = tiny_simmim_vit()
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.randint(0, 2, (2, 4, 4))
    loss, rec, mask_out = model(imgs, mask)
    assert rec.shape == imgs.shape and mask_out is mask
    assert loss.item() == pytest.approx(model.forward_loss(imgs, rec, mask).item())
    loss.backward()
    assert model.encoder.mask_token.grad.abs().sum() > 0
    assert model.patch_size == 8 and model.encoder_stride == 8 and model.in_chans == 3
    with pytest.raises(ValueError, match="mask of shape"):
        model(imgs, torch.zeros(2, 2, 2, dtype=torch.long))


def test_decoder_is_a_1x1_conv_then_pixel_shuffle():
    """out[b, c, h*s+i, w*s+j] = conv(z)[b, c*s*s + i*s + j, h, w] (spec section 1)."""
    torch.manual_seed(0)
    model = tiny_simmim_vit()
    s = model.encoder_stride
    assert model.decoder[0].kernel_size == (1, 1) and model.decoder[0].weight.shape == (3 * s * s, 32, 1, 1)
    z = torch.randn(2, 32, 2, 3)
    out, conv = model.decoder(z), model.decoder[0](z)
    assert out.shape == (2, 3, 2 * s, 3 * s)
    for c in range(3):
        for i in range(s):
            for j in range(s):
                assert torch.equal(out[:, c, i::s, j::s], conv[:, c * s * s + i * s + j])


# --------------------------------------------------------------------------- the ViT encoder
def test_relative_position_index_with_cls_rows():
    enc = VisionTransformerForSimMIM(img_size=(16, 24), patch_size=8, embed_dim=16, depth=0, num_heads=2)
    idx = enc.rel_pos_bias.relative_position_index
    assert torch.equal(idx, spec_index(2, 3))
    assert enc.rel_pos_bias.relative_position_bias_table.shape == (3 * 5 + 3, 2)
    assert "rel_pos_bias.relative_position_index" in enc.state_dict()  # persistent, as the official
    # ViT-B/16 at 224: patch entries 0..728, cls row 729, cls column 730, [0, 0] 731
    idx = VisionTransformerForSimMIM(depth=0).rel_pos_bias.relative_position_index
    assert idx.shape == (197, 197)
    assert idx[1:, 1:].min() == 0 and idx[1:, 1:].max() == 728
    assert (idx[0, 1:] == 729).all() and (idx[1:, 0] == 730).all() and idx[0, 0] == 731
    assert torch.equal(idx[1:, 1:].diagonal(), torch.full((196,), 13 * 27 + 13))  # delta 0
    assert idx[1 + 0, 1 + 15] == (0 - 1 + 13) * 27 + (0 - 1 + 13)  # query (0,0), key (1,1)


def reference_encoder(enc, x, mask, heads):
    """Spec section 2 written out: mask tokens before the cls token, shared bias, q/v biases
    (zero k bias), q * head_dim^-0.5, layer scale, final norm, feature map."""
    sd = enc.state_dict()
    D, p = enc.embed_dim, enc.patch_size
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    B, _, gh, gw = t.shape
    t = t.flatten(2).transpose(1, 2)  # (B, L, D), row-major
    w = mask.reshape(B, -1, 1).to(x.dtype)
    t = t * (1 - w) + sd["mask_token"] * w
    t = torch.cat([sd["cls_token"].expand(B, 1, D), t], dim=1)
    N, hd = t.shape[1], D // heads
    bias = sd["rel_pos_bias.relative_position_bias_table"][spec_index(gh, gw)].permute(2, 0, 1)  # (h, N, N)
    i = 0
    while f"blocks.{i}.gamma_1" in sd:
        b = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(t, (D,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv = h @ b("attn.qkv.weight").T + torch.cat([b("attn.q_bias"), torch.zeros(D, dtype=x.dtype),
                                                       b("attn.v_bias")])
        q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(B, N, D) @ b("attn.proj.weight").T + b("attn.proj.bias")
        t = t + b("gamma_1") * o
        h = F.layer_norm(t, (D,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        t = t + b("gamma_2") * h
        i += 1
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 1:].transpose(1, 2).reshape(B, D, gh, gw)


def test_vit_encoder_matches_the_spec_written_out():
    torch.manual_seed(0)
    enc = tiny_simmim_vit().encoder.double().eval()
    with torch.no_grad():  # make every parameter matter (fresh: zero table and biases)
        for name, prm in enc.named_parameters():
            if "bias" in name or "gamma" in name or "table" in name:
                prm.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = torch.randint(0, 2, (2, 4, 4))
    out = enc(x, mask)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out, reference_encoder(enc, x, mask, heads=2), rtol=1e-9, atol=1e-9)
    # the features (kNN monitor): tokens after the norm, cls first, no mask
    model = SimMIM(enc, 8)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 17, 32) and model.num_prefix_tokens == 1
    torch.testing.assert_close(tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4),
                               enc(x, torch.zeros_like(mask)))


# --------------------------------------------------------------------------- names and shapes
def vit_pretrain_keys(D, depth, heads, grid, patch=16):
    """Spec section 8, SimMIM ViT, in the state_dict's order."""
    keys = [("encoder.cls_token", (1, 1, D)), ("encoder.mask_token", (1, 1, D)),
            ("encoder.patch_embed.proj.weight", (D, 3, patch, patch)), ("encoder.patch_embed.proj.bias", (D,)),
            ("encoder.rel_pos_bias.relative_position_bias_table", ((2 * grid - 1) ** 2 + 3, heads)),
            ("encoder.rel_pos_bias.relative_position_index", (grid * grid + 1,) * 2)]
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        keys += [(b + "gamma_1", (D,)), (b + "gamma_2", (D,)), (b + "norm1.weight", (D,)), (b + "norm1.bias", (D,)),
                 (b + "attn.q_bias", (D,)), (b + "attn.v_bias", (D,)), (b + "attn.qkv.weight", (3 * D, D)),
                 (b + "attn.proj.weight", (D, D)), (b + "attn.proj.bias", (D,)),
                 (b + "norm2.weight", (D,)), (b + "norm2.bias", (D,)),
                 (b + "mlp.fc1.weight", (4 * D, D)), (b + "mlp.fc1.bias", (4 * D,)),
                 (b + "mlp.fc2.weight", (D, 4 * D)), (b + "mlp.fc2.bias", (D,))]
    out = patch * patch * 3
    return keys + [("encoder.norm.weight", (D,)), ("encoder.norm.bias", (D,)),
                   ("decoder.0.weight", (out, D, 1, 1)), ("decoder.0.bias", (out,))]


def swin_pretrain_keys(img, C, depths, heads, window):
    """Spec section 8, SimMIM Swin, in the state_dict's order: a stage's window is clipped to its
    resolution, and then it is unshifted (no attn_mask)."""
    keys = [("encoder.mask_token", (1, 1, C)), ("encoder.patch_embed.proj.weight", (C, 3, 4, 4)),
            ("encoder.patch_embed.proj.bias", (C,)), ("encoder.patch_embed.norm.weight", (C,)),
            ("encoder.patch_embed.norm.bias", (C,))]
    for s in range(4):
        dim, res = C * 2 ** s, img // 4 // 2 ** s
        w, shifted = min(window, res), res > window
        for j in range(depths[s]):
            b = f"encoder.layers.{s}.blocks.{j}."
            if shifted and j % 2:
                keys.append((b + "attn_mask", ((res // w) ** 2, w * w, w * w)))
            keys += [(b + "norm1.weight", (dim,)), (b + "norm1.bias", (dim,)),
                     (b + "attn.relative_position_bias_table", ((2 * w - 1) ** 2, heads[s])),
                     (b + "attn.relative_position_index", (w * w, w * w)),
                     (b + "attn.qkv.weight", (3 * dim, dim)), (b + "attn.qkv.bias", (3 * dim,)),
                     (b + "attn.proj.weight", (dim, dim)), (b + "attn.proj.bias", (dim,)),
                     (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
                     (b + "mlp.fc1.weight", (4 * dim, dim)), (b + "mlp.fc1.bias", (4 * dim,)),
                     (b + "mlp.fc2.weight", (dim, 4 * dim)), (b + "mlp.fc2.bias", (dim,))]
        if s < 3:
            d = f"encoder.layers.{s}.downsample."
            keys += [(d + "reduction.weight", (2 * dim, 4 * dim)), (d + "norm.weight", (4 * dim,)),
                     (d + "norm.bias", (4 * dim,))]
    F_ = C * 8
    return keys + [("encoder.norm.weight", (F_,)), ("encoder.norm.bias", (F_,)),
                   ("decoder.0.weight", (3072, F_, 1, 1)), ("decoder.0.bias", (3072,))]


def layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@functools.lru_cache(maxsize=None)
def _meta_default(factory):
    with torch.device("meta"):
        return factory()


def on_meta(factory, **kwargs):
    """factory(**kwargs) built on the meta device (shapes only: fast, no memory); the default
    models are built once per session."""
    if not kwargs:
        return _meta_default(factory)
    with torch.device("meta"):
        return factory(**kwargs)


def test_vit_base_keys_shapes_and_counts_are_the_official_ones():
    model = on_meta(models_simmim.simmim_vit_base_patch16)
    assert layout(model) == vit_pretrain_keys(768, 12, 12, 14)
    sd = model.state_dict()
    assert len(sd) == 190
    assert sum(v.numel() for v in sd.values()) == 86_295_529
    assert sum(p.numel() for p in model.parameters()) == 86_256_720
    assert sd["encoder.rel_pos_bias.relative_position_index"].dtype == torch.int64
    assert model.patch_size == 16 and model.encoder_stride == 16
    dpr = [blk.drop_path1.drop_prob for blk in model.encoder.blocks[1:]]
    assert dpr == pytest.approx(np.linspace(0, 0.1, 12)[1:].tolist())
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_vit_tiny_is_the_mae_tiny_encoder_size_and_takes_overrides():
    assert layout(on_meta(models_simmim.simmim_vit_tiny_patch16)) == vit_pretrain_keys(192, 12, 3, 14)
    model = on_meta(models_simmim.simmim_vit_tiny_patch16, img_size=64, embed_dim=48, depth=3, num_heads=4,
                    drop_path_rate=0.2)
    assert layout(model) == vit_pretrain_keys(48, 3, 4, 4)
    assert model.encoder.blocks[2].drop_path1.drop_prob == pytest.approx(0.2)


def test_swin_base_keys_shapes_and_counts_are_the_official_ones():
    model = on_meta(models_simmim.simmim_swin_base_patch4_window6_192)
    assert layout(model) == swin_pretrain_keys(192, 128, (2, 2, 18, 2), (4, 8, 16, 32), 6)
    sd = model.state_dict()
    assert len(sd) == 365
    assert sum(v.numel() for v in sd.values()) == 90_055_544
    assert sum(p.numel() for p in model.parameters()) == 89_874_104
    assert [k for k in sd if k.endswith("attn_mask")][-1] == "encoder.layers.2.blocks.17.attn_mask"
    assert model.patch_size == 4 and model.encoder_stride == 32


def test_swin_large_and_tiny_keys_and_shapes():
    large = on_meta(models_simmim.simmim_swin_large_patch4_window12_192)
    assert layout(large) == swin_pretrain_keys(192, 192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    masks = {k: tuple(v.shape) for k, v in large.state_dict().items() if k.endswith("attn_mask")}
    assert set(masks.values()) == {(16, 144, 144), (4, 144, 144)}  # stages 0, 1; stage 2 unshifted
    assert large.state_dict()["encoder.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (121, 48)
    tiny = on_meta(models_simmim.simmim_swin_tiny_patch4_window4_64)
    assert layout(tiny)[:-2] == swin_pretrain_keys(64, 32, (2, 2, 2, 2), (2, 4, 8, 16), 4)[:-2]
    assert layout(tiny)[-2:] == [("decoder.0.weight", (3072, 256, 1, 1)), ("decoder.0.bias", (3072,))]
    over = on_meta(models_simmim.simmim_swin_tiny_patch4_window4_64, img_size=128, embed_dim=16,
                   depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), window_size=8, drop_path_rate=0.3)
    assert layout(over)[:-2] == swin_pretrain_keys(128, 16, (2, 2, 4, 2), (1, 2, 4, 8), 8)[:-2]


def test_no_weight_decay_sets_are_the_official_ones():
    vit = on_meta(models_simmim.simmim_vit_base_patch16)
    assert vit.no_weight_decay() == {"encoder.pos_embed", "encoder.cls_token"}
    assert vit.no_weight_decay_keywords() == set()
    swin = on_meta(models_simmim.simmim_swin_base_patch4_window6_192)
    assert swin.no_weight_decay() == {"encoder.absolute_pos_embed", "encoder.mask_token"}
    # the prefixed keyword matches no parameter name: the Swin pretrain tables ARE decayed
    assert swin.no_weight_decay_keywords() == {"encoder.relative_position_bias_table"}
    assert not any("encoder.relative_position_bias_table" in n for n, _ in swin.named_parameters())
    assert on_meta(models_vit.beit_base_patch16).no_weight_decay() == {"pos_embed", "cls_token"}


def test_beit_finetune_classifier_keys():
    """Spec section 9: per-block tables and indexes, no shared table, no norm (mean pooling ->
    fc_norm), head; the keys the pretrain checkpoint maps onto."""
    model = on_meta(models_vit.beit_base_patch16)
    expected = []
    for k, shape in vit_pretrain_keys(768, 12, 12, 14):
        if not k.startswith("encoder."):
            continue
        k = k[len("encoder."):]
        if k in ("mask_token", "norm.weight", "norm.bias") or k.startswith("rel_pos_bias"):
            continue
        expected.append((k, shape))
        if k.endswith("attn.v_bias"):
            expected += [(k[:-len("v_bias")] + "relative_position_bias_table", (732, 12)),
                         (k[:-len("v_bias")] + "relative_position_index", (197, 197))]
    expected += [("fc_norm.weight", (768,)), ("fc_norm.bias", (768,)), ("head.weight", (1000, 768)),
                 ("head.bias", (1000,))]
    assert layout(model) == expected
    assert model.blocks[11].drop_path1.drop_prob == pytest.approx(0.1)
    token = on_meta(models_vit.beit_tiny_patch16, global_pool=False, num_classes=10)
    keys = dict(layout(token))
    assert keys["norm.weight"] == (192,) and "fc_norm.weight" not in keys and keys["head.weight"] == (10, 192)


# --------------------------------------------------------------------------- official checkpoints
@pytest.mark.parametrize("factory", [tiny_simmim_vit, models_simmim.simmim_swin_tiny_patch4_window4_64])
def test_from_official_to_official_round_trip_and_strict_load(factory):
    torch.manual_seed(0)
    model = factory()
    sd = model.state_dict()
    official = models_simmim.to_official(sd)
    assert list(official) == list(sd) and all(official[k] is sd[k] for k in sd)
    back = models_simmim.from_official({"model": official, "epoch": 3})  # a whole checkpoint file
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    ddp = models_simmim.from_official({"module." + k: v for k, v in official.items()})
    assert list(ddp) == list(sd)
    torch.manual_seed(1)
    other = factory()
    assert not torch.equal(other.state_dict()["encoder.mask_token"], sd["encoder.mask_token"])
    other.load_state_dict(back, strict=True)
    # the checkpoint's buffers are the ones the model computes itself
    for k, v in factory().state_dict().items():
        if "relative_position_index" in k or "attn_mask" in k:
            assert torch.equal(v, back[k]), k
    imgs = torch.randn(1, 3, *model.encoder.patch_embed.img_size)
    mask = torch.randint(0, 2, (1, *model.encoder.patch_embed.grid_size))
    model.eval(), other.eval()
    assert torch.equal(model(imgs, mask)[1], other(imgs, mask)[1])


# --------------------------------------------------------------------------- table resize
def not_a_knot_by_hand(x, y, xi):
    """The cubic spline through 5 points whose only interior knot is x[2] (not-a-knot: no knot at
    x[1], x[3]): two cubics in the power basis, joined C2 at x[2]; 8 equations, 8 unknowns."""
    assert len(x) == 5
    row = lambda t, d=0: [math.prod(range(k - d + 1, k + 1)) * t ** (k - d) if k >= d else 0.  # noqa: E731
                          for k in range(4)]
    z = [0.] * 4
    A = [row(x[0]) + z, row(x[1]) + z, row(x[2]) + z, z + row(x[2]), z + row(x[3]), z + row(x[4])]
    A += [row(x[2], 1) + [-v for v in row(x[2], 1)], row(x[2], 2) + [-v for v in row(x[2], 2)]]
    c = np.linalg.solve(np.array(A), np.array([y[0], y[1], y[2], y[2], y[3], y[4], 0., 0.]))
    return np.array([np.dot(row(t), c[:4] if t <= x[2] else c[4:]) for t in xi])


def test_cubic_interpolation_is_the_not_a_knot_spline():
    rng = np.random.default_rng(0)
    x = models_simmim._geometric_axis(5, 9)  # [-(1+q), -1, 0, 1, 1+q]
    assert x[2] == 0 and x[3] == 1 and x[1] == -1
    y = rng.normal(size=5)
    xi = np.linspace(x[0], x[-1], 23)
    A = models_simmim.cubic_interpolation_matrix(x, xi)
    np.testing.assert_allclose(A @ y, not_a_knot_by_hand(x, y, xi), atol=1e-12)
    # interpolates the data; reproduces a cubic exactly (a natural spline would not)
    x9 = models_simmim._geometric_axis(9, 13)
    np.testing.assert_allclose(models_simmim.cubic_interpolation_matrix(x9, x9), np.eye(9), atol=1e-12)
    cubic = lambda t: 0.3 * t ** 3 - t ** 2 + 2 * t - 1  # noqa: E731
    xi = np.linspace(x9[0], x9[-1], 31)
    np.testing.assert_allclose(models_simmim.cubic_interpolation_matrix(x9, xi) @ cubic(x9), cubic(xi), atol=1e-9)
    # outside the source coordinates: the boundary value (FITPACK clamps)
    A = models_simmim.cubic_interpolation_matrix(x, [x[0] - 3, x[-1] + 1])
    np.testing.assert_allclose(A @ y, [y[0], y[-1]], atol=1e-12)


def test_geometric_axis_spacing():
    x = models_simmim._geometric_axis(11, 13)  # Swin-B 192/w6 -> 224/w7
    d = np.diff(x[5:])
    q = d[1] / d[0]
    np.testing.assert_allclose(d, q ** np.arange(5), rtol=1e-9)  # 1, q, q^2, ...
    assert 1.01 < q < 1.5 and x[-1] == pytest.approx(6, abs=1e-4)
    np.testing.assert_allclose(x, -x[::-1])


def test_resize_table_keeps_centre_and_cls_rows_and_matches_scipy():
    torch.manual_seed(0)
    table = torch.randn(7 * 7 + 3, 2)  # ViT grid 4 (64 px): 7x7 deltas + 3 cls entries
    out = models_simmim.resize_rel_pos_bias_table(table, 11, num_extra=3)  # grid 6 (96 px)
    assert out.shape == (11 * 11 + 3, 2) and out.dtype == torch.float32
    assert torch.equal(out[-3:], table[-3:])
    torch.testing.assert_close(out[5 * 11 + 5], table[3 * 7 + 3])  # delta (0, 0)
    # a head that is constant stays constant; the same size is a copy
    const = torch.full((7 * 7, 1), 0.7)
    torch.testing.assert_close(models_simmim.resize_rel_pos_bias_table(const, 9), torch.full((81, 1), 0.7))
    assert torch.equal(models_simmim.resize_rel_pos_bias_table(table, 7, num_extra=3), table)
    interpolate = pytest.importorskip("scipy.interpolate")
    x = models_simmim._geometric_axis(7, 11)
    xi = np.arange(-5, 5.1, 1.0)
    for h in range(2):
        z = table[:49, h].view(7, 7).numpy()
        ref = interpolate.RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)(xi, xi).T
        np.testing.assert_allclose(out[:121, h].view(11, 11).numpy(), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- pretrain -> finetune
def test_vit_conversion_same_size(capsys):
    torch.manual_seed(0)
    pre = models_simmim.simmim_vit_tiny_patch16(img_size=64, depth=2)
    with torch.no_grad():
        pre.encoder.rel_pos_bias.relative_position_bias_table.normal_()
    fine = models_vit.beit_tiny_patch16(img_size=64, depth=2, num_classes=5)
    sd = models_simmim.finetune_state_dict({"model": pre.state_dict()}, fine)
    printed = capsys.readouterr().out
    for key in ("decoder.0.weight", "mask_token", "norm.weight"):
        assert key in printed
    result = fine.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert result.unexpected_keys == []
    shared = pre.encoder.rel_pos_bias.relative_position_bias_table
    for blk in fine.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, shared)
    assert torch.equal(fine.cls_token, pre.encoder.cls_token)
    assert torch.equal(fine.blocks[1].attn.qkv.weight, pre.encoder.blocks[1].attn.qkv.weight)
    # the finetune model computes the pretrain encoder's tokens (before the final norm)
    fine.eval(), pre.eval()
    x = torch.randn(1, 3, 64, 64)
    seen = {}
    pre.encoder.norm.register_forward_hook(lambda m, i, o: seen.setdefault("pre", i[0]))
    pre(x, torch.zeros(1, 4, 4, dtype=torch.long))
    torch.testing.assert_close(_tokens(fine, x), seen["pre"])


def _tokens(beit, x):
    """The BEiT classifier's tokens after its last block (its `norm` is Identity under mean pooling)."""
    t = beit.patch_embed(x)
    t = torch.cat([beit.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
    for blk in beit.blocks:
        t = blk(t)
    return t


def test_vit_conversion_resizes_tables_to_another_resolution():
    torch.manual_seed(0)
    pre = models_simmim.simmim_vit_tiny_patch16(img_size=64, depth=2)
    with torch.no_grad():
        pre.encoder.rel_pos_bias.relative_position_bias_table.normal_()
    fine = models_vit.beit_tiny_patch16(img_size=96, depth=2, num_classes=5)  # grid 4 -> 6
    sd = models_simmim.finetune_state_dict(pre.state_dict(), fine)
    table = pre.encoder.rel_pos_bias.relative_position_bias_table
    assert sd["blocks.0.attn.relative_position_bias_table"].shape == (11 * 11 + 3, 3)
    torch.testing.assert_close(sd["blocks.1.attn.relative_position_bias_table"],
                               models_simmim.resize_rel_pos_bias_table(table, 11, num_extra=3))
    assert torch.equal(sd["blocks.0.attn.relative_position_index"], spec_index(6, 6))
    fine.load_state_dict(sd, strict=False)
    assert fine(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    # quirk 10 fixed: a checkpoint with per-block tables only (a finetuned one) converts too
    back = models_simmim.finetune_state_dict(fine.state_dict(), models_vit.beit_tiny_patch16(
        img_size=64, depth=2, num_classes=5))
    assert back["blocks.0.attn.relative_position_bias_table"].shape == (7 * 7 + 3, 3)
    assert "head.weight" in back


def test_swin_conversion_resizes_tables_and_uses_the_models_buffers(capsys):
    torch.manual_seed(0)
    pre = models_simmim.simmim_swin_tiny_patch4_window4_64()
    fine = models_swin.swin_tiny_patch4_window4_64(num_classes=5, window_size=8)  # windows 8, 8, 4, 2
    sd = models_simmim.finetune_state_dict(pre.state_dict(), fine)
    assert "mask_token" in capsys.readouterr().out
    src = pre.state_dict()["encoder.layers.0.blocks.1.attn.relative_position_bias_table"]
    assert sd["layers.0.blocks.1.attn.relative_position_bias_table"].shape == (15 * 15, 2)
    torch.testing.assert_close(sd["layers.0.blocks.1.attn.relative_position_bias_table"],
                               models_simmim.resize_rel_pos_bias_table(src, 15))
    assert torch.equal(sd["layers.2.blocks.0.attn.relative_position_bias_table"],
                       pre.state_dict()["encoder.layers.2.blocks.0.attn.relative_position_bias_table"])
    for k, v in fine.state_dict().items():
        if "attn_mask" in k or "relative_position_index" in k:
            assert torch.equal(sd[k], v), k
    result = fine.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []
    assert torch.equal(fine.norm.weight, pre.encoder.norm.weight)  # Swin keeps its final norm


# --------------------------------------------------------------------------- initialisation
def _bounded_trunc(w, bound):
    """A trunc_normal(0.02, -bound, bound)-like sample at +-1 std: inside the bound, reaching
    close to it, with the std of a normal truncated at +-1 std."""
    assert w.abs().max() <= bound * (1 + 1e-6)
    assert w.abs().max() > 0.95 * bound
    assert w.std().item() == pytest.approx(TRUNC_1SIGMA_STD * bound, rel=0.05)


def test_pretrain_vit_init_laws():
    """Spec section 4: every trunc-normal at +-0.02, proj / fc2 of block l / sqrt(2l), layer
    scale 0.1, zero q/v biases and shared table, decoder at PyTorch's default."""
    torch.manual_seed(0)
    model = models_simmim.simmim_vit_tiny_patch16(img_size=64)
    enc = model.encoder
    for t in (enc.cls_token, enc.mask_token, enc.patch_embed.proj.weight):
        assert t.abs().max() <= 0.02 and 0.006 < t.std() < 0.016
    for l, blk in enumerate(enc.blocks, start=1):
        _bounded_trunc(blk.attn.qkv.weight, 0.02)
        _bounded_trunc(blk.mlp.fc1.weight, 0.02)
        _bounded_trunc(blk.attn.proj.weight, 0.02 / math.sqrt(2 * l))
        _bounded_trunc(blk.mlp.fc2.weight, 0.02 / math.sqrt(2 * l))
        for t in (blk.attn.q_bias, blk.attn.v_bias, blk.attn.proj.bias, blk.mlp.fc1.bias, blk.mlp.fc2.bias,
                  blk.norm1.bias, blk.norm2.bias):
            assert (t == 0).all()
        assert (blk.gamma_1 == 0.1).all() and (blk.gamma_2 == 0.1).all()
        assert (blk.norm1.weight == 1).all() and (blk.norm2.weight == 1).all()
        assert blk.attn.k_bias.abs().sum() == 0 and not blk.attn.k_bias.requires_grad
    assert (enc.rel_pos_bias.relative_position_bias_table == 0).all()
    assert (enc.patch_embed.proj.bias == 0).all()
    bound = 1 / math.sqrt(192)  # decoder conv: kaiming_uniform(a=sqrt(5)), U(+-1/sqrt(fan_in))
    w, b = model.decoder[0].weight, model.decoder[0].bias
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert b.abs().max() <= bound and (b != 0).all()


def test_finetune_beit_init_laws():
    """Spec section 4: trunc_normal(0.02, +-2) (effectively untruncated), the same rescale, the
    patch-embedding conv included (zero bias), zero per-block tables, head x 0.001."""
    torch.manual_seed(0)
    model = models_vit.beit_tiny_patch16(img_size=64, num_classes=100)

    def std(t):  # robust to a rare clamp at -2 (spec section 4)
        t = t.detach().flatten()
        return t[t.abs() < 0.5].std().item()
    for l, blk in enumerate(model.blocks, start=1):
        assert std(blk.attn.qkv.weight) == pytest.approx(0.02, rel=0.03)
        assert std(blk.mlp.fc2.weight) == pytest.approx(0.02 / math.sqrt(2 * l), rel=0.03)
        assert (blk.attn.relative_position_bias_table == 0).all() and (blk.gamma_1 == 0.1).all()
    assert blk.attn.qkv.weight.abs().max() > 0.06  # +-3 std reached: not the pretrain's +-0.02
    w = model.patch_embed.proj.weight
    assert std(w) == pytest.approx(0.02, rel=0.05) and (model.patch_embed.proj.bias == 0).all()
    assert (w.abs() > 1 / math.sqrt(768)).float().mean() > 0.03  # normal tails, not PyTorch's uniform
    assert std(model.head.weight) == pytest.approx(2e-5, rel=0.1) and (model.head.bias == 0).all()
    assert (model.fc_norm.weight == 1).all() and (model.fc_norm.bias == 0).all()
