"""Whether the Hugging Face Hub can be asked now: one rule for data sets and for weights (timm:<name>).

Without a network, `datasets` and `huggingface_hub` retry for ~20 s before failing with a low-level
error. We decide up front instead: the Hub is offline when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is
set, or when a TCP connection to the endpoint (through the HTTPS proxy when one is configured) does
not open within 2 s, DNS included.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from functools import lru_cache

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
CHECK_TIMEOUT_S = 2.0


def offline_reason(library_offline: bool = False) -> str | None:
    """Why the Hub should not be asked (an offline variable is set, the calling library's own offline
    mode is on, or the Hub cannot be reached), or None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var} is set; unset it on a connected machine to download"
    if library_offline:
        return "offline mode is on"
    host, port = endpoint()
    if not reachable(host, port):
        return f"{host}:{port} cannot be reached (no network?)"
    return None


def endpoint() -> tuple[str, int]:
    """Host and port to probe: the HTTPS proxy when one is configured, else the Hub endpoint."""
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urllib.parse.urlsplit(proxy or url)
    default_port = 443 if target.scheme == "https" else 80
    return target.hostname or "huggingface.co", target.port or default_port


@lru_cache(maxsize=8)
def reachable(host: str, port: int) -> bool:
    # A thread bounds the whole check: socket timeouts do not cover DNS resolution, which can hang.
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=CHECK_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(CHECK_TIMEOUT_S)
    return bool(result and result[0])
