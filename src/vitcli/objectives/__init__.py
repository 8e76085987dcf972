"""Training objectives: modules that turn a batch into `loss, metrics = objective(batch)`.

An objective holds the model (and any trainable parts of its own) so the engine wraps it once with
DDP/FSDP, and says what its evaluations report (`evaluate`, `eval_metrics`, `score`). The engine knows
nothing else about it. `supervised` (Classification) is the paper's; `mpp` (the paper's masked patch
prediction, §4.6) and `mae` (masked autoencoder) need no labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitcli.errors import VitError
from vitcli.objectives.base import Objective
from vitcli.objectives.evaluate import ECE_BINS, EvalAccumulator, evaluate
from vitcli.objectives.fewshot import FewshotSet
from vitcli.objectives.mae import MaskedAutoencoder
from vitcli.objectives.mpp import MaskedPatchPrediction
from vitcli.objectives.selfsup import SelfSupervised
from vitcli.objectives.supervised import Classification
from vitcli.recipe import ObjectiveCfg

MAX_MPP_OUTPUTS = 2 ** 16

__all__ = ["ECE_BINS", "OBJECTIVES", "Classification", "EvalAccumulator", "FewshotSet", "MaskedAutoencoder",
           "MaskedPatchPrediction", "Objective", "SelfSupervised", "build_objective", "evaluate"]


@dataclass(frozen=True)
class Inputs:
    """What a builder may use besides the recipe's objective section and the model."""

    criterion: nn.Module | None
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fewshot: FewshotSet | None


def build_objective(cfg: ObjectiveCfg, model: nn.Module, *, criterion: nn.Module | None = None, num_classes: int = 0,
                    mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                    fewshot: FewshotSet | None = None) -> Objective:
    """The recipe's objective around `model` (by its name in OBJECTIVES); VitError when the model cannot serve it."""
    if cfg.name not in OBJECTIVES:
        raise VitError(f"objective {cfg.name!r} is not one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[cfg.name](cfg, model, Inputs(criterion, num_classes, tuple(mean), tuple(std), fewshot))


def _classification(cfg: ObjectiveCfg, model: nn.Module, given: Inputs) -> Objective:
    return Classification(model, given.criterion if given.criterion is not None else nn.CrossEntropyLoss(), given.num_classes)


def _patch_size(cfg: ObjectiveCfg, model: nn.Module) -> int:
    """The pixel patch size of a plain ViT that takes masked patch tokens; VitError for any other model."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(embed, "proj") or getattr(getattr(model, "config", None), "hybrid", False):
        raise VitError(f"objective {cfg.name} masks patches of pixels, so it needs a plain ViT; "
                       f"{getattr(model.config, 'name', 'this model')} embeds CNN features. Choose a vit_* model.")
    if not hasattr(model, "encode_patches"):
        raise VitError(f"objective {cfg.name} feeds the encoder masked patch tokens, which vitcli's rotary-embedding "
                       f"ViTs ({model.config.name}) do not take yet; pretrain a vit_* model, or fine-tune this one")
    return embed.patch_size[0]


def _mae(cfg: ObjectiveCfg, model: nn.Module, given: Inputs) -> Objective:
    _patch_size(cfg, model)
    if cfg.decoder_dim % 4:
        raise VitError(f"'objective.decoder_dim' ({cfg.decoder_dim}) must be divisible by 4: the decoder's 2D "
                       "sine-cosine position embeddings split it into 4 parts.")
    return MaskedAutoencoder(model, mask_ratio=cfg.ratio, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                             decoder_heads=cfg.decoder_heads, norm_pix_loss=cfg.norm_pix_loss, fewshot=given.fewshot)


def _mpp(cfg: ObjectiveCfg, model: nn.Module, given: Inputs) -> Objective:
    patch = _patch_size(cfg, model)
    channels = model.patch_embed.in_chans
    if cfg.mpp_target == "downsized" and patch % 4:
        raise VitError(f"'objective.mpp_target' downsized predicts each patch's 4x4 downsized colours, which needs a "
                       f"patch size divisible by 4; this model's patches are {patch}x{patch}. Use mean_color or "
                       "pixels, or a model with patches of 4, 8, 16 ...")
    classes = 2 ** (cfg.mpp_bits * channels) * (16 if cfg.mpp_target == "downsized" else 1)
    if cfg.mpp_target != "pixels" and classes > MAX_MPP_OUTPUTS:
        raise VitError(f"'objective.mpp_bits' {cfg.mpp_bits} on {channels} channels gives {classes:,} outputs per "
                       f"patch (at most {MAX_MPP_OUTPUTS:,}); the paper's 3 bits give 512 colours.")
    return MaskedPatchPrediction(model, mean=given.mean, std=given.std, mask_ratio=cfg.ratio, target=cfg.mpp_target,
                                 bits=cfg.mpp_bits, replace=tuple(cfg.mpp_replace), fewshot=given.fewshot)


# The one registry of objectives, shared by `vit pretrain` (engine.setup) and `vit bench --objective`.
OBJECTIVES: dict[str, Callable[[ObjectiveCfg, nn.Module, Inputs], Objective]] = {
    "supervised": _classification,
    "mpp": _mpp,
    "mae": _mae,
}
