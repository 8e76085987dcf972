"""What the self-supervised objectives share: their evaluation and what they keep of their own.

An evaluation reports the objective's loss on the evaluation split, with masks drawn from a fixed seed
(comparable from one evaluation to the next, and the training RNG is not touched), and, where the data
has labels, the closed-form few-shot accuracy of the frozen features (objectives.fewshot) and, when
objective.knn asks, their weighted k-NN accuracy against the training split (objectives.knn). The best
checkpoint is the one with the best k-NN accuracy, else few-shot accuracy at the largest K, else the lowest loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from vitcli.errors import VitError
from vitcli.objectives.base import Objective
from vitcli.objectives.evaluate import gather_arrays
from vitcli.objectives.fewshot import FewshotSet, features, fewshot_metrics
from vitcli.objectives.knn import NeighbourSet, knn_accuracy

EVAL_SEED = 0


class SelfSupervised(Objective):
    """Base of mpp, mae and dino: `model` is the ViT encoder; the other children are the objective's own."""

    name = "self-supervised"
    reads_labels = False
    default_fewshot = (10,)  # watch the representation improve, where the data has labels

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.train.linear_probe:
            raise VitError(f"'train.linear_probe' trains a classification head; objective {cls.name} has none.")
        if recipe.data.mixup or recipe.data.cutmix:
            raise VitError(f"'data.mixup' and data.cutmix mix labels; objective {cls.name} reads none. Set them to 0.")

    @classmethod
    def patch_size(cls, model: nn.Module) -> int:
        """The pixel patch size of a plain ViT that takes masked patch tokens; VitError for any other model."""
        embed = getattr(model, "patch_embed", None)
        name = getattr(getattr(model, "config", None), "name", "this model")
        if embed is None or not hasattr(embed, "proj") or getattr(getattr(model, "config", None), "hybrid", False):
            raise VitError(f"objective {cls.name} masks patches of pixels, so it needs a plain ViT; "
                           f"{name} does not embed pixel patches. Choose a vit_* model.")
        if not hasattr(model, "encode_patches"):
            raise VitError(f"objective {cls.name} feeds the encoder masked patch tokens, which vitcli's rotary-embedding "
                           f"ViTs ({name}) do not take yet; pretrain a vit_* model, or fine-tune this one")
        return embed.patch_size[0]

    def __init__(self, model: nn.Module, fewshot: FewshotSet | None = None, knn: NeighbourSet | None = None):
        super().__init__(model)
        self.fewshot = fewshot  # set by the engine when the data has labels
        self.knn = knn  # set by the engine when the data has labels and objective.knn asks

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        shots = self.fewshot.shots if self.fewshot is not None else []
        knn = [f"knn_{self.knn.k}"] if self.knn is not None else []
        return ("loss", "num_images", "images_per_second", *(f"fewshot_{k}" for k in shots), *knn)

    @property
    def best_metric(self) -> str:
        if self.knn is not None:
            return f"knn_{self.knn.k}"
        return f"fewshot_{max(self.fewshot.shots)}" if self.fewshot is not None else "loss"

    def score(self, metrics: dict[str, Any]) -> float:
        """Higher is better: k-NN accuracy, else few-shot accuracy, else minus the loss."""
        return -metrics["loss"] if self.best_metric == "loss" else metrics[self.best_metric]

    def describe(self, metrics: dict[str, Any]) -> str:
        shots = "".join(f"  {k.removeprefix('fewshot_')}-shot {v:.4f}" for k, v in metrics.items() if k.startswith("fewshot_"))
        knn = "".join(f"  {k.removeprefix('knn_')}-NN {v:.4f}" for k, v in metrics.items() if k.startswith("knn_"))
        return f"loss {metrics['loss']:.4f}{shots}{knn}"

    def no_weight_decay(self) -> set[str]:
        """Embeddings and tokens stay out of weight decay (read by timm.optim), as in the ViT itself."""
        return {f"model.{k}" for k in self.model.no_weight_decay()} | {k for k, _ in self.named_parameters() if "token" in k}

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor], encoder: nn.Module | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The labels, if any, are ignored; each objective defines `loss(encoder, images, generator)`.
        Evaluation comes through here too (FSDP gathers the objective's shards around forward)."""
        return self.loss(self.model if encoder is None else encoder, batch[0], generator), {}

    @torch.no_grad()
    def evaluate(self, encoder: nn.Module, batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """The objective's loss over the evaluation batches (fixed masks) and, with labels, few-shot accuracy
        of `encoder` (the trained weights or their EMA)."""
        import time

        was = encoder.training, self.training
        self.eval()
        encoder.eval()
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss x images, images]
        feats, labels = [], []
        start = time.perf_counter()
        for images, y in batches:
            if len(y) == 0:
                continue
            images = images.to(device, non_blocking=True)
            with amp:
                totals += torch.stack([self((images, y), encoder, generator)[0].double() * len(y),
                                       torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
                if self.fewshot is not None or self.knn is not None:
                    feats.append(encoder.forward_head(encoder.forward_features(images), pre_logits=True).float().cpu())
                    labels.append(y.cpu())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        seconds = time.perf_counter() - start
        out: dict[str, Any] = {"loss": float(totals[0] / totals[1].clamp(min=1)), "num_images": int(totals[1]),
                               "seconds": seconds, "images_per_second": float(totals[1]) / seconds if seconds else 0.0}
        if self.fewshot is not None or self.knn is not None:
            eval_feats, eval_labels = gather_arrays(torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32),
                                                    torch.cat(labels).numpy() if labels else np.zeros(0, np.int64))
        if self.fewshot is not None:
            out.update(fewshot_metrics(encoder, self.fewshot, eval_feats, eval_labels, device, amp_dtype))
        if self.knn is not None:
            train_feats, train_labels = features(encoder, self.knn.batches, device, amp_dtype)
            found = knn_accuracy(train_feats, train_labels, eval_feats, eval_labels, self.knn.num_classes, (self.knn.k,))
            out[f"knn_{self.knn.k}"] = found[str(self.knn.k)]
        self.train(was[1])
        encoder.train(was[0])
        return out
