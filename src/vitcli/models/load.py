"""Read any ViT checkpoint a user hands us, safely, into vitcli names with typed metadata.

    ck = load_checkpoint("runs/b16-cifar10")          # run dir, step dir, .safetensors, .pth/.pt/.bin,
                                                      # Google .npz, timm or HF model dir, timm:<name>,
                                                      # hf-hub:<org>/<name>, local-dir:<folder>
    model = load_model("timm:vit_small_patch14_reg4_dinov2.lvd142m", num_classes=10)   # from Python

This module only dispatches: `readers` opens files, `formats.*` name tensors, `infer` finds the
architecture, `adapt` builds and reshapes. Nothing is unpickled freely: torch files are read with
`weights_only=True` and .npz files with `allow_pickle=False`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError, few_keys
from vitcli.io.checkpoint import read_weights
from vitcli.io.meta import CheckpointMeta, Preprocessing
from vitcli.models import infer, readers
from vitcli.models.formats import detect_format, hf, npz
from vitcli.models.formats import timm as timm_format


@dataclass
class LoadedCheckpoint:
    """Weights in vitcli (= timm) names plus what is known about them.

    Attributes:
        state_dict: name -> tensor, vitcli names.
        meta: the model to build (its own, or inferred from the tensors for a foreign file: then
            `meta.inferred`), preprocessing and class names when known, provenance.
        source: the file actually read (or "timm:<name>").
        notes: what the loader chose or approximated, for the CLI to print (which of best/last was
            used, an assumed head count, dropped tensors, resampled embeddings...).
    """

    state_dict: dict[str, torch.Tensor]
    meta: CheckpointMeta
    source: Path | str
    notes: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return self.meta.format


def load_checkpoint(spec: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint in any supported form (see readers.KINDS) into vitcli names; VitError on any problem."""
    if isinstance(spec, str) and spec.startswith("timm:"):
        name = spec[len("timm:"):].strip()
        model, source = timm_format.load_name(name)
        notes = [f"timm:{name} read from {source}"]
        return _finish(timm_format.to_vitcli(model.state_dict()), {}, "timm", f"timm:{name}", notes,
                       timm_format.model_hints(model, name))
    if isinstance(spec, str) and spec.startswith("hf-hub:"):
        return _load_path(timm_format.hub_snapshot(spec[len("hf-hub:"):]))
    if isinstance(spec, str) and spec.startswith("local-dir:"):
        spec = spec[len("local-dir:"):]
    return _load_path(Path(spec).expanduser())


def _load_path(path: Path) -> LoadedCheckpoint:
    notes: list[str] = []
    if not path.exists():
        raise VitError(f"checkpoint {path} not found; pass {readers.KINDS}")
    if path.is_dir():
        path = readers.file_in_dir(path, notes)
    if not path.is_file():
        raise VitError(f"checkpoint {path} is not a file; pass {readers.KINDS}")
    if path.stat().st_size == 0:
        raise VitError(f"checkpoint {path} is empty (0 bytes): the download or copy probably failed; fetch it again")

    name = path.name.lower()
    saved: dict[str, Any] = {}
    hints: dict[str, Any] = {}
    if name.endswith(".safetensors"):
        tensors, saved = read_weights(path)
    elif name.endswith(readers.TORCH_SUFFIXES):
        tensors, hints = readers.read_torch(path, notes)
    elif name.endswith(".npz"):
        arrays = readers.read_npz(path)
        try:
            tensors = npz.from_google_npz(arrays, notes)
        except VitError as e:
            raise VitError(f"{path}: {e}") from e
        return _finish(tensors, {}, "npz", path, notes, {"num_heads": npz.npz_num_heads(arrays)})
    else:
        raise VitError(f"don't know how to read {path} (suffix {path.suffix or 'none'}); pass {readers.KINDS}")

    tensors = timm_format.to_vitcli(tensors)
    fmt = detect_format(tensors, saved)
    if fmt == "timm":
        hints.update(timm_format.hints(path.parent))
    elif fmt == "hf":
        hints.update(hf.hints(path.parent, notes))
        try:
            tensors = hf.to_vitcli(tensors, notes, hints.get("model_type"))
        except VitError as e:
            raise VitError(f"{path}: {e}") from e
    elif fmt == "unknown":
        raise VitError(f"{path} does not look like a ViT checkpoint (first tensors: {few_keys(tensors)}). "
                       "vitcli reads vitcli, timm, Hugging Face transformers and Google .npz ViT checkpoints")
    return _finish(tensors, saved, fmt, path, notes, hints)


def _finish(tensors: dict[str, torch.Tensor], saved: dict[str, Any], fmt: str, source: Path | str,
            notes: list[str], hints: dict[str, Any]) -> LoadedCheckpoint:
    """The checkpoint's own metadata, or metadata inferred from the tensors and the hints beside them."""
    if fmt == "vitcli" and saved.get("model") and isinstance(saved.get("model_args"), dict):
        return LoadedCheckpoint(tensors, CheckpointMeta.from_dict(saved), source, notes)

    named = _arch_config(hints.get("arch"))
    proj = tensors.get("patch_embed.proj.weight")
    same_width = named is not None and proj is not None and named.embed_dim == proj.shape[0]
    num_heads = hints.get("num_heads") or (named.num_heads if same_width else None)
    img_size = hints.get("img_size")
    try:
        try:
            args = infer.infer_model_args(tensors, num_heads=num_heads, img_size=img_size)
        except VitError:
            if img_size is None:
                raise
            args = infer.infer_model_args(tensors, num_heads=num_heads)  # config size stale: trust the grid
        if named is not None:  # how the family pools, where the weights allow it
            args.update(infer.pooling_of(named, args))
        for key in infer.UNSEEN_KEYS:  # what the weights cannot show: the hints', else the named model's
            if key in hints:
                args[key] = hints[key]
            elif named is not None:
                args[key] = getattr(named, key)
        model, model_args, exact = infer.closest_model(args, prefer=named.name if same_width else None)
    except VitError as e:
        raise VitError(f"{source}: {e}") from e
    if not num_heads and not exact:
        notes.append(f"the checkpoint does not say how many attention heads it has: assuming {args['num_heads']} "
                     f"(head width {args['embed_dim'] // args['num_heads']}); if that is wrong, pass "
                     "model_args={'num_heads': N}")
    if not exact:
        notes.append(f"no registered model has this architecture (width {args['embed_dim']}, depth {args['depth']}, "
                     f"{args['num_heads']} heads, patch {args['patch_size']}); building {model} with overrides")
    if model_args.get("pre_norm") and "act_layer" not in hints and named is None:
        notes.append("a CLIP-style tower read without its config: built with GELU; pass model_args="
                     "{'act_layer': 'quick_gelu'} for OpenAI's CLIP weights")
    pre_logits = any(k.startswith("pre_logits.") for k in tensors)
    if pre_logits:
        notes.append("the checkpoint has a pre-logits (representation) layer, which vitcli's ViT does not have; "
                     "its head can only be replaced (pass num_classes)")
    from vitcli.models.registry import preprocessing

    in_chans = int(model_args.get("in_chans") or 3)
    meta = CheckpointMeta(
        model=model, model_args=model_args, num_classes=model_args["num_classes"],
        img_size=list(model_args["img_size"]), format=fmt, inferred=True, pre_logits=pre_logits,
        preprocess=Preprocessing.from_dict(hints, in_chans) or (preprocessing(model) if exact else None),
        class_names=hints.get("class_names"))
    return LoadedCheckpoint(tensors, meta, source, notes)


def _arch_config(arch: str | None):
    """The registered config of a timm model name (`vit_small_patch14_reg4_dinov2`, from a timm config.json,
    a train.py checkpoint's `arch` or a timm: name), else None. Its family settings (activation, LayerNorm
    epsilon) hold at any width; its head count only at its own."""
    if not arch:
        return None
    from vitcli.models.registry import resolve_config

    try:
        return resolve_config(arch.split(".")[0])
    except VitError:
        return None


def load_model(ckpt: str | Path, **overrides: Any) -> nn.Module:
    """The model of any checkpoint vitcli reads (a run, a file, timm:<name>, hf-hub:<id> ...), in eval
    mode, as `timm.create_model(..., pretrained=True)` gives one.

    Overrides: img_size (position embeddings resampled), num_classes (a new zero-initialised head),
    patch_size (kernel PI-resized), interpolation, and any create_model setting (drop_path_rate ...).
    """
    from vitcli.models.adapt import model_from_checkpoint

    special = {k: overrides.pop(k) for k in ("img_size", "num_classes", "patch_size", "interpolation") if k in overrides}
    model, _ = model_from_checkpoint(ckpt, model_args=overrides, **special)
    return model
