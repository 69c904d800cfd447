"""2D sin-cos position embeddings and their interpolation."""
import math

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed

import models_mae
import models_vit
from util.pos_embed import (_resize_grid_embed, get_1d_sincos_pos_embed_from_grid,
                            get_2d_sincos_pos_embed, interpolate_patch_embed,
                            interpolate_pos_embed)


def test_1d_by_hand():
    # D' = 4: omega = [1, 1/100]
    emb = get_1d_sincos_pos_embed_from_grid(4, np.array([0.0, 3.0]))
    expected = [[0, 0, 1, 1], [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)]]
    assert emb.dtype == np.float64
    np.testing.assert_allclose(emb, expected, rtol=0, atol=1e-15)


def test_2d_by_hand_first_half_is_column_second_half_is_row():
    # D = 8, grid 2x3 (h=2, w=3); each half has D' = 4, omega = [1, 1/100]
    emb = get_2d_sincos_pos_embed(8, (2, 3), cls_token=True)
    assert emb.shape == (1 + 6, 8)
    assert np.all(emb[0] == 0)

    def one_d(pos):
        return [math.sin(pos), math.sin(pos / 100), math.cos(pos), math.cos(pos / 100)]

    for h in range(2):
        for w in range(3):
            row = emb[1 + h * 3 + w]  # patches in row-major order
            np.testing.assert_allclose(row, one_d(w) + one_d(h), rtol=0, atol=1e-15)


def test_square_grid_and_sin_cos_halves():
    emb = get_2d_sincos_pos_embed(16, 4)
    assert emb.shape == (16, 16)
    # within each half: sin^2 + cos^2 = 1 channel-wise
    for half in (emb[:, :8], emb[:, 8:]):
        np.testing.assert_allclose(half[:, :4] ** 2 + half[:, 4:] ** 2, 1.0, atol=1e-12)
    # first half depends only on the column: patches 0 and 4 (same column) share it
    np.testing.assert_array_equal(emb[0, :8], emb[4, :8])
    np.testing.assert_array_equal(emb[0, 8:], emb[1, 8:])


def test_model_pos_embed_is_the_sincos_table():
    model = models_mae.mae_vit_tiny_patch16(img_size=64)
    expected = get_2d_sincos_pos_embed(192, 4, cls_token=True)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), expected, atol=1e-7)
    dec = get_2d_sincos_pos_embed(128, 4, cls_token=True)
    np.testing.assert_allclose(model.decoder_pos_embed[0].numpy(), dec, atol=1e-7)


def test_interpolation_14_to_24_keeps_cls_row(capsys):
    model = models_vit.vit_tiny_patch16(img_size=384, num_classes=3, depth=1)
    assert tuple(model.patch_embed.grid_size) == (24, 24)
    ckpt_pos = torch.randn(1, 1 + 14 * 14, 192)
    # a field constant on the grid stays constant under bicubic interpolation
    ckpt_pos[:, 1:, :5] = 0.25
    checkpoint_model = {"pos_embed": ckpt_pos.clone()}
    interpolate_pos_embed(model, checkpoint_model)
    new = checkpoint_model["pos_embed"]
    assert new.shape == (1, 1 + 24 * 24, 192)
    assert torch.equal(new[:, 0], ckpt_pos[:, 0])
    assert torch.allclose(new[:, 1:, :5], torch.full_like(new[:, 1:, :5], 0.25), atol=1e-6)
    assert "14x14 to 24x24" in capsys.readouterr().out
    model.load_state_dict(checkpoint_model, strict=False)
    # and it is bicubic with align_corners=False on the (D, 14, 14) grid, as the original
    grid = ckpt_pos[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    assert torch.allclose(new[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 576, 192), atol=1e-5)
    for mode, corners in (("bilinear", False), ("bicubic", True)):
        other = torch.nn.functional.interpolate(grid, size=(24, 24), mode=mode, align_corners=corners)
        assert not torch.allclose(new[:, 1:], other.permute(0, 2, 3, 1).reshape(1, 576, 192), atol=1e-3)


def test_interpolation_is_a_noop_for_equal_sizes(capsys):
    model = models_vit.vit_tiny_patch16(img_size=224, num_classes=3, depth=1)
    pos = torch.randn(1, 197, 192)
    checkpoint_model = {"pos_embed": pos}
    interpolate_pos_embed(model, checkpoint_model)
    assert checkpoint_model["pos_embed"] is pos
    assert capsys.readouterr().out == ""


def test_interpolation_to_a_non_square_grid_and_decoder_pos_embed():
    model = models_mae.mae_vit_tiny_patch16(img_size=(32, 64))
    src = models_mae.mae_vit_tiny_patch16(img_size=48)  # 3x3 grid
    checkpoint_model = src.state_dict()
    interpolate_pos_embed(model, checkpoint_model)
    assert checkpoint_model["pos_embed"].shape == model.pos_embed.shape
    assert checkpoint_model["decoder_pos_embed"].shape == model.decoder_pos_embed.shape
    model.load_state_dict(checkpoint_model, strict=True)



def reference_resize(pos_embed, num_extra_tokens, new_hw):
    """The original MAE computation, kept as the reference for the timm-based resize: bicubic,
    align_corners=False, on the (1, D, G, G) grid in float32, cast back; extra rows kept."""
    old = int(round((pos_embed.shape[1] - num_extra_tokens) ** 0.5))
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid.float(), size=new_hw, mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, grid), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_extra_tokens", [1, 0])
@pytest.mark.parametrize("old, new_hw", [(14, (24, 24)), (14, (7, 7)), (16, (14, 14)), (14, (12, 16))])
def test_timm_resize_is_bit_identical_to_the_reference(old, new_hw, num_extra_tokens, dtype):
    gen = torch.Generator().manual_seed(old * 100 + new_hw[0] * 10 + new_hw[1])
    for grid in (torch.from_numpy(get_2d_sincos_pos_embed(64, old)).float(),
                 torch.randn(old * old, 64, generator=gen)):
        extra = torch.randn(num_extra_tokens, 64, generator=gen)
        pos = torch.cat((extra, grid))[None].to(dtype)  # (1, extra + G*G, 64)
        new = _resize_grid_embed(pos, num_extra_tokens, new_hw, "pos_embed")
        assert new.dtype == dtype and new.shape == (1, num_extra_tokens + new_hw[0] * new_hw[1], 64)
        assert torch.equal(new, reference_resize(pos, num_extra_tokens, new_hw))
        assert torch.equal(new[:, :num_extra_tokens], pos[:, :num_extra_tokens])
        if new_hw[0] < old:  # antialias must stay off: with it, shrinking gives other numbers
            smooth = resample_abs_pos_embed(pos, list(new_hw), old_size=[old, old],
                                            num_prefix_tokens=num_extra_tokens, antialias=True)
            assert not torch.equal(new, smooth)

def test_non_square_checkpoint_grid_is_refused():
    model = models_vit.vit_tiny_patch16(img_size=64, num_classes=3, depth=1)
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(model, {"pos_embed": torch.randn(1, 1 + 8, 192)})


def test_patch_embed_resampled_for_another_patch_size():
    model = models_vit.vit_tiny_patch16(img_size=64, patch_size=8, num_classes=3, depth=1)
    checkpoint_model = {"patch_embed.proj.weight": torch.randn(192, 3, 16, 16)}
    interpolate_patch_embed(model, checkpoint_model)
    assert checkpoint_model["patch_embed.proj.weight"].shape == (192, 3, 8, 8)
