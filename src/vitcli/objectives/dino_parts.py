"""DINO's pieces, each checkable on its own: the projection head, the centred and sharpened cross-entropy
over pairs of views, the schedules, and DINOv2's KoLeo regulariser.

References: DINO (Caron et al., 2021; main_dino.py, vision_transformer.DINOHead, utils.cosine_scheduler)
and DINOv2 (Oquab et al., 2023; loss/koleo_loss.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DinoHead(nn.Module):
    """MLP (Linear-GELU x (layers - 1), then a Linear to the bottleneck), L2 normalisation, and a
    weight-normalised linear layer without bias onto `out_dim` prototypes; with `norm_last_layer` its
    weight norm stays fixed at 1; with `batch_norm` a BatchNorm follows each hidden Linear (DINO's
    use_bn_in_head)."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3,
                 norm_last_layer: bool = True, batch_norm: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            hidden = i < len(dims) - 2
            mlp += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if hidden and batch_norm else []) + ([nn.GELU()] if hidden else [])
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_targets(teacher: torch.Tensor, centre: torch.Tensor | None, temp: float) -> torch.Tensor:
    """The teacher's distributions: softmax((t - centre) / temp) (DINO), or Sinkhorn-Knopp's equipartition
    when `centre` is None (DINOv2)."""
    if centre is None:
        return sinkhorn_knopp(teacher, temp)
    return F.softmax((teacher.float() - centre) / temp, dim=-1)


def cross_view_loss(student: torch.Tensor, teacher: torch.Tensor, centre: torch.Tensor | None, *, student_views: int,
                    teacher_views: int, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's loss: for each teacher view q and each student view v != q, the cross-entropy of the student's
    softmax(s_v / student_temp) against the teacher's softmax((t_q - centre) / teacher_temp) (or, centre
    None, Sinkhorn-Knopp's targets over all teacher views, as DINOv2), averaged over images and then over the pairs.
    Outputs are stacked view after view: (views x B, K)."""
    s = (student.float() / student_temp).chunk(student_views)
    t = teacher_targets(teacher, centre, teacher_temp).detach().chunk(teacher_views)
    total, pairs = student.new_zeros((), dtype=torch.float32), 0
    for q, target in enumerate(t):
        for v, logits in enumerate(s):
            if v == q:  # the same view seen by both networks carries no signal
                continue
            total = total + torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
            pairs += 1
    return total / max(pairs, 1)


@torch.no_grad()
def sinkhorn_knopp(teacher: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's alternative to centring: the teacher's softmax(t / temp) over the batch, rescaled
    `iterations` times so that each prototype receives 1/K of the batch's mass and each image sums to 1
    (an equipartition; sums over every process's images). Returns (B, K) targets."""
    q = torch.exp((teacher.float() - teacher.float().max()) / temp).T  # (K, B); the shift cancels out
    k, b = q.shape
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    total = q.sum()
    if distributed:
        torch.distributed.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if distributed:
            torch.distributed.all_reduce(rows)
        q /= rows * k
        q /= q.sum(dim=0, keepdim=True) * b * world
    return (q * b * world).T


@torch.no_grad()
def updated_centre(centre: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """centre * m + mean of the teacher's outputs * (1 - m); the mean is over every process's images."""
    total = teacher.float().sum(dim=0, keepdim=True)
    count = torch.tensor(float(len(teacher)), device=teacher.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return centre * momentum + total / count * (1 - momentum)


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """The EMA momentum at update `step` (0-based): cosine from `base` at the first update to 1 at the end
    (DINO's cosine_scheduler(base, 1, ...), per iteration)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Linear from warmup_temp (epoch 0) to temp (epoch warmup_epochs - 1), then temp: DINO's per-epoch table."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: minus the mean log distance of each L2-normalised feature to its nearest
    neighbour in the batch (spreads the features out)."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
