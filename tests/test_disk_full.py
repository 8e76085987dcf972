"""A disk that fills up: every write stops with one message (exit 2), leaves nothing half-written behind,
and a training run resumed after space is freed ends exactly as an uninterrupted one.

Two ways to fill a disk:
- a real one: a tmpfs of a few MB mounted for the run (root only; skipped with the reason elsewhere);
- a write wrapper: `open` patched so that one file's writes raise ENOSPC at a chosen byte, having written
  the bytes before it, as a kernel does.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from helpers import comparable, offline_env, run_cli
from vitcli.io.checkpoint import newest_loadable

pytestmark = pytest.mark.slow

RUN = ["pretrain", "quickstart", "--set", "train.epochs=4", "--set", "data.num_workers=0"]  # 88 steps, eval every 22


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` at path; the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here ({mounted.stderr.strip() or 'mount failed'}); "
                    "the write-wrapper tests cover the same paths")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    with offline_env():
        assert run_cli(*RUN, "--out", str(run)) == 0
    return run


def summary(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {k: s[k] for k in ("best_top1", "final_top1", "final_top5", "steps")}


def assert_intact(run: Path) -> None:
    """What a full disk may leave: whole checkpoints (the newest loads) and whole metrics lines, except a
    last one cut short, which the resume drops."""
    assert not list((run / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"
    assert newest_loadable(run / "checkpoints", warn=pytest.fail) is not None
    lines = (run / "metrics.jsonl").read_text().splitlines()
    for line in lines[:-1]:
        json.loads(line)


def resume_command(stderr: str) -> list[str]:
    """The command the error message gives, as arguments of `python -m vitcli`."""
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stderr
    command = shlex.split(stderr.split("then resume: ", 1)[1].strip())
    assert command[0] == "vit" and "--resume" in command
    return command[1:]


def test_a_checkpoint_on_a_full_disk_stops_resumably_and_resumes_exactly(tmp_path, uninterrupted, capsys):
    with tmpfs(tmp_path / "disk", "6m") as disk:
        run = disk / "run"
        assert run_cli(*RUN, "--out", str(run)) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "checkpoint of step" in err and "the disk is full" in err and "needs about" in err and "MB are free" in err
        assert "The last complete checkpoint (step-" in err
        assert_intact(run)
        assert not (run / "summary.json").exists()

        grow(disk, "64m")  # space freed
        assert run_cli(*resume_command(err)) == 0
        assert comparable(run) == comparable(uninterrupted)
        assert summary(run) == summary(uninterrupted)


class FillsAt:
    """`open` for writing whose file named `name` takes `at` bytes in all, then raises ENOSPC (once)."""

    def __init__(self, name: str, at: int):
        self.name, self.at, self.fired = name, at, False
        self.real = builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        f = self.real(file, mode, *args, **kwargs)
        if self.fired or not isinstance(file, (str, Path)) or not any(m in mode for m in "wax") or not self.name_matches(file):
            return f
        return _Filling(f, self)

    def name_matches(self, file) -> bool:
        name = Path(file).name
        return name == self.name or name.startswith(f".{Path(self.name).stem}.tmp-")  # atomic_write's temporary name


class _Filling(io.IOBase):
    def __init__(self, f, disk: FillsAt):
        self.f, self.disk = f, disk

    def write(self, data):
        room = self.disk.at - self.f.tell()
        if len(data) <= room:
            return self.f.write(data)
        self.f.write(data[:max(room, 0)])
        self.f.flush()
        self.disk.fired = True
        raise OSError(errno.ENOSPC, "No space left on device", self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def close(self):
        self.f.close()


@pytest.mark.parametrize("name, at", [
    ("metrics.jsonl", 1_200),   # mid-line, a few evaluations in (the whole file: ~2 kB)
    ("state.pt", 50_000),       # inside the first checkpoint's training state (torch's zip writer)
    ("summary.json", 20),       # the last write of a run
])
def test_a_write_that_fills_the_disk_stops_resumably_and_resumes_exactly(tmp_path, uninterrupted, monkeypatch, capsys, name, at):
    run = tmp_path / "run"
    disk = FillsAt(name, at)
    with monkeypatch.context() as mp:
        mp.setattr(builtins, "open", disk)
        mp.setattr(io, "open", disk)
        assert run_cli(*RUN, "--out", str(run)) == 2
    assert disk.fired
    err = " ".join(capsys.readouterr().err.split())
    assert "the disk is full" in err and "Training stopped at step" in err and "needs about" in err
    if name == "metrics.jsonl":
        assert (run / "metrics.jsonl").stat().st_size == at  # the line was cut where the disk filled
        with pytest.raises(json.JSONDecodeError):
            json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    if name == "state.pt":
        assert "No checkpoint was written yet" in err and not list((run / "checkpoints").glob("*"))
    else:
        assert_intact(run)

    assert run_cli(*resume_command(err)) == 0
    out = capsys.readouterr().out
    assert ("Dropped 1 half-written line" in out) == (name == "metrics.jsonl")
    assert comparable(run) == comparable(uninterrupted)
    assert summary(run) == summary(uninterrupted)


def test_a_full_datasets_cache_is_one_message_and_no_run(tmp_path, monkeypatch, capsys):
    import datasets
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(400):
            Image.fromarray(np.full((8, 8, 3), 40 + 150 * c, np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    with tmpfs(tmp_path / "cache", "16k") as cache:
        monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        assert run_cli(*RUN, "--set", f"data.dataset={folder}", "--out", str(tmp_path / "run")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the Hugging Face datasets cache" in err and "the disk is full" in err and "HF_DATASETS_CACHE" in err
    assert not (tmp_path / "run").exists()


def test_vit_shards_on_a_full_disk_leaves_no_shard_behind(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "300k") as disk:
        assert run_cli("shards", "digits", str(disk / "shards"), "--samples-per-shard", "100") == 2
        assert not list((disk / "shards").iterdir())  # no .partial, no whole shards without their index
    assert "the shards" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, out", [("vitcli", "m.safetensors"), ("timm", "timm"), ("hf", "hf"),
                                      ("exported-program", "m.pt2"), ("onnx", "m.onnx")])
def test_vit_export_on_a_full_disk_leaves_nothing_behind(tmp_path, uninterrupted, capsys, fmt, out):
    with tmpfs(tmp_path / "disk", "100k") as disk:
        assert run_cli("export", "--ckpt", str(uninterrupted), "--format", fmt, "--out", str(disk / out)) == 2
        assert not list(disk.iterdir())
    err = " ".join(capsys.readouterr().err.split())
    assert f"--out {disk / out}" in err and "the disk is full" in err
