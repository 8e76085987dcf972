"""How `vit predict` writes: a line per image, one JSON array streamed element by element, a CSV file
written under a temporary name and renamed when complete, and a progress bar on a terminal."""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Callable

from vitcli.errors import VitError, path_error
from vitcli.predict.boxes import BoxPrediction
from vitcli.predict.masks import MaskPrediction
from vitcli.predict.run import Prediction


def text_line(row: Prediction | MaskPrediction | BoxPrediction) -> str:
    if isinstance(row, BoxPrediction):  # the objects found, most confident first
        return f"{row.path}  {len(row.objects)} object(s)  " + "  ".join(
            f"{o['label']} {o['score']:.2f} [{', '.join(f'{v:.0f}' for v in o['box'])}]" for o in row.objects[:5])
    if isinstance(row, MaskPrediction):  # the mask written and the largest class areas
        return f"{row.path} -> {row.mask}  " + "  ".join(f"{name} {a:.1%}" for name, a in list(row.areas.items())[:5])
    return f"{row.path}  " + "  ".join(f"{label} {p:.4f}" for label, _, p in row.top)


def as_dict(row: Prediction | MaskPrediction | BoxPrediction) -> dict[str, Any]:
    if isinstance(row, BoxPrediction):
        return {"path": row.path, "objects": row.objects, **({"drawn": row.drawn} if row.drawn else {})}
    if isinstance(row, MaskPrediction):
        return {"path": row.path, "mask": row.mask, "overlay": row.overlay, "areas": row.areas}
    return {"path": row.path, "top": [{"label": label, "index": i, "probability": p} for label, i, p in row.top]}


class JsonArray:
    """`[`, the rows as they come, `]`: one valid JSON array on stdout even for a million images."""

    def __init__(self, stream: IO[str], enabled: bool):
        self.stream, self.enabled, self.count = stream, enabled, 0

    def __enter__(self) -> JsonArray:
        if self.enabled:
            self.stream.write("[")
        return self

    def add(self, row: Prediction | MaskPrediction | BoxPrediction) -> None:
        if self.enabled:
            self.stream.write(("," if self.count else "") + "\n" + json.dumps(as_dict(row)))
            self.stream.flush()
            self.count += 1

    def __exit__(self, *exc) -> bool:
        if self.enabled:
            self.stream.write("\n]\n")
        return False


class CsvRows:
    """path, then label, index and probability for each of the top k; complete or not there at all."""

    def __init__(self, path: Path | None, topk: int):
        self.path, self.topk = path, topk
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}") if path is not None else None
        self.file = self.writer = None

    def __enter__(self) -> CsvRows:
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.tmp, "w", newline="")
            except OSError as e:
                raise path_error(e, self.path, "--csv") from e
            self.writer = csv.writer(self.file)
            self.writer.writerow(["path"] + [f"{col}_{r}" for r in range(1, self.topk + 1)
                                             for col in ("label", "index", "probability")])
        return self

    def add(self, row: Prediction) -> None:
        if self.writer is not None and isinstance(row, BoxPrediction):
            raise VitError("--csv lists classes per image; a detector's boxes come as --json.")
        if self.writer is not None:
            self.writer.writerow([row.path] + [v for label, i, p in row.top for v in (label, i, f"{p:.6f}")])

    def __exit__(self, kind, error, tb) -> bool:
        if self.file is None:
            return False
        self.file.close()
        if kind is not None:  # a failed run leaves no half-written file
            self.tmp.unlink(missing_ok=True)
            return False
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise path_error(e, self.path, "--csv") from e
        return False


@contextlib.contextmanager
def progress_bar(console) -> Iterator[Callable[[int, int], None] | None]:
    """progress(done, total) drawing a rich bar on a terminal (stderr); None elsewhere."""
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("predict", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
