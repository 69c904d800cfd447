"""Tests for util/datasets.py and util/crop.py on tiny images generated here."""
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from conftest import REPO, SUBPROCESS_ENV
from util import crop, datasets
from util.datasets import (BadImageError, BadImageWarning, PretrainTransform, SeededSampler,
                           benchmark_transform, build_dataset, build_linprobe_transform,
                           build_pretrain_transform, build_train_loader, build_transform,
                           build_val_loader, check_num_classes, load_and_transform, sample_seed)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _noise_image(h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    return img.convert(mode)


def _make_folder(root, classes=("a", "b"), per_class=4, size=(30, 40), ext="png"):
    """<root>/<class>/<k>.<ext> noise images; returns the list of written paths."""
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            path = root / name / f"{k}.{ext}"
            _noise_image(*size, seed=100 * c + k).save(path)
            paths.append(path)
    return paths


def _reference_pretrain(size):
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
    ])


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48, (32, 48)])
def test_transform_shapes_and_dtypes(size, make_args):
    h, w = (size, size) if isinstance(size, int) else size
    img = _noise_image(50, 70, seed=0)
    pretrain, finetune, linprobe = (make_args(script, input_size=size)  # also (h, w), which no flag gives
                                    for script in ("pretrain", "finetune", "linprobe"))
    outs = [build_pretrain_transform(pretrain)(img),
            build_linprobe_transform(True, linprobe)(img),
            build_linprobe_transform(False, linprobe)(img),
            build_transform(True, finetune)(img),
            build_transform(False, finetune)(img)]
    for out in outs:
        assert out.shape == (3, h, w) and out.dtype == torch.float32


@pytest.mark.parametrize("build", [
    lambda make_args, s: build_pretrain_transform(make_args("pretrain", "--input_size", s)),
    lambda make_args, s: build_linprobe_transform(True, make_args("linprobe", "--input_size", s)),
    lambda make_args, s: build_linprobe_transform(False, make_args("linprobe", "--input_size", s)),
    lambda make_args, s: build_transform(False, make_args("finetune", "--input_size", s)),
])
def test_normalisation_numbers(build, make_args):
    color = (255, 0, 128)
    img = Image.new("RGB", (40, 36), color)
    out = build(make_args, 32)(img)
    expected = (torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(out, expected.expand(3, 32, 32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode,ext", [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png")])
def test_pretrain_transform_is_bit_identical_to_torchvision(tmp_path, mode, ext, make_args):
    path = tmp_path / f"img.{ext}"
    _noise_image(45, 61, seed=1, mode=mode).save(path)
    fast, ref = build_pretrain_transform(make_args("pretrain", "--input_size", 32)), _reference_pretrain(32)
    for seed in range(24):
        torch.manual_seed(seed)
        with Image.open(path) as img:
            expected = ref(img.convert("RGB"))
        torch.manual_seed(seed)
        out = load_and_transform(path, fast)  # gets the lazily opened image
        assert torch.equal(out, expected)
    # both flip outcomes occur over 24 seeds, so the flip path is covered as well
    draws = []
    for seed in range(24):
        torch.manual_seed(seed)
        transforms.RandomResizedCrop.get_params(Image.new("RGB", (61, 45)), (0.2, 1.0), (3 / 4, 4 / 3))
        draws.append(bool(torch.rand(1) < 0.5))
    assert any(draws) and not all(draws)


def test_pretrain_crop_draw_matches_torchvision_get_params(monkeypatch):
    img = Image.new("RGB", (70, 50))
    boxes = []
    real_crop = Image.Image.crop
    monkeypatch.setattr(Image.Image, "crop", lambda self, box: boxes.append(box) or real_crop(self, box))
    t = PretrainTransform(16)
    for seed in range(10):
        torch.manual_seed(seed)
        t(img)
        torch.manual_seed(seed)
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
        assert boxes[-1] == (j, i, j + w, i + h)


def test_fused_normalisation_matches_to_tensor_normalize():
    img = _noise_image(32, 32, seed=3)
    t = PretrainTransform(32)
    expected = F.normalize(F.to_tensor(img), MEAN.flatten().tolist(), STD.flatten().tolist())
    assert torch.equal(t._to_normalized_tensor(img, flip=False), expected)
    assert torch.equal(t._to_normalized_tensor(img, flip=True), expected.flip(-1))


def test_fast_decode_drafts_only_large_jpeg_crops(tmp_path):
    jpg, png = tmp_path / "a.jpg", tmp_path / "a.png"
    _noise_image(256, 256, seed=4).save(jpg, quality=90)
    _noise_image(256, 256, seed=4).save(png)
    with Image.open(jpg) as img:  # box 8x the output: decoded at 1/8 scale
        img, box = datasets._draft_jpeg(img, (0, 0, 256, 256), (32, 32))
        assert img.size == (32, 32) and box == (0, 0, 32, 32)
    with Image.open(jpg) as img:  # 128x96 box vs 32 px output: 1/2 only (96 < 4 * 32)
        img, box = datasets._draft_jpeg(img, (16, 8, 144, 104), (32, 32))
        assert img.size == (128, 128) and box == (8, 4, 72, 52)
    with Image.open(jpg) as img:  # box < 2x the output: untouched
        assert datasets._draft_jpeg(img, (0, 0, 60, 60), (32, 32)) == (img, (0, 0, 60, 60))
        assert img.size == (256, 256)
    with Image.open(png) as img:  # not a JPEG: untouched
        assert datasets._draft_jpeg(img, (0, 0, 256, 256), (32, 32))[0].size == (256, 256)
    smooth = tmp_path / "smooth.jpg"
    Image.fromarray(np.uint8(np.add.outer(np.arange(256), np.arange(256)) // 2)).convert("RGB").save(smooth)
    for seed in range(3):  # same crop and flip, close pixel values
        torch.manual_seed(seed)
        exact = load_and_transform(smooth, PretrainTransform(32))
        torch.manual_seed(seed)
        fast = load_and_transform(smooth, PretrainTransform(32, fast_decode=True))
        assert fast.shape == exact.shape and (fast - exact).abs().mean() < 0.05


def test_eval_transform_resize_and_crop(make_args):
    t = build_transform(False, make_args("finetune", "--input_size", 32))
    assert t.transforms[0].size == 36 and t.transforms[0].interpolation == InterpolationMode.BICUBIC
    assert t.transforms[1].size == (32, 32)
    assert build_transform(False, make_args("finetune", "--input_size", 224)).transforms[0].size == 256
    assert build_transform(False, make_args("finetune", "--input_size", 384)).transforms[0].size == 384  # no margin
    assert build_linprobe_transform(False, make_args("linprobe", "--input_size", 32)).transforms[0].size == 36


def test_finetune_train_transform_uses_timm_randaug_and_erasing(make_args):
    names = [type(t).__name__ for t in build_transform(True, make_args("finetune", "--input_size", 32)).transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names
    erasing = build_transform(True, make_args("finetune", "--input_size", 32)).transforms[-1]
    assert type(erasing).__name__ == "RandomErasing"
    assert erasing.probability == 0.25 and erasing.mode == "pixel" and erasing.max_count == 1
    custom = build_transform(True, make_args("finetune", "--input_size", 32, "--reprob", 0.0, "--color_jitter", 0.4,
                                             aa=None))
    names = [type(t).__name__ for t in custom.transforms]
    assert "RandAugment" not in names and "ColorJitter" in names and "RandomErasing" not in names


def test_linprobe_train_uses_tf_style_crop(make_args):
    t = build_linprobe_transform(True, make_args("linprobe", "--input_size", 32))
    assert isinstance(t.transforms[0], crop.RandomResizedCrop)
    assert t.transforms[0].interpolation == InterpolationMode.BICUBIC
    assert t.transforms[0].scale == (0.08, 1.0)


# ---------------------------------------------------------------------------------------------
# util.crop.RandomResizedCrop
# ---------------------------------------------------------------------------------------------

def test_crop_box_inside_image():
    get_params = crop.RandomResizedCrop.get_params
    for seed in range(200):
        torch.manual_seed(seed)
        width, height = random.Random(seed).randint(1, 80), random.Random(-seed).randint(1, 80)
        i, j, h, w = get_params(Image.new("RGB", (width, height)), (0.08, 1.0), (3 / 4, 4 / 3))
        assert 1 <= h <= height and 1 <= w <= width
        assert 0 <= i <= height - h and 0 <= j <= width - w


def test_crop_is_a_single_draw():
    img = Image.new("RGB", (40, 30))
    for seed in range(5):
        torch.manual_seed(seed)
        crop.RandomResizedCrop.get_params(img, (0.9, 1.0), (3.0, 4.0))  # would retry in torchvision
        after = torch.rand(1)
        torch.manual_seed(seed)
        torch.empty(1).uniform_(0, 1), torch.empty(1).uniform_(0, 1)  # area, ratio
        torch.randint(0, 2, (1,)), torch.randint(0, 2, (1,))  # top, left
        assert torch.equal(torch.rand(1), after)


def test_crop_equals_torchvision_when_first_draw_fits():
    img = Image.new("RGB", (100, 100))  # scale <= 0.5: every draw fits, no retry in torchvision
    for seed in range(20):
        torch.manual_seed(seed)
        ours = crop.RandomResizedCrop.get_params(img, (0.2, 0.5), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert ours == transforms.RandomResizedCrop.get_params(img, (0.2, 0.5), (3 / 4, 4 / 3))


def test_crop_clamps_extreme_ratios():
    img = Image.new("RGB", (40, 40))
    for seed in range(10):
        torch.manual_seed(seed)
        i, j, h, w = crop.RandomResizedCrop.get_params(img, (0.5, 1.0), (10.0, 10.0))
        assert w == 40 and j == 0 and h < 40  # too wide: clamped, not redrawn
        torch.manual_seed(seed)
        i, j, h, w = crop.RandomResizedCrop.get_params(img, (0.5, 1.0), (0.1, 0.1))
        assert h == 40 and i == 0 and w < 40
    torch.manual_seed(0)  # torchvision would fall back to a centre crop here, we clamp
    assert crop.RandomResizedCrop.get_params(img, (2.0, 2.0), (1.0, 1.0)) == (0, 0, 40, 40)


def test_crop_output_size():
    img = _noise_image(30, 50, seed=5)
    assert crop.RandomResizedCrop(32)(img).size == (32, 32)
    assert crop.RandomResizedCrop((24, 40))(img).size == (40, 24)


# ---------------------------------------------------------------------------------------------
# build_dataset errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_path", [None, ""])
def test_error_data_path_not_set(data_path, make_args):
    with pytest.raises(ValueError, match="expected an ImageFolder layout"):
        build_dataset(True, make_args("pretrain", data_path=data_path), None)


def test_error_data_path_missing_or_not_a_folder(tmp_path, make_args):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist.*expected an ImageFolder layout") as e:
        build_dataset(True, make_args("pretrain", "--data_path", missing), None)
    assert str(missing) in str(e.value)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(FileNotFoundError, match="not a folder") as e:
        build_dataset(True, make_args("pretrain", "--data_path", a_file), None)
    assert str(a_file) in str(e.value)


def test_error_missing_split_folder(tmp_path, make_args):
    _make_folder(tmp_path / "train")
    ds = build_dataset(True, make_args("finetune", "--data_path", tmp_path), None)
    assert len(ds) == 8 and ds.classes == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no 'val' folder") as e:
        build_dataset(False, make_args("finetune", "--data_path", tmp_path), None)
    assert f"{tmp_path}/val/<class>/<image>" in str(e.value)


def test_error_empty_class_folder(tmp_path, make_args):
    _make_folder(tmp_path / "train")
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "train" / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no images.*empty_class"):
        build_dataset(True, make_args("pretrain", "--data_path", tmp_path), None)


def test_error_no_class_folders(tmp_path, make_args):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.png")  # image without a class dir
    with pytest.raises(FileNotFoundError, match="no class folders.*expected an ImageFolder layout"):
        build_dataset(True, make_args("pretrain", "--data_path", tmp_path), None)


# ---------------------------------------------------------------------------------------------
# bad images
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def bad_root(tmp_path):
    """train/c/ with 3 good PNGs, a JPEG cut in half and a text file named x.jpg."""
    good = _make_folder(tmp_path / "train", classes=("c",), per_class=3, size=(24, 24))
    full = tmp_path / "full.jpg"
    _noise_image(64, 64, seed=7).save(full, quality=90)
    data = full.read_bytes()
    (tmp_path / "train" / "c" / "1_truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "train" / "c" / "x.jpg").write_text("this is not a JPEG")
    return tmp_path, good


def test_bad_images_raise_naming_the_file(bad_root, make_args):
    root, _ = bad_root
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    ds = build_dataset(True, make_args("pretrain", "--data_path", root), F.pil_to_tensor)
    names = [p.rsplit("/", 1)[-1] for p, _ in ds.samples]
    for bad in ("1_truncated.jpg", "x.jpg"):
        with pytest.raises(BadImageError, match=bad):
            ds[names.index(bad)]
    assert ds[names.index("0.png")][0].shape == (3, 24, 24)


def test_skip_bad_images_completes_an_epoch_with_good_images(bad_root, make_args):
    root, good = bad_root
    ds = build_dataset(True, make_args("pretrain", "--data_path", root, "--skip_bad_images"), F.pil_to_tensor)
    good_tensors = [F.pil_to_tensor(Image.open(p)) for p in good]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second epoch must not warn again
            batches = list(DataLoader(ds, batch_size=2, num_workers=0))
    images = torch.cat([b[0] for b in batches])
    assert len(images) == len(ds) == 5
    assert all(any(torch.equal(x, g) for g in good_tensors) for x in images)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(messages) == 2
    assert any("1_truncated.jpg" in m for m in messages) and any("x.jpg" in m for m in messages)


def test_skip_bad_images_gives_up_when_all_are_bad(tmp_path, make_args):
    (tmp_path / "train" / "c").mkdir(parents=True)
    (tmp_path / "train" / "c" / "x.jpg").write_text("nope")
    ds = build_dataset(True, make_args("pretrain", "--data_path", tmp_path, "--skip_bad_images"), None)
    with pytest.warns(BadImageWarning), pytest.raises(BadImageError, match="no readable image"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# SeededSampler
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded_dataset(tmp_path_factory, make_args):
    root = tmp_path_factory.mktemp("seeded")
    _make_folder(root / "train", per_class=6, size=(30, 40))
    args = make_args("pretrain", "--data_path", root, "--input_size", 16)
    return build_dataset(True, args, build_pretrain_transform(args))


def _epochs(dataset, sampler, epochs, **loader_kw):
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, **loader_kw)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append([b[0] for b in loader])
    return out


def test_sample_seed_is_deterministic_63_bit():
    s = sample_seed(0, 3, 17)
    assert s == sample_seed(0, 3, 17) and 0 <= s < 2**63
    assert len({sample_seed(0, 3, 17), sample_seed(1, 3, 17), sample_seed(0, 4, 17),
                sample_seed(0, 3, 18), sample_seed(0, 3, 17, stream=1)}) == 5


def test_seeded_batches_do_not_depend_on_workers(seeded_dataset):
    ds = seeded_dataset
    ref = _epochs(ds, SeededSampler(RandomSampler(ds), seed=5), [0, 1], num_workers=0)
    again = _epochs(ds, SeededSampler(RandomSampler(ds), seed=5), [0, 1], num_workers=0)
    workers = _epochs(ds, SeededSampler(RandomSampler(ds), seed=5), [0, 1], num_workers=2,
                      persistent_workers=True)
    for other in (again, workers):
        for a, b in zip(ref, other):
            assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = _epochs(ds, SeededSampler(RandomSampler(ds), seed=6), [0], num_workers=0)
    assert not torch.equal(torch.cat(ref[0]), torch.cat(other_seed[0]))


def test_different_epoch_gives_different_crops(seeded_dataset):
    ds = seeded_dataset
    sampler = SeededSampler(SequentialSampler(ds), seed=0)  # same order in both epochs
    e0, e1 = _epochs(ds, sampler, [0, 1])
    e0, e1 = torch.cat(e0), torch.cat(e1)
    assert all(not torch.equal(a, b) for a, b in zip(e0, e1))
    assert torch.equal(torch.cat(_epochs(ds, sampler, [0])[0]), e0)


def test_seeded_getitem_leaves_global_rngs_alone(seeded_dataset):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    a = seeded_dataset[(3, 12345)][0]
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
    assert torch.equal(seeded_dataset[(3, 12345)][0], a)
    assert not torch.equal(seeded_dataset[(3, 54321)][0], a)


def test_set_epoch_start_yields_the_tail():
    sampler = SeededSampler(RandomSampler(range(20)), seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(i for i, _ in full) == list(range(20)) and len(sampler) == 20
    sampler.set_epoch(2, start=7)
    assert len(sampler) == 13 and list(sampler) == full[7:]
    assert repr(sampler) == "SeededSampler(RandomSampler, seed=1, epoch=2, start=7)"
    sampler.set_epoch(3)  # resets the start
    assert len(sampler) == 20 and len(list(sampler)) == 20


def test_random_sampler_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        sampler = SeededSampler(RandomSampler(range(30)), seed=seed)
        sampler.set_epoch(epoch)
        return [i for i, _ in sampler]
    torch.manual_seed(0)
    a = order(1, 4)
    torch.manual_seed(99)  # the global RNG does not matter
    assert order(1, 4) == a
    assert order(1, 5) != a and order(2, 4) != a


def test_wraps_distributed_sampler():
    n = 12
    samplers = [SeededSampler(DistributedSampler(range(n), num_replicas=2, rank=r), seed=0)
                for r in range(2)]
    orders = []
    for epoch in (0, 1):
        ranks = []
        for s in samplers:
            s.set_epoch(epoch)
            assert s.sampler.epoch == epoch
            ranks.append([i for i, _ in s])
        assert not set(ranks[0]) & set(ranks[1])
        assert set(ranks[0]) | set(ranks[1]) == set(range(n))
        assert len(ranks[0]) == len(samplers[0]) == n // 2
        orders.append(ranks)
    assert orders[0] != orders[1]
    odd = [SeededSampler(DistributedSampler(range(n - 1), num_replicas=2, rank=r), seed=0)
           for r in range(2)]  # padded with one repeated index, still covers everything
    assert set().union(*[{i for i, _ in s} for s in odd]) == set(range(n - 1))


# ---------------------------------------------------------------------------------------------
# DataLoaders of the training scripts
# ---------------------------------------------------------------------------------------------

def _loader_args(make_args, *flags):
    """main_finetune's arguments of a single process on the CPU: --seed 3, --batch_size 5,
    --num_workers 0 (pin_mem and no dist_eval by default), then `flags`."""
    return make_args("finetune", "--seed", 3, "--batch_size", 5, "--num_workers", 0, "--device", "cpu", *flags,
                     distributed=False)


def test_train_loader_is_seeded_drops_last_and_leaves_the_global_rng(seeded_dataset, make_args):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sampler, loader = build_train_loader(_loader_args(make_args), seeded_dataset)  # 12 images, batches of 5
    assert isinstance(sampler, SeededSampler) and isinstance(sampler.sampler, RandomSampler)
    assert loader.sampler is sampler and not loader.pin_memory  # pinning only for CUDA
    sampler.set_epoch(1)
    batches = [images for images, _ in loader]
    assert [len(b) for b in batches] == [5, 5]  # drop_last
    assert torch.equal(torch.rand(3), expected)  # iterating drew nothing from the global RNG
    again = [images for images, _ in build_train_loader(_loader_args(make_args), seeded_dataset)[1]]
    assert not all(torch.equal(a, b) for a, b in zip(batches, again))  # epoch 0 != epoch 1
    sampler2, loader2 = build_train_loader(_loader_args(make_args), seeded_dataset)
    sampler2.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(batches, [images for images, _ in loader2]))


def test_train_loader_with_fewer_images_than_a_batch(seeded_dataset, make_args):
    with pytest.raises(ValueError, match="12 training images are fewer than one batch of --batch_size 13"):
        build_train_loader(_loader_args(make_args, "--batch_size", 13), seeded_dataset)
    eval_args = _loader_args(make_args, "--batch_size", 13, "--eval")
    _, loader = build_train_loader(eval_args, seeded_dataset, training=not eval_args.eval)  # --eval
    assert len(loader) == 0


def test_val_loader_is_in_order_and_keeps_the_last_batch(seeded_dataset, make_args):
    loader = build_val_loader(_loader_args(make_args), seeded_dataset)
    assert isinstance(loader.sampler, SequentialSampler)
    assert [len(targets) for _, targets in loader] == [5, 5, 2]
    assert torch.cat([t for _, t in loader]).tolist() == seeded_dataset.targets


def test_check_num_classes(seeded_dataset):
    check_num_classes(seeded_dataset, 2)
    check_num_classes(seeded_dataset, 1000)
    with pytest.raises(ValueError, match="has 2 classes but --nb_classes is 1"):
        check_num_classes(seeded_dataset, 1)


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def test_benchmark_transform(tmp_path):
    _make_folder(tmp_path, classes=("c",), per_class=3, ext="jpg")
    assert benchmark_transform(str(tmp_path), PretrainTransform(16), n=3) > 0
    with pytest.raises(FileNotFoundError):
        benchmark_transform(str(tmp_path / "c" / "nothing"), PretrainTransform(16))


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    """'rand-m9-mstd0.5-inc1' draws PosterizeIncreasing with 0 bits kept when the jittered
    magnitude hits 10; Pillow >= 11 raises there, the original's Pillow returned black."""
    from timm.data.auto_augment import AugmentOp
    datasets.use_posterize_with_zero_bits()  # what build_transform does first
    img = Image.fromarray((np.arange(48 * 48 * 3) % 256).astype(np.uint8).reshape(48, 48, 3))
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={"magnitude_std": 0})
    out = np.asarray(op(img))
    assert out.shape == (48, 48, 3) and out.max() == 0
    op4 = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5, hparams={"magnitude_std": 0})
    assert np.all(np.asarray(op4(img)) % 64 == 0)  # 2 bits kept


POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


@pytest.mark.slow
def test_finetune_transform_patches_posterize_and_importing_does_not(make_args, monkeypatch):
    """The Pillow >= 11 posterize fix is applied by build_transform(True, args), not when
    util.datasets is imported: other users of timm in the process keep timm's own ops."""
    from timm.data import auto_augment
    for name in POSTERIZE_OPS:  # timm's own ops, whatever an earlier test built (restored afterwards)
        monkeypatch.setitem(auto_augment.NAME_TO_OP, name, auto_augment.posterize)
    build_transform(False, make_args("finetune", "--input_size", 32))  # eval: no RandAugment, no patch
    assert all(auto_augment.NAME_TO_OP[name] is auto_augment.posterize for name in POSTERIZE_OPS)

    transform = build_transform(True, make_args("finetune", "--input_size", 32))
    assert all(auto_augment.NAME_TO_OP[name] is datasets._posterize for name in POSTERIZE_OPS)
    # the RandAugment of this transform posterizes with 0 bits kept into a black image
    (randaug,) = [t for t in transform.transforms if type(t).__name__ == "RandAugment"]
    (op,) = [op for op in randaug.ops if op.name == "PosterizeIncreasing"]
    assert op.aug_fn is datasets._posterize
    img = Image.fromarray((np.arange(48 * 48 * 3) % 256).astype(np.uint8).reshape(48, 48, 3))
    zero_bits = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={"magnitude_std": 0})
    assert zero_bits.aug_fn is datasets._posterize and np.asarray(zero_bits(img)).max() == 0

    # a fresh interpreter that only imports util.datasets keeps timm's posterize
    code = ("import util.datasets; from timm.data import auto_augment; "
            f"print(*[auto_augment.NAME_TO_OP[name].__module__ for name in {POSTERIZE_OPS!r}])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = proc.stdout.split()
    assert len(modules) == 3 and "util.datasets" not in modules, proc.stdout
