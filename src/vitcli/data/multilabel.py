"""Multi-label data: images with any number of classes each.

A set is multi-label when its label column is a `Sequence(ClassLabel)` (the Hugging Face schema), or a
folder of images comes with a labels file (`data.labels`):
- CSV: rows `path,labels` with the labels separated by `;` (a header row `path,labels` is optional);
- JSON: a list of {"path": ..., "labels": [...]} or a mapping {path: [labels]}.
Paths are relative to the folder. Class names are the sorted union of the labels. Batches carry multi-hot
float targets (batch, classes) instead of class ids.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np

from vitcli.errors import VitError, path_error

SEPARATOR = ";"


def is_multilabel(feature) -> bool:
    """Whether a label column's feature holds several classes per image."""
    return isinstance(feature, (datasets.Sequence, list)) or isinstance(getattr(feature, "feature", None), datasets.ClassLabel)


def read_label_file(path: Path) -> dict[str, list[str]]:
    """{relative image path: [label, ...]} from a CSV or JSON labels file; VitError naming what is wrong."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise path_error(e, path, "data.labels file", reading=True) from e
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise VitError(f"data.labels {path} is not valid JSON ({e}).") from e
        if isinstance(raw, dict):
            rows = raw.items()
        elif isinstance(raw, list) and all(isinstance(r, dict) and "path" in r and "labels" in r for r in raw):
            rows = [(r["path"], r["labels"]) for r in raw]
        else:
            raise VitError(f"data.labels {path}: expected a list of {{\"path\": ..., \"labels\": [...]}} or a mapping "
                           "{path: [labels]}.")
        out = {}
        for image, labels in rows:
            if not isinstance(labels, list):
                raise VitError(f"data.labels {path}: the labels of {image} must be a list, got {labels!r}.")
            out[str(image)] = [str(label) for label in labels]
        return out
    if path.suffix.lower() != ".csv":
        raise VitError(f"data.labels {path.name}: use a .csv (rows path,labels with labels separated by ';') or a .json file.")
    out = {}
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "labels"]):
            continue
        if len(row) != 2:
            raise VitError(f"data.labels {path}, line {n}: expected 2 fields (path,labels), got {len(row)}: {row}.")
        out[row[0].strip()] = [label.strip() for label in row[1].split(SEPARATOR) if label.strip()]
    return out


def labelled_folder(folder: Path, label_file: str) -> dict[str, datasets.Dataset]:
    """A folder's images with the labels file's classes: {"train": Dataset(image, label: Sequence(ClassLabel))}."""
    rows = read_label_file(Path(label_file))
    if not rows:
        raise VitError(f"data.labels {label_file} lists no images.")
    missing = [p for p in rows if not (folder / p).is_file()]
    if missing:
        raise VitError(f"data.labels {label_file} names {len(missing)} image(s) that are not in {folder}, e.g. "
                       f"{missing[0]}. Paths in the file are relative to data.dataset.")
    names = sorted({label for labels in rows.values() for label in labels})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Sequence(datasets.ClassLabel(names=names))})
    index = {name: i for i, name in enumerate(names)}
    table = {"image": [str(folder / p) for p in rows], "label": [[index[label] for label in labels] for labels in rows.values()]}
    return {"train": datasets.Dataset.from_dict(table, features=features)}


def multi_hot(rows: list[list[int]], num_classes: int) -> list[list[float]]:
    """Class-id lists -> multi-hot rows."""
    out = np.zeros((len(rows), num_classes), dtype=np.float32)
    for i, ids in enumerate(rows):
        out[i, list(ids)] = 1.0
    return out.tolist()
