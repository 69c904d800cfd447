"""SimMIM's masking and its pretraining transform (SPEC-simmim section 5).

- MaskGenerator: a random mask of large square blocks (32 px by default), ceil(ratio * blocks) of
  them masked, returned at the encoder's patch grid (1 = masked).
- SimMIMTransform / build_simmim_transform: RandomResizedCrop(scale 0.67-1, bilinear) + flip +
  ToTensor + Normalize, and one mask per image: transform(img) -> (img (3, H, W), mask (Hp, Wp)).

The official code draws each mask with numpy's legacy global RNG (np.random.permutation). Here the
mask comes from a numpy Generator: one passed in (rng=...), else one seeded from numpy's global
RNG, which ImageFolderDataset seeds per sample from (seed, epoch, index) (util.datasets.seeded_rngs).
So a sample's mask depends only on (seed, epoch, index), whatever worker or process draws it, and a
resumed run draws the same masks. The distribution is the official one: a uniformly random subset
of exactly mask_count blocks; only the random stream differs.
"""
import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode


def _pair(size):
    """int or (h, w) -> (h, w)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def sample_rng():
    """A numpy Generator seeded from numpy's global RNG (one draw from it). Inside
    ImageFolderDataset that RNG is seeded per sample, so the Generator is a function of
    (seed, epoch, index); elsewhere it follows the process's numpy stream."""
    return np.random.default_rng(int(np.random.randint(0, 2**63 - 1, dtype=np.int64)))


class MaskGenerator:
    """SimMIM's random block mask.

    The image (input_size px) is cut into blocks of mask_patch_size px (rand_size = input_size /
    mask_patch_size per side); mask_count = ceil(token_count * mask_ratio) blocks, chosen uniformly
    without replacement, are masked; each block is then repeated scale = mask_patch_size /
    model_patch_size times along rows and columns, which gives the mask at the encoder's patch
    grid. 192 px: 6x6 = 36 blocks, 22 masked (36 * 0.6 = 21.6 rounded up); 224 px: 7x7 = 49, 30.

    Deviation from the official code: it draws `np.random.permutation(token_count)[:mask_count]`
    from numpy's legacy global RNG; this draws `rng.permutation(token_count)[:mask_count]` from a
    numpy Generator (see the module docstring: per-sample seeding makes resume exact). Same
    distribution, same counts, another random stream.
    """

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        h, w = _pair(input_size)
        if h % mask_patch_size or w % mask_patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the mask patch size "
                             f"{mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask patch size {mask_patch_size} is not divisible by the model's "
                             f"patch size {model_patch_size}")
        if not 0 <= mask_ratio <= 1:  # also NaN
            raise ValueError(f"mask ratio must be in [0, 1], got {mask_ratio}")
        self.input_size = (h, w)
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = (h // mask_patch_size, w // mask_patch_size)  # the block grid
        self.scale = mask_patch_size // model_patch_size  # patches per block side
        self.token_count = self.rand_size[0] * self.rand_size[1]
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))  # as the official float product

    def __call__(self, rng=None):
        """One mask (H / model_patch_size, W / model_patch_size), int64, 1 = masked. rng: a numpy
        Generator (default: sample_rng())."""
        rng = sample_rng() if rng is None else rng
        idx = rng.permutation(self.token_count)[:self.mask_count]
        mask = np.zeros(self.token_count, dtype=np.int64)
        mask[idx] = 1
        mask = mask.reshape(self.rand_size)  # (h / 32, w / 32), row-major blocks
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)  # (Hp, Wp)

    def __repr__(self):
        return (f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size="
                f"{self.mask_patch_size}, model_patch_size={self.model_patch_size}, mask_ratio="
                f"{self.mask_ratio}, masked {self.mask_count} of {self.token_count} blocks)")


class SimMIMTransform:
    """SimMIM's pretraining transform: (PIL image[, rng]) -> (img (3, H, W) float32, mask (Hp, Wp)
    int64 tensor at the encoder's patch grid, 1 = masked).

    Image: RGB, RandomResizedCrop(input_size, scale=(0.67, 1), ratio=(3/4, 4/3)) with torchvision's
    default bilinear interpolation (the official code ignores its DATA.INTERPOLATION here),
    RandomHorizontalFlip(0.5), ToTensor, Normalize(ImageNet mean / std). The crop and flip draw
    from torch's RNG, the mask from a numpy Generator (rng, else sample_rng()): both are seeded per
    sample by ImageFolderDataset.
    """

    def __init__(self, input_size, model_patch_size, mask_patch_size=32, mask_ratio=0.6,
                 crop_scale=(0.67, 1.0), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.image_transform = transforms.Compose([
            transforms.RandomResizedCrop(_pair(input_size), scale=tuple(crop_scale),
                                         ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation=InterpolationMode.BILINEAR),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
        self.mask_generator = MaskGenerator(input_size, mask_patch_size, model_patch_size, mask_ratio)

    def __call__(self, img, rng=None):
        if img.mode != "RGB":
            img = img.convert("RGB")
        return self.image_transform(img), torch.from_numpy(self.mask_generator(rng))

    def __repr__(self):
        return f"{type(self).__name__}({self.image_transform}, {self.mask_generator})"


def build_simmim_transform(args, model_patch_size):
    """SimMIMTransform(args.input_size, model_patch_size, args.mask_patch_size (default 32),
    args.mask_ratio). model_patch_size: the encoder's patch size (16 ViT, 4 Swin). Note MAE's
    --mask_ratio default is 0.75; SimMIM's recipes use 0.6."""
    return SimMIMTransform(args.input_size, model_patch_size,
                           mask_patch_size=getattr(args, "mask_patch_size", 32), mask_ratio=args.mask_ratio)
