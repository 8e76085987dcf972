"""Pick the checkpoint's model, write it in the asked format, and measure the written file against it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitcli.engine.resolve import load_for_inference
from vitcli.errors import VitError
from vitcli.export import formats
from vitcli.io.paths import writable_dir, writable_file
from vitcli.models import input_channels, input_size

FORMATS = {  # name: (writer, whether it writes a folder, default suffix)
    "onnx": (formats.write_onnx, False, ".onnx"),
    "exported-program": (formats.write_exported_program, False, ".pt2"),
    "hf": (formats.write_hf, True, ""),
    "timm": (formats.write_timm, True, ""),
    "vitcli": (formats.write_vitcli, False, ".safetensors"),
}
VERIFY_BATCH = 3
TOLERANCE = 1e-4  # fp32 logits


def export(ckpt: str | Path | None, fmt: str, out: str | Path, *, res: tuple[int, int] | None = None,
           dynamic_batch: bool = True, force: bool = False, runs_root: Path = Path("runs"),
           say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write `ckpt` as `fmt` to `out` and verify it; returns format, out, img_size, classes and max_abs_diff."""
    if fmt not in FORMATS:
        raise VitError(f"--format {fmt!r} is not one vitcli writes; choose one of {', '.join(FORMATS)}.")
    writer, folder, suffix = FORMATS[fmt]
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise VitError(f"--out {out} exists. Choose another path or pass --force to overwrite it.")
    if folder:
        writable_dir(out, "--out")
    else:
        if suffix and out.suffix != suffix:
            raise VitError(f"--out {out}: a {fmt} export is one {suffix} file; name it e.g. model{suffix}.")
        writable_file(out, "--out")
    # an image size the patches do not divide is refused here
    model, ck, _ = load_for_inference(ckpt, Path(runs_root), say, img_size=res, needs_head="there are no class scores to export")
    if ck.meta.task == "detection":
        from vitcli.export.detector import export_detector

        return export_detector(model, ck, fmt, out)
    if ck.meta.task == "segmentation" and fmt in ("hf", "timm"):
        raise VitError(f"{fmt} has no model class for a Segmenter (a ViT with a segmentation decoder); export it as onnx, "
                       "exported-program or vitcli (each verified against PyTorch).")
    channels, size = input_channels(model), input_size(model)
    example = torch.randn(VERIFY_BATCH, channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(example)
    load = writer(model, ck.meta, out, example, dynamic_batch=dynamic_batch)
    with torch.no_grad():
        diff = float((load(example).float() - expected.float()).abs().max())
        if dynamic_batch and fmt in ("onnx", "exported-program"):  # another batch size through the dynamic axis
            other = torch.randn(VERIFY_BATCH + 2, channels, *size, generator=torch.Generator().manual_seed(1))
            diff = max(diff, float((load(other).float() - model(other).float()).abs().max()))
    return {"format": fmt, "out": str(out), "checkpoint": str(ck.source), "model": ck.meta.model,
            "img_size": list(size), "num_classes": model.num_classes, "max_abs_diff": diff,
            "verified": diff <= TOLERANCE}
