"""One module per foreign checkpoint format, each with its detection and its key map (both ways where
vitcli writes that format): `timm` (vitcli's own names), `hf` (transformers), `npz` (Google JAX)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vitcli.models.formats import hf, npz, timm

FORMATS = ("vitcli", "timm", "hf", "npz", "unknown")


def detect_format(keys: Iterable[str], meta: Mapping[str, Any] | None = None) -> str:
    """Which naming a checkpoint uses: "vitcli" (our metadata), "timm" (our names without it), "hf"
    (transformers), "npz" (Google JAX/Flax, '/'-separated) or "unknown"."""
    keys = list(keys)
    if meta and meta.get("format") == "vitcli":
        return "vitcli"
    for module in (npz, hf, timm):
        if module.detect(keys):
            return module.NAME
    return "unknown"
