"""A small, learnable image dataset generated on the fly, for the quickstart and the tests.

Classes differ in shape and texture, not in mean colour: every image has a random
foreground and background colour, a random position/scale/phase and pixel noise, so a model
must look at structure to tell them apart. Written as an ImageFolder root:
<root>/train/<class>/<i>.png and <root>/val/<class>/<i>.png.

    python -m util.toy_data ./data/toy --train_per_class 64 --val_per_class 16 --size 64
"""
import argparse
import os

import numpy as np
from PIL import Image

CLASSES = ("horizontal_stripes", "vertical_stripes", "checkerboard", "disc")


def _pattern(name, size, rng):
    """A (size, size) mask in [0, 1] for one class, with random scale and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(size / 8, size / 4)
    phase = rng.uniform(0, 2 * np.pi)
    if name == "horizontal_stripes":
        return (np.sin(2 * np.pi * yy / period + phase) > 0).astype(np.float64)
    if name == "vertical_stripes":
        return (np.sin(2 * np.pi * xx / period + phase) > 0).astype(np.float64)
    if name == "checkerboard":
        a = np.sin(2 * np.pi * yy / period + phase) > 0
        b = np.sin(2 * np.pi * xx / period + phase) > 0
        return (a ^ b).astype(np.float64)
    if name == "disc":
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, size=2)
        radius = rng.uniform(0.15 * size, 0.35 * size)
        return (((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2).astype(np.float64)
    raise ValueError(f"unknown class {name!r}")


def make_image(name, size, rng):
    """One RGB uint8 image (size, size, 3) of class `name`."""
    mask = _pattern(name, size, rng)[..., None]  # (S, S, 1)
    fg, bg = rng.uniform(0, 255, size=(2, 3))
    img = mask * fg + (1 - mask) * bg + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_toy_dataset(root, train_per_class=64, val_per_class=16, size=64, classes=CLASSES,
                     seed=0):
    """Write the dataset under root (train/ and val/); returns root. Idempotent: an existing
    complete dataset with the same counts is left as it is."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = make_image(name, size, rng)  # draw even when the file exists: same data
                path = os.path.join(folder, f"{i:05d}.png")
                if not os.path.exists(path):
                    Image.fromarray(img).save(path)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output folder (an ImageFolder root with train/ and val/)")
    parser.add_argument("--train_per_class", type=int, default=64)
    parser.add_argument("--val_per_class", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_toy_dataset(args.root, args.train_per_class, args.val_per_class, args.size, seed=args.seed)
    n = len(CLASSES) * (args.train_per_class + args.val_per_class)
    print(f"wrote {n} images of {len(CLASSES)} classes to {args.root}")


if __name__ == "__main__":
    main()
