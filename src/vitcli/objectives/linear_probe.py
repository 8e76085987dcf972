"""Linear probing of frozen features: many learning rates from one forward pass, chosen on held-out images.

The backbone runs once over the training and test splits (eval transform, no augmentation); a linear head
per learning rate then trains on the stored features, all heads on the same batches (as DINOv2's linear
evaluation trains its grid of heads at once). The learning rate is chosen by accuracy on a stratified
held-out part of the training split (never the test split); the head is then trained again on the whole
training split at that rate and scored on the test split.

Features, by protocol:
- dino (Caron et al., 2021, eval_linear.py): the class tokens of the last 4 blocks, each through the final
  norm, concatenated, for models narrower than ViT-B; for ViT-B and wider, the last class token and the
  average of the last patch tokens;
- mae (He et al., 2022, main_linprobe.py): the model's pooled features through a BatchNorm without affine
  parameters (eps 1e-6), then the head.
Training: SGD with momentum 0.9, no weight decay, a cosine schedule, batch 256, DINO's 100 epochs;
heads start at zero weights (DINO: normal(0, 0.01); the choice makes the result seed-independent).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vitcli.objectives.fewshot import features

PROTOCOLS = ("dino", "mae")
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # per 256 images
EPOCHS = 100
BATCH = 256
HOLDOUT = 0.1
DINO_LAST_BLOCKS = 4
WIDE = 768  # ViT-B's width: from here DINO probes class token + average-pooled patches


@torch.no_grad()
def probe_features(model: torch.nn.Module, images: torch.Tensor, protocol: str) -> torch.Tensor:
    """(B, D') features the probe reads (see the module's docstring)."""
    if protocol == "mae":
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if getattr(model, "embed_dim", WIDE) < WIDE:
        n = min(DINO_LAST_BLOCKS, len(model.blocks))
        pairs = model.forward_intermediates(images, indices=n, return_prefix_tokens=True, norm=True, intermediates_only=True)
        return torch.cat([prefix[:, 0] for _, prefix in pairs], dim=-1)
    tokens = model.forward_features(images)
    return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)


def collect(model: torch.nn.Module, batches: Iterable, protocol: str, device: torch.device,
            amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every batch, on the CPU."""
    feats, labels = features(model, batches, device, amp_dtype, embed=lambda m, x: probe_features(m, x, protocol))
    return torch.from_numpy(feats), torch.from_numpy(labels)


class Heads(torch.nn.Module):
    """L linear heads on the same features, one batched weight (L, D, C); with `batch_norm` the features
    first pass a BatchNorm without affine parameters (MAE's), shared by the heads (they see the same batches)."""

    def __init__(self, count: int, dim: int, num_classes: int, batch_norm: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(count, dim, num_classes))  # zero init: no seed in the result
        self.bias = torch.nn.Parameter(torch.zeros(count, 1, num_classes))
        self.norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batch_norm else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (L, B, C) logits."""
        return torch.einsum("bd,ldc->lbc", self.norm(x), self.weight) + self.bias


def train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], *, batch_norm: bool,
                epochs: int = EPOCHS, batch: int = BATCH, seed: int = 0) -> Heads:
    """One linear head per learning rate (scaled by batch / 256, as DINO's), trained together on (x, y) by SGD
    with momentum 0.9 on a cosine schedule: each head's update is its own rate times its momentum buffer."""
    g = torch.Generator().manual_seed(seed)
    heads = Heads(len(lrs), x.shape[1], num_classes, batch_norm).to(x.device)
    rates = torch.tensor(lrs, dtype=x.dtype, device=x.device).view(-1, 1, 1) * batch / 256
    momentum = [torch.zeros_like(p) for p in (heads.weight, heads.bias)]
    steps, step = epochs * math.ceil(len(x) / batch), 0
    heads.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            logits = heads(x[idx])  # the heads' losses summed: each head's gradient is its own
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y[idx].repeat(len(lrs)), reduction="sum") / len(idx)
            grads = torch.autograd.grad(loss, [heads.weight, heads.bias])
            scale = 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                for p, buf, grad in zip((heads.weight, heads.bias), momentum, grads):
                    buf.mul_(0.9).add_(grad)
                    p.sub_(rates * scale * buf)
            step += 1
    return heads.eval()


@torch.no_grad()
def accuracies(heads: Heads, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each head's top-1 accuracy on (x, y)."""
    if not len(y):
        return [float("nan")] * heads.weight.shape[0]
    return (heads(x).argmax(dim=2) == y).float().mean(dim=1).tolist()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                 protocol: str, *, lrs: Sequence[float] = LEARNING_RATES, epochs: int = EPOCHS, seed: int = 0) -> dict:
    """{accuracy (test split), lr (chosen on the held-out part), protocol, heldout_accuracy {lr: accuracy}}."""
    labels = train_y.numpy()
    counts = np.bincount(labels, minlength=num_classes)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    from sklearn.model_selection import train_test_split  # here: scikit-learn and scipy cost ~1 s to import

    fit, held = train_test_split(np.arange(len(labels)), test_size=HOLDOUT, random_state=seed, stratify=stratify)
    fit, held = torch.as_tensor(fit, device=train_x.device), torch.as_tensor(held, device=train_x.device)
    bn = protocol == "mae"
    heads = train_heads(train_x[fit], train_y[fit], num_classes, lrs, batch_norm=bn, epochs=epochs, seed=seed)
    scores = dict(zip(lrs, accuracies(heads, train_x[held], train_y[held])))
    best = max(lrs, key=lambda lr: (scores[lr], -lr))  # ties: the smaller rate
    final = train_heads(train_x, train_y, num_classes, [best], batch_norm=bn, epochs=epochs, seed=seed)
    return {"accuracy": accuracies(final, test_x, test_y)[0], "lr": best, "protocol": protocol,
            "heldout_accuracy": {f"{lr:g}": v for lr, v in scores.items()}}
