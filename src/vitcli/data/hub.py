"""Loading named sets from the Hugging Face Hub, failing fast and clearly when it cannot be reached.

When the Hub is offline (vitcli.io.hub: an offline variable, or no answer within 2 s) we read the
local HF cache only, and if the set is not there we say what to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import datasets
import huggingface_hub.constants

from vitcli.data.registry import DatasetSpec
from vitcli.errors import VitError
from vitcli.io import hub as hub_check


def offline_reason() -> Optional[str]:
    """Why the Hub should not be asked (vitcli.io.hub's rule, with datasets' own offline mode), or None."""
    return hub_check.offline_reason(library_offline=datasets.config.HF_HUB_OFFLINE)


@contextlib.contextmanager
def forced_offline() -> Iterator[None]:
    """Make datasets / huggingface_hub use only the local cache, whatever the env said at import."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def local_copy_hint(spec: DatasetSpec) -> str:
    cols = f"'{spec.image_column}' / '{spec.label_column}' columns"
    return (
        f"To use a local copy instead: `--data-dir PATH` (data.data_dir) for a copy with the Hub schema ({cols}: "
        f"a save_to_disk directory, a downloaded snapshot of {spec.hub_id}, or an image folder), "
        "`--dataset PATH` (data.dataset) for any image folder or save_to_disk directory, or put the set in the "
        "HF cache (~/.cache/huggingface) on a connected machine and run with HF_DATASETS_OFFLINE=1."
    )


def load_hub_split(spec: DatasetSpec, split: str) -> datasets.Dataset:
    """datasets.load_dataset(spec.hub_id, spec.config, split=split), with every failure a VitError."""
    assert spec.hub_id is not None
    reason = offline_reason()
    context = forced_offline() if reason else contextlib.nullcontext()
    try:
        with context:
            return datasets.load_dataset(spec.hub_id, spec.config, split=split)
    except Exception as e:  # noqa: BLE001 -- every Hub failure becomes one clear message
        raise _explain(e, spec, split, reason) from e


def stream_hub_split(spec: DatasetSpec, split: str) -> datasets.IterableDataset:
    """datasets.load_dataset(..., streaming=True): needs the Hub (a stream reads no local cache)."""
    assert spec.hub_id is not None
    reason = offline_reason()
    if reason:
        raise VitError(f"Data set '{spec.name}' cannot be streamed: the Hub is offline ({reason}), and a stream reads "
                       f"the Hub, not the local cache. Drop data.streaming to read a cached copy. {local_copy_hint(spec)}")
    try:
        return datasets.load_dataset(spec.hub_id, spec.config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 -- every Hub failure becomes one clear message
        raise _explain(e, spec, split, None) from e


def _explain(e: Exception, spec: DatasetSpec, split: str, offline: Optional[str]) -> VitError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"Data set '{spec.name}' ({spec.hub_id}{', ' + spec.config if spec.config else ''})"
    if isinstance(e, ValueError) and "split" in text.lower():
        return VitError(
            f"{where} has no split '{split}': {text} Pick one with --set data.train_split=... / data.eval_split=..."
        )
    login = ""
    if spec.gated:
        login = "Accept its licence on huggingface.co, then `huggingface-cli login` (or set HF_TOKEN). "
    if offline:
        return VitError(
            f"{where} cannot be loaded: the Hub is offline ({offline}) and the set is not in the local HF cache. "
            f"{login}{local_copy_hint(spec)}"
        )
    if "gated" in text.lower() or "authenticat" in text.lower() or "401" in text:
        return VitError(
            f"{where} is gated: accept its licence on huggingface.co, then `huggingface-cli login` or set HF_TOKEN. "
            f"({text}) {local_copy_hint(spec)}"
        )
    if isinstance(e, ConnectionError) or "connect" in text.lower() or "timed out" in text.lower():
        return VitError(f"{where} could not be downloaded ({text}). Check the network. {login}{local_copy_hint(spec)}")
    return VitError(f"{where} could not be loaded: {type(e).__name__}: {text} {login}{local_copy_hint(spec)}")
