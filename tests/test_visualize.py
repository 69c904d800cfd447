"""Reconstruction grids (util/visualize.py) and the visualize command (main_visualize.py): the
tiles' content, the readable layout (titles, upscaled tiles, gaps), images picked round-robin over
the classes, the model inferred from a checkpoint without args, and where the PNG goes; the same
for SimMIM checkpoints (this repo's and the official layout), whose masks are seeded blocks.

All in-process on tiny models and 32-64 px toy images.
"""
import argparse
import os
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import main_visualize
import models_mae
import models_simmim
from models_mae import MaskedAutoencoderViT
from util import visualize
from util.datasets import ImageFolderDataset, build_eval_transform, load_and_transform
from util.masking import MaskGenerator

IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def random_images(n, seed=0, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def patch_mask_image(mask, size=32, patch=8):
    """(L,) 0/1 patch mask -> (S, S) bool pixel mask."""
    g = size // patch
    return mask.reshape(g, g).repeat_interleave(patch, 0).repeat_interleave(patch, 1).bool()


def tile_in_grid(grid, n_rows, row, col, tile):
    """The (3, tile, tile) tile at (row, col) of a draw_grid image of n_rows rows, located from the
    bottom-left corner (the title row's height depends on the font)."""
    top = grid.shape[1] - (n_rows - row) * (tile + visualize.GAP)
    left = visualize.GAP + col * (tile + visualize.GAP)
    return grid[:, top:top + tile, left:left + tile]


# ---------------------------------------------------------------------------------------------
# the tiles
# ---------------------------------------------------------------------------------------------

def test_tiles_show_original_masked_reconstruction_and_pasted(tiny_mae):
    torch.manual_seed(0)
    model = tiny_mae()
    imgs = random_images(3)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    tiles = visualize.reconstruction_tiles(model, imgs, mask_ratio=0.75, noise=noise)
    assert tiles.dtype == torch.uint8 and tiles.shape == (3, 4, 3, 32, 32)

    _, mask, _ = model.random_masking(model.patch_embed(imgs), 0.75, noise)  # (3, 16)
    assert model.training  # the tiles put the model back in training mode
    for r in range(3):
        removed = patch_mask_image(mask[r])  # (32, 32)
        assert removed.sum() == 12 * 64
        original, masked, recon, pasted = tiles[r]
        assert torch.equal(original, visualize.denormalize(imgs[r:r + 1])[0])
        assert torch.equal(masked[:, ~removed], original[:, ~removed])  # visible cells equal
        assert torch.equal(pasted[:, ~removed], original[:, ~removed])
        assert torch.equal(pasted[:, removed], recon[:, removed])
        assert (masked[:, removed] == 128).all()  # removed patches grey
        assert (masked[:, removed] != original[:, removed]).any(0).float().mean() > 0.9


class OracleMAE(MaskedAutoencoderViT):
    """Predicts exactly its (normalised) target: a perfect reconstruction."""

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        _, mask, _ = self.forward_encoder(imgs, mask_ratio, noise)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
        return torch.zeros(()), target, mask


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_undoes_norm_pix_loss(norm_pix_loss, tiny_mae):
    model = tiny_mae(norm_pix_loss=norm_pix_loss)
    model.__class__ = OracleMAE  # the same model, with the oracle's forward
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) / 255
    imgs = (pixels - IMAGENET_MEAN.view(3, 1, 1)) / IMAGENET_STD.view(3, 1, 1)
    tiles = visualize.reconstruction_tiles(model, imgs, mask_ratio=0.75).int()  # (2, 4, 3, 32, 32)
    assert (tiles[:, 2] - tiles[:, 0]).abs().max() <= 1  # reconstruction = original
    assert (tiles[:, 3] - tiles[:, 0]).abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# the readable grid
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, factor", [(32, 3), (48, 2), (64, 2), (96, 1), (224, 1)])
def test_upscale_factor_is_the_smallest_integer_reaching_96_px(size, factor):
    assert visualize.upscale_factor(size, size) == factor
    assert size * factor >= visualize.MIN_TILE > size * (factor - 1) or factor == 1


def test_grid_has_titles_upscaled_tiles_and_gaps():
    tiles = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = visualize.draw_grid(tiles)  # (3, H', W')
    gap, tile = visualize.GAP, 96  # 32 px x 3
    assert grid.dtype == torch.uint8 and grid.shape[2] == gap + 4 * (tile + gap)
    title_h = grid.shape[1] - 2 * (tile + gap)
    assert title_h >= 10  # room for a line of text
    for row in range(2):
        for col in range(4):  # nearest neighbour: each pixel a 3 x 3 block
            expected = tiles[row, col].repeat_interleave(3, 1).repeat_interleave(3, 2)
            assert torch.equal(tile_in_grid(grid, 2, row, col, tile), expected)
    white = torch.tensor(visualize.BACKGROUND, dtype=torch.uint8).view(3, 1)
    assert (grid[:, title_h:, :gap].flatten(1) == white).all()  # the gap left of the first column
    assert (grid[:, title_h + tile:title_h + tile + gap].flatten(1) == white).all()  # between the rows

    titles = grid[:, :title_h].int().sum(0) < 3 * 128  # (title_h, W') dark pixels: the text
    for col in range(4):  # every column titled, its title within the column
        left = gap + col * (tile + gap)
        assert titles[:, left:left + tile].sum() > 20, visualize.COLUMNS[col]
        assert not titles[:, left - gap:left].any()  # no text spills into the gaps


def test_save_reconstructions_writes_the_grid_png(tmp_path, tiny_mae):
    model = tiny_mae()
    imgs = random_images(3)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "vis" / "grid.png")
    grid = visualize.save_reconstructions(model, imgs, path, mask_ratio=0.75, noise=noise)
    assert torch.equal(grid, visualize.draw_grid(visualize.reconstruction_tiles(model, imgs, 0.75, noise)))
    with Image.open(path) as im:
        assert im.size == (grid.shape[2], grid.shape[1]) and min(im.size) >= 3 * 96
        assert torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), grid)


# ---------------------------------------------------------------------------------------------
# images from several classes
# ---------------------------------------------------------------------------------------------

def test_round_robin_takes_one_of_each_class_in_turn():
    labels = [0, 0, 0, 1, 1, 2]
    assert visualize.round_robin_indices(labels, 5) == [0, 3, 5, 1, 4]
    assert visualize.round_robin_indices(labels, 100) == [0, 3, 5, 1, 4, 2]
    assert visualize.round_robin_indices(["b", "a", "b"], 2) == [0, 1]  # order of first appearance
    assert visualize.round_robin_indices(labels, 0) == []


def test_pretraining_grids_show_several_classes(toy_data, make_args):
    root = os.path.join(toy_data(train_per_class=4, val_per_class=1, size=32), "train")
    dataset = ImageFolderDataset(root)
    args = make_args("pretrain", "--vis_images", 6, "--input_size", 32)
    state = torch.get_rng_state()
    imgs = main_pretrain.load_vis_images(dataset, args)  # (6, 3, 32, 32)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG stream untouched

    classes = sorted(os.listdir(root))
    assert len(classes) >= 4
    files = {c: sorted(os.listdir(os.path.join(root, c))) for c in classes}
    expected = [(c, files[c][0]) for c in classes] + [(c, files[c][1]) for c in classes]
    transform = build_eval_transform(32)
    for img, (c, name) in zip(imgs, expected[:6]):
        assert torch.equal(img, load_and_transform(os.path.join(root, c, name), transform))


def test_visualize_lists_images_round_robin_over_folders(toy_data, tmp_path):
    val = os.path.join(toy_data(train_per_class=4, val_per_class=2, size=32), "val")
    paths = main_visualize.list_images(val, 5)
    classes = [os.path.basename(os.path.dirname(p)) for p in paths]
    assert classes[:4] == sorted(os.listdir(val))[:4] and len(set(classes)) == 4

    for name in ("b.png", "a.png", "c.png"):  # a flat folder: sorted
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [os.path.basename(p) for p in main_visualize.list_images(str(tmp_path), 2)] == ["a.png", "b.png"]


# ---------------------------------------------------------------------------------------------
# main_visualize.py: the model a checkpoint holds, the output path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("mae_vit_tiny_patch16", dict(input_size=224, patch_size=16, num_heads=3, decoder_num_heads=4)),
    ("mae_vit_large_patch16", dict(input_size=224, patch_size=16, num_heads=16, decoder_num_heads=16)),
    ("mae_vit_huge_patch14", dict(input_size=224, patch_size=14, num_heads=16, decoder_num_heads=16)),
])
def test_infer_mae_names_the_factory_of_a_released_layout(name, expected):
    with torch.device("meta"):  # shapes only: no memory
        reference = getattr(models_mae, name)()
    args, layout = main_visualize.infer_mae(reference.state_dict())
    assert args == dict(model=name, **expected)
    assert layout == dict(embed_dim=reference.pos_embed.shape[-1], depth=len(reference.blocks), mlp_ratio=4.0,
                          decoder_embed_dim=reference.decoder_embed.out_features,
                          decoder_depth=len(reference.decoder_blocks))


def save_weights_only(model, path):
    """A checkpoint as the original's mae_visualize_vit_*.pth: {'model': state_dict}, no args."""
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("overrides, heads", [
    (dict(), ["--num_heads", "2", "--decoder_num_heads", "2"]),  # 2 heads: not in the weights
    (dict(img_size=48, patch_size=12, embed_dim=64, depth=3, num_heads=1, decoder_embed_dim=32,
          decoder_depth=2, decoder_num_heads=1, norm_pix_loss=True), ["--norm_pix_loss"]),
])
def test_checkpoint_without_args_gets_its_model_inferred(overrides, heads, tiny_mae, toy_data, tmp_path, capsys):
    torch.manual_seed(0)
    reference = tiny_mae(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **overrides)  # eps as the factories
    checkpoint = save_weights_only(reference, tmp_path / "mae_visualize_tiny.pth")
    val = os.path.join(toy_data(train_per_class=4, val_per_class=1, size=32), "val")
    capsys.readouterr()
    grid = main_visualize.main(["--checkpoint", checkpoint, "--data_path", val, "--num_images", "2",
                                "--device", "cpu", *heads])
    out = capsys.readouterr().out
    size = reference.patch_embed.img_size[0]
    assert f"inferred from its weights: {size} px, patch {reference.patch_embed.patch_size[0]}" in out
    assert f"norm_pix_loss {reference.norm_pix_loss}" in out

    # the same grid as the reference model draws: every weight, depth, head and size right
    imgs = main_visualize.load_images(main_visualize.list_images(val, 2), size)
    noise = torch.rand(2, reference.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
    assert torch.equal(grid, visualize.reconstruction_grid(reference, imgs, 0.75, noise))
    # written beside the checkpoint by default
    with Image.open(tmp_path / "reconstructions-mae_visualize_tiny.png") as im:
        assert torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), grid)


@pytest.fixture(scope="module")
def args_checkpoint(tmp_path_factory):
    """A checkpoint with args, as main_pretrain.py writes it: mae_vit_tiny_patch16, 32 px, patch 16."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=16)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-0.pth"
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=32, patch_size=16, norm_pix_loss=False)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, path)
    return str(path)


def grid_shape(n_rows, size=32):
    """The (3, H', W') shape of a grid of n_rows rows of size px images."""
    return visualize.draw_grid(torch.zeros(n_rows, 4, 3, size, size, dtype=torch.uint8)).shape


def test_visualize_command_reads_the_checkpoints_args(args_checkpoint, toy_data, tmp_path, capsys):
    train = os.path.join(toy_data(train_per_class=4, val_per_class=1, size=32), "train")
    grid_path = str(tmp_path / "grid.png")
    grid = main_visualize.main(["--checkpoint", args_checkpoint, "--data_path", train, "--out", grid_path,
                                "--num_images", "3", "--device", "cpu"])
    assert "Loaded mae_vit_tiny_patch16 (input 32" in capsys.readouterr().out  # not inferred
    assert grid.shape == grid_shape(3)
    with Image.open(grid_path) as im:
        assert im.size == (grid.shape[2], grid.shape[1])

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 50), (60 * i, 100, 200)).save(flat / f"{i}.jpg")
    grid = main_visualize.main(["--checkpoint", args_checkpoint, "--data_path", str(flat), "--out",
                                str(tmp_path / "flat.png"), "--model", "mae_vit_tiny_patch16", "--num_images", "8"])
    assert grid.shape == grid_shape(2)


@pytest.mark.parametrize("with_args", [True, False])
def test_encoder_only_checkpoint_is_refused(with_args, args_checkpoint, tmp_path):
    checkpoint = torch.load(args_checkpoint, weights_only=False)
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items()
                           if not k.startswith("decoder") and k != "mask_token"}
    if not with_args:  # as the release's mae_pretrain_vit_*.pth
        del checkpoint["args"]
    encoder_only = str(tmp_path / "encoder_only.pth")
    torch.save(checkpoint, encoder_only)
    with pytest.raises(ValueError, match="need a checkpoint with the decoder"):
        main_visualize.main(["--checkpoint", encoder_only, "--data_path", str(tmp_path), "--out",
                             str(tmp_path / "x.png")])


def test_non_mae_weights_get_a_one_line_error(tmp_path, cli):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}}, path)
    status, output = cli("main_visualize.py", "--checkpoint", path, "--data_path", tmp_path)
    assert status == 1 and "Traceback" not in output
    (line,) = output.strip().splitlines()
    assert line.startswith("ERROR: ") and "not a MAE's" in line and "conv1.weight" in line and str(path) in line
    assert not list(tmp_path.glob("*.png"))


def test_default_output_is_beside_the_checkpoint():
    assert main_visualize.default_out("out/run/checkpoint-9.pth") == os.path.join(
        "out/run", "reconstructions-checkpoint-9.png")
    assert main_visualize.default_out("mae_visualize_vit_large.pth") == "reconstructions-mae_visualize_vit_large.png"
    url = "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large.pth"
    assert main_visualize.default_out(url) == "reconstructions-mae_visualize_vit_large.png"  # the current folder


# ---------------------------------------------------------------------------------------------
# main_visualize.py for SimMIM checkpoints: this repo's (with args) and the official layout
# ---------------------------------------------------------------------------------------------

def save_simmim_checkpoint(path, simmim, **args):
    """A SimMIM checkpoint as main_pretrain.py writes it ({'model', 'args', 'epoch'}), or, without
    keyword arguments, as the official files: {'model': state_dict in the official names}."""
    checkpoint = {"model": models_simmim.to_official(simmim.state_dict())}
    if args:
        checkpoint.update(args=argparse.Namespace(**args), epoch=0)
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def simmim_vit(tmp_path_factory):
    """(path, model): simmim_vit_tiny_patch16 at 64 px (4 x 4 patches of 16 px, 2 x 2 mask blocks
    of 32 px) in a checkpoint with args; its mask ratio 0.5 (2 of the 4 blocks), not the default."""
    torch.manual_seed(0)
    model = models_simmim.simmim_vit_tiny_patch16(img_size=64)
    path = save_simmim_checkpoint(tmp_path_factory.mktemp("simmim") / "checkpoint-0.pth", model,
                                  model="simmim_vit_tiny_patch16", input_size=64, patch_size=None,
                                  mask_patch_size=32, mask_ratio=0.5, seed=0)
    return path, model


@pytest.fixture(scope="module")
def simmim_swin():
    """simmim_swin_tiny_patch4_window4_64 at its default size (64 px, patch 4): an official-layout
    checkpoint of it is inferred."""
    torch.manual_seed(1)
    return models_simmim.simmim_swin_tiny_patch4_window4_64()


def vis_images(toy_data, n, size=64):
    """The n images main_visualize draws from the toy train folder at size px."""
    train = os.path.join(toy_data(train_per_class=4, val_per_class=1, size=32), "train")
    return train, main_visualize.load_images(main_visualize.list_images(train, n), size)


def test_simmim_checkpoint_with_args_draws_masked_reconstruction_and_pasted(simmim_vit, toy_data, tmp_path,
                                                                            capsys):
    path, model = simmim_vit
    train, imgs = vis_images(toy_data, 3)  # (3, 3, 64, 64)
    out = str(tmp_path / "grid.png")
    grid = main_visualize.main(["--checkpoint", path, "--data_path", train, "--out", out, "--num_images", "3",
                                "--device", "cpu"])
    assert "Loaded simmim_vit_tiny_patch16 (input 64, masks of 32 px blocks, ratio 0.5)" in capsys.readouterr().out
    assert grid.shape == grid_shape(3, 64)  # 3 rows x 4 columns
    with Image.open(out) as im:
        assert torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), grid)

    # the masks: the checkpoint's ratio and block size, those of the pretraining grids of seed 0
    masks, noise = visualize.fixed_masking(model, 3, 0, 0.5, 32)  # (3, 4, 4)
    assert noise is None and masks.shape == (3, 4, 4)
    assert (masks.sum((1, 2)) == 2 * 4).all()  # 2 of the 4 blocks of 2 x 2 patches
    assert torch.equal(masks, masks[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2))  # blocks

    tiles = visualize.reconstruction_tiles(model, imgs, masks)  # (3, 4, 3, 64, 64)
    assert torch.equal(grid, visualize.draw_grid(tiles))  # the grid is these tiles: same weights, masks
    for r in range(3):
        removed = masks[r].bool().repeat_interleave(16, 0).repeat_interleave(16, 1)  # (64, 64)
        original, masked, recon, pasted = tiles[r]
        assert torch.equal(original, visualize.denormalize(imgs[r:r + 1])[0])
        assert (masked[:, removed] == 128).all()  # grey exactly where the mask is 1
        assert torch.equal(masked[:, ~removed], original[:, ~removed])
        assert torch.equal(pasted[:, ~removed], original[:, ~removed])  # the original where it is 0
        assert torch.equal(pasted[:, removed], recon[:, removed])
        assert (recon[:, ~removed] != original[:, ~removed]).any()  # recon is the model's, not a copy


def test_simmim_grid_is_a_function_of_the_seed(simmim_vit, toy_data, tmp_path):
    path, _ = simmim_vit
    train, _ = vis_images(toy_data, 2)

    def grid(seed, name):
        return main_visualize.main(["--checkpoint", path, "--data_path", train, "--out", str(tmp_path / name),
                                    "--num_images", "2", "--device", "cpu", "--seed", str(seed)])
    first = grid(0, "a.png")
    assert torch.equal(grid(0, "b.png"), first)
    assert not torch.equal(grid(1, "c.png"), first)


def test_official_simmim_checkpoint_gets_its_factory_inferred(simmim_swin, toy_data, tmp_path, capsys):
    path = save_simmim_checkpoint(tmp_path / "simmim_pretrain_tiny.pth", simmim_swin)  # no args
    train, imgs = vis_images(toy_data, 2)
    capsys.readouterr()
    grid = main_visualize.main(["--checkpoint", path, "--data_path", train, "--num_images", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "inferred from its weights: models_simmim.simmim_swin_tiny_patch4_window4_64 at 64 px, patch 4" in out
    assert "masks of 32 px blocks, ratio 0.6" in out  # the defaults: not in the weights

    generator = MaskGenerator(64, 32, 4, 0.6)
    rng = np.random.default_rng(0)  # --seed 0
    masks = torch.from_numpy(np.stack([generator(rng) for _ in range(2)]))  # (2, 16, 16)
    assert torch.equal(grid, visualize.reconstruction_grid(simmim_swin, imgs, masks))
    assert (tmp_path / "reconstructions-simmim_pretrain_tiny.png").exists()  # beside the checkpoint


@pytest.mark.parametrize("name", [  # each Swin built twice on the meta device: seconds
    "simmim_vit_base_patch16", pytest.param("simmim_swin_base_patch4_window6_192", marks=pytest.mark.slow),
    pytest.param("simmim_swin_large_patch4_window12_192", marks=pytest.mark.slow)])
def test_infer_simmim_names_the_factory_of_an_official_layout(name):
    with torch.device("meta"):  # shapes only: no memory
        reference = getattr(models_simmim, name)()
    official = models_simmim.to_official(reference.state_dict())
    assert main_visualize.infer_simmim({"model": official}) == name  # a whole file's dict too
    assert main_visualize.infer_simmim({f"module.{k}": v for k, v in official.items()}) == name  # DDP-saved
    official.pop("encoder.norm.weight")
    assert main_visualize.infer_simmim(official) is None
    with torch.device("meta"):
        mae = models_mae.mae_vit_base_patch16(depth=1, decoder_depth=1)
    assert main_visualize.infer_simmim(mae.state_dict()) is None


@pytest.mark.parametrize("with_args", [True, False])
def test_simmim_without_decoder_is_a_one_line_error(with_args, simmim_vit, simmim_swin, tmp_path, cli):
    if with_args:  # this repo's, the decoder removed
        checkpoint = torch.load(simmim_vit[0], weights_only=False)
    else:  # the official layout, the decoder removed
        checkpoint = {"model": models_simmim.to_official(simmim_swin.state_dict())}
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.startswith("decoder.")}
    path = tmp_path / "encoder_only.pth"
    torch.save(checkpoint, path)
    status, output = cli("main_visualize.py", "--checkpoint", path, "--data_path", tmp_path, "--device", "cpu")
    assert status == 1 and "Traceback" not in output
    (line,) = output.strip().splitlines()
    assert line.startswith("ERROR: ") and "need a checkpoint with the decoder" in line and "decoder.0." in line
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("name", ["beit_vit_tiny_patch16", "vit_base_patch16", "swin_tiny_patch4_window4_64"])
def test_classifier_checkpoint_is_refused(name, tmp_path, cli):
    """A finetuning / linear probing checkpoint: its args name a classifier; no model is built."""
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": {"head.weight": torch.zeros(10, 4)}, "args": argparse.Namespace(model=name)}, path)
    status, output = cli("main_visualize.py", "--checkpoint", path, "--data_path", tmp_path)
    assert status == 1 and "Traceback" not in output
    (line,) = output.strip().splitlines()
    assert line.startswith("ERROR: ") and f"holds a {name} classifier" in line and "pretraining checkpoint" in line


def test_input_size_not_made_of_mask_blocks_is_a_clear_error(tmp_path, toy_data, cli):
    torch.manual_seed(0)
    model = models_simmim.simmim_vit_tiny_patch16(img_size=48)  # as main_pretrain builds it
    path = save_simmim_checkpoint(tmp_path / "checkpoint-48.pth", model, model="simmim_vit_tiny_patch16",
                                  input_size=48, patch_size=None)  # no mask_patch_size: 32 by default
    train, _ = vis_images(toy_data, 1, 48)
    status, output = cli("main_visualize.py", "--checkpoint", path, "--data_path", train, "--num_images", 1,
                         "--device", "cpu", "--out", tmp_path / "x.png")
    assert status == 1 and "Traceback" not in output
    line = output.strip().splitlines()[-1]
    assert line.startswith("ERROR: ") and "48 is not divisible by the mask patch size 32" in line
    assert "--mask_patch_size" in line and not (tmp_path / "x.png").exists()

    status, output = cli("main_visualize.py", "--checkpoint", path, "--data_path", train, "--num_images", 1,
                         "--device", "cpu", "--out", tmp_path / "x.png", "--mask_patch_size", 16)
    assert status == 0 and (tmp_path / "x.png").exists()
