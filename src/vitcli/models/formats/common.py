"""What every format's reader shares: wrapper prefixes in front of a model's own names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Prefixes that wrappers add in front of a model's own names: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes shared by every key."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd
