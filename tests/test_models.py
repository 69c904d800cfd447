"""MaskedAutoencoderViT and the ViT classifiers: masking, patches, loss, names, shapes."""
import math
import types
from functools import partial

import pytest
import torch

import models_mae
import models_vit
from util.models import build_classifier, model_from_name

# conftest's tiny_mae (32 px, 8 px patches, width 32, decoder 16 x 1) with 2 encoder blocks and
# the factories' LayerNorm (eps 1e-6)
MAE = dict(depth=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking_keeps_exact_count_and_restores_order(ratio, tiny_mae):
    torch.manual_seed(0)
    model = tiny_mae(**MAE)
    N, L, D = 3, 16, 5
    x = torch.arange(N * L, dtype=torch.float32).reshape(N, L, 1).expand(N, L, D).contiguous()
    x_masked, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert x_masked.shape == (N, keep, D)
    assert mask.shape == (N, L)
    assert torch.all(mask.sum(dim=1) == L - keep)
    for n in range(N):
        kept_ids = x_masked[n, :, 0].long() - n * L  # the patch index each kept token came from
        # mask is 0 exactly at the kept patches, in the original patch order
        expected = torch.ones(L)
        expected[kept_ids] = 0
        assert torch.equal(mask[n], expected)
    # ids_restore inverts ids_shuffle: restoring [kept, removed] gives 0..L-1
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(N, L))


def test_decoder_unshuffles_tokens_back_to_their_patches(tiny_mae):
    """forward_decoder puts the encoded token of patch i back at position 1 + i (cls first) and
    a mask token at every removed patch, before the decoder's position embedding."""
    torch.manual_seed(0)
    model = tiny_mae(**MAE)
    N, L, Dd = 2, 16, 16
    imgs = torch.randn(N, 3, 32, 32)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)  # (N, 1+4, D)
    seen = {}
    model.decoder_blocks[0].register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    model.forward_decoder(latent, ids_restore)
    x = seen["x"] - model.decoder_pos_embed  # (N, 1+L, Dd): the tokens before the pos embed
    embedded = model.decoder_embed(latent)  # (N, 1+K, Dd)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    for n in range(N):
        assert torch.allclose(x[n, 0], embedded[n, 0], atol=1e-6)  # cls stays first
        for k in range(latent.shape[1] - 1):  # k-th kept token came from patch ids_shuffle[n, k]
            patch = ids_shuffle[n, k]
            assert mask[n, patch] == 0
            assert torch.allclose(x[n, 1 + patch], embedded[n, 1 + k], atol=1e-6)
        for patch in torch.nonzero(mask[n]).flatten():
            assert torch.allclose(x[n, 1 + patch], model.mask_token[0, 0], atol=1e-6)


def test_noise_fixes_the_mask_and_small_noise_is_kept(tiny_mae):
    model = tiny_mae(**MAE)
    x = torch.randn(2, 16, 4)
    noise = torch.rand(2, 16)
    _, mask1, r1 = model.random_masking(x, 0.75, noise)
    _, mask2, r2 = model.random_masking(x, 0.75, noise.clone())
    assert torch.equal(mask1, mask2) and torch.equal(r1, r2)
    kept_by_noise = noise.argsort(dim=1)[:, :4]
    for n in range(2):
        assert torch.all(mask1[n, kept_by_noise[n]] == 0)
    imgs = torch.randn(2, 3, 32, 32)
    out1 = model(imgs, 0.75, noise=noise)
    out2 = model(imgs, 0.75, noise=noise)
    assert torch.equal(out1[2], out2[2]) and torch.equal(out1[0], out2[0])


# --------------------------------------------------------------------------- patches
@pytest.mark.parametrize("img_size,patch,chans", [((32, 32), 8, 3), ((48, 32), 16, 3),
                                                   ((64, 64), 16, 1), ((32, 48), 4, 4)])
def test_unpatchify_inverts_patchify(img_size, patch, chans, tiny_mae):
    model = tiny_mae(**MAE, img_size=img_size, patch_size=patch, in_chans=chans)
    imgs = torch.randn(2, chans, *img_size)
    x = model.patchify(imgs)
    L = (img_size[0] // patch) * (img_size[1] // patch)
    assert x.shape == (2, L, patch * patch * chans)
    assert torch.equal(model.unpatchify(x), imgs)


def test_patch_pixel_order_is_p_q_c_and_patches_row_major(tiny_mae):
    model = tiny_mae(**MAE, img_size=(16, 32), patch_size=8)
    imgs = torch.randn(1, 3, 16, 32)
    x = model.patchify(imgs)  # (1, 2*4, 8*8*3)
    # patch (row 1, col 2) is index 1*4 + 2; value at pixel (p=3, q=5, c=2)
    assert x[0, 6, (3 * 8 + 5) * 3 + 2] == imgs[0, 2, 8 + 3, 16 + 5]
    assert x[0, 1, 0] == imgs[0, 0, 0, 8]


# --------------------------------------------------------------------------- loss
def test_loss_counts_removed_patches_only(tiny_mae):
    torch.manual_seed(0)
    model = tiny_mae(**MAE)
    imgs = torch.randn(2, 3, 32, 32)
    _, pred, mask = model(imgs, 0.75)
    base = model.forward_loss(imgs, pred, mask)
    visible = mask == 0
    pred2 = pred.detach().clone()
    pred2[visible] += 100.0  # change only visible patches' predictions
    assert torch.allclose(model.forward_loss(imgs, pred2, mask), base)
    pred3 = pred.detach().clone()
    pred3[~visible] += 1.0
    assert not torch.allclose(model.forward_loss(imgs, pred3, mask), base)
    # by hand: mean over a patch's values, then over removed patches
    target = model.patchify(imgs)
    per_patch = ((pred.detach() - target) ** 2).mean(-1)
    assert torch.allclose(base, per_patch[mask.bool()].mean(), atol=1e-6)


def test_norm_pix_loss_normalises_each_patch_with_unbiased_variance(tiny_mae):
    model = tiny_mae(**MAE, norm_pix_loss=True)
    imgs = torch.randn(1, 3, 32, 32) * 3 + 2
    target = model.patchify(imgs)  # (1, 16, 192)
    n = target.shape[-1]
    mean = target.sum(-1, keepdim=True) / n
    var = ((target - mean) ** 2).sum(-1, keepdim=True) / (n - 1)
    normed = (target - mean) / torch.sqrt(var + 1e-6)
    mask = torch.zeros(1, 16)
    mask[0, [1, 5, 7]] = 1
    # predicting the normalised target exactly gives zero loss; predicting 0 gives ~1
    assert model.forward_loss(imgs, normed, mask).abs() < 1e-10
    zero_loss = model.forward_loss(imgs, torch.zeros_like(normed), mask)
    assert torch.allclose(zero_loss, (normed[0, [1, 5, 7]] ** 2).mean(), atol=1e-6)
    assert abs(zero_loss.item() - (n - 1) / n) < 1e-3  # unbiased var: mean square = (n-1)/n


# --------------------------------------------------------------------------- init, grads
def test_init_matches_the_original():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=64)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0), name
            bound = math.sqrt(6 / (m.in_features + m.out_features))  # xavier_uniform
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(model.cls_token.std().item() - 0.02) < 0.006
    assert abs(model.mask_token.std().item() - 0.02) < 0.006
    assert torch.all(model.pos_embed[0, 0] == 0) and torch.all(model.decoder_pos_embed[0, 0] == 0)
    attn = model.blocks[0].attn
    assert attn.fused_attn and attn.scale == attn.head_dim ** -0.5
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU)
    assert model.blocks[0].mlp.act.approximate == "none"


def test_gradients_reach_every_trainable_parameter_and_pos_embeds_are_frozen(tiny_mae):
    torch.manual_seed(0)
    model = tiny_mae(**MAE)
    loss, _, _ = model(torch.randn(2, 3, 32, 32), 0.75)
    loss.backward()
    for name, p in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert not p.requires_grad and p.grad is None
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    names = {n for n, _ in model.named_parameters()}
    assert {"pos_embed", "decoder_pos_embed"} <= set(model.state_dict()) and "pos_embed" in names


# --------------------------------------------------------------------------- names & shapes
BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]


def expected_mae_shapes(D, depth, Dd, ddepth, p, L, C=3):
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, L + 1, D),
              "patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,),
              "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
              "mask_token": (1, 1, Dd), "decoder_pos_embed": (1, L + 1, Dd),
              "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
              "decoder_pred.weight": (p * p * C, Dd), "decoder_pred.bias": (p * p * C,)}
    for prefix, width, n in (("blocks", D, depth), ("decoder_blocks", Dd, ddepth)):
        for i in range(n):
            for k, s in zip(BLOCK_KEYS, [(width,), (width,), (3 * width, width), (3 * width,),
                                         (width, width), (width,), (width,), (width,),
                                         (4 * width, width), (4 * width,), (width, 4 * width),
                                         (width,)]):
                shapes[f"{prefix}.{i}.{k}"] = s
    return shapes


@pytest.mark.parametrize("name,D,depth,Dd,ddepth,p", [
    ("mae_vit_tiny_patch16", 192, 12, 128, 4, 16),
    ("mae_vit_small_patch16", 384, 12, 256, 4, 16),
    ("mae_vit_base_patch16", 768, 12, 512, 8, 16),
    ("mae_vit_large_patch16", 1024, 24, 512, 8, 16),
    ("mae_vit_huge_patch14", 1280, 32, 512, 8, 14),
    ("mae_vit_base_patch16_dec512d8b", 768, 12, 512, 8, 16),
    ("mae_vit_large_patch16_dec512d8b", 1024, 24, 512, 8, 16),
    ("mae_vit_huge_patch14_dec512d8b", 1280, 32, 512, 8, 14),
])
def test_mae_factory_state_dict_names_and_shapes(name, D, depth, Dd, ddepth, p):
    with torch.device("meta"):
        model = getattr(models_mae, name)()
    L = (224 // p) ** 2
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_mae_shapes(D, depth, Dd, ddepth, p, L)


def test_factory_overrides():
    model = models_mae.mae_vit_tiny_patch16(img_size=64, patch_size=8, norm_pix_loss=True,
                                            in_chans=1, decoder_depth=2)
    assert model.norm_pix_loss and len(model.decoder_blocks) == 2
    assert model.pos_embed.shape == (1, 65, 192)
    loss, pred, mask = model(torch.randn(2, 1, 64, 64))
    assert pred.shape == (2, 64, 64) and torch.isfinite(loss)


def test_non_square_images(tiny_mae):
    model = tiny_mae(**MAE, img_size=(32, 64))
    loss, pred, mask = model(torch.randn(2, 3, 32, 64), 0.5)
    assert pred.shape == (2, 32, 192) and mask.shape == (2, 32)
    assert model.unpatchify(pred).shape == (2, 3, 32, 64)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name,millions", [("vit_base_patch16", 86), ("vit_large_patch16", 304),
                                           ("vit_huge_patch14", 632)])
def test_vit_encoder_parameter_counts(name, millions):
    with torch.device("meta"):
        model = getattr(models_vit, name)(num_classes=1000, global_pool=True)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.01, n


@pytest.mark.parametrize("name,dim,depth", [("vit_tiny_patch16", 192, 12), ("vit_small_patch16", 384, 12),
                                            ("vit_base_patch16", 768, 12), ("vit_large_patch16", 1024, 24),
                                            ("vit_huge_patch14", 1280, 32)])
def test_vit_factory_keys_and_shapes(name, dim, depth):
    """The names and shapes of the original's mae_finetuned_vit_*.pth (global pool)."""
    with torch.device("meta"):
        model = getattr(models_vit, name)(num_classes=1000, global_pool=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    p = 14 if name.endswith("14") else 16
    L = (224 // p) ** 2
    expected = {"cls_token": (1, 1, dim), "pos_embed": (1, L + 1, dim),
                "patch_embed.proj.weight": (dim, 3, p, p), "patch_embed.proj.bias": (dim,),
                "fc_norm.weight": (dim,), "fc_norm.bias": (dim,), "head.weight": (1000, dim), "head.bias": (1000,)}
    for i in range(depth):
        b = f"blocks.{i}."
        expected.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                         b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                         b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                         b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                         b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                         b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    assert shapes == expected


@pytest.mark.parametrize("global_pool", [True, False])
def test_vit_pooling_and_names(global_pool):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, num_classes=5, global_pool=global_pool,
                                        depth=2).eval()
    keys = set(model.state_dict())
    assert ("fc_norm.weight" in keys) == global_pool
    assert ("norm.weight" in keys) == (not global_pool)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    tokens = model.forward_features(x)  # (N, 1+L, D); norm already applied when not pooling
    if global_pool:
        feats = model.fc_norm(tokens[:, 1:].mean(dim=1))  # cls excluded
    else:
        feats = tokens[:, 0]
    assert torch.allclose(model.head(feats), logits, atol=1e-5)


@pytest.mark.parametrize("global_pool", [True, False])
def test_pretrain_state_dict_loads_into_finetune_model(global_pool):
    mae = models_mae.mae_vit_tiny_patch16(img_size=32)
    vit = models_vit.vit_tiny_patch16(img_size=32, num_classes=10, global_pool=global_pool)
    result = vit.load_state_dict(mae.state_dict(), strict=False)
    expected_missing = {"head.weight", "head.bias"}
    if global_pool:
        expected_missing |= {"fc_norm.weight", "fc_norm.bias"}
    assert set(result.missing_keys) == expected_missing
    assert all(k.startswith(("decoder", "mask_token")) or (global_pool and k.startswith("norm."))
               for k in result.unexpected_keys)
    assert torch.equal(vit.blocks[3].attn.qkv.weight, mae.blocks[3].attn.qkv.weight)


def test_mae_state_dict_round_trips_strictly():
    a = models_mae.mae_vit_tiny_patch16(img_size=32)
    b = models_mae.mae_vit_tiny_patch16(img_size=32)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 4)
    assert torch.equal(a(x, noise=noise)[0], b(x, noise=noise)[0])


def test_forward_compiles_as_one_graph_without_breaks(tiny_mae):
    """--compile: the MAE forward (masking, unshuffle, loss) and the classifier trace into a
    single graph each, so torch.compile optimises the whole step."""
    mae = tiny_mae(**MAE, norm_pix_loss=True)
    explained = torch._dynamo.explain(mae)(torch.randn(2, 3, 32, 32), 0.75)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    vit = models_vit.vit_tiny_patch16(img_size=32, depth=2, num_classes=5, global_pool=True)
    explained = torch._dynamo.explain(vit)(torch.randn(2, 3, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ---------------------------------------------------------------------------------------------
# util/models.py: the model that --model names
# ---------------------------------------------------------------------------------------------

def test_model_from_name():
    zoo = types.ModuleType("zoo")
    zoo.net_small = lambda **kwargs: ("small", kwargs)
    zoo.net_big = lambda **kwargs: ("big", kwargs)
    zoo.helper = lambda **kwargs: None
    assert model_from_name(zoo, "net_big", "net_", depth=2, patch_size=None) == ("big", {"depth": 2})
    with pytest.raises(ValueError, match="unknown --model 'helper'; choose one of: net_big, net_small$"):
        model_from_name(zoo, "helper", "net_")


def test_build_classifier_from_the_script_flags(make_args):
    args = make_args("finetune", "--model", "vit_tiny_patch16", "--input_size", 64, "--patch_size", 8,
                     "--nb_classes", 7, "--cls_token")
    model = build_classifier(args, drop_path_rate=0.2)
    assert model.patch_embed.grid_size == (8, 8) and model.head.out_features == 7 and model.global_pool == "token"
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown --model 'mae_vit_tiny_patch16'"):
        build_classifier(make_args("linprobe", "--model", "mae_vit_tiny_patch16"))
