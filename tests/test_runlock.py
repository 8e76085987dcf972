"""One training process per run directory (an OS file lock): a second one is refused untouched, a killed one
leaves no stale lock, and the reading commands work on a run while it trains."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from vitcli.errors import VitError
from vitcli.io.runlock import LOCK_FILE, RunLock

from helpers import ARGS, recipe_file, run_cli, start_training, train_steps


def test_a_second_lock_on_a_locked_directory_names_the_holder_and_release_frees_it(tmp_path):
    run = tmp_path / "run"
    first = RunLock.acquire(run)
    with pytest.raises(VitError, match=rf"in use: another process trains in it \(pid {os.getpid()} on "
                                       rf"{socket.gethostname()}, started "):
        RunLock.acquire(run)  # a second open file description, as another process would hold
    first.release()
    RunLock.acquire(run).release()
    assert run.is_dir()  # a normal release keeps the directory


def test_an_aborted_start_removes_the_directory_it_created_and_nothing_else(tmp_path):
    new = tmp_path / "new"
    RunLock.acquire(new).release(aborted=True)
    assert not new.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    RunLock.acquire(kept).release(aborted=True)
    assert (kept / "notes.txt").exists()


def test_a_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    run = tmp_path / "bad"
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(run), *ARGS, "--set", "data.dataset=nope") == 2
    assert not run.exists()


@pytest.mark.slow
def test_two_trainings_on_one_directory_the_second_is_refused_then_kill_9_then_resume(tmp_path, capsys):
    recipe = recipe_file(tmp_path, "train: {steps: 2000}\n")
    run = tmp_path / "run"
    args = [*ARGS, "--set", "train.checkpoint_every=5"]
    first = start_training(recipe, run, args, until_step=10, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert first.poll() is None, "the first training ended before the test could race it"
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
        before = (run / "metrics.jsonl").read_text()
        capsys.readouterr()
        # the same command again (a re-submitted job) and a --resume both stop before touching anything
        for extra in ([], ["--resume"]):
            assert run_cli("pretrain", str(recipe), "--out", str(run), *args, *extra) == 2
            err = capsys.readouterr().err
            assert f"pid {first.pid} on {socket.gethostname()}" in err and "Traceback" not in err
        assert (run / "metrics.jsonl").read_text().startswith(before)  # only the first process writes

        # reading commands work while it trains
        assert (run / "checkpoints" / "last").exists()
        assert run_cli("eval", "--ckpt", str(run), "--json") == 0
        assert json.loads(capsys.readouterr().out)["num_images"] > 0
        assert run_cli("plot", str(run), "--out", str(tmp_path / "curves.png")) == 0
        assert run_cli("export", "--ckpt", str(run), "--format", "vitcli", "--out", str(tmp_path / "w.safetensors")) == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    stopped_at = train_steps(run)
    # kill -9 leaves no stale lock (the kernel dropped it with the process): a restart trains on
    again = start_training(recipe, run, [*args, "--resume"], until_step=stopped_at + 3, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        assert again.poll() is None and train_steps(run) >= stopped_at + 3
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == again.pid
    finally:
        again.send_signal(signal.SIGKILL)
        again.wait(timeout=60)
