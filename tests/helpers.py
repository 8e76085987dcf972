"""What many test modules share: the CLI run in-process, tiny recipes and runs, reading a run back,
small checkpoints and images. Fixtures live in conftest.py; the offline setting too (offline_env
is its copy for module-scoped fixtures, which run outside a test's own monkeypatch)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vitcli.cli import main
from vitcli.data import ImageSet, TransformSpec, build_transform
from vitcli.models import create_model
from vitcli.models.adapt import meta_for_model, model_from_checkpoint, save_state_dict

REPO = Path(__file__).resolve().parents[1]


TINY = [
    "model.name=vit_pico",
    "model.img_size=16",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "data.num_workers=0",
    "data.hflip=0.0",
    "optim.lr=1e-3",
    "schedule.warmup_steps=2",
    "train.batch_size=8",
    "train.log_every=1",
]


def run_cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@contextlib.contextmanager
def offline_env():
    """The per-test offline setting of conftest, for module-scoped fixtures (which run outside it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield mp


def recipe_file(tmp_path: Path, body: str = "train: {steps: 6}\n") -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text("# a tiny test recipe\n" + body)
    return p


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


ARGS = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=256",
        "--set", "data.eval_subset=40", "--set", "model.img_size=8", "--set", "model.patch_size=2",
        "--set", "train.batch_size=16", "--set", "train.eval_every=100", "--set", "model.drop_rate=0.1"]


def comparable(run: Path) -> list[dict]:
    drop = ("time", "images_per_second", "wall_seconds", "path")
    return [{k: v for k, v in e.items() if k not in drop} for e in read_metrics(run) if e["kind"] in ("train", "eval")]


def train_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}") and '"kind": "train"' in line]
    return max(steps, default=0)


def start_training(recipe: Path, run: Path, args: list[str], *, until_step: int, **popen) -> subprocess.Popen:
    """`vit pretrain` in a subprocess, returned once metrics.jsonl shows `until_step` (or it ended)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen([sys.executable, "-m", "vitcli", "pretrain", str(recipe), "--out", str(run), *args], **popen)
    deadline = time.time() + 120
    while train_steps(run) < until_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return proc


def make_ckpt(path: Path, num_classes: int = 10, dataset: str | None = "digits", seed: int = 0, **meta) -> Path:
    torch.manual_seed(seed)
    model = create_model("vit_pico", num_classes=num_classes)
    base = {"dataset": dataset, **meta} if dataset else dict(meta)
    return save_state_dict(path, model.state_dict(), meta_for_model(model, base))


def coordinate_image(w: int, h: int) -> np.ndarray:
    """R encodes x, G encodes y: any difference in crop box or flip shows up in the pixels."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def image_set(cells: list[dict], name: str = "coords") -> ImageSet:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": cells, "label": [i % 2 for i in range(len(cells))]}, features=features)
    return ImageSet(ds, 2, ["a", "b"], name, "train")


def rotated_jpeg(array: np.ndarray, orientation: int = 6) -> bytes:
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(array, "JPEG", exif=exif.tobytes(), quality=95)


SETS = [x for s in TINY for x in ("--set", s)]


DIGITS = [*SETS, "--set", "data.dataset=digits", "--set", "data.train_subset=96", "--set", "data.eval_subset=40",
          "--set", "model.img_size=8", "--set", "model.patch_size=2"]


def by_hand(ckpt: Path, files: list[Path]) -> torch.Tensor:
    """The checkpoint's logits on files through its own eval transform, one image at a time."""
    model, ck = model_from_checkpoint(ckpt)
    tf = build_transform(TransformSpec.from_checkpoint(ck.meta), (8, 8), train=False)
    with torch.no_grad():
        return model.eval()(torch.stack([tf(Image.open(f)) for f in files]))


def take(batches, n):
    out = []
    for images, labels in batches:
        out.append((images.clone(), labels.clone()))
        if len(out) == n:
            break
    return out


def sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, args: list[str], recipe: Path | None = None, *,
                                                    steps: int = 120, cut_at: int = 30) -> list[dict]:
    """SIGTERM at step `cut_at` of `steps` (30 of 120, 89 steps an epoch: mid-epoch), resume; the metrics equal a
    run left alone (returned). `recipe`: one that says train.steps = `steps` (default: the tiny one)."""
    recipe = recipe or recipe_file(tmp_path, f"train: {{steps: {steps}}}\n")
    cut = tmp_path / "cut"
    proc = start_training(recipe, cut, args, until_step=cut_at)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert cut_at <= train_steps(cut) < steps
    assert run_cli("pretrain", str(recipe), "--out", str(cut), "--resume", *args) == 0
    full = tmp_path / "full"
    assert run_cli("pretrain", str(recipe), "--out", str(full), *args) == 0
    assert comparable(cut) == comparable(full)
    return comparable(full)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def lay_out_cache(cache, repo: str, files: dict) -> None:
    """A Hugging Face hub cache entry as huggingface_hub writes it: refs/main -> snapshots/<commit>/files."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(snap / name)


def write_coco_digits(root: Path, category_ids: list[int], *, masks: bool = False,
                      counts: tuple[tuple[str, int], ...] = (("train", 32), ("val", 8))) -> Path:
    """A COCO folder (annotations/instances_{split}.json over SPLIT/SPLIT_NNN.png, image ids 100 + i) of the
    first digits-det canvases of each split; digit c is category_ids[c]. With `masks`, each annotation carries
    the digit's ink as compressed RLE."""
    from vitcli.data import builtin

    splits = builtin.digits_det_splits()
    for split, count in counts:
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for i, row in enumerate(splits[split].select(range(count))):
            name = f"{split}_{i:03d}.png"
            row["image"].save(root / split / name)
            images.append({"id": 100 + i, "file_name": name, "width": 64, "height": 64})
            o = row["objects"]
            for box, category, rle in zip(o["bbox"], o["category"], o["segmentation"]):
                annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": category_ids[category],
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                                    **({"segmentation": {"size": [64, 64], "counts": rle}} if masks else {})})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations,
             "categories": [{"id": c, "name": str(d)} for d, c in enumerate(category_ids)]}))
    return root
