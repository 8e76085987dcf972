"""Vision Transformer models with timm-compatible parameter names, and their registry."""

from vitcli.models.config import ModelConfig, input_channels, input_size
from vitcli.models.registry import (create_model, list_models, model_info, register_model, resolve_config,
                                    resolve_name)
from vitcli.models import variants as _variants  # noqa: F401  (registers the built-in models)
from vitcli.models import families as _families  # noqa: F401  (registers DeiT, DINOv2, SigLIP, CLIP)
from vitcli.models.vit import VisionTransformer

__all__ = [
    "ModelConfig",
    "VisionTransformer",
    "create_model",
    "input_channels",
    "input_size",
    "list_models",
    "model_info",
    "register_model",
    "resolve_config",
    "resolve_name",
]
