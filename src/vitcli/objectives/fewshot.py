"""Few-shot linear evaluation (Dosovitskiy et al. 2021, §4.1 and Appendix B.1.2 of the paper).

The model is frozen; its pre-logit features of K training images per class are mapped to {-1, 1}^C
targets by regularised least squares, solved in closed form, and the fitted linear map classifies the
evaluation split. As in big_vision's `fewshot_lsr` evaluator (the paper's code):

- features are standardised with the mean and standard deviation of the K-shot training features;
- a constant column of BIAS_CONSTANT (100) is appended, so the bias is (almost) unregularised;
- the ridge strength is fixed at DEFAULT_L2 = 2**10 (big_vision's default), not tuned per data set:
  with one to 25 images per class there is no room for a validation split to choose it;
- the K images of each class are the first K of a seeded permutation of that class, so the 1-shot
  images are among the 5-shot ones, and so on.

    W, b = fit_fewshot(train_features, train_labels, num_classes)
    accuracy = (np.argmax(eval_features @ W + b, axis=1) == eval_labels).mean()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

BIAS_CONSTANT = 100.0
DEFAULT_L2 = 2.0 ** 10
STD_EPS = 1e-5


def augment(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardised features with the constant bias column appended: (N, D) -> (N, D + 1)."""
    x = (np.asarray(features, dtype=np.float64) - mean) / std
    return np.hstack([x, np.full((len(x), 1), BIAS_CONSTANT)])


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """{-1, 1}^C rows: +1 at the label, -1 elsewhere."""
    y = -np.ones((len(labels), num_classes))
    y[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)] = 1.0
    return y


def fit_fewshot(features: np.ndarray, labels: np.ndarray, num_classes: int,
                l2: float = DEFAULT_L2) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression from features to {-1, 1}^C targets.

    With X the augmented features (`augment`: standardised, bias column appended) and Y the targets,
    the solution is w = (XᵀX + l2 I)⁻¹ XᵀY, computed as Xᵀ(XXᵀ + l2 I)⁻¹Y when there are fewer
    images than feature dimensions (the same matrix, a smaller system). The standardisation and the
    bias column are folded back, so the result applies to raw features.

    Args:
        features: (N, D) pre-logit features of the training images.
        labels: (N,) class ids in [0, num_classes).
        num_classes: C, the width of the targets.
        l2: ridge strength (> 0).

    Returns:
        (W, b), float64, shapes (D, C) and (C,): scores are `features @ W + b`.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + STD_EPS
    xa = augment(x, mean, std)
    y = targets(labels, num_classes)
    n, d = xa.shape
    if n >= d:
        w = np.linalg.solve(xa.T @ xa + l2 * np.eye(d), xa.T @ y)
    else:
        w = xa.T @ np.linalg.solve(xa @ xa.T + l2 * np.eye(n), y)
    w_feat, w_bias = w[:-1], w[-1]
    W = w_feat / std[:, None]
    b = BIAS_CONSTANT * w_bias - (mean / std) @ w_feat
    return W, b


def select_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` images per class (fewer where a class has fewer), sorted.

    Each class's images are permuted with numpy's default_rng(seed) and the first `shots` kept, so a
    smaller K takes a subset of a larger K's images for the same seed.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
    return np.sort(np.concatenate(per_class)) if per_class else np.zeros(0, dtype=np.int64)


def fewshot_accuracy(train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray,
                     eval_labels: np.ndarray, num_classes: int, l2: float = DEFAULT_L2) -> float:
    """Accuracy on the evaluation features of the linear map fitted on the training features."""
    W, b = fit_fewshot(train_features, train_labels, num_classes, l2)
    scores = np.asarray(eval_features, dtype=np.float64) @ W + b
    return float(np.mean(scores.argmax(axis=1) == np.asarray(eval_labels)))


def needed_images(labels: np.ndarray, num_classes: int, shots: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
    """Sorted indices of every training image some (K, seed) choice takes: the only ones to embed."""
    most = max(shots)
    return np.unique(np.concatenate([select_shots(labels, num_classes, most, s) for s in seeds]))


def fewshot_results(features: np.ndarray, index: np.ndarray, labels: np.ndarray, eval_features: np.ndarray,
                    eval_labels: np.ndarray, num_classes: int, shots: Sequence[int], seeds: Sequence[int],
                    l2: float = DEFAULT_L2) -> dict[str, float]:
    """{str(K): accuracy averaged over seeds} for each K in shots.

    Args:
        features: (M, D) features of the training images `index` (sorted, e.g. `needed_images`).
        index: (M,) their positions in the training split.
        labels: (N,) labels of the whole training split (the K-shot choice is made among them).
        eval_features, eval_labels: the evaluation split.
    """
    labels = np.asarray(labels)
    out = {}
    for k in shots:
        accs = []
        for seed in seeds:
            chosen = select_shots(labels, num_classes, k, seed)
            rows = np.searchsorted(index, chosen)
            accs.append(fewshot_accuracy(features[rows], labels[chosen], eval_features, eval_labels,
                                         num_classes, l2))
        out[str(k)] = float(np.mean(accs))
    return out


# ---- during training: the K-shot images of the training split, and the frozen features ----------


@dataclass
class FewshotSet:
    """What few-shot evaluation during training fits on: the chosen training images (every K-shot choice
    of every seed, eval transform) as re-iterable batches, their positions in the training split, and
    the labels of the whole split (the choice is made among them)."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    index: np.ndarray
    labels: np.ndarray
    num_classes: int
    shots: list[int]
    seeds: list[int]


def pre_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled, normalised representation a head would see."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


@torch.no_grad()
def features(model: torch.nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
             embed: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = pre_logits) -> tuple[np.ndarray, np.ndarray]:
    """Features of every batch (`embed`: pre-logits unless another is given) and labels, the model in eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for images, y in batches:
        if len(y) == 0:
            continue
        with amp:
            f = embed(model, images.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def fewshot_metrics(model: torch.nn.Module, fewshot: FewshotSet, eval_feats: np.ndarray, eval_labels: np.ndarray,
                    device: torch.device, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """{'fewshot_K': accuracy} of the frozen model for each K (see fewshot_results)."""
    train_feats, _ = features(model, fewshot.batches, device, amp_dtype)
    scores = fewshot_results(train_feats, fewshot.index, fewshot.labels, eval_feats, eval_labels,
                             fewshot.num_classes, fewshot.shots, fewshot.seeds)
    return {f"fewshot_{k}": v for k, v in scores.items()}
