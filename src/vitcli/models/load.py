"""Read any ViT checkpoint a user hands us, safely, and build the model it belongs to.

    ck = load_checkpoint("runs/b16-cifar10")         # run dir, step dir, .safetensors, .pth/.pt/.bin,
                                                     # Google .npz, HF model dir, or timm:<name>
    model, ck = model_from_checkpoint(ck, img_size=384, num_classes=10)   # paper §3.2 fine-tuning
    save_state_dict("b16-384.safetensors", model.state_dict(), meta_for_model(model, ck.meta))

Nothing is unpickled freely: torch files are read with `weights_only=True` and .npz files with
`allow_pickle=False`; a file that would need to run code is refused with a VitError.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitcli.errors import VitError
from vitcli.io.checkpoint import read_weights, save_weights
from vitcli.io.hub import offline_reason
from vitcli.io.paths import atomic_write, writable_file
from vitcli.io.rundir import CHECKPOINTS, LINKS, WEIGHTS, has_weights, linked_checkpoint, step_dirs
from vitcli.models import convert
from vitcli.models.posemb import MODES, resample_pos_embed, resize_patch_embed

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar")
WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema", "state_dict_ema")  # first found wins
EMA_KEYS = ("model_ema", "state_dict_ema")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
KINDS = "a vitcli run directory, a step-*/ directory, a .safetensors / .pth / .pt / .bin / .npz file, " \
        "a Hugging Face ViT model directory, or timm:<model name>"


@dataclass
class LoadedCheckpoint:
    """Weights in vitcli (= timm) names plus what is known about them.

    Attributes:
        state_dict: name -> tensor, vitcli names.
        meta: vitcli checkpoint metadata. Always holds `model` (registered name) and `model_args`
            (create_model overrides), `num_classes` and `img_size`; for foreign files these are inferred
            (`inferred: True`), with class names / normalisation when the file's neighbours say.
        format: the file's naming: "vitcli", "timm", "hf" or "npz".
        source: the file actually read (or "timm:<name>").
        notes: what the loader chose or approximated, for the CLI to print (which of best/last was
            used, an assumed head count, dropped tensors, resampled embeddings...).
    """

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    format: str
    source: Path | str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Reading files


def load_checkpoint(spec: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint in any supported form (see KINDS) into vitcli names; VitError on any problem."""
    if isinstance(spec, str) and spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):].strip())
    path = Path(spec).expanduser()
    notes: list[str] = []
    if not path.exists():
        raise VitError(f"checkpoint {path} not found; pass {KINDS}")
    if path.is_dir():
        path = _file_in_dir(path, notes)
    if not path.is_file():
        raise VitError(f"checkpoint {path} is not a file; pass {KINDS}")
    if path.stat().st_size == 0:
        raise VitError(f"checkpoint {path} is empty (0 bytes): the download or copy probably failed; fetch it again")

    name = path.name.lower()
    meta: dict[str, Any] = {}
    hints: dict[str, Any] = {}
    if name.endswith(".safetensors"):
        tensors, meta = read_weights(path)
    elif name.endswith(TORCH_SUFFIXES):
        tensors, hints = _read_torch(path, notes)
    elif name.endswith(".npz"):
        arrays = _read_npz(path)
        try:
            tensors = convert.from_google_npz(arrays, notes)
        except VitError as e:
            raise VitError(f"{path}: {e}") from e
        hints["num_heads"] = convert.npz_num_heads(arrays)
        return _finish(tensors, {}, "npz", path, notes, hints)
    else:
        raise VitError(f"don't know how to read {path} (suffix {path.suffix or 'none'}); pass {KINDS}")

    tensors = convert.strip_wrappers(tensors)
    fmt = convert.detect_format(tensors, meta)
    if fmt == "timm":
        hints.update(_timm_hints(path.parent))
        tensors = convert.from_timm(tensors, hints.get("img_size"), notes)
    elif fmt == "hf":
        hints.update(_hf_hints(path.parent, notes))
        try:
            tensors = convert.from_hf_transformers(tensors, notes)
        except VitError as e:
            raise VitError(f"{path}: {e}") from e
    elif fmt == "unknown":
        raise VitError(f"{path} does not look like a ViT checkpoint (first tensors: {convert.few_keys(tensors)}). "
                       "vitcli reads vitcli, timm, Hugging Face transformers ViT and Google .npz checkpoints")
    return _finish(tensors, meta, fmt, path, notes, hints)


def _file_in_dir(path: Path, notes: list[str]) -> Path:
    """The weights file a directory stands for: run dir -> checkpoints/best (else last) -> model.safetensors."""
    ckpts = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if ckpts is not path or any((path / link).exists() for link in LINKS) or path.name == CHECKPOINTS:
        found = linked_checkpoint(path, has_weights)
        if found is not None:
            which, step_dir = found
            notes.append(f"using the {which} checkpoint of {path} ({step_dir.resolve().name})")
            return step_dir / WEIGHTS
        steps = sorted(step_dirs(ckpts), key=lambda c: c.step)
        if steps and has_weights(steps[-1].path):
            notes.append(f"{path} has no best/last link; using the newest step directory {steps[-1].path.name}")
            return steps[-1].path / WEIGHTS
        if ckpts is not path:
            raise VitError(f"run directory {path} has no checkpoint yet (nothing in {ckpts}); train until the "
                           "first checkpoint is saved, or pass a weights file")
    for name in HF_WEIGHTS:
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors.index.json").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise VitError(f"{path} holds a sharded checkpoint, which vitcli does not read; merge the shards into "
                       "one model.safetensors (transformers: save_pretrained(..., max_shard_size='100GB'))")
    raise VitError(f"{path} is a directory without a checkpoint (looked for checkpoints/best, checkpoints/last, "
                   f"{', '.join(HF_WEIGHTS)}); pass {KINDS}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # torch's weights_only message buries the reason ("Trying to load unsupported GLOBAL ...") mid-text.
    fallback = lines[0] if lines else type(e).__name__
    return next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), fallback)[:300]


def _read_torch(path: Path, notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch file's state dict without running code from it, unwrapped from training checkpoints."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4"
            # timm's train.py stores its argparse.Namespace beside the weights; rebuilding one runs no code.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "GLOBAL" in str(e):
            raise VitError(
                f"refusing to unpickle {path}: it contains Python objects, not just tensors, and loading them "
                f"could run code ({_first_line(e)}). If you trust its source, re-save only its weights as "
                "a .safetensors file (safetensors.torch.save_file(state_dict, 'weights.safetensors')) and "
                "pass that instead") from e
        raise VitError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated or "
                       "corrupt: download or copy it again") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError,
            AttributeError, TypeError) as e:
        raise VitError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); it "
                       "may be truncated or corrupt: download or copy it again") from e

    hints: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        raise VitError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    if isinstance(obj.get("arch"), str):  # timm train.py: the model name it trained
        hints["arch"] = obj["arch"]
    if not _is_state_dict(obj):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _is_state_dict(obj[k])), None)
        if key is None:
            raise VitError(f"{path} holds no state dict: its entries are {convert.few_keys(map(str, obj))}; expected "
                           f"tensors, or a training checkpoint with one of {', '.join(WRAPPER_KEYS)}")
        ema = [k for k in EMA_KEYS if k != key and isinstance(obj.get(k), Mapping)]
        notes.append(f"weights taken from the '{key}' entry of {path.name}"
                     + (f" (EMA weights also present under '{ema[0]}')" if ema else ""))
        obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors, hints


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and \
        sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise VitError(f"refusing to unpickle {path}: it stores Python objects, not just arrays; vitcli reads "
                           "plain-array .npz files only (numpy.savez of the parameters)") from e
        raise VitError(f"{path} is not a readable .npz ({e}); it may be truncated or corrupt: fetch it again") from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise VitError(f"{path} is not a readable .npz ({type(e).__name__}: {e}); it may be truncated or corrupt: "
                       "fetch it again") from e


def _hf_hints(folder: Path, notes: list[str]) -> dict[str, Any]:
    """num_heads, resolution, class names and normalisation from a transformers config.json beside the weights."""
    hints: dict[str, Any] = {}
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        notes.append("no transformers config.json beside the weights: the architecture is inferred from shapes")
        return hints
    if cfg.get("model_type") not in (None, "vit"):
        raise VitError(f"{folder / 'config.json'} is for a transformers '{cfg.get('model_type')}' model; vitcli "
                       "reads plain ViT ('vit') checkpoints")
    if "num_attention_heads" in cfg:
        hints["num_heads"] = int(cfg["num_attention_heads"])
    if "image_size" in cfg:
        hints["img_size"] = cfg["image_size"]
    labels = cfg.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)] if labels else []
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:
        hints["class_names"] = names
    eps = cfg.get("layer_norm_eps")
    if eps is not None and not math.isclose(eps, 1e-6):
        notes.append(f"the transformers config uses LayerNorm eps {eps:g}; vitcli (as timm and the original JAX "
                     "code) uses 1e-6, a difference far below float32 noise for trained weights")
    if cfg.get("hidden_act", "gelu") != "gelu":
        notes.append(f"the transformers config uses activation {cfg['hidden_act']!r}; vitcli uses exact GELU")
    try:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        if "image_mean" in pre and "image_std" in pre:
            hints["mean"], hints["std"] = list(pre["image_mean"]), list(pre["image_std"])
    except (OSError, ValueError):
        pass
    return hints


def _timm_hints(folder: Path) -> dict[str, Any]:
    """Model name, resolution, normalisation and class names from a timm Hub config.json beside the weights."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        return {}
    hints: dict[str, Any] = {"arch": cfg["architecture"]}
    pcfg = cfg.get("pretrained_cfg") or {}
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in pcfg:
            hints[key] = pcfg[key]
    if isinstance(pcfg.get("input_size"), list) and len(pcfg["input_size"]) == 3:
        hints["img_size"] = pcfg["input_size"][1:]
    if isinstance(cfg.get("label_names"), list):
        hints["class_names"] = cfg["label_names"]
    return hints


# ---------------------------------------------------------------------------------------------------
# timm:<name> (network)


def _load_timm(name: str) -> LoadedCheckpoint:
    if not name:
        raise VitError("timm: needs a model name, e.g. timm:vit_base_patch16_224.augreg2_in21k_ft_in1k")
    reason = offline_reason()
    if reason:
        raise VitError(
            f"timm:{name} downloads weights from the Hugging Face Hub, but this machine is offline ({reason}). "
            f"On a machine with network access run `python -c \"import timm, safetensors.torch as s; "
            f"s.save_file(timm.create_model('{name}', pretrained=True).state_dict(), 'weights.safetensors')\"`, "
            "copy weights.safetensors here and pass its path instead")
    import timm

    if not timm.is_model(name):
        from vitcli.errors import did_you_mean

        raise VitError(f"timm has no model {name!r}.{did_you_mean(name, timm.list_models('vit_*'))}")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # network drop, missing pretrained tag, hub error: all user-facing
        raise VitError(f"could not fetch timm:{name} ({type(e).__name__}: {_first_line(e)}); check the name "
                       "(`timm.list_pretrained('vit_*')`) and the network, or pass a local file") from e
    hints: dict[str, Any] = {}
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn"):
        hints["num_heads"] = int(blocks[0].attn.num_heads)
    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in pcfg:
            hints[key] = list(pcfg[key]) if isinstance(pcfg[key], tuple) else pcfg[key]
    if "input_size" in pcfg:
        hints["img_size"] = list(pcfg["input_size"][-2:])
    notes: list[str] = []
    tensors = convert.from_timm(dict(model.state_dict()), hints.get("img_size"), notes)
    return _finish(tensors, {}, "timm", f"timm:{name}", notes, hints)


# ---------------------------------------------------------------------------------------------------
# Metadata


def _finish(tensors: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str, source: Path | str,
            notes: list[str], hints: dict[str, Any]) -> LoadedCheckpoint:
    """Fill meta with the model to build: the checkpoint's own, or one inferred from the tensors."""
    meta = dict(meta)
    if fmt == "vitcli" and meta.get("model") and isinstance(meta.get("model_args"), Mapping):
        meta.setdefault("num_classes", meta["model_args"].get("num_classes"))
        return LoadedCheckpoint(tensors, meta, fmt, source, notes)

    num_heads = hints.get("num_heads") or _arch_heads(hints.get("arch"), tensors)
    img_size = hints.get("img_size")
    try:
        try:
            args = convert.infer_model_args(tensors, num_heads=num_heads, img_size=img_size)
        except VitError:
            if img_size is None:
                raise
            args = convert.infer_model_args(tensors, num_heads=num_heads)  # config size stale: trust the grid
        model, model_args, exact = convert.closest_model(args)
    except VitError as e:
        raise VitError(f"{source}: {e}") from e
    if not num_heads and not exact:
        notes.append(f"the checkpoint does not say how many attention heads it has: assuming {args['num_heads']} "
                     f"(head width {args['embed_dim'] // args['num_heads']}); if that is wrong, pass "
                     "model_args={'num_heads': N}")
    if not exact:
        notes.append(f"no registered model has this architecture (width {args['embed_dim']}, depth {args['depth']}, "
                     f"{args['num_heads']} heads, patch {args['patch_size']}); building {model} with overrides")
    meta.update({
        "format": fmt,
        "inferred": True,
        "model": model,
        "model_args": model_args,
        "num_classes": model_args["num_classes"],
        "img_size": list(model_args["img_size"]),
    })
    if any(k.startswith("pre_logits.") for k in tensors):
        meta["pre_logits"] = True
        notes.append("the checkpoint has a pre-logits (representation) layer, which vitcli's ViT does not have; "
                     "its head can only be replaced (pass num_classes)")
    for key in ("class_names", "mean", "std", "interpolation", "crop_pct"):
        if key in hints:
            meta[key] = hints[key]
    return LoadedCheckpoint(tensors, meta, fmt, source, notes)


def _arch_heads(arch: str | None, tensors: Mapping[str, torch.Tensor]) -> int | None:
    """Heads of the registered model named like timm's train.py `arch` entry (vit_base_patch16_224),
    when its width matches the weights."""
    proj = tensors.get("patch_embed.proj.weight")
    if not arch or proj is None:
        return None
    from vitcli.models.registry import resolve_config

    try:
        cfg = resolve_config(arch.split(".")[0])
    except VitError:
        return None
    return cfg.num_heads if cfg.embed_dim == proj.shape[0] else None


def meta_for_model(model: nn.Module, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """vitcli checkpoint metadata describing `model` (its ModelConfig), keeping base's other entries
    (class names, normalisation, dataset...)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise VitError("the model has no config; build it with vitcli.models.create_model")
    d = cfg.to_dict()
    meta = {k: v for k, v in dict(base or {}).items() if k not in ("inferred", "pre_logits")}
    meta.update({
        "format": "vitcli",
        "model": cfg.name,
        "model_args": {k: d[k] for k in convert.ARCH_KEYS},
        "num_classes": cfg.num_classes,
        "img_size": list(cfg.img_size),
    })
    if meta.get("class_names") is not None and len(meta["class_names"]) != cfg.num_classes:
        meta.pop("class_names")  # the head changed: the old names no longer apply
    return meta


# ---------------------------------------------------------------------------------------------------
# Adapting a checkpoint to a new resolution / patch size / class count, and building its model

_SPECIAL = ("img_size", "patch_size", "num_classes")


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

    - img_size: position embeddings 2D-resampled to the new grid, class token slot kept (paper §3.2).
    - patch_size: patch-embedding kernel PI-resized (FlexiViT) and the grid recomputed.
    - num_classes: head replaced by a zero-initialised one (paper §3.2).
    `model_args` are further create_model overrides (e.g. num_heads for a bare file).
    """
    if not isinstance(ck, LoadedCheckpoint):
        ck = load_checkpoint(ck)
    if interpolation not in MODES:
        raise VitError(f"interpolation must be one of {', '.join(MODES)}, got {interpolation!r}")
    from vitcli.models.registry import resolve_config

    new, extra = _split_overrides(img_size, patch_size, num_classes, model_args)
    name, args = ck.meta["model"], {**ck.meta.get("model_args", {}), **extra}
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
    pool_before = ck.meta.get("model_args", {}).get("global_pool", "token")
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
        prefix = int(src.class_token)
        n_grid = sd["pos_embed"].shape[1] - prefix
        if n_grid != src.grid_size[0] * src.grid_size[1]:
            raise VitError(f"{ck.source}: pos_embed has {n_grid} grid tokens but the checkpoint's settings "
                           f"({src.img_size[0]}x{src.img_size[1]}, patch {src.patch_size}) give "
                           f"{src.grid_size[0]}x{src.grid_size[1]}; its metadata does not match its weights")
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], dst.grid_size, old_grid=src.grid_size,
                                             num_prefix_tokens=prefix, mode=interpolation)
        notes.append(f"position embeddings resampled from a {src.grid_size[0]}x{src.grid_size[1]} to a "
                     f"{dst.grid_size[0]}x{dst.grid_size[1]} grid ({interpolation})")
    if dst.num_classes != src.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        if dst.num_classes > 0:
            dtype = sd["pos_embed"].dtype if "pos_embed" in sd else torch.float32
            sd["head.weight"] = torch.zeros(dst.num_classes, dst.embed_dim, dtype=dtype)
            sd["head.bias"] = torch.zeros(dst.num_classes, dtype=dtype)
        notes.append(f"head replaced: {src.num_classes} -> {dst.num_classes} classes, zero-initialised")

    model_args_out = {**ck.meta.get("model_args", {}), **extra, **new}
    if "img_size" in new:
        model_args_out["img_size"] = list(dst.img_size)
    meta = {**ck.meta, "model_args": model_args_out, "num_classes": dst.num_classes, "img_size": list(dst.img_size)}
    meta.pop("pre_logits", None)
    if meta.get("class_names") is not None and len(meta["class_names"]) != dst.num_classes:
        meta.pop("class_names")
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

    new, extra = _split_overrides(img_size, patch_size, num_classes, model_args)
    want = new.pop("num_classes", None)
    # A pre-logits checkpoint's head is dropped with it (adapt_checkpoint asks for num_classes first).
    drop_head = want is not None and any(k.startswith("pre_logits.") for k in ck.state_dict)
    adapted = adapt_checkpoint(ck, interpolation=interpolation, model_args={**extra, **new},
                               num_classes=0 if drop_head else None)
    with torch.device("meta"):  # no time spent on a random init that the weights overwrite
        model = create_model(adapted.meta["model"], **adapted.meta["model_args"])
    _check_fits(model, adapted.state_dict, ck.source)
    model.to_empty(device="cpu")
    model.load_state_dict(adapted.state_dict, strict=True)
    if want is not None and want != model.num_classes:
        old = model.num_classes
        _zero_head(model, want)
        adapted.notes.append(f"head replaced: {old} -> {want} classes, zero-initialised")
    model.eval()
    return model, replace(ck, notes=adapted.notes)


def _zero_head(model: nn.Module, num_classes: int) -> None:
    """A new zero-initialised head (paper §3.2), through the model's reset_classifier when it has one."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    dim = model.head.in_features
    model.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
    if num_classes > 0:
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    model.num_classes = num_classes


def _check_fits(model: nn.Module, sd: Mapping[str, torch.Tensor], source: Path | str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    problems = [f"'{k}' is {have[k]} in the checkpoint but {want[k]} in the model"
                for k in want if k in have and have[k] != want[k]]
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing:
        problems.append(f"missing from the checkpoint: {convert.few_keys(missing)}")
    if unexpected:
        problems.append(f"not in the model: {convert.few_keys(unexpected)}")
    if problems:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise VitError(f"checkpoint {source} does not fit the model {name}: {'; '.join(problems)}. The checkpoint "
                       "is for a different architecture or class count: pass num_classes=N for a new head, or "
                       "the model settings it was trained with (model_args / recipe model.*)")


# ---------------------------------------------------------------------------------------------------
# Writing


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any], what: str = "") -> Path:
    """Write weights by suffix: .safetensors (atomic, `meta` in the header) or .pth/.pt/.bin (a plain
    name -> tensor dict for `torch.load`; the metadata is not kept, so prefer .safetensors)."""
    path = Path(path).expanduser()
    name = path.name.lower()
    if not name.endswith((".safetensors", *TORCH_SUFFIXES)):
        raise VitError(f"don't know how to write {path.name}: use a .safetensors (recommended) or .pth file name")
    path = writable_file(path, what)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if name.endswith(".safetensors"):
        save_weights(path, tensors, dict(meta), what)
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp), what)
    return path
