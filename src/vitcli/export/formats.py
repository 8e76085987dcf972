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
from vitcli.io.checkpoint import safetensors_os_errors, write_safetensors
from vitcli.io.paths import atomic_write, write_through
from vitcli.io.meta import CheckpointMeta, Preprocessing
from vitcli.models.adapt import meta_for_model, model_from_checkpoint, save_state_dict
from vitcli.models.timm_classifier import TimmClassifierConfig, needs_vit
from vitcli.models.formats import hf as hf_format
from vitcli.models.formats.timm import timm_architecture

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
        with safetensors_os_errors(tmp):  # transformers' save_pretrained writes through safetensors too
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


def write_onnx(model: nn.Module, meta: CheckpointMeta, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """The torch.onnx dynamo exporter (a dynamic batch axis by default), run back in onnxruntime."""
    ort = _needs("onnxruntime", "export")
    _needs("onnxscript", "export")
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_batch_axis(dynamic_batch),
                                input_names=["images"], output_names=["logits"], verbose=False)
    head = head_metadata(meta)

    def save(tmp: Path) -> None:
        program.save(str(tmp))
        if head:  # what reads the logits needs to know: a sigmoid per class and the threshold (metadata_props)
            import onnx

            proto = onnx.load(str(tmp))
            onnx.helper.set_model_props(proto, {k: str(v) for k, v in head.items()})
            onnx.save(proto, str(tmp))

    atomic_write(out, save, "--out")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def write_exported_program(model: nn.Module, meta: CheckpointMeta, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """A torch.export ExportedProgram (.pt2), loaded back with torch.export.load."""
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_axis(dynamic_batch))
    atomic_write(out, lambda tmp: write_through(tmp, lambda f: torch.export.save(program, f)), "--out")
    loaded = torch.export.load(str(out)).module()
    return lambda x: loaded(x)


def write_hf(model: nn.Module, meta: CheckpointMeta, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """A transformers classifier folder (config, weights, image processor) for the family: ViT, DeiT with
    teacher, DINOv2 (with registers), SigLIP (averaged tokens); loaded back with from_pretrained, which
    must find no missing or unexpected weights."""
    if isinstance(model.config, TimmClassifierConfig):
        raise needs_vit("--format hf (a transformers ViT classifier)", model.config.name)
    transformers = _needs("transformers", "export")
    cfg = model.config
    names = _class_names(meta, cfg.num_classes)
    with _quiet_transformers(transformers):
        hf, layout = hf_format.export_model(cfg, names)
    hf.load_state_dict(hf_format.to_hf(model.state_dict(), hf.state_dict(), layout), strict=True)
    if head_metadata(meta):  # transformers' own flag for a sigmoid head (its loss and pipelines read it)
        hf.config.problem_type = "multi_label_classification"
        hf.config.threshold = head_metadata(meta)["threshold"]
    pre = _preprocess(meta, cfg.in_chans)
    h, w = cfg.img_size
    processor = transformers.ViTImageProcessor(
        do_resize=True, size={"height": h, "width": w}, resample=_pil_resample(pre.interpolation),
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(pre.mean), image_std=list(pre.std))

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    with _quiet_transformers(transformers):
        _replace_folder(out, write)
        loaded, info = type(hf).from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise VitError(f"transformers loads {out} with {problems}; the export is not faithful (please report this).")
    loaded.eval()
    return lambda x: loaded(pixel_values=x).logits


def write_timm(model: nn.Module, meta: CheckpointMeta, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
    """A folder in the layout of a timm model on the Hub (config.json + model.safetensors), loaded back with
    timm.create_model("local-dir:FOLDER", pretrained=True)."""
    import timm
    cfg = model.config
    if isinstance(cfg, TimmClassifierConfig):  # already timm's model and keys
        arch, model_args, own = cfg.architecture, {"in_chans": cfg.in_chans}, model.pretrained_cfg
        first_conv, classifier, fixed = own.get("first_conv"), own.get("classifier"), False
    else:
        (arch, model_args), first_conv, classifier, fixed = timm_architecture(cfg), "patch_embed.proj", "head", True
    pre = _preprocess(meta, cfg.in_chans)
    config = {
        "architecture": arch,
        "num_classes": cfg.num_classes,
        "num_features": model.num_features,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "vitcli", "custom_load": False, "input_size": [cfg.in_chans, *cfg.img_size], "fixed_input_size": fixed,
            "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
            "crop_mode": "center", "mean": list(pre.mean), "std": list(pre.std), "num_classes": cfg.num_classes,
            "first_conv": first_conv, "classifier": classifier},
        "label_names": _class_names(meta, cfg.num_classes),
        **({"head": head_metadata(meta)} if head_metadata(meta) else {}),
    }
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")

    _replace_folder(out, write)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    return lambda x: loaded(x)


def write_vitcli(model: nn.Module, meta: CheckpointMeta, out: Path, example: torch.Tensor, *, dynamic_batch: bool) -> Runner:
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


def head_metadata(meta: CheckpointMeta) -> dict[str, Any]:
    """A multi-label head's: {"task": "multilabel", "activation": "sigmoid", "threshold": t}; a segmenter's: its
    task, class names and that the logits are (N, classes, H, W) maps; {} for a softmax head."""
    if meta.task == "segmentation":
        return {"task": "segmentation", "output": "per-pixel class scores (N, classes, H, W); argmax for the mask",
                "class_names": ",".join(meta.class_names or []), "decoder": (meta.decoder or {}).get("kind", "")}
    if meta.task != "multilabel":
        return {}
    return {"task": "multilabel", "activation": "sigmoid", "threshold": float(meta.training.get("threshold") or 0.5)}


def _preprocess(meta: CheckpointMeta, in_chans: int) -> Preprocessing:
    return meta.preprocess or Preprocessing(mean=(0.5,) * in_chans, std=(0.5,) * in_chans)


def _class_names(meta: CheckpointMeta, num_classes: int) -> list[str]:
    names = meta.class_names
    return [str(n) for n in names] if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def _pil_resample(interpolation: str | None) -> int:
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(interpolation or "bicubic", Image.BICUBIC)
