"""Vision Transformer models with timm-compatible parameter names, and their registry."""

from vitcli.models.config import ModelConfig
from vitcli.models.registry import (create_model, list_models, model_info, register_model, resolve_config,
                                    resolve_name)
from vitcli.models import variants as _variants  # noqa: F401  (registers the built-in models)
from vitcli.models.vit import VisionTransformer

__all__ = [
    "ModelConfig",
    "VisionTransformer",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "resolve_config",
    "resolve_name",
]
