"""Weighted k-nearest-neighbour classification of frozen features (Wu et al., 2018; DINO's `eval_knn.py`).

Every feature is L2-normalised; a test image's neighbours are the k training images of highest cosine
similarity, and each votes for its label with weight exp(similarity / T), T = 0.07. The predicted class is
the one with the largest summed vote. Similarities are computed for CHUNK test images at a time, so memory
stays at CHUNK x N_train whatever the split sizes, and the top-k is taken once for the largest k (the
smaller k read its first columns: top-k is sorted).

    accuracy = knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, ks=(10, 20))
    # {"10": 0.97, "20": 0.968}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TEMPERATURE = 0.07
DEFAULT_K = 20
CHUNK = 1024


def parse_ks(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """"10,20" (or a sequence) -> (10, 20), sorted and unique; ValueError for anything but positive integers."""
    if text is None:
        return ()
    items = [k for k in text.split(",") if k.strip()] if isinstance(text, str) else list(text)
    ks = tuple(sorted({int(k) for k in items}))
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be positive, got {list(ks)}")
    return ks


@torch.no_grad()
def knn_predictions(train_feats: torch.Tensor | np.ndarray, train_labels: torch.Tensor | np.ndarray,
                    test_feats: torch.Tensor | np.ndarray, num_classes: int, ks: Sequence[int],
                    temperature: float = TEMPERATURE, chunk: int = CHUNK) -> dict[int, torch.Tensor]:
    """{k: predicted class of each test image (N_test,)} by similarity-weighted votes of its k neighbours.

    A k larger than the training split uses every training image."""
    train = F.normalize(torch.as_tensor(train_feats, dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(test_feats, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.int64)
    most = min(max(ks), len(train))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test), chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(most, dim=1)  # sorted, most similar first
        votes = F.one_hot(labels[idx], num_classes).float() * (sims / temperature).exp().unsqueeze(-1)
        for k in ks:
            out[k].append(votes[:, :k].sum(dim=1).argmax(dim=1))
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64) for k, v in out.items()}


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, ks: Sequence[int] = (DEFAULT_K,),
                 temperature: float = TEMPERATURE, chunk: int = CHUNK) -> dict[str, float]:
    """{str(k): top-1 accuracy of the weighted k-NN classifier} on the test features."""
    truth = torch.as_tensor(test_labels, dtype=torch.int64)
    predicted = knn_predictions(train_feats, train_labels, test_feats, num_classes, ks, temperature, chunk)
    return {str(k): float((p == truth).float().mean()) if len(truth) else float("nan") for k, p in predicted.items()}


@dataclass
class NeighbourSet:
    """What k-NN evaluation during training compares against: the training split's images (eval transform)
    as re-iterable (images, labels) batches, and the k."""

    batches: Iterable
    k: int
    num_classes: int

