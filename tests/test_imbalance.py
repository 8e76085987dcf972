"""Imbalanced classes: the long-tail subsample, the class-balanced sampler, loss weights, balanced accuracy."""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from PIL import Image

from helpers import DIGITS, recipe_file, run_cli, take
from vitcli import data as vdata
from vitcli.data.shard_sets import ShardSet
from vitcli.data.tarshards import ShardWriter
from vitcli.engine.setup import build_data
from vitcli.recipe import load_recipe
from vitcli.data.balance import class_counts, long_tail, loss_weights, sample_weights
from vitcli.data.loader import EpochBatchSampler
from vitcli.objectives.evaluate import EvalAccumulator


def labelled(labels: list[int], classes: int) -> vdata.ImageSet:
    import datasets
    from PIL import Image

    pixel = Image.new("RGB", (2, 2))
    names = [str(c) for c in range(classes)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": [pixel] * len(labels), "label": labels}, features=features)
    return vdata.ImageSet(ds, classes, names, "toy", "train")


def test_the_balanced_sampler_draws_each_class_equally_within_binomial_bounds():
    labels = [0] * 400 + [1] * 40 + [2] * 8 + [3] * 2  # 200:1
    data = labelled(labels, 4)
    n, draws = len(labels), Counter()
    for epoch in range(4):
        sampler = EpochBatchSampler(n, 50, shuffle=True, drop_last=True, seed=3, epoch=epoch, weights=sample_weights(data))
        for batch in sampler:
            draws.update(labels[i] for i in batch.indices)
    total = sum(draws.values())
    assert total == 4 * n
    for c in range(4):  # each class ~1/4 of the draws: within 4 standard deviations of the binomial
        assert abs(draws[c] - total / 4) <= 4 * math.sqrt(total * 0.25 * 0.75), draws
    again = EpochBatchSampler(n, 50, shuffle=True, drop_last=True, seed=3, epoch=0, weights=sample_weights(data))
    first = EpochBatchSampler(n, 50, shuffle=True, drop_last=True, seed=3, epoch=0, weights=sample_weights(data))
    assert [b.indices for b in again] == [b.indices for b in first]  # a pure function of (seed, epoch): resumable


def test_loss_weights_by_inverse_frequency_and_effective_number():
    counts = np.array([100, 10, 1, 0])
    inverse = loss_weights(counts, "inverse", 0.999).numpy()
    expected = np.array([1 / 100, 1 / 10, 1, 0]) * 111 / 3  # ~ 1 / n_c, averaging 1 over the 111 images
    np.testing.assert_allclose(inverse, expected, rtol=1e-6)
    assert (inverse * counts).sum() == pytest.approx(counts.sum())
    beta = 0.99
    effective = (1 - beta ** counts[:3]) / (1 - beta)  # Cui et al.'s effective number, weights summing to the classes
    expected = np.append(3 * (1 / effective) / (1 / effective).sum(), 0)
    np.testing.assert_allclose(loss_weights(counts, "effective", beta).numpy(), expected, rtol=1e-6)
    # the labels' loss weighs each image by its class: torch's weighted mean of the per-image cross-entropy
    loss = vdata.build_train_loss(vdata.MixSpec(balance="loss_weights"), counts)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.as_tensor(inverse, dtype=torch.float32)[y]
    nll = -F.log_softmax(logits, dim=1)[torch.arange(6), y]
    torch.testing.assert_close(loss(logits, y), (w * nll).sum() / w.sum())
    # with Mixup's soft targets: -sum_c w_c t_c log p_c, averaged over images
    soft = vdata.build_train_loss(vdata.MixSpec(balance="loss_weights", mixup=0.8), counts)
    t = torch.softmax(torch.randn(6, 4), dim=1)
    by_hand = -(t * F.log_softmax(logits, dim=1) * torch.as_tensor(inverse, dtype=torch.float32)).sum(1).mean()
    torch.testing.assert_close(soft(logits, t), by_hand)


def test_balanced_accuracy_is_sklearns():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(50), torch.ones(10), torch.full((5,), 2)]).long()
    logits = torch.randn(65, 4, generator=g) + 2 * F.one_hot(labels, 4) * (torch.rand(65, 1, generator=g) > 0.4)
    acc = EvalAccumulator(4, torch.device("cpu"))
    acc.update(logits[:30], labels[:30])
    acc.update(logits[30:], labels[30:])
    result = acc.result()
    expected = balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert result["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)  # class 3 has no images: not counted


def test_the_long_tail_falls_exponentially_from_the_smallest_class():
    data = labelled([c for c in range(5) for _ in range(40)] + [0] * 10, 5)
    tail = long_tail(data, 16, seed=0)
    assert class_counts(tail).tolist() == [40, 20, 10, 5, 2]  # 40 x 16^(-c/4), rounded
    assert tail.split == "train[long tail 16:1]"
    assert class_counts(long_tail(data, 16, seed=1)).tolist() == class_counts(tail).tolist()


def test_an_imbalanced_run_shows_its_counts_and_eval_reports_balanced_accuracy(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 3}\n")), "--out", str(run), *DIGITS,
                   "--set", "data.train_subset=null", "--set", "data.imbalance=20", "--set", "data.balance=sampler") == 0
    out = capsys.readouterr().out
    assert "is imbalanced (" in out and "data.balance: sampler" in out
    assert run_cli("eval", "--ckpt", str(run), "--json", "--num-workers", "0") == 0
    result = json.loads(capsys.readouterr().out)
    present = [a for a in result["per_class_accuracy"] if a is not None]
    assert result["balanced_accuracy"] == pytest.approx(np.mean(present))
    logged = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["kind"] == "eval"]
    assert "balanced_accuracy" in logged[-1]


def test_inspect_draws_the_per_class_accuracy(trained, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert run_cli("inspect", "--ckpt", str(trained), "--out", str(out), "--images", "8", "--show", "2") == 0
    summary = json.loads((out / "inspect.json").read_text())
    assert (out / "per_class_accuracy.png").stat().st_size > 0 and len(summary["per_class_accuracy"]) == 10
    assert summary["balanced_accuracy"] == pytest.approx(np.mean([a for a in summary["per_class_accuracy"] if a is not None]))


@pytest.mark.parametrize("setting, message", [
    ("data.imbalance=0.5", "'data.imbalance' is a max:min ratio >= 1"),
    ("data.balance=weights", "'data.balance' must be one of none, sampler, loss_weights"),
])
def test_bad_balance_settings_are_one_clear_error(setting, message, tmp_path, capsys):
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "r"), *DIGITS, "--set", setting) == 2
    assert message in capsys.readouterr().err


def balanced_stream(urls: list[str], *, buffer: int = 200, batch: int = 100):
    spec = vdata.TransformSpec(crop_scale=(0.5, 1.0), hflip=0.5, crop_pct=1.0, interpolation="bilinear", mean=(0.5,), std=(0.5,))
    transform = vdata.build_transform(spec, (8, 8), train=True)
    shards = ShardSet(None, 4, [str(c) for c in range(4)], "toy", "train", urls=urls)
    return vdata.make_stream_loader(shards, transform, vdata.LoaderSpec.training(batch, seed=3, balanced=True), buffer=buffer)


def labelled_shards(folder, labels: list[int], per_shard: int = 150) -> list[str]:
    rng = np.random.default_rng(0)
    order, urls = rng.permutation(len(labels)), []
    for start in range(0, len(labels), per_shard):
        writer = ShardWriter(str(folder / f"toy-{start:04d}.tar"))
        for i in order[start:start + per_shard].tolist():
            buf = io.BytesIO()  # random pixels: a copy's own augmentation shows
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
            writer.add(f"{i:05d}", buf.getvalue(), "png", labels[i])
        writer.close()
        urls.append(writer.path)
    return urls


def test_a_balanced_stream_draws_each_class_equally_from_its_buffer_and_resumes_exactly(tmp_path):
    labels = [0] * 300 + [1] * 100 + [2] * 30 + [3] * 20  # 15:1; a buffer of 200 holds ~9 of the rarest class
    urls = labelled_shards(tmp_path, labels)
    straight = take(balanced_stream(urls), 20)  # 2,000 emitted, ~5 passes over the 450 samples
    draws = Counter(torch.cat([y for _, y in straight]).tolist())
    total = sum(draws.values())
    for c in range(4):  # a class drawn uniformly at every emission: each ~1/4, within 4 binomial standard deviations
        assert abs(draws[c] - total / 4) <= 4 * math.sqrt(total * 0.25 * 0.75), draws
    first = balanced_stream(urls)
    take(first, 7)
    state = first.state_dict()
    assert any(len(ref) == 5 for ref in first.stream.state_dict()["buffer"])  # emitted ones saved with their copy count
    resumed = balanced_stream(urls)
    assert resumed.load_state_dict(state)
    for (x, y), (u, v) in zip(straight[7:], take(resumed, 13)):
        assert torch.equal(y, v) and torch.equal(x, u)  # same draws, same augmentation of every copy


def test_shards_record_class_counts_and_streams_train_balanced(tmp_path, capsys):
    shards = tmp_path / "shards"
    assert run_cli("shards", "digits", str(shards), "--samples-per-shard", "500") == 0
    index = json.loads((shards / "index.json").read_text())
    train = vdata.load_split("digits", None, role="train")
    assert index["splits"]["train"]["class_counts"] == np.bincount(vdata.label_array(train.dataset), minlength=10).tolist()
    streamed = [*DIGITS, "--set", f"data.dataset={shards}", "--set", "data.train_subset=null", "--set", "data.shuffle_buffer=100"]
    recipe = load_recipe(None, [f"data.dataset={shards}", "data.balance=loss_weights", "train.steps=1", "model.img_size=8"])
    criterion = build_data(recipe).criterion  # the weights of the index's counts
    torch.testing.assert_close(criterion.weight, loss_weights(np.array(index["splits"]["train"]["class_counts"]), "inverse", 0.999))
    for balance in ("sampler", "loss_weights"):
        out = tmp_path / balance
        assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 2}\n")), "--out", str(out), *streamed,
                       "--set", f"data.balance={balance}") == 0
    capsys.readouterr()
    pattern = str(shards / "train-*.tar")  # shards by pattern carry no counts
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "r"), *streamed, "--set",
                   f"data.dataset={pattern}", "--set", "data.num_samples=1000", "--set", "data.balance=loss_weights") == 2
    err = capsys.readouterr().err
    assert "needs the training split's class counts" in err and "data.balance: sampler" in err
