"""vitcli installed from its wheel, used from an empty folder outside the checkout, as a new user would.

The wheel is built from a copy of the files a source distribution holds (pyproject, README, src, recipes)
and installed without -e into a fresh virtual environment. Its dependencies (torch, timm, ...) are
reached through a .pth line to this environment's site-packages, so the test needs no index; a .pth
line does not run the editable install's own hook, so the checkout's vitcli stays invisible.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import vitcli.recipe_files as recipe_files

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the fresh environment's bin folder, the environment variables to run it with)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "recipes", source / "recipes")
    shutil.copytree(ROOT / "src", source / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        cwd=tmp, env=os.environ.copy())
    (wheel,) = wheels.glob("vitcli-*.whl")

    fresh = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    fresh_site = Path(sysconfig.get_path("purelib", vars={"base": str(fresh), "platbase": str(fresh)}))
    (fresh_site / "_vitcli_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)],
        cwd=tmp, env=env)
    return fresh / "bin", env


def test_the_wheel_runs_the_quickstart_and_finetune_from_an_empty_folder(installed, tmp_path):
    bin_dir, env = installed
    where = run([str(bin_dir / "python"), "-c", "import vitcli; print(vitcli.__file__)"], cwd=tmp_path, env=env).stdout
    assert str(bin_dir.parent) in where and str(ROOT) not in where  # the installed copy, not the checkout

    listed = run([str(bin_dir / "vit"), "recipes"], cwd=tmp_path, env=env).stdout
    for name in recipe_files.shipped_names():
        assert name in listed
    shown = run([str(bin_dir / "vit"), "recipes", "show", "quickstart"], cwd=tmp_path, env=env).stdout
    assert shown == (ROOT / "recipes" / "quickstart.yaml").read_text()

    pretrain = run([str(bin_dir / "vit"), "pretrain", "quickstart", "--set", "train.epochs=2", "--out", "runs/q"],
                   cwd=tmp_path, env=env)
    assert "the shipped recipe 'quickstart'" in pretrain.stdout
    assert (tmp_path / "runs" / "q" / "summary.json").is_file()

    # the issue's `vit finetune --ckpt RUN --res 16`; 20 of the recipe's 200 steps show the same thing
    finetune = run([str(bin_dir / "vit"), "finetune", "--ckpt", "runs/q", "--res", "16", "--out", "runs/ft",
                    "--set", "train.steps=20"], cwd=tmp_path, env=env)
    assert "the shipped recipe 'finetune_digits' for digits" in finetune.stdout
    recipe = (tmp_path / "runs" / "ft" / "recipe.yaml").read_text()
    assert "lr: 0.03" in recipe and "label_smoothing: 0.3" in recipe  # finetune_digits.yaml's, not the paper's defaults
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written outside the run directories
