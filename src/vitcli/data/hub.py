"""Loading named sets from the Hugging Face Hub, failing fast and clearly when it cannot be reached.

Without a network `datasets` retries for ~20 s before giving up with a low-level error. We decide up
front instead: when offline mode is set or the Hub endpoint does not answer within 2 s, we read the
local HF cache only, and if the set is not there we say what to do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from functools import lru_cache
from typing import Optional

import datasets
import huggingface_hub.constants

from vitcli.data.registry import DatasetSpec
from vitcli.errors import VitError

_TRUE = {"1", "ON", "YES", "TRUE"}
_CHECK_TIMEOUT_S = 2.0


def offline_reason() -> Optional[str]:
    """Why the Hub should not be asked (offline env var, or the endpoint is unreachable), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var} is set; unset it on a connected machine to download"
    if datasets.config.HF_HUB_OFFLINE:
        return "offline mode is on"
    host, port = _endpoint()
    if not _reachable(host, port):
        return f"{host}:{port} cannot be reached (no network?)"
    return None


def _endpoint() -> tuple[str, int]:
    """Host and port to probe: the HTTPS proxy when one is configured, else the Hub endpoint."""
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urllib.parse.urlsplit(proxy or url)
    default_port = 443 if target.scheme == "https" else 80
    return target.hostname or "huggingface.co", target.port or default_port


@lru_cache(maxsize=8)
def _reachable(host: str, port: int) -> bool:
    # A thread bounds the whole check: socket timeouts do not cover DNS resolution, which can hang.
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=_CHECK_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_CHECK_TIMEOUT_S)
    return bool(result and result[0])


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
