"""The data pipeline on real photos: a few Imagenette2 (112 px ImageNet) JPEGs from
../shared/data through every transform and a tiny MAE. Skipped when the data is absent (a
user's clone has no shared/)."""
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from util.datasets import (build_dataset, build_eval_transform, build_linprobe_transform,
                           build_pretrain_transform, build_transform)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_TAR = os.path.join(REPO, "..", "shared", "data", "imagenette2-112", "val.tar")
PER_CLASS = 3
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory):
    """<root>/val/<wnid>/*.JPEG: the first PER_CLASS images of each of the 10 classes."""
    if not os.path.isfile(VAL_TAR):
        pytest.skip(f"{VAL_TAR} not present")
    root = tmp_path_factory.mktemp("imagenette")
    taken = {}
    with tarfile.open(VAL_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and taken.get(parts[1], 0) < PER_CLASS:
                tar.extract(member, root, filter="data")
                taken[parts[1]] = taken.get(parts[1], 0) + 1
            if len(taken) == 10 and min(taken.values()) == PER_CLASS:
                break
    return root


def test_real_jpegs_through_every_transform_and_a_tiny_mae(imagenette, make_args, tiny_mae):
    data = ("--data_path", imagenette, "--input_size", 64)
    pretrain = make_args("pretrain", *data)
    finetune = make_args("finetune", *data, "--aa", "rand-m9-mstd0.5-inc1", "--reprob", 0.25, "--remode", "pixel",
                         "--recount", 1)  # no --color_jitter
    linprobe = make_args("linprobe", *data)
    mae = tiny_mae(img_size=64, patch_size=16, norm_pix_loss=True)
    for transform in (build_pretrain_transform(pretrain), build_transform(True, finetune),
                      build_linprobe_transform(True, linprobe), build_eval_transform(64)):
        dataset = build_dataset(False, pretrain, transform)
        assert len(dataset.classes) == 10 and len(dataset) == 10 * PER_CLASS
        samples = [dataset[i] for i in range(0, len(dataset), PER_CLASS)]  # one image per class
        batch = torch.stack([img for img, _ in samples])
        assert [label for _, label in samples] == list(range(10))
        assert batch.shape == (10, 3, 64, 64) and torch.isfinite(batch).all()
        loss, pred, mask = mae(batch)
        assert torch.isfinite(loss) and pred.shape == (10, 16, 16 * 16 * 3)


def test_eval_transform_of_a_real_photo_is_the_normalised_centre_crop(imagenette, make_args):
    args = make_args("finetune", "--data_path", imagenette)
    path = build_dataset(False, args, None).samples[0][0]
    got = build_dataset(False, args, build_eval_transform(64))[0][0].numpy()  # (3, 64, 64)
    with Image.open(path) as img:
        assert img.size == (112, 112)
        resized = img.convert("RGB").resize((73, 73), Image.BICUBIC)  # int(64 / 0.875) = 73
    crop = np.asarray(resized.crop((4, 4, 68, 68)), dtype=np.float64) / 255  # round((73-64)/2) = 4
    expected = ((crop - MEAN) / STD).transpose(2, 0, 1)
    assert np.abs(got - expected).max() < 1e-5
