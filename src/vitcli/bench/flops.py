"""FLOPs of one step, counted with `torch.utils.flop_counter.FlopCounterMode`, and the closed form for a ViT.

FlopCounterMode counts 2 FLOPs per multiply-add of matrix products and convolutions only (elementwise
ops, norms, softmax and the optimizer are free), and for fused attention 2 batched matmuls forward
(Q K^T and P V) and 5 backward (it counts the recomputed Q K^T). PyTorch registers the CUDA attention
kernels; we add the CPU flash kernel with the same formulas, so a step counts the same on every device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _custom_mapping() -> dict:
    mapping = {}
    if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also knows the CPU attention kernels."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: only the global totals are read, and the tracker's
    hooks fail on a view of a parameter taken under inference_mode (an attention pool's expanded latent
    query, SigLIP's in timm as in vitcli)."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc) -> None:
        return None


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Run fn once under the counter: (total FLOPs, FLOPs per aten op name)."""
    counter = flop_counter()
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    per_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def vit_flops(*, batch: int, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int, depth: int,
              mlp_dim: int, num_classes: int, prefix_tokens: int = 1, train: bool = True) -> int:
    """What FlopCounterMode counts for one plain-ViT step (forward, or forward + backward when train).

    With B images, P = (H/p)(W/p) patches, N = P + prefix tokens (class, distillation, registers), width D,
    MLP width M, depth L, K classes:

    forward   patch conv 2·B·P·(C·p²)·D
              per block: linears 2·B·N·(3D·D + D·D + D·M + M·D) = 2·B·N·(4D² + 2DM), attention 2·(2·B·N²·D)
              head 2·B·D·K
    backward  every linear twice its forward (input and weight gradients), the patch conv once (weight
              gradient only: the images need none), attention 5 / 2 of its forward.
    """
    h, w = img_size
    patches = (h // patch_size) * (w // patch_size)
    n = patches + prefix_tokens
    d, m, b = embed_dim, mlp_dim, batch
    conv = 2 * b * patches * in_chans * patch_size * patch_size * d
    linear = depth * 2 * b * n * (4 * d * d + 2 * d * m) + 2 * b * d * num_classes
    attention = depth * 4 * b * n * n * d
    if not train:
        return conv + linear + attention
    return 2 * conv + 3 * linear + attention + attention * 5 // 2
