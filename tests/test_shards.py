"""Tar shards: `vit shards` writes them, training streams them, and a stopped run resumes at the next sample."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, comparable, offline_env, recipe_file, run_cli, sigterm_then_resume_matches_an_uninterrupted_run, take
from vitcli.data import LoaderSpec, TransformSpec, build_transform, make_stream_loader
from vitcli.data.builtin import digits_splits
from vitcli.data.shard_index import expand, load_index
from vitcli.data.shard_sets import ShardSet
from vitcli.data.tarshards import ShardError, ShardWriter, read_samples
from vitcli.io import checkpoint as ckpt


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digit-shards")
    with offline_env():
        assert run_cli("shards", "digits", str(out), "--samples-per-shard", "100") == 0
    return out


def numbered_shards(folder: Path, shards: int, per_shard: int) -> list[str]:
    """Shards of 8x8 grey PNGs whose label is the sample's number: a batch's labels say which samples it holds."""
    rng = np.random.default_rng(0)
    urls = []
    for s in range(shards):
        writer = ShardWriter(str(folder / f"n-{s:03d}.tar"))
        for i in range(per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
            writer.add(f"{s:03d}{i:03d}", buf.getvalue(), "png", s * per_shard + i)
        writer.close()
        urls.append(str(folder / f"n-{s:03d}.tar"))
    return urls


# ---------------------------------------------------------------------------------------------
# vit shards


def test_vit_shards_writes_every_image_as_stored_with_an_index_of_counts_and_checksums(digit_shards):
    index = json.loads((digit_shards / "index.json").read_text())
    assert index["classes"] == [str(i) for i in range(10)]
    source = digits_splits()
    for split, n, shards in (("train", 1437, 15), ("test", 360, 4)):
        entry = index["splits"][split]
        assert entry["num_samples"] == n and len(entry["shards"]) == shards
        assert [s["samples"] for s in entry["shards"]] == [100] * (shards - 1) + [n - 100 * (shards - 1)]
        rows = []
        for s in entry["shards"]:
            data = (digit_shards / s["name"]).read_bytes()
            assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
            for sample in read_samples(str(digit_shards / s["name"])):
                assert sample.ext == "png"
                rows.append((int(sample.key), sample.image, sample.label))  # the key is the source row
        expected = source[split].cast_column("image", datasets.Image(decode=False))
        order = [row for row, _, _ in rows]
        assert sorted(order) == list(range(n))
        assert (order != sorted(order)) == (split == "train")  # training shards come shuffled, test in order
        assert [image for _, image, _ in sorted(rows)] == [c["bytes"] for c in expected["image"]]  # no re-encode
        assert [label for _, _, label in sorted(rows)] == expected["label"]


def test_shard_size_closes_shards_and_max_size_downsizes(tmp_path):
    big = tmp_path / "folder"
    for c in ("cat", "dog"):
        (big / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((300, 200, 3), 40 * i, np.uint8)).save(big / c / f"{i}.jpg", quality=90)
    out = tmp_path / "s"
    assert run_cli("shards", str(big), str(out), "--split", "train", "--shard-size", "20KB", "--max-size", "64") == 0
    index = load_index(str(out))
    shards = index.splits["train"].shards
    assert index.classes == ["cat", "dog"] and sum(s.samples for s in shards) == 12 and len(shards) > 1
    assert all(s.bytes <= 20_000 or s.samples == 1 for s in shards)
    sample = next(read_samples(shards[0].url))
    assert sample.ext == "jpg" and Image.open(io.BytesIO(sample.image)).size == (43, 64)  # longer side 64, aspect kept


def test_vit_shards_refuses_a_folder_that_holds_shards_without_force(digit_shards, capsys):
    assert run_cli("shards", "digits", str(digit_shards)) == 2
    assert "already holds shards" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Reading shards


def test_a_sample_read_from_its_saved_offset_is_the_same_sample(digit_shards):
    url = str(digit_shards / "train-000003.tar")
    samples = list(read_samples(url))
    assert [s.offset for s in samples[1:]] == [s.end for s in samples[:-1]]
    again = next(read_samples(url, samples[57].offset))
    assert (again.key, again.image, again.label) == (samples[57].key, samples[57].image, samples[57].label)
    assert [s.key for s in read_samples(url, samples[98].end)] == [samples[99].key]


@pytest.mark.slow
def test_a_reader_left_open_at_exit_prints_nothing(digit_shards):
    # A script that stops reading mid-shard: Python closes the generator while shutting down.
    import subprocess
    import sys

    script = (f"from vitcli.data.tarshards import read_samples\n"
              f"samples = read_samples({str(digit_shards / 'train-000003.tar')!r})\nnext(samples)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("cut", [700, 1800, 2048 * 3 + 600], ids=["mid-data", "mid-header", "later"])
def test_a_truncated_shard_is_an_error_naming_it(tmp_path, digit_shards, cut):
    broken = tmp_path / "broken.tar"
    broken.write_bytes((digit_shards / "train-000000.tar").read_bytes()[:cut])
    with pytest.raises(ShardError, match="broken.tar.*cut short"):
        list(read_samples(str(broken)))


def test_a_sample_without_image_or_label_says_what_it_lacks(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.cls", b"1"), ("b.png", b"png-bytes"), ("c.png", b"x"), ("c.cls", b"seven")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    a, b, c = read_samples(str(path))
    assert "no image member" in a.problem and b.problem is None and b.label is None
    assert "not a class index" in c.problem


def test_patterns_expand_brace_ranges_and_globs(tmp_path):
    for i in range(3):
        (tmp_path / f"train-{i:04d}.tar").write_bytes(b"")
    assert expand(str(tmp_path / "train-{0000..0002}.tar")) == [str(tmp_path / f"train-{i:04d}.tar") for i in range(3)]
    assert expand(str(tmp_path / "train-*.tar")) == [str(tmp_path / f"train-{i:04d}.tar") for i in range(3)]


# ---------------------------------------------------------------------------------------------
# The stream: who reads what, and exact resume


def loader(urls, *, workers=0, world_size=1, rank=0, buffer=4, batch=5, epoch=0, bad="error"):
    transform = build_transform(TransformSpec(crop_scale=(0.5, 1.0), hflip=0.5, crop_pct=1.0, interpolation="bilinear",
                                              mean=(0.5,), std=(0.5,)), (8, 8), train=True)
    shards = ShardSet(None, 0, [], "numbered", "train", urls=urls)
    return make_stream_loader(shards, transform, LoaderSpec.training(batch, num_workers=workers, seed=3, bad_images=bad),
                              epoch=epoch, buffer=buffer, rank=rank, world_size=world_size)




def test_each_reader_reads_its_own_shards_and_an_epoch_covers_every_sample_once(tmp_path):
    urls = numbered_shards(tmp_path, 8, 10)
    per_rank = {}
    for rank in range(2):  # 2 processes x 2 workers = 4 readers of 2 shards (20 samples) each an epoch
        batches = take(loader(urls, workers=2, world_size=2, rank=rank, batch=4), 8)
        per_rank[rank] = torch.cat([labels for _, labels in batches]).tolist()
    # each reader has emitted 16 samples, drawn from its first 20 reads (its epoch-0 shards) through a buffer of 4
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == 64
    shards_of = {r: {s // 10 for s in per_rank[r]} for r in per_rank}
    assert not shards_of[0] & shards_of[1] and all(len(shards_of[r]) == 4 for r in per_rank)


def test_stream_order_is_seeded_per_epoch(tmp_path):
    urls = numbered_shards(tmp_path, 4, 6)
    a = [labels.tolist() for _, labels in take(loader(urls), 4)]
    b = [labels.tolist() for _, labels in take(loader(urls), 4)]
    c = [labels.tolist() for _, labels in take(loader(urls, epoch=1), 4)]
    assert a == b and a != c


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_stream_gives_exactly_the_batches_of_an_uninterrupted_one(tmp_path, workers):
    urls = numbered_shards(tmp_path, 4, 12)
    straight = take(loader(urls, workers=workers), 14)  # past one epoch (48 samples)
    first = loader(urls, workers=workers)
    take(first, 5)
    state = first.state_dict()
    first.close()
    resumed = loader(urls, workers=workers)
    assert resumed.load_state_dict(state)
    rest = take(resumed, 9)
    for (x, y), (u, v) in zip(straight[5:], rest):
        assert torch.equal(y, v) and torch.equal(x, u)  # same samples, same augmentation


def test_a_restored_stream_reads_no_consumed_sample_again(tmp_path, monkeypatch):
    import vitcli.data.shard_stream as shard_stream

    urls = numbered_shards(tmp_path, 2, 20)
    first = loader(urls, buffer=3)
    take(first, 3)  # 15 emitted, 18 read: the reader is inside its first shard
    state = first.state_dict()
    reads = []
    real = shard_stream.read_samples
    monkeypatch.setattr(shard_stream, "read_samples", lambda url, start=0, **kw: (reads.append((url, start, kw.get("limit"))), real(url, start, **kw))[1])
    resumed = loader(urls, buffer=3)
    resumed.load_state_dict(state)
    take(resumed, 1)
    fetched = [r for r in reads if r[2] == 1]  # the 3 buffered samples, fetched one by one by offset
    streamed = [r for r in reads if r[2] is None]
    assert len(fetched) == 3 and all(start > 0 for _, start, _ in fetched)
    assert streamed[0][1] > max(start for _, start, _ in fetched)  # reading goes on after the last sample read


def test_more_readers_than_shards_is_a_clear_error(tmp_path):
    urls = numbered_shards(tmp_path, 2, 4)
    with pytest.raises(Exception, match="2 shard.*cannot feed 4 readers"):
        loader(urls, workers=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# Training from shards


ARGS = [*sum((["--set", s] for s in TINY), []), "--set", "model.img_size=8", "--set", "model.patch_size=2",
        "--set", "train.batch_size=16", "--set", "train.eval_every=100", "--set", "model.drop_rate=0.1",
        "--set", "data.shuffle_buffer=50"]




@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, digit_shards, workers):
    sigterm_then_resume_matches_an_uninterrupted_run(
        tmp_path, [*ARGS, "--set", f"data.dataset={digit_shards}", "--set", f"data.num_workers={workers}"])


@pytest.mark.slow
def test_killed_after_a_checkpoint_resumes_at_the_next_sample(tmp_path, digit_shards):
    recipe = recipe_file(tmp_path, "train: {steps: 40, checkpoint_every: 20, keep: 5}\n")
    args = [*ARGS, "--set", f"data.dataset={digit_shards}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli("pretrain", str(recipe), "--out", str(full), *args) == 0
    shutil.copytree(full, cut, symlinks=True)  # the same deterministic run, cut short below
    for c in ckpt.step_dirs(cut / "checkpoints"):  # as if killed -9 just after the step-20 checkpoint
        if c.step > 20:
            shutil.rmtree(c.path)
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "last").unlink()
    assert run_cli("pretrain", str(recipe), "--out", str(cut), "--resume", *args) == 0
    assert comparable(cut) == comparable(full)
    a, _ = ckpt.read_weights(full / "checkpoints" / "last" / ckpt.WEIGHTS)
    b, _ = ckpt.read_weights(cut / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_number_of_workers_restarts_the_epoch_and_says_so(tmp_path, digit_shards, capsys):
    recipe = recipe_file(tmp_path, "train: {steps: 30, checkpoint_every: 10, keep: 5}\n")
    args = [*ARGS, "--set", f"data.dataset={digit_shards}"]
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe), "--out", str(run), *args) == 0
    for c in ckpt.step_dirs(run / "checkpoints"):
        if c.step > 10:
            shutil.rmtree(c.path)
    (run / "checkpoints" / "last").unlink()
    saved = run / "recipe.yaml"  # a resumed run keeps its own recipe: edit it, as a user changing workers would
    saved.write_text(saved.read_text().replace("num_workers: 0", "num_workers: 2"))
    capsys.readouterr()
    assert run_cli("pretrain", str(recipe), "--out", str(run), "--resume", *args) == 0
    out = capsys.readouterr().out
    assert "epoch 0 restarts from its first shards" in out, out


def test_eval_on_shards_scores_the_same_images_as_the_map_style_set(tmp_path, digit_shards):
    recipe = recipe_file(tmp_path, "train: {steps: 60}\n")
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe), "--out", str(run), *ARGS, "--set", "data.dataset=digits") == 0
    rows = []
    for dataset in ("digits", str(digit_shards)):
        out = tmp_path / f"pred-{len(rows)}.csv"
        assert run_cli("eval", "--ckpt", str(run), "--dataset", dataset, "--predictions", str(out)) == 0
        lines = out.read_text().splitlines()
        rows.append([line.split(",")[1:] for line in lines])  # the first column names the image: a path or shard:key
    assert len(rows[1]) == 361 and rows[0] == rows[1]  # header + the 360 test digits, predicted alike


def test_a_truncated_training_shard_is_named_or_skipped_and_counted(tmp_path, digit_shards, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in digit_shards.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    tar = broken / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[: 2048 * 40 + 700])
    recipe = recipe_file(tmp_path, "train: {steps: 100}\n")
    args = [*ARGS, "--set", f"data.dataset={broken}"]
    assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "a"), *args) == 2
    err = capsys.readouterr().err
    assert "train-000002.tar" in err and "cut short" in err and "Traceback" not in err
    assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "b"), *args, "--set", "data.bad_images=skip") == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["skipped_images"] >= 1


@pytest.mark.parametrize("dataset, message", [
    ("{tmp}/none-{{000..009}}.tar", "does not exist"),
    ("{tmp}/nothing-*.tar", "matches no file"),
    ("http://127.0.0.1:9/shards/train-{{000..001}}.tar", "cannot be opened|does not exist"),
])
def test_unusable_shard_sources_are_one_clear_message(tmp_path, capsys, dataset, message):
    recipe = recipe_file(tmp_path, "train: {steps: 4}\n")
    source = dataset.format(tmp=tmp_path)
    code = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "r"), *ARGS, "--set", f"data.dataset={source}",
                   "--set", "data.num_samples=100", "--set", "data.eval_split=" + source)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_bench_data_streams_shards(digit_shards, capsys):
    assert run_cli("bench", "--data", str(digit_shards), "--res", "8", "--num-workers", "2", "--steps", "3",
                   "--batch-size", "32", "--json") == 0
    d = json.loads(capsys.readouterr().out)["data"]
    assert d["streamed"] is True and d["num_images"] == 1437 and d["images_per_second"] > 0 and d["num_workers"] == 2


def test_buffer_draws_are_uniform_and_a_function_of_the_count():
    from vitcli.data.sample_stream import draw

    counts = np.bincount([draw(12345, j, 10) for j in range(100_000)], minlength=10)
    assert counts.min() > 9_600 and counts.max() < 10_400  # 4 standard deviations of a fair 10-sided draw
    assert [draw(7, j, 1000) for j in range(5)] == [draw(7, j, 1000) for j in range(5)]


def test_vit_shards_refuses_an_unwritable_destination_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    assert run_cli("shards", "digits", str(blocker / "out")) == 2
    err = capsys.readouterr().err
    assert "a_file" in err and "Traceback" not in err
    assert blocker.read_text() == "in the way"


def test_self_supervised_pretraining_on_shards_scores_few_shot_from_the_first_shards(tmp_path, digit_shards):
    recipe = recipe_file(tmp_path, "train: {steps: 4}\n")
    run = tmp_path / "mae"
    mae = ["--set", "objective.name=mae", "--set", "objective.mae.decoder_dim=32", "--set", "objective.mae.decoder_depth=1",
           "--set", "objective.mae.decoder_heads=4", "--set", "objective.fewshot=[2]"]
    assert run_cli("pretrain", str(recipe), "--out", str(run), *ARGS, "--set", f"data.dataset={digit_shards}", *mae) == 0
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
    assert last["fewshot_2"] > 0.15 and last["num_images"] == 360  # above chance (0.1): 2 labelled images a class were found
