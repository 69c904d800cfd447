"""Datasets and transforms for pretraining, finetuning and linear probing.

- build_dataset: an ImageFolder over <data_path>/train or <data_path>/val with clear errors for
  a wrong layout and for unreadable images (optionally skipped with a warning).
- build_pretrain_transform / build_transform / build_linprobe_transform: the original MAE
  augmentations (ImageNet mean/std normalisation).
- SeededSampler: yields (index, sample_seed) so that each sample's augmentation depends only on
  (seed, epoch, index), not on the DataLoader's workers; supports mid-epoch resume.
- build_train_loader / build_val_loader: the DataLoaders of the three training scripts.
- benchmark_transform: images/s of decode + transform on one CPU thread.
"""
import contextlib
import glob
import itertools
import os
import random
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from util.dist import get_rank, get_world_size
from util.crop import RandomResizedCrop
from util.preemption import worker_init_fn

# What PIL raises for files it cannot decode (UnidentifiedImageError and "image file is
# truncated" are OSErrors; some broken headers raise SyntaxError).
BAD_IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def _pair(size):
    """int or (h, w) -> (h, w)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

def _normalize_lut(mean, std):
    """(3, 256) float32 table of ToTensor + Normalize applied to every uint8 value.

    Built with the very torchvision ops it replaces, so looking pixels up in it gives the same
    bits as ToTensor + Normalize (the tests check this).
    """
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    lut = F.normalize(F.to_tensor(Image.fromarray(ramp)), mean, std)  # (3, 1, 256)
    return lut.reshape(3, 256).numpy()


def _draft_jpeg(img, box, size):
    """Ask libjpeg to decode img at 1/s scale (s = 8, 4 or 2, the largest that keeps the crop box
    at least s times the output size in both dimensions). Returns the image and the box in the
    reduced image's coordinates. Does nothing for non-JPEGs or already decoded images."""
    out_h, out_w = size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    fits = [s for s in (2, 4, 8) if crop_w >= s * out_w and crop_h >= s * out_h]
    if not fits or img.format != "JPEG" or img.mode != "RGB":
        return img, box
    s = max(fits)
    full_w = img.size[0]
    drafted = img.draft(None, (full_w // s, img.size[1] // s))  # -> (mode, (0, 0, W/s, H/s))
    if drafted is None:
        return img, box
    scale = full_w / drafted[1][2]
    return img, tuple(c / scale for c in box)


class PretrainTransform:
    """RandomResizedCrop(size, scale, ratio, bicubic) + RandomHorizontalFlip(0.5) + ToTensor +
    Normalize(mean, std) in one callable, faster than the torchvision Compose but equal to it.

    With fast_decode off (default) the output is bit-identical to the Compose under the same
    torch RNG state: the same get_params draw, the same PIL crop + bicubic resize, the same flip
    draw, and ToTensor + Normalize through an exact 256-entry lookup table.

    It accepts a PIL image that is opened but not decoded yet (`lazy_decode = True`, see
    load_and_transform): the crop box is drawn on the header's size, so with fast_decode a
    JPEG whose crop box is >= 2x (4x, 8x) the output in both dimensions is decoded at 1/2 (1/4,
    1/8) scale by libjpeg's DCT scaling. This keeps the distribution of crop boxes and flips
    but changes pixel values a little (DCT-domain downscaling is a different low-pass filter
    than PIL's bicubic), which is why it is off by default.
    """

    lazy_decode = True

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, fast_decode=False):
        self.size = _pair(size)  # (h, w)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.fast_decode = fast_decode
        self.lut = _normalize_lut(mean, std)  # (3, 256)

    def __call__(self, img):
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        box = (j, i, j + w, i + h)  # (left, upper, right, lower)
        out_wh = self.size[::-1]
        if self.fast_decode:
            img, box = _draft_jpeg(img, box, self.size)
        if img.mode != "RGB":
            img = img.convert("RGB")  # decodes; the same conversion as ImageFolder's loader
        if all(isinstance(c, int) for c in box):
            img = img.crop(box).resize(out_wh, Image.BICUBIC)  # = F.resized_crop on PIL
        else:
            img = img.resize(out_wh, Image.BICUBIC, box=box)  # sub-pixel box after a draft
        flip = torch.rand(1) < 0.5  # RandomHorizontalFlip's draw
        return self._to_normalized_tensor(img, flip)

    def _to_normalized_tensor(self, img, flip):
        pixels = np.asarray(img)  # (H, W, 3) uint8
        if flip:
            pixels = pixels[:, ::-1]
        out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)  # (3, H, W)
        for c in range(3):
            np.take(self.lut[c], pixels[..., c], out=out[c])
        return torch.from_numpy(out)

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
                f"ratio={tuple(round(r, 4) for r in self.ratio)}, interpolation=bicubic, "
                f"hflip=0.5, fast_decode={self.fast_decode})")


def build_pretrain_transform(args):
    """RandomResizedCrop(input_size, scale=(0.2, 1), bicubic) + flip + ToTensor + Normalize."""
    return PretrainTransform(args.input_size, fast_decode=args.fast_decode)


def build_eval_transform(input_size):
    """Resize to input_size / 0.875 (bicubic; no margin above 224 px) + centre crop."""
    h, w = _pair(input_size)
    crop_pct = 224 / 256 if max(h, w) <= 224 else 1.0
    resize = int(max(h, w) / crop_pct)  # the shorter side; = original's for square sizes
    return transforms.Compose([
        transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop((h, w)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def _posterize(img, bits_to_keep, **__):
    """timm's RandAugment posterize, keeping 0 bits as the Pillow of the original release did
    (a black image). Pillow >= 11 refuses bits=0, which 'rand-m9-mstd0.5-inc1' draws whenever
    the jittered magnitude reaches 10, so a finetuning run crashed at random."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)  # every value & ~255 == 0
    return ImageOps.posterize(img, bits_to_keep)


def use_posterize_with_zero_bits():
    """Point timm's RandAugment posterize ops at _posterize (idempotent). Called by
    build_transform, so only finetuning transforms change timm, and only when built."""
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


def build_transform(is_train, args):
    """Finetuning: timm's RandAugment + random erasing pipeline for training, else eval."""
    if not is_train:
        return build_eval_transform(args.input_size)
    use_posterize_with_zero_bits()  # Pillow >= 11 refuses posterize(0), which RandAugment draws
    return create_transform(
        input_size=args.input_size,
        is_training=True,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation="bicubic",
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def build_linprobe_transform(is_train, args):
    """Linear probe: TF-style RandomResizedCrop (bicubic) + flip for training, else eval."""
    if not is_train:
        return build_eval_transform(args.input_size)
    return transforms.Compose([
        RandomResizedCrop(args.input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

class BadImageError(OSError):
    """An image file that PIL cannot decode; the message names the file."""


class BadImageWarning(UserWarning):
    """Emitted once per file (per process) when --skip_bad_images skips it."""


def to_8_bits(img):
    """A 16-bit grayscale image (PIL modes I;16, I;16B, ..., and I, which 16-bit PNGs and PGMs
    open as on some Pillow versions) scaled to 8 bits (mode L, value >> 8); other images as they
    are. convert("RGB") would clip every value above 255 to white."""
    if not (img.mode == "I" or img.mode.startswith("I;16")):
        return img
    pixels = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8  # (H, W) in [0, 255]
    return Image.fromarray(pixels.astype(np.uint8))


def load_and_transform(path, transform):
    """Open the image at path and apply transform to it.

    Like ImageFolder's loader the image is converted to RGB first (16-bit images scaled to 8
    bits before, see to_8_bits), except for transforms that decode it themselves
    (`transform.lazy_decode`), which get the opened, undecoded image.
    """
    with Image.open(path) as img:
        img = to_8_bits(img)
        if transform is not None and getattr(transform, "lazy_decode", False):
            return transform(img)
        img = img.convert("RGB")
    return img if transform is None else transform(img)


def sample_seed(seed, epoch, index, stream=0):
    """A deterministic 63-bit seed for (seed, epoch, index); stream separates independent uses.
    All arguments must be non-negative integers."""
    words = [int(seed), int(epoch), int(index), int(stream)]  # fixed length: no padding clashes
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_rngs(seed):
    """Seed the CPU RNGs of torch, random and numpy (a 32-bit fold) inside the block, and put
    their previous states back afterwards (the caller's RNG streams are left untouched)."""
    if seed is None:
        yield
        return
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators stay as they are
    random.seed(seed)
    np.random.seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SymlinkWarning(UserWarning):
    """A symlinked folder of a dataset that is not followed: a loop, or a second way into a folder
    already read."""


def _skip_if_seen(path, seen):
    """True (with a SymlinkWarning naming it) when the folder at path is one of seen, a dict
    {(st_dev, st_ino): the path it was read as}; else False, and the folder added to seen."""
    try:
        st = os.stat(path)  # follows symlinks
    except OSError:  # vanished, or a dangling link
        return True
    key = st.st_dev, st.st_ino
    if key not in seen:
        seen[key] = path
        return False
    target = os.path.realpath(path)
    if os.path.commonpath([target, os.path.realpath(os.path.dirname(path))]) == target:
        why = f"a symlink loop ({target} contains it)"
    else:
        why = f"{target} is already read as {seen[key]}"
    warnings.warn(f"not following {path}: {why}", SymlinkWarning)
    return True


def _walk_real(top, seen, links):
    """[(folder, file names)] of top and of the folders under it reached without following a
    symlink, less folders already in seen; the symlinked sub-folders are appended to links."""
    found = []
    for folder, subdirs, files in os.walk(top):  # followlinks=False
        found.append((folder, files))
        paths = [os.path.join(folder, d) for d in sorted(subdirs)]
        links += [p for p in paths if os.path.islink(p)]
        subdirs[:] = [os.path.basename(p) for p in paths
                      if not os.path.islink(p) and not _skip_if_seen(p, seen)]
    return found


def find_images_once(directory, class_to_idx, is_valid_file):
    """ImageFolder's samples [(path, class index)], in its order (by class, then folder path,
    then file name), but reading each real folder once: torchvision's os.walk(followlinks=True)
    repeats a folder under a symlink loop (about 40 times, under the wrong label for a link to
    an ancestor; two loops never end). Real folders are read first, then the symlinked folders
    not read yet; the others are skipped with a SymlinkWarning naming them."""
    seen = {}
    _skip_if_seen(directory, seen)  # the root: a link back to it is a loop
    folders = {c: [] for c in class_to_idx}  # class -> [(folder, file names)]
    links = []  # (class, symlinked folder), followed once every real folder is read
    for c in sorted(class_to_idx):
        top, found = os.path.join(directory, c), []
        if os.path.isdir(top) and not _skip_if_seen(top, seen):
            folders[c] += _walk_real(top, seen, found)  # the class folder itself may be a symlink
        links += [(c, p) for p in found]
    for c, path in links:  # grows while it is read: links under linked folders come last
        found = []
        if not _skip_if_seen(path, seen):
            folders[c] += _walk_real(path, seen, found)
        links += [(c, p) for p in found]
    return [(os.path.join(folder, f), class_to_idx[c]) for c in sorted(class_to_idx)
            for folder, files in sorted(folders[c], key=lambda entry: entry[0]) for f in sorted(files)
            if is_valid_file(os.path.join(folder, f))]


class ImageFolderDataset(datasets.ImageFolder):
    """ImageFolder with clear layout errors, named bad files, and per-sample seeding.

    __getitem__ takes an index, or an (index, sample_seed) pair from SeededSampler: then the
    transform runs with torch / random / numpy seeded from sample_seed, so the augmentation of a
    sample is the same whatever process or worker computes it.

    An unreadable image raises BadImageError naming the file; with skip_bad_images=True it is
    reported once (BadImageWarning) and the next index (wrapping around, same seed) is returned
    instead. The set of files already reported is per process: nothing is shared by workers.

    Symlinked folders are followed once (see find_images_once). max_image_pixels sets Pillow's
    decompression-bomb limit (0: none; None: Pillow's as it is) in whichever process reads images.
    """

    def __init__(self, root, transform=None, target_transform=None, skip_bad_images=False,
                 max_image_pixels=None):
        super().__init__(root, transform=transform, target_transform=target_transform, allow_empty=True)
        self.skip_bad_images = skip_bad_images
        self.max_image_pixels = max_image_pixels
        self._apply_pixel_limit()  # this process; DataLoader workers apply it in __getitem__
        self._reported = set()
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if empty:
            raise FileNotFoundError(
                f"class folder(s) with no images in {root}: {', '.join(empty)}; expected image "
                f"files ({', '.join(IMG_EXTENSIONS)}) in {root}/<class>/")

    def find_classes(self, directory):
        try:
            return super().find_classes(directory)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"no class folders in {directory}: expected an ImageFolder layout "
                f"{directory}/<class>/<image>") from e

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """The samples of torchvision's make_dataset, each real folder read once. Empty classes
        are left to __init__'s check (allow_empty is always True here)."""
        if is_valid_file is None:
            def is_valid_file(path):
                return has_file_allowed_extension(path, extensions)
        return find_images_once(os.path.expanduser(directory), class_to_idx, is_valid_file)

    def _apply_pixel_limit(self):
        if self.max_image_pixels is not None:
            Image.MAX_IMAGE_PIXELS = self.max_image_pixels or None  # 0: no limit

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        self._apply_pixel_limit()  # Pillow's limit is per process: DataLoader workers too
        for _ in range(len(self.samples)):
            path, target = self.samples[index]
            try:
                with seeded_rngs(seed):
                    sample = load_and_transform(path, self.transform)
            except BAD_IMAGE_ERRORS as e:
                if not self.skip_bad_images:
                    fix = ("pass --max_image_pixels of at least its size, or 0 for no limit"
                           if isinstance(e, Image.DecompressionBombError) else
                           "use --skip_bad_images to skip unreadable images with a warning")
                    raise BadImageError(f"cannot read image {path}: {e} ({fix})") from e
                self._report(path, e)
                index = (index + 1) % len(self.samples)
                continue
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise BadImageError(f"no readable image in {self.root}")

    def _report(self, path, error):
        if path not in self._reported:
            self._reported.add(path)
            warnings.warn(f"skipping unreadable image {path}: {error}", BadImageWarning, stacklevel=3)


def _split_root(data_path, split):
    """<data_path>/<split>, checked, or an error that says what layout is expected."""
    layout = f"expected an ImageFolder layout {data_path or '<data_path>'}/{split}/<class>/<image>"
    if not data_path:
        raise ValueError(f"--data_path is not set; {layout}")
    if not os.path.exists(data_path):
        raise FileNotFoundError(f"--data_path {data_path} does not exist; {layout}")
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data_path {data_path} is not a folder; {layout}")
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no '{split}' folder in {data_path} ({root} is missing); {layout}")
    return root


def build_dataset(is_train, args, transform):
    """ImageFolderDataset over <args.data_path>/train (is_train) or <args.data_path>/val."""
    root = _split_root(args.data_path, "train" if is_train else "val")
    dataset = ImageFolderDataset(root, transform, skip_bad_images=args.skip_bad_images,
                                 max_image_pixels=args.max_image_pixels)
    print(f"data: {root}: {len(dataset)} images in {len(dataset.classes)} classes")
    return dataset


def check_num_classes(dataset, nb_classes):
    """A ValueError when the dataset has more classes than the classifier's --nb_classes."""
    if len(dataset.classes) > nb_classes:
        raise ValueError(f"{dataset.root} has {len(dataset.classes)} classes but --nb_classes is "
                         f"{nb_classes}")


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------

class SeededSampler(torch.utils.data.Sampler):
    """Wraps a sampler and yields (index, sample_seed(seed, epoch, index)) pairs.

    set_epoch(epoch) is forwarded to the wrapped sampler (DistributedSampler reshuffles with
    it). A RandomSampler's generator is re-seeded from (seed, epoch) at every epoch, so its
    order too is a function of (seed, epoch). set_epoch(epoch, start=k) also skips the first k
    samples of that epoch (mid-epoch resume; k counts this process's samples).
    Use the same seed on every rank. DistributedSampler's padding repeats a few indices; a
    repeated index gets the same seed, hence the same augmentation.
    """

    def __init__(self, sampler, seed):
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch
        self.start = start
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return max(len(self.sampler) - self.start, 0)

    def __repr__(self):
        return (f"{type(self).__name__}({type(self.sampler).__name__}, seed={self.seed}, "
                f"epoch={self.epoch}, start={self.start})")

    def __iter__(self):
        if isinstance(self.sampler, torch.utils.data.RandomSampler):
            if self.sampler.generator is None:
                self.sampler.generator = torch.Generator()
            self.sampler.generator.manual_seed(sample_seed(self.seed, self.epoch, 0, stream=1))
        for index in itertools.islice(self.sampler, self.start, None):
            yield index, sample_seed(self.seed, self.epoch, index)


# ---------------------------------------------------------------------------------------------
# DataLoaders
# ---------------------------------------------------------------------------------------------

def _loader(args, dataset, sampler, drop_last):
    """DataLoader with args.batch_size and args.num_workers (persistent, prefetching 2 batches),
    pinned memory only for a CUDA device (--pin_mem), and its own generator seeded with
    seed + rank: creating an iterator seeds the workers from it and never draws from the global
    torch RNG, so the training randomness (e.g. masking noise) does not depend on num_workers.
    The workers ignore SIGTERM / SIGUSR1: the main process stops and ends them (util.preemption)."""
    workers = args.num_workers
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, drop_last=drop_last,
        num_workers=workers,
        pin_memory=args.pin_mem and torch.device(args.device).type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed + get_rank()),
        worker_init_fn=worker_init_fn,
    )


def build_train_loader(args, dataset, training=True):
    """The training DataLoader (drop_last) and its SeededSampler: a DistributedSampler (this
    rank's shard, reshuffled by set_epoch) when args.distributed, else a RandomSampler, wrapped
    so that a sample's augmentation depends only on (seed, epoch, index). Call
    sampler.set_epoch(epoch) before each epoch. Raises a ValueError when the dataset holds fewer
    images than one batch of all the processes, unless training=False (--eval builds the loader
    but does not train). Returns (sampler, loader)."""
    world_size = get_world_size()
    if args.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=get_rank(),
                                                      shuffle=True, seed=args.seed)
    else:
        sampler = torch.utils.data.RandomSampler(dataset)
    sampler = SeededSampler(sampler, seed=args.seed)
    print("Sampler_train = %s" % str(sampler))
    loader = _loader(args, dataset, sampler, drop_last=True)
    if len(loader) == 0 and training:
        raise ValueError(f"{len(dataset)} training images are fewer than one batch of "
                         f"--batch_size {args.batch_size} per process x {world_size} processes")
    return sampler, loader


def build_val_loader(args, dataset):
    """The evaluation DataLoader: every image in order, or with --dist_eval (when distributed)
    this rank's shard of a DistributedSampler, which pads the last shard with repeated images
    when the dataset does not divide by the number of processes (as the original)."""
    world_size = get_world_size()
    if args.distributed and args.dist_eval:
        if len(dataset) % world_size != 0:
            print("Warning: Enabling distributed evaluation with an eval dataset not divisible by process "
                  "number. This will slightly alter validation results as extra duplicate entries are "
                  "added to achieve equal num of samples per-process.")
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=get_rank(),
                                                      shuffle=False)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return _loader(args, dataset, sampler, drop_last=False)


def build_classification_loaders(args, build_transform_fn):
    """The data of finetuning and linear probing: <data_path>/train through
    build_transform_fn(True, args) and <data_path>/val through build_transform_fn(False, args),
    the training classes checked against --nb_classes. --eval reads only <data_path>/val (no
    train/ folder needed; its classes are checked instead): the training sampler and loader are
    None. Returns (sampler_train, data_loader_train, data_loader_val)."""
    if args.eval:
        dataset_val = build_dataset(False, args, build_transform_fn(False, args))
        check_num_classes(dataset_val, args.nb_classes)
        return None, None, build_val_loader(args, dataset_val)
    dataset_train = build_dataset(True, args, build_transform_fn(True, args))
    dataset_val = build_dataset(False, args, build_transform_fn(False, args))
    check_num_classes(dataset_train, args.nb_classes)
    sampler_train, data_loader_train = build_train_loader(args, dataset_train)
    return sampler_train, data_loader_train, build_val_loader(args, dataset_val)


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------

def benchmark_transform(folder, transform, n=200):
    """Images per second of decode + transform, single process and one torch thread, over the
    first n images found (recursively) under folder. Files are read once beforehand so the
    page cache does not favour one run over another."""
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if has_file_allowed_extension(p, IMG_EXTENSIONS))[:n]
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p in paths[:5]:  # warm-up
            load_and_transform(p, transform)
        start = time.perf_counter()
        for p in paths:
            load_and_transform(p, transform)
        return len(paths) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
