"""Indexing a local image folder with `datasets`' imagefolder builder, in vitcli's words.

`datasets` prints its own bars while it indexes a folder ("Downloading data: 61/61 files", "Generating
train split"), although nothing is downloaded. Here they are silenced and replaced by one line,
"indexing 1,797 images in FOLDER", plus a transient progress bar on a terminal when indexing takes
more than a second. A failure to write the datasets cache becomes one clear message. (Hub downloads
keep `datasets`' own bars: those are real downloads.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import datasets
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from vitcli.errors import FULL, VitError, path_error

SHOW_BAR_AFTER_S = 1.0


def count_images(folder: Path) -> int:
    """Files the imagefolder builder takes as images (by extension), below folder."""
    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    return sum(
        1 for _, _, files in os.walk(folder) for name in files if os.path.splitext(name)[1].lower() in extensions
    )


@contextlib.contextmanager
def quiet_bars() -> Iterator[None]:
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _bar_when_slow(text: str) -> Iterator[None]:
    """A transient, indeterminate rich progress bar on a terminal, shown once indexing outlasts 1 s."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(text), BarColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    progress.add_task("index", total=None)
    timer = threading.Timer(SHOW_BAR_AFTER_S, progress.start)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        progress.stop()


def _in_cache(filename: Optional[str]) -> bool:
    if not filename:
        return False
    cache = Path(datasets.config.HF_DATASETS_CACHE).expanduser().absolute()
    target = Path(filename).expanduser().absolute()
    return target == cache or cache in target.parents


def index_folder(path: Path, config: Optional[str], say: Optional[Callable[[str], object]] = None) -> datasets.DatasetDict:
    """datasets.load_dataset(folder) with vitcli's line instead of datasets' bars; VitError on failure."""
    text = f"indexing {count_images(path):,} images in {path}"
    if say is not None:
        say(text)
    try:
        with quiet_bars(), _bar_when_slow(text):
            return datasets.load_dataset(str(path), config)
    except Exception as e:  # noqa: BLE001
        cause = _os_error(e)  # datasets wraps a writer's OSError (a full cache disk) in DatasetGenerationError
        if cause is not None and (_in_cache(cause.filename) or cause.errno in FULL):
            error = path_error(cause, cause.filename or datasets.config.HF_DATASETS_CACHE, "the Hugging Face datasets cache")
            error.args = (f"{error} The cache folder is {datasets.config.HF_DATASETS_CACHE}: set HF_DATASETS_CACHE "
                          "to a writable folder with free space.",)
            raise error from e
        if isinstance(e, OSError) and e.errno is not None:  # the system refused a file (permissions, a vanished disk ...)
            raise path_error(e, e.filename or path, "data set", reading=True) from e
        raise _no_images(path, e) from e  # datasets' own FileNotFoundError: no data files there


def _os_error(e: BaseException) -> OSError | None:
    """The OSError e is, or was raised from (through __cause__ / __context__)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _no_images(path: Path, e: Exception) -> VitError:
    return VitError(
        f"No images could be read from '{path}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
        "Expected one sub-folder of images per class (optionally inside train/ and test/ or val/), "
        "or a directory written by save_to_disk."
    )
