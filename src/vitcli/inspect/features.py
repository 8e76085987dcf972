"""The numbers behind the paper's inspection figures (Dosovitskiy et al., Fig. 7 and Fig. 6).

    comps, share = patch_embedding_pca(model)          # Fig. 7 left: principal components of the filters
    sim = position_similarity(model)                   # Fig. 7 centre: (gh, gw, gh, gw) cosine similarity
    stats = position_structure(sim)                    # neighbours vs distant positions, Spearman rho
    probe = AttentionProbe(model)                      # Fig. 7 right and Fig. 6, from real images:
    with probe:
        model(images)                                  # hooks reduce each block's attention on the fly
    probe.mean_distance()                              # (depth, heads) mean attention distance, pixels
    probe.rollout_maps()                               # (images, gh, gw) attention rollout

Attention weights are recomputed from each block's fused qkv projection (a forward hook on `attn.qkv`):
softmax(q k^T / sqrt(head_dim)), exactly what `F.scaled_dot_product_attention` applies. The hooks
reduce as they go (distance sums, a running rollout product), so memory does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------
# Grid geometry


def grid_coords(grid: tuple[int, int]) -> np.ndarray:
    """(N, 2) integer (row, column) of each patch, in token order (row-major)."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def patch_distances(grid: tuple[int, int], cell: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """(N, N) Euclidean distance between patch centres; cell = (height, width) of one patch in pixels."""
    xy = grid_coords(grid) * np.asarray(cell, dtype=np.float64)
    return np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))


def patch_cell(model: nn.Module) -> tuple[float, float]:
    """Pixels per grid cell: the patch size, or the hybrid's CNN stride (image size / grid size)."""
    pe = model.patch_embed
    return pe.img_size[0] / pe.grid_size[0], pe.img_size[1] / pe.grid_size[1]


# ---------------------------------------------------------------------------------------------------
# Fig. 7 left: patch-embedding filters


def has_pixel_filters(model: nn.Module) -> bool:
    """True when patch_embed.proj convolves pixels (False for the hybrid, whose proj sees CNN features)."""
    proj = model.patch_embed.proj
    return proj.in_channels == getattr(model.patch_embed, "in_chans", proj.in_channels) and proj.in_channels <= 4


@torch.no_grad()
def patch_embedding_pca(model: nn.Module, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the linear patch-embedding filters (paper Fig. 7 left: first 28).

    Each of the D filters (C, p, p) is one sample; the samples are centred and decomposed by SVD.

    Returns:
        components: (k, C, p, p), unit norm, ordered by explained variance; the sign of each is chosen
            so that its entry of largest magnitude is positive.
        explained: (k,) share of the filters' total variance each component explains.
    """
    w = model.patch_embed.proj.weight.detach().to("cpu", torch.float64)
    shape = w.shape[1:]
    x = w.reshape(w.shape[0], -1)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    k = min(k, vt.shape[0])
    comps = vt[:k]
    big = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(k), big])
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    var = s**2
    explained = var[:k] / var.sum().clamp_min(1e-300)
    return comps.reshape(k, *shape).numpy(), explained.numpy()


# ---------------------------------------------------------------------------------------------------
# Fig. 7 centre: position embeddings


@torch.no_grad()
def position_similarity(model: nn.Module) -> np.ndarray:
    """Cosine similarity of each patch's position embedding with every other: (gh, gw, gh, gw).

    sim[r, c] is the map of position (r, c) against all positions (the prefix tokens' slots are left out).
    """
    gh, gw = model.patch_embed.grid_size
    slots = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    pos = model.pos_embed.detach().to("cpu", torch.float64)[0, slots:]
    pos = pos / pos.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (pos @ pos.T).reshape(gh, gw, gh, gw).numpy()


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN when either is constant."""
    rx, ry = _average_ranks(np.asarray(x)), _average_ranks(np.asarray(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


@dataclass
class PositionStructure:
    """How much the position embeddings' similarity follows the 2D grid.

    near: mean similarity of grid neighbours (distance 1); far: of pairs at distance >= far_from (None
    when the grid has no such pair); spearman: rank correlation between grid distance and similarity over
    all pairs of distinct positions (strongly negative = 2D structure); same_row / same_column / other:
    mean similarity of distinct pairs sharing a row, sharing a column, sharing neither (the paper's
    row-column structure; None when there is no such pair); n_near / n_far / n_pairs: counts.
    """

    near: float
    far: float | None
    spearman: float
    same_row: float | None
    same_column: float | None
    other: float | None
    far_from: float
    n_near: int
    n_far: int
    n_pairs: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def position_structure(sim: np.ndarray, far_from: float = 3.0) -> PositionStructure:
    """Summarise a (gh, gw, gh, gw) similarity as neighbours vs distant pairs and Spearman's rho."""
    gh, gw = sim.shape[:2]
    coords = grid_coords((gh, gw))
    sq = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)  # integer squared distances: exact ties
    i, j = np.triu_indices(gh * gw, k=1)
    d2, s = sq[i, j], sim.reshape(gh * gw, gh * gw)[i, j]
    near, far = s[d2 == 1], s[d2 >= far_from**2]
    row = coords[i, 0] == coords[j, 0]
    col = coords[i, 1] == coords[j, 1]

    def mean(x: np.ndarray) -> float | None:
        return float(x.mean()) if len(x) else None

    return PositionStructure(
        near=float(near.mean()) if len(near) else float("nan"), far=mean(far),
        spearman=spearman(d2, s) if len(s) > 1 else float("nan"),
        same_row=mean(s[row]), same_column=mean(s[col]), other=mean(s[~row & ~col]),
        far_from=far_from, n_near=len(near), n_far=len(far), n_pairs=len(s))


# ---------------------------------------------------------------------------------------------------
# Fig. 7 right and Fig. 6: attention, from real images


def attention_weights(attn: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """(B, heads, N, N) attention weights softmax(q k^T / sqrt(head_dim)) of an attention module on its
    input x, from the module's own queries and keys (`qkv_heads`: qk-norm, rotary embeddings applied)."""
    q, k, _ = attn.qkv_heads(x.float(), **kwargs)
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)


def rollout_step(rollout: torch.Tensor | None, attn: torch.Tensor, residual: bool = True) -> torch.Tensor:
    """One layer of attention rollout (Abnar & Zuidema 2020, the paper's Fig. 6): average the heads,
    add the residual path (0.5 A + 0.5 I), renormalise rows, and multiply onto the running product.

    attn: (B, heads, N, N) or (B, N, N); rollout: (B, N, N) so far, or None before the first layer.
    """
    a = attn.mean(dim=1) if attn.ndim == 4 else attn
    a = a.double()
    if residual:
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
    return a if rollout is None else a @ rollout


def attention_rollout(attentions: list[torch.Tensor], residual: bool = True) -> torch.Tensor:
    """(B, N, N) product of every layer's rollout step, first layer rightmost: row t says how much of
    output token t comes from each input token."""
    rollout = None
    for attn in attentions:
        rollout = rollout_step(rollout, attn, residual)
    if rollout is None:
        raise ValueError("attention_rollout needs at least one layer")
    return rollout


def rollout_to_patches(rollout: torch.Tensor, num_prefix_tokens: int, global_pool: str,
                       grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) share of the pooled representation drawn from each input patch.

    global_pool 'token': the class token's row; 'avg': the mean of the patch tokens' rows. Mass the class
    token keeps from its own embedding is not shown, so a map sums to at most 1.
    """
    p = num_prefix_tokens
    rows = rollout[:, 0, p:] if global_pool == "token" else rollout[:, p:, p:].mean(dim=1)
    return rows.reshape(-1, *grid)


class AttentionProbe:
    """Forward hooks on every block's `attn.qkv` that reduce attention weights while the model runs.

    Per block and head it accumulates the mean attention distance (paper Fig. 7 right): for each query
    patch, the distance in pixels to every key patch weighted by the attention, with the weights renormalised
    over the patch keys (the class token has no position); averaged over query patches and images. With
    `rollout_images`, it also keeps the attention rollout (Fig. 6) of the first that many images seen.

    Args:
        model: a VisionTransformer, hybrid or Eva; its blocks' `attn` modules must have `qkv_heads`.
        rollout_images: keep the rollout of this many images (the first ones the model sees).
    """

    def __init__(self, model: nn.Module, rollout_images: int = 0) -> None:
        self.model = model
        self.rollout_images = rollout_images
        self.prefix = int(model.num_prefix_tokens)
        self.grid = tuple(model.patch_embed.grid_size)
        self.depth = len(model.blocks)
        self.heads = int(model.blocks[0].attn.num_heads)
        self.distances = torch.from_numpy(patch_distances(self.grid, patch_cell(model)))
        self._dist_sum = torch.zeros(self.depth, self.heads, dtype=torch.float64)
        self._queries = torch.zeros(self.depth, dtype=torch.float64)
        self._rollout: torch.Tensor | None = None
        self._rollouts: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> AttentionProbe:
        for i, block in enumerate(self.model.blocks):
            self._handles.append(block.attn.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def hook(module: nn.Module, args, kwargs) -> None:
            with torch.no_grad():
                attn = attention_weights(module, args[0].detach(), **kwargs)
            self._add_distance(index, attn)
            need = self.rollout_images - sum(len(r) for r in self._rollouts)
            if need > 0:
                self._rollout = rollout_step(None if index == 0 else self._rollout, attn[:need])
                if index == self.depth - 1:
                    self._rollouts.append(self._rollout.cpu())
                    self._rollout = None
        return hook

    def _add_distance(self, index: int, attn: torch.Tensor) -> None:
        p = self.prefix
        a = attn[:, :, p:, p:].double()
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        d = self.distances.to(a.device)
        per_query = (a * d).sum(dim=-1)  # (B, heads, N)
        self._dist_sum[index] += per_query.sum(dim=(0, 2)).cpu()
        self._queries[index] += per_query.shape[0] * per_query.shape[2]

    def mean_distance(self) -> np.ndarray:
        """(depth, heads) mean attention distance in pixels over everything seen so far."""
        if not self._queries.any():
            raise ValueError("AttentionProbe saw no images; run the model inside `with probe:` first")
        return (self._dist_sum / self._queries[:, None]).numpy()

    def rollout(self) -> torch.Tensor:
        """(images, N, N) attention rollout of the first `rollout_images` images seen, in order."""
        if not self._rollouts:
            raise ValueError("AttentionProbe kept no rollout; run the model inside `with probe:` first")
        return torch.cat(self._rollouts)

    def rollout_maps(self) -> np.ndarray:
        """(images, gh, gw) share of the pooled representation drawn from each input patch."""
        pool = getattr(self.model, "global_pool", "token")
        return rollout_to_patches(self.rollout(), self.prefix, pool, self.grid).numpy()


def mean_pairwise_distance(grid: tuple[int, int], cell: tuple[float, float] = (1.0, 1.0)) -> float:
    """Mean distance over all ordered pairs of patches (self-pairs included): what uniform attention
    gives as its mean attention distance."""
    return float(patch_distances(grid, cell).mean())
