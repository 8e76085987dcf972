"""A checkpoint made to fit a new resolution, patch size or class count, the model built from it, and
what is written back.

    model, ck = model_from_checkpoint("timm:vit_small_patch14_reg4_dinov2.lvd142m", img_size=224, num_classes=10)
    save_state_dict("s14-224.safetensors", model.state_dict(), meta_for_model(model, ck.meta))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError, few_keys
from vitcli.io.checkpoint import save_weights
from vitcli.io.meta import CheckpointMeta
from vitcli.io.paths import atomic_write, writable_file
from vitcli.models.infer import ARCH_KEYS
from vitcli.models.load import LoadedCheckpoint, load_checkpoint
from vitcli.models.posemb import MODES, resample_pos_embed, resize_patch_embed
from vitcli.models.readers import TORCH_SUFFIXES
from vitcli.models.timm_classifier import TimmClassifierConfig, is_timm_classifier, load_timm_weights, needs_vit

_SPECIAL = ("img_size", "patch_size", "num_classes")
HEADS = ("head.", "head_dist.")  # a distilled model's two heads are replaced together


def meta_for_model(model: nn.Module, base: CheckpointMeta | Mapping[str, Any] | None = None,
                   **training: Any) -> CheckpointMeta:
    """vitcli checkpoint metadata describing `model` (its ModelConfig), keeping base's preprocessing, class
    names and provenance (a CheckpointMeta, or a dict in the on-disk layout: {"dataset": "digits", "mean":
    [...]}); `training` entries (step, top1 ...) are added to what base recorded."""
    if isinstance(base, Mapping):
        base = CheckpointMeta.from_dict(base)
    from vitcli.models.task_models import task_meta

    dense = task_meta(model, base, **training)  # a Segmenter or Detector: its encoder's description and its head's
    if dense is not None:
        return dense
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise VitError("the model has no config; build it with vitcli.models.create_model")
    d = cfg.to_dict()
    names = base.class_names if base is not None else None
    if names is not None and len(names) != cfg.num_classes:
        names = None  # the head changed: the old names no longer apply
    args = cfg.checkpoint_args() if isinstance(cfg, TimmClassifierConfig) else {k: d[k] for k in ARCH_KEYS}
    return CheckpointMeta(
        model=cfg.name, model_args=args, num_classes=cfg.num_classes,
        img_size=list(cfg.img_size), preprocess=base.preprocess if base else None, class_names=names,
        format="vitcli", dataset=base.dataset if base else None, data_dir=base.data_dir if base else None,
        objective=base.objective if base else None, task=base.task if base else None, training={**(base.training if base else {}), **training})


def _split_overrides(img_size, patch_size, num_classes, model_args) -> tuple[dict[str, Any], dict[str, Any]]:
    extra = dict(model_args or {})
    new = {k: extra.pop(k) for k in _SPECIAL if k in extra}
    for k, v in (("img_size", img_size), ("patch_size", patch_size), ("num_classes", num_classes)):
        if v is not None:
            new[k] = v
    return new, extra


def adapt_checkpoint(ck: LoadedCheckpoint | str | Path, *, img_size: int | tuple[int, int] | None = None,
                     patch_size: int | None = None, num_classes: int | None = None,
                     interpolation: str = "bicubic", model_args: Mapping[str, Any] | None = None,
                     ) -> LoadedCheckpoint:
    """A copy of the checkpoint for another resolution, patch size or class count, keys unchanged.

    - img_size: position embeddings 2D-resampled to the new grid; the slots of prefix tokens (class,
      distillation, registers) are kept as they are (paper §3.2).
    - patch_size: patch-embedding kernel PI-resized (FlexiViT) and the grid recomputed.
    - num_classes: head (and a distilled model's head_dist) replaced by zero-initialised ones (paper §3.2).
    `model_args` are further create_model overrides (e.g. num_heads for a bare file).
    """
    if not isinstance(ck, LoadedCheckpoint):
        ck = load_checkpoint(ck)
    if is_timm_classifier(ck.meta.model):
        raise needs_vit("Resampling position embeddings or patches", ck.meta.model)
    if interpolation not in MODES:
        raise VitError(f"interpolation must be one of {', '.join(MODES)}, got {interpolation!r}")
    from vitcli.models.registry import resolve_config

    new, extra = _split_overrides(img_size, patch_size, num_classes, model_args)
    name, args = ck.meta.model, {**ck.meta.model_args, **extra}
    src = resolve_config(name, **args)
    sd = dict(ck.state_dict)
    notes = list(ck.notes)

    if any(k.startswith("pre_logits.") for k in sd):
        if "num_classes" not in new:
            raise VitError(f"{ck.source} has a pre-logits (representation) layer before its head, which vitcli's "
                           "ViT does not have, so its head cannot be used as is. Pass num_classes=N to fine-tune "
                           "with a new zero-initialised head (paper §3.2), or num_classes=0 for features")
        sd = {k: v for k, v in sd.items() if not k.startswith(("pre_logits.", "head."))}
        src = resolve_config(name, **{**args, "num_classes": 0})
        notes.append("dropped the pre-logits layer and the head behind it")

    dst = resolve_config(name, **{**args, **new})
    own = resolve_config(name).global_pool  # the checkpoint's pooling: its saved setting, else its model's
    pool_before = ck.meta.model_args.get("global_pool") or own
    if dst.global_pool == "map" and pool_before != "map":
        raise VitError(f"{ck.source} has no attention-pool head to fine-tune with global_pool=map; keep its own "
                       f"pooling ({pool_before}) or use avg")
    if pool_before == "map" and dst.global_pool != "map":
        sd = {k: v for k, v in sd.items() if not k.startswith("attn_pool.")}
        notes.append(f"global pooling map -> {dst.global_pool}: the attention-pool head was dropped")
        pool_before = "token"  # its final norm sits on the tokens, where token pooling keeps it
    if dst.global_pool != pool_before and any(k.startswith(("norm.", "fc_norm.")) for k in sd):
        # token pooling normalises all tokens (norm), average pooling the pooled vector (fc_norm): the
        # trained LayerNorm moves to the other slot (MAE re-initialises it; the trained one is a closer start)
        old, new_name = ("norm.", "fc_norm.") if dst.global_pool == "avg" else ("fc_norm.", "norm.")
        sd = {(new_name + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
        notes.append(f"global pooling {pool_before} -> {dst.global_pool}: the final LayerNorm is now {new_name.rstrip('.')}")
    if not src.hybrid and dst.patch_size != src.patch_size and "patch_embed.proj.weight" in sd:
        sd["patch_embed.proj.weight"] = resize_patch_embed(sd["patch_embed.proj.weight"], dst.patch_size,
                                                           mode=interpolation)
        notes.append(f"patch embedding resized from {src.patch_size}x{src.patch_size} to "
                     f"{dst.patch_size}x{dst.patch_size} ({interpolation})")
    if dst.grid_size != src.grid_size and "pos_embed" in sd:
        prefix = src.pos_prefix_tokens
        n_grid = sd["pos_embed"].shape[1] - prefix
        if n_grid != src.grid_size[0] * src.grid_size[1]:
            raise VitError(f"{ck.source}: pos_embed has {n_grid} grid tokens but the checkpoint's settings "
                           f"({src.img_size[0]}x{src.img_size[1]}, patch {src.patch_size}) give "
                           f"{src.grid_size[0]}x{src.grid_size[1]}; its metadata does not match its weights")
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], dst.grid_size, old_grid=src.grid_size,
                                             num_prefix_tokens=prefix, mode=interpolation)
        kept = f", {prefix} prefix slot{'s' * (prefix > 1)} kept" if prefix else ""
        notes.append(f"position embeddings resampled from a {src.grid_size[0]}x{src.grid_size[1]} to a "
                     f"{dst.grid_size[0]}x{dst.grid_size[1]} grid ({interpolation}{kept})")
    if dst.grid_size != src.grid_size and dst.arch == "eva":
        notes.append(f"rotary position embeddings: nothing to resample, the rotations follow the "
                     f"{dst.grid_size[0]}x{dst.grid_size[1]} grid")
    if dst.num_classes != src.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith(HEADS)}
        if dst.num_classes > 0:
            dtype = sd["pos_embed"].dtype if "pos_embed" in sd else torch.float32
            for head in HEADS[: 1 + dst.distilled]:
                sd[f"{head}weight"] = torch.zeros(dst.num_classes, dst.embed_dim, dtype=dtype)
                sd[f"{head}bias"] = torch.zeros(dst.num_classes, dtype=dtype)
        notes.append(f"head replaced: {src.num_classes} -> {dst.num_classes} classes, zero-initialised")

    model_args_out = {**ck.meta.model_args, **extra, **new}
    if "img_size" in new:
        model_args_out["img_size"] = list(dst.img_size)
    names = ck.meta.class_names if ck.meta.class_names and len(ck.meta.class_names) == dst.num_classes else None
    meta = ck.meta.replace(model_args=model_args_out, num_classes=dst.num_classes, img_size=list(dst.img_size),
                           pre_logits=False, class_names=names)
    return replace(ck, state_dict=sd, meta=meta, notes=notes)


def model_from_checkpoint(spec: LoadedCheckpoint | str | Path, *, img_size: int | tuple[int, int] | None = None,
                          num_classes: int | None = None, patch_size: int | None = None,
                          interpolation: str = "bicubic", model_args: Mapping[str, Any] | None = None,
                          ) -> tuple[nn.Module, LoadedCheckpoint]:
    """Build the model a checkpoint belongs to and load its weights strictly.

    Args:
        spec: anything `load_checkpoint` accepts, or a LoadedCheckpoint.
        img_size: build for this resolution; position embeddings are resampled (paper §3.2).
        num_classes: build with this many classes; a different count gets a new zero-initialised head.
        patch_size: build with this patch size; the patch-embedding kernel is PI-resized.
        interpolation: resampling mode for both ('bicubic', 'bilinear', 'nearest', 'area').
        model_args: more create_model overrides (num_heads for a bare file, drop_path_rate, ...).

    Returns the model (eval mode; `model.config` describes it, `meta_for_model` turns it into checkpoint
    metadata) and the checkpoint as read, its notes extended with what was adapted. Weights that do not
    fit the model raise a VitError naming the tensor.
    """
    ck = spec if isinstance(spec, LoadedCheckpoint) else load_checkpoint(spec)
    from vitcli.models import create_model

    from vitcli.models.task_models import TASK_MODELS

    if ck.meta.task in TASK_MODELS:  # an encoder with a task's head (segmentation, detection)
        return TASK_MODELS[ck.meta.task].from_checkpoint(ck, num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                                                         interpolation=interpolation, model_args=model_args)

    new, extra = _split_overrides(img_size, patch_size, num_classes, model_args)
    if is_timm_classifier(ck.meta.model):
        return _timm_classifier(ck, new, extra)
    want = new.pop("num_classes", None)
    # A pre-logits checkpoint's head is dropped with it (adapt_checkpoint asks for num_classes first).
    drop_head = want is not None and any(k.startswith("pre_logits.") for k in ck.state_dict)
    adapted = adapt_checkpoint(ck, interpolation=interpolation, model_args={**extra, **new},
                               num_classes=0 if drop_head else None)
    with torch.device("meta"):  # no time spent on a random init that the weights overwrite
        model = create_model(adapted.meta.model, **adapted.meta.model_args)
    _check_fits(model, adapted.state_dict, ck.source)
    model.to_empty(device="cpu")
    if hasattr(model, "init_non_persistent_buffers"):  # rotary tables and the like are not in a state dict
        model.init_non_persistent_buffers()
    model.load_state_dict(adapted.state_dict, strict=True)
    if want is not None and want != model.num_classes:
        old = model.num_classes
        model.reset_classifier(want)
        adapted.notes.append(f"head replaced: {old} -> {want} classes, zero-initialised")
    model.eval()
    return model, replace(ck, notes=adapted.notes)


def _timm_classifier(ck: LoadedCheckpoint, new: dict[str, Any], extra: dict[str, Any]) -> tuple[nn.Module, LoadedCheckpoint]:
    """A timm classifier's checkpoint: built as saved (a CNN takes any resolution, so img_size only changes what
    its data is resized to), its head replaced for another class count."""
    from vitcli.models import create_model

    if "patch_size" in new:
        raise needs_vit("model.patch_size", ck.meta.model)
    want = new.pop("num_classes", None)
    model = create_model(ck.meta.model, **{**ck.meta.model_args, **extra, **new})
    load_timm_weights(model, ck.state_dict, ck.source)
    notes = list(ck.notes)
    if want is not None and want != model.num_classes:
        notes.append(f"head replaced: {model.num_classes} -> {want} classes")
        model.reset_classifier(want)
        model.config = replace(model.config, num_classes=want)
    return model.eval(), replace(ck, notes=notes)


def _check_fits(model: nn.Module, sd: Mapping[str, torch.Tensor], source: Path | str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    problems = [f"'{k}' is {have[k]} in the checkpoint but {want[k]} in the model"
                for k in want if k in have and have[k] != want[k]]
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing:
        problems.append(f"missing from the checkpoint: {few_keys(missing)}")
    if unexpected:
        problems.append(f"not in the model: {few_keys(unexpected)}")
    if problems:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise VitError(f"checkpoint {source} does not fit the model {name}: {'; '.join(problems)}. The checkpoint "
                       "is for a different architecture or class count: pass num_classes=N for a new head, or "
                       "the model settings it was trained with (model_args / recipe model.*)")


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor], meta: CheckpointMeta, what: str = "") -> Path:
    """Write weights by suffix: .safetensors (atomic, `meta` in the header) or .pth/.pt/.bin (a plain
    name -> tensor dict for `torch.load`; the metadata is not kept, so prefer .safetensors)."""
    path = Path(path).expanduser()
    name = path.name.lower()
    if not name.endswith((".safetensors", *TORCH_SUFFIXES)):
        raise VitError(f"don't know how to write {path.name}: use a .safetensors (recommended) or .pth file name")
    path = writable_file(path, what)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if name.endswith(".safetensors"):
        save_weights(path, tensors, meta.to_dict(), what)
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp), what)
    return path
