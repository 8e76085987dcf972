"""Device and precision: the small facts every run needs (RNG seeding is vitcli.rng)."""

from __future__ import annotations

import torch

from vitcli.errors import VitError


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VitError("--device cuda was asked for but PyTorch sees no CUDA GPU. Use --device cpu (or auto).")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    'auto' is bf16 on CUDA and fp32 on CPU: on CPUs without native bf16 units autocast runs ~20x
    slower than fp32.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def configure_device(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (as timm's train.py and nanoGPT
    do): under bf16 autocast that covers what stays fp32 (the hybrid stem's convolutions, fp32 heads),
    under precision fp32 it is most of the step. No effect on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
