"""What the digits demo scripts share: run the checkout's `vit` and read what a run wrote.

    from vit_runs import ROOT, pretrain, vit       # the scripts run as `python benchmarks/NAME.py`
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIT = str(ROOT / ".venv" / "bin" / "vit")


def vit(*args: str) -> str:
    """`vit ARGS` with its stdout; the script stops with vit's stderr when it fails."""
    proc = subprocess.run([VIT, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"vit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def pretrain(recipe: str | Path, out: Path, sets: list[str]) -> dict:
    """`vit pretrain RECIPE --out OUT --force --set ...`; the run's summary.json."""
    vit("pretrain", str(recipe), "--out", str(out), "--force", *[x for s in sets for x in ("--set", s)])
    return json.loads((out / "summary.json").read_text())


def digits_encoders(root: Path) -> dict[str, Path | None]:
    """The dense-task demos' encoders: name -> pretrained run under `root` (None: random initialisation), the
    quickstart's and recipes/mae_digits.yaml's MAE, each pretrained once (seed 0)."""
    made = {}
    for name, recipe in (("quickstart", "quickstart.yaml"), ("mae_digits", "mae_digits.yaml")):
        run = root / f"encoder-{name}"
        if not (run / "summary.json").exists():
            pretrain(ROOT / "recipes" / recipe, run, [])
        made[name] = run
    return {**made, "random init": None}
