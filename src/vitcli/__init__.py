"""vitcli: pretrain, fine-tune and evaluate Vision Transformers (Dosovitskiy et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "load_model"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import vitcli.errors` / `vit --help` do not pay for importing torch.
    if name in ("create_model", "list_models"):
        from vitcli import models

        return getattr(models, name)
    if name == "load_model":  # vitcli.load_model("timm:vit_small_patch14_reg4_dinov2.lvd142m", num_classes=10)
        from vitcli.models.load import load_model

        return load_model
    raise AttributeError(f"module 'vitcli' has no attribute {name!r}")
