"""vitcli: pretrain, fine-tune and evaluate Vision Transformers (Dosovitskiy et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import vitcli.errors` / `vit --help` do not pay for importing torch.
    if name in ("create_model", "list_models"):
        from vitcli import models

        return getattr(models, name)
    raise AttributeError(f"module 'vitcli' has no attribute {name!r}")
