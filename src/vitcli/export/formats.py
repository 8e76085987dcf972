"""One writer per export format. Each writes `out` whole or not at all (a temporary name, then a rename)
and returns a function running the written artifact with its own runtime: images -> logits."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError, path_error
from vitcli.io.paths import atomic_write
from vitcli.models import model_info
from vitcli.models.convert import to_hf_transformers
from vitcli.models.load import meta_for_model, model_from_checkpoint, save_state_dict

Runner = Callable[[torch.Tensor], torch.Tensor]


def _needs(package: str, extra: str):
    try:
        return __import__(package)
    except ImportError as e:
        raise VitError(f"this export needs {package}: pip install 'vitcli[{extra}]' (make install does).") from e


def _batch_axis(dynamic: bool):
    return ({0: torch.export.Dim("batch", min=1)},) if dynamic else None


def _replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp folder), then put it at `out` (replacing what --force allowed to replace)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    except OSError as e:
        raise path_error(e, out, "--out") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_onnx(model: nn.Module, meta: dict, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """The torch.onnx dynamo exporter (a dynamic batch axis by default), run back in onnxruntime."""
    ort = _needs("onnxruntime", "export")
    _needs("onnxscript", "export")
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_batch_axis(dynamic_batch),
                                input_names=["images"], output_names=["logits"], verbose=False)
    atomic_write(out, lambda tmp: program.save(str(tmp)), "--out")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def write_exported_program(model: nn.Module, meta: dict, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """A torch.export ExportedProgram (.pt2), loaded back with torch.export.load."""
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_axis(dynamic_batch))
    atomic_write(out, lambda tmp: torch.export.save(program, str(tmp)), "--out")
    loaded = torch.export.load(str(out)).module()
    return lambda x: loaded(x)


def write_hf(model: nn.Module, meta: dict, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """A transformers ViTForImageClassification folder (config, weights, image processor), loaded back with
    from_pretrained, which must find no missing or unexpected weights."""
    transformers = _needs("transformers", "export")
    cfg = model.config
    if cfg.hybrid or not cfg.class_token or cfg.global_pool != "token":
        raise VitError(f"--format hf writes transformers' ViTForImageClassification, which classifies a plain ViT's "
                       f"class token; {cfg.name} ({'hybrid' if cfg.hybrid else 'average pooling'}) is not one. "
                       "Use --format timm, onnx or exported-program.")
    names = _class_names(meta, cfg.num_classes)
    h, w = cfg.img_size
    hf_cfg = transformers.ViTConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim, hidden_act="gelu", layer_norm_eps=1e-6, image_size=h if h == w else [h, w],
        patch_size=cfg.patch_size, num_channels=cfg.in_chans, qkv_bias=cfg.qkv_bias, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    hf = transformers.ViTForImageClassification(hf_cfg)
    hf.load_state_dict(to_hf_transformers(model.state_dict(), hf.state_dict().keys()), strict=True)
    processor = transformers.ViTImageProcessor(
        do_resize=True, size={"height": h, "width": w}, resample=_pil_resample(meta.get("interpolation")),
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(meta.get("mean") or [0.5] * cfg.in_chans), image_std=list(meta.get("std") or [0.5] * cfg.in_chans))

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    with _quiet_transformers(transformers):
        _replace_folder(out, write)
        loaded, info = transformers.ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise VitError(f"transformers loads {out} with {problems}; the export is not faithful (please report this).")
    loaded.eval()
    return lambda x: loaded(pixel_values=x).logits


def write_timm(model: nn.Module, meta: dict, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """A folder in the layout of a timm model on the Hub (config.json + model.safetensors), loaded back with
    timm.create_model("local-dir:FOLDER", pretrained=True)."""
    import timm
    cfg = model.config
    arch, model_args = _timm_architecture(cfg, timm)
    config = {
        "architecture": arch,
        "num_classes": cfg.num_classes,
        "num_features": cfg.embed_dim,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "vitcli", "custom_load": False, "input_size": [cfg.in_chans, *cfg.img_size], "fixed_input_size": True,
            "interpolation": meta.get("interpolation") or "bicubic", "crop_pct": meta.get("crop_pct") or 0.875,
            "crop_mode": "center", "mean": list(meta.get("mean") or [0.5] * cfg.in_chans),
            "std": list(meta.get("std") or [0.5] * cfg.in_chans), "num_classes": cfg.num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head"},
        "label_names": _class_names(meta, cfg.num_classes),
    }
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))

    _replace_folder(out, write)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    return lambda x: loaded(x)


def write_vitcli(model: nn.Module, meta: dict, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """vitcli's own .safetensors with metadata (any format vitcli reads becomes this), read back by vitcli."""
    save_state_dict(out, model.state_dict(), meta_for_model(model, meta), what="--out")
    loaded, _ = model_from_checkpoint(out)
    return lambda x: loaded(x)


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """No progress bars or info logs from transformers while it writes and reads a few local files."""
    logging = transformers.utils.logging
    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _class_names(meta: dict, num_classes: int) -> list[str]:
    names = meta.get("class_names")
    return [str(n) for n in names] if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def _pil_resample(interpolation: str | None) -> int:
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(interpolation or "bicubic", Image.BICUBIC)


def _timm_architecture(cfg: Any, timm) -> tuple[str, dict[str, Any]]:
    """A timm model name for the config and the arguments that make it this model (any ViT size)."""
    aliases = [a for a in model_info(cfg.name)["aliases"] if a.startswith("vit_") and timm.is_model(a)]
    args: dict[str, Any] = {"img_size": list(cfg.img_size), "num_classes": cfg.num_classes, "global_pool": cfg.global_pool}
    if cfg.hybrid:
        return next(a for a in aliases if a.endswith("_224")), args
    args.update(patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token)
    return next((a for a in aliases if a.endswith("_224")), "vit_base_patch16_224"), args
