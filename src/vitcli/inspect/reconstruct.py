"""The MAE paper's Fig. 2 for an MAE run: each image, its masked version, and the reconstruction (the
visible patches pasted back), from the run's own decoder (kept in the checkpoint's training state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitcli.io.checkpoint import read_state
from vitcli.io.rundir import RECIPE_FILE, STATE
from vitcli.models.load import LoadedCheckpoint
from vitcli.objectives import MaskedAutoencoder, build_objective
from vitcli.objectives.mae import NORM_PIX_EPS
from vitcli.objectives.patches import patchify, unpatchify
from vitcli.recipe import load_recipe

MASK_SEED = 0


def load_mae(ck: LoadedCheckpoint, run_dir: Path | None, model: torch.nn.Module) -> MaskedAutoencoder | None:
    """The run's MAE (encoder `model` + its decoder) when ck is an MAE run's checkpoint with its state.pt."""
    if ck.meta.objective != "mae" or run_dir is None or not isinstance(ck.source, Path):
        return None
    state_path = ck.source.parent / STATE
    if not state_path.is_file():
        return None
    own = read_state(state_path).get("objective")
    if own is None:
        return None
    recipe = load_recipe(run_dir / RECIPE_FILE)
    mae = build_objective(recipe.objective, model)
    mae.load_own_state(own)
    return mae.eval()


@torch.no_grad()
def reconstructions(mae: MaskedAutoencoder, images: torch.Tensor, mean, std) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(originals, masked, reconstructions), each (n, H, W[, 3]) in [0, 1] for drawing; masked patches grey."""
    generator = torch.Generator(device=images.device).manual_seed(MASK_SEED)
    pred, _, masking = mae.reconstruct(mae.model, images, generator)
    raw = patchify(images, mae.patch)
    if mae.norm_pix_loss:  # predictions are per-patch normalised: use the true patch's statistics, as MAE's demo
        pred = pred * (raw.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt() + raw.mean(dim=-1, keepdim=True)
    masked = masking.mask.unsqueeze(-1).bool()
    channels = images.shape[1]
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    grey = ((0.5 - m) / s).reshape(1, channels, 1, 1).expand_as(images)
    grey_patches = patchify(grey.contiguous(), mae.patch)

    def picture(patches: torch.Tensor) -> np.ndarray:
        img = (unpatchify(patches, mae.patch, mae.grid, channels) * s + m).clamp(0, 1).numpy()
        return img[:, 0] if channels != 3 else np.moveaxis(img, 1, -1)

    return (picture(raw), picture(torch.where(masked, grey_patches, raw)), picture(torch.where(masked, pred, raw)))
