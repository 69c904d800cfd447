"""kNN monitor: is pretraining learning features? (--knn_freq)

Every --knn_freq epochs (and after the last) the encoder, on whole images (no masking) with the
eval transform, embeds a fixed class-balanced subset of the training set (--knn_train_samples)
and the validation set (--knn_val_samples caps it); each validation image is classified by a
weighted vote of its k = 20 nearest training images (cosine similarity of L2-normalised
features, vote weight exp(similarity / 0.07)), as is common in self-supervised benchmarks (Wu et
al. 2018, "Unsupervised feature learning via non-parametric instance discrimination"; DINO).

Two features are reported: the cls token (knn_top1 / knn_top5, the token MAE's linear probe
uses) and the mean of the patch tokens (knn_avg_top1 / knn_avg_top5, the pooling finetuning
uses); a model without a cls token (num_prefix_tokens = 0) reports the mean as knn_top*.

Under torchrun each process embeds its share of both sets; the training features are gathered
in index order, so every process holds the same bank as a single process would, and the correct
counts are summed. The monitor never draws from the global RNGs (fixed subsets from a numpy
Generator, a seeded DataLoader generator, eval transform, eval mode), so a run with it trains
exactly as a run without it, and resume stays exact.
"""
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from util.datasets import ImageFolderDataset, build_eval_transform
from util.dist import comm_device, get_rank, get_world_size, is_dist_avail_and_initialized
from util.precision import autocast
from util.preemption import worker_init_fn


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def knn_scores(train_features, train_labels, features, num_classes, k=20, temperature=0.07, chunk=256):
    """Weighted kNN class scores.

    train_features: (M, D) and features: (N, D), both L2-normalised; train_labels: (M,) int64.
    Returns (N, num_classes): for each query, the sum over its k most similar training samples
    (cosine similarity s) of exp(s / temperature), per class of those samples.
    """
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, features.shape[0], chunk):
        similarity = features[start:start + chunk] @ train_features.T  # (n, M)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (n, k)
        weights = (top_sim / temperature).exp()  # (n, k)
        votes = torch.zeros(top_idx.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # (n, num_classes)
        scores.append(votes)
    return torch.cat(scores) if scores else features.new_zeros(0, num_classes)


def correct_counts(scores, labels):
    """(top-1 correct, top-5 correct) counts of class scores (N, C) against labels (N,); with
    fewer than 5 classes, top-5 is top-C."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, 5)
    hits = top == labels[:, None]
    return hits[:, 0].sum().item(), hits.any(dim=1).sum().item()


# ---------------------------------------------------------------------------------------------
# Fixed subsets
# ---------------------------------------------------------------------------------------------

def balanced_subset(targets, n, seed=0):
    """Indices of a class-balanced subset of about n samples, fixed by seed (sorted): n // C of
    each of the C classes (the first n % C classes one more), all of a class that has fewer.
    n = 0 or n >= len(targets): every index."""
    targets = np.asarray(targets)
    if n <= 0 or n >= len(targets):
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    picked = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(targets == c)
        quota = n // len(classes) + (i < n % len(classes))
        picked.append(rng.permutation(members)[:quota])
    return sorted(np.concatenate(picked).tolist())


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

def _loader(dataset, indices, args):
    """This process's share (indices[rank::world_size]) in order; a seeded generator so that
    creating the iterator draws nothing from the global torch RNG."""
    shard = torch.utils.data.Subset(dataset, indices[get_rank()::get_world_size()])
    return torch.utils.data.DataLoader(
        shard, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=args.pin_mem and torch.device(args.device).type == "cuda",
        generator=torch.Generator().manual_seed(0), worker_init_fn=worker_init_fn)


@torch.no_grad()
def extract_features(model, loader, device, precision):
    """Encoder features of every image of loader: {"cls": (N, D), "avg": (N, D)} L2-normalised
    float32 ("cls" only for a model with a cls token), and the labels (N,)."""
    num_prefix = getattr(model, "num_prefix_tokens", 1)
    features, labels = {"cls": [], "avg": []} if num_prefix else {"avg": []}, []
    for images, targets in loader:
        with autocast(device, precision):
            tokens = model.forward_features(images.to(device, non_blocking=True))  # (B, P+L, D)
        tokens = tokens.float()
        if num_prefix:
            features["cls"].append(tokens[:, 0])
        features["avg"].append(tokens[:, num_prefix:].mean(dim=1))
        labels.append(targets.to(device))
    dim = getattr(model, "num_features", None) or model.norm.weight.shape[0]  # for an empty shard
    features = {name: torch.nn.functional.normalize(torch.cat(f) if f else torch.zeros(0, dim, device=device),
                                                    dim=1) for name, f in features.items()}
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return features, labels


def _gather_in_order(tensor, count):
    """Rows of every process's shard (rank r holds rows r, r + W, r + 2W, ... of `count`),
    back in the original order; the tensor itself when not distributed."""
    world = get_world_size()
    if world == 1:
        return tensor
    shard = -(-count // world)  # rows of the largest shard
    comm = comm_device()
    padded = torch.zeros(shard, *tensor.shape[1:], dtype=tensor.dtype, device=comm)
    padded[:tensor.shape[0]] = tensor.to(comm)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    interleaved = torch.stack(gathered, dim=1).flatten(0, 1)  # row j*W + r = rank r's row j
    return interleaved[:count].to(tensor.device)


def _sum(values):
    """values (a tuple of counts) summed over the processes."""
    if not is_dist_avail_and_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# The monitor
# ---------------------------------------------------------------------------------------------

class KNNMonitor:
    """kNN accuracy of the encoder's features on <data_path>/val against a fixed subset of
    <data_path>/train. Build with KNNMonitor.create(args) (None when off); call it every epoch:
    it returns {} except at the epochs --knn_freq selects."""

    def __init__(self, train_set, train_indices, val_set, val_indices, args, k=20, temperature=0.07):
        self.train_set, self.train_indices = train_set, train_indices
        self.val_set, self.val_indices = val_set, val_indices
        self.args, self.k, self.temperature = args, k, temperature
        self.num_classes = len(train_set.classes)

    @classmethod
    def create(cls, args):
        """The monitor, or None (with a one-line note) when --knn_freq is 0 or no labelled
        val/ folder with the training classes sits next to train/."""
        if args.knn_freq <= 0:
            return None
        val_root = os.path.join(args.data_path, "val")
        if not os.path.isdir(val_root):
            print(f"kNN monitor off: no {val_root} with labelled class folders (--knn_freq 0 silences this)")
            return None
        transform = build_eval_transform(args.input_size)
        kwargs = dict(skip_bad_images=args.skip_bad_images, max_image_pixels=args.max_image_pixels)
        train_set = ImageFolderDataset(os.path.join(args.data_path, "train"), transform, **kwargs)
        val_set = ImageFolderDataset(val_root, transform, **kwargs)
        if val_set.classes != train_set.classes:
            print(f"kNN monitor off: the classes of {val_root} differ from those of train/")
            return None
        train_indices = balanced_subset(train_set.targets, args.knn_train_samples, seed=args.seed)
        val_indices = balanced_subset(val_set.targets, args.knn_val_samples, seed=args.seed)
        print(f"kNN monitor every {args.knn_freq} epochs: {len(train_indices)} train images "
              f"(class-balanced) vs {len(val_indices)} val images, k=20, T=0.07")
        return cls(train_set, train_indices, val_set, val_indices, args)

    def due(self, epoch):
        return epoch % self.args.knn_freq == 0 or epoch + 1 == self.args.epochs

    def __call__(self, model, epoch, device, log_writer=None):
        """{knn_top1, knn_top5, [knn_avg_top1, knn_avg_top5,] knn_seconds} at the epochs
        --knn_freq selects, else {}. model: the unwrapped pretraining model (forward_features)."""
        if not self.due(epoch):
            return {}
        start = time.time()
        was_training = model.training
        model.eval()
        args = self.args
        bank, bank_labels = extract_features(model, _loader(self.train_set, self.train_indices, args),
                                             device, args.precision)
        queries, labels = extract_features(model, _loader(self.val_set, self.val_indices, args),
                                           device, args.precision)
        model.train(was_training)
        bank_labels = _gather_in_order(bank_labels, len(self.train_indices))
        stats = {}
        for name, features in bank.items():
            features = _gather_in_order(features, len(self.train_indices))
            scores = knn_scores(features, bank_labels, queries[name], self.num_classes, self.k,
                                self.temperature)
            top1, top5 = _sum(correct_counts(scores, labels))
            prefix = "knn" if name == "cls" or "cls" not in bank else "knn_avg"
            stats[f"{prefix}_top1"] = 100.0 * top1 / len(self.val_indices)
            stats[f"{prefix}_top5"] = 100.0 * top5 / len(self.val_indices)
        stats["knn_seconds"] = round(time.time() - start, 2)
        print("kNN (k={}) on {} val images: {}".format(
            self.k, len(self.val_indices), "  ".join(f"{k} {v:.2f}" for k, v in stats.items())))
        if log_writer is not None:
            for key, value in stats.items():
                log_writer.add_scalar(f"knn/{key[4:]}", value, epoch)
        return stats
