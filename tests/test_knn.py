"""The kNN monitor (util/knn.py): the weighted kNN classifier on features with a known answer,
the class-balanced subsets, and the monitor in a pretraining run (log.txt, TensorBoard, no
effect on training, the same accuracy under torchrun with 2 processes as with 1)."""
import json
import math
import os

import pytest
import torch

from conftest import REPO
from util.checkpoint import load_checkpoint
from util.knn import balanced_subset, correct_counts, knn_scores

PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "16", "--batch_size", "4",
            "--device", "cpu", "--num_workers", "0", "--vis_freq", "0", "--precision", "fp32", "--seed", "0",
            "--warmup_epochs", "1", "--save_freq", "1"]


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------

def test_knn_scores_are_the_temperature_weighted_votes_of_the_k_nearest():
    """Training points at angles 0, 10, 20 degrees (class 0) and 90, 100 degrees (class 1); a
    query at 5 degrees with k=3: neighbours 0, 10 (class 0) and 20 (class 0); with k=4 the
    next one is 90 degrees (class 1). Scores = sum of exp(cos / T) per class, by hand."""
    angles = torch.tensor([0.0, 10.0, 20.0, 90.0, 100.0]) * math.pi / 180
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1])
    q = torch.tensor([[math.cos(math.radians(5)), math.sin(math.radians(5))]])
    T = 0.07
    sims = (q @ train.T)[0]
    scores = knn_scores(train, labels, q, num_classes=3, k=4, temperature=T)
    expected0 = sum(math.exp(sims[i].item() / T) for i in (0, 1, 2))
    expected1 = math.exp(sims[3].item() / T)
    assert scores.shape == (1, 3)
    assert scores[0, 0].item() == pytest.approx(expected0, rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(expected1, rel=1e-5)
    assert scores[0, 2].item() == 0


def test_one_very_close_neighbour_outvotes_two_far_ones():
    """Weighted, not majority, voting: at T = 0.07 one neighbour at cosine 0.99 (class 1)
    outweighs two at cosine 0.5 (class 0): exp(0.99/0.07) > 2 exp(0.5/0.07)."""
    train = unit([0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)], [0.99, math.sqrt(1 - 0.99 ** 2)])
    scores = knn_scores(train, torch.tensor([0, 0, 1]), unit([1.0, 0.0]), num_classes=2, k=3)
    assert scores.argmax(dim=1).item() == 1
    # at a high temperature the weights flatten and the majority (class 0) wins
    flat = knn_scores(train, torch.tensor([0, 0, 1]), unit([1.0, 0.0]), num_classes=2, k=3, temperature=100.0)
    assert flat.argmax(dim=1).item() == 0


def test_separable_clusters_are_classified_perfectly_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1) * 5
    train_labels = torch.arange(4).repeat_interleave(25)
    train = torch.nn.functional.normalize(centres[train_labels] + torch.randn(100, 16, generator=g), dim=1)
    val_labels = torch.arange(4).repeat(10)
    val = torch.nn.functional.normalize(centres[val_labels] + torch.randn(40, 16, generator=g), dim=1)
    scores = knn_scores(train, train_labels, val, num_classes=4)
    assert correct_counts(scores, val_labels) == (40, 40)
    assert torch.equal(knn_scores(train, train_labels, val, num_classes=4, chunk=7), scores)


def test_correct_counts_top1_and_top5():
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6],   # ranking 6 5 4 3 2 | 1 0
                           [6.0, 5, 4, 3, 2, 1, 0]])  # ranking 0 1 2 3 4 | 5 6
    assert correct_counts(scores, torch.tensor([6, 0])) == (2, 2)
    assert correct_counts(scores, torch.tensor([2, 4])) == (0, 2)
    assert correct_counts(scores, torch.tensor([0, 6])) == (0, 0)
    # fewer than 5 classes: top-5 is top-C (always right)
    assert correct_counts(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == (0, 1)


def test_fewer_training_samples_than_k():
    train = unit([1.0, 0.0], [0.0, 1.0])
    scores = knn_scores(train, torch.tensor([0, 1]), unit([1.0, 0.1]), num_classes=2, k=20)
    assert scores.argmax().item() == 0 and (scores > 0).all()


# ---------------------------------------------------------------------------------------------
# Fixed subsets
# ---------------------------------------------------------------------------------------------

def test_balanced_subset_is_balanced_fixed_and_sorted():
    targets = [0] * 50 + [1] * 30 + [2] * 5
    subset = balanced_subset(targets, 31, seed=3)
    counts = [sum(targets[i] == c for i in subset) for c in range(3)]
    assert counts == [11, 10, 5]  # 31 // 3 = 10, class 0 gets the remainder; class 2 has only 5
    assert subset == sorted(subset) and len(set(subset)) == len(subset)
    assert balanced_subset(targets, 31, seed=3) == subset
    assert balanced_subset(targets, 31, seed=4) != subset
    assert balanced_subset(targets, 0) == list(range(85)) == balanced_subset(targets, 1000)


# ---------------------------------------------------------------------------------------------
# In a pretraining run
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(toy_data):
    """4 classes x (6 train + 3 val) images of 32 px."""
    return toy_data(train_per_class=6, val_per_class=3, size=32)


def run(run_script, data, out, *extra, check=True):
    return run_script("main_pretrain.py", *PRETRAIN, "--data_path", data, "--output_dir", out, "--log_dir", out,
                      *map(str, extra),
                      timeout=180, check=check)


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def test_monitor_logs_knn_accuracy_to_log_txt_and_tensorboard(data, tmp_path, run_script):
    """--knn_freq 2 over 3 epochs: epochs 0 and 2 (the last); both features reported."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    _, log = run(run_script, data, out, "--epochs", 3, "--knn_freq", 2)
    assert "kNN monitor every 2 epochs: 24 train images (class-balanced) vs 12 val images" in log
    lines = read_log(out)
    assert ["knn_top1" in line for line in lines] == [True, False, True]
    for line in (lines[0], lines[2]):
        for key in ("knn_top1", "knn_top5", "knn_avg_top1", "knn_avg_top5"):
            assert 0 <= line[key] <= 100 and (line[key] * 12 / 100) == pytest.approx(round(line[key] * 12 / 100))
        assert line["knn_top5"] >= line["knn_top1"]
    events = EventAccumulator(out, size_guidance={"scalars": 0})
    events.Reload()
    top1 = events.Scalars("knn/top1")
    assert [e.step for e in top1] == [0, 2]
    assert [e.value for e in top1] == pytest.approx([lines[0]["knn_top1"], lines[2]["knn_top1"]])
    assert "knn/avg_top1" in events.Tags()["scalars"]


def test_monitor_does_not_change_training_and_is_off_without_val(data, toy_data, tmp_path, run_script):
    """The same 2 epochs with the monitor at every epoch and with it off: identical weights and
    RNG states (the monitor draws no random numbers). Without val/ it is off, with a note."""
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    run(run_script, data, on, "--epochs", 2, "--knn_freq", 1, "--num_workers", 2)
    run(run_script, data, off, "--epochs", 2, "--knn_freq", 0)
    a, b = (load_checkpoint(os.path.join(d, "checkpoint-1.pth")) for d in (on, off))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(ra["torch"], rb["torch"]) for ra, rb in zip(a["rng"], b["rng"]))
    assert [line["train_loss"] for line in read_log(on)] == [line["train_loss"] for line in read_log(off)]
    assert all("knn_top1" in line for line in read_log(on))
    assert not any("knn_top1" in line for line in read_log(off))

    no_val = tmp_path / "no_val"
    no_val.mkdir()
    os.symlink(os.path.join(data, "train"), no_val / "train")
    _, log = run(run_script, str(no_val), str(tmp_path / "nv"), "--epochs", 1)
    assert f"kNN monitor off: no {no_val / 'val'} with labelled class folders" in log
    assert "knn_top1" not in read_log(str(tmp_path / "nv"))[0]


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_knn_accuracy_as_one(data, tmp_path, run_script):
    """The monitor alone on the weights of a 1-epoch run, in 1 process and under torchrun in 2
    (each embeds half of the images; the bank is gathered in index order, the correct counts
    summed): the same accuracies."""
    out = str(tmp_path / "single")
    run(run_script, data, out, "--epochs", 1, "--knn_freq", 0)
    script = tmp_path / "knn_only.py"
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {REPO!r})
import torch
import main_pretrain
from util import misc
from util.checkpoint import load_checkpoint
from util.dist import get_world_size, is_main_process
from util.knn import KNNMonitor
from util.models import build_pretrain_model
args = main_pretrain.get_args_parser().parse_args()
misc.init_run(args, training=False)
model = build_pretrain_model(args)
model.load_state_dict(load_checkpoint({os.path.join(out, 'checkpoint-0.pth')!r})["model"])
stats = KNNMonitor.create(args)(model, 0, torch.device("cpu"))
if is_main_process():
    with open(os.path.join({str(tmp_path)!r}, f"knn-{{get_world_size()}}.json"), "w") as f:
        json.dump(stats, f)
""")
    flags = [*PRETRAIN, "--epochs", "1", "--knn_freq", "1", "--data_path", data]
    run_script(script, *flags, "--output_dir", str(tmp_path / "w1"), timeout=180)
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *flags,
               "--output_dir", str(tmp_path / "w2"), timeout=180)
    one, two = (json.load(open(tmp_path / f"knn-{n}.json")) for n in (1, 2))
    one.pop("knn_seconds"), two.pop("knn_seconds")
    assert one == two and set(one) == {"knn_top1", "knn_top5", "knn_avg_top1", "knn_avg_top5"}
