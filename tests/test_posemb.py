"""Position-embedding resampling (vs timm) and FlexiViT patch-embedding resize (vs its definition)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from vitcli.errors import VitError
from vitcli.models import create_model
from vitcli.models.posemb import resample_pos_embed, resize_patch_embed


@pytest.mark.parametrize("old, new, mode, prefix", [
    ((14, 14), (24, 24), "bicubic", 1),   # paper §3.2: 224 -> 384 fine-tuning of a /16 model
    ((24, 24), (14, 14), "bicubic", 1),   # down
    ((14, 14), (20, 12), "bicubic", 1),   # non-square target
    ((16, 10), (8, 12), "bicubic", 1),    # non-square source (old grid given)
    ((14, 14), (24, 24), "bilinear", 1),
    ((24, 24), (10, 14), "bilinear", 0),  # no class token
])
def test_resample_pos_embed_matches_timm(old, new, mode, prefix):
    torch.manual_seed(0)
    pe = torch.randn(1, prefix + old[0] * old[1], 32)
    old_grid = None if old[0] == old[1] else old
    ours = resample_pos_embed(pe, new, old_grid=old_grid, num_prefix_tokens=prefix, mode=mode)
    theirs = resample_abs_pos_embed(pe, list(new), old_size=old_grid, num_prefix_tokens=prefix,
                                    interpolation=mode)
    assert ours.shape == (1, prefix + new[0] * new[1], 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert torch.equal(ours[:, :prefix], pe[:, :prefix])  # class token kept as is


def test_resample_pos_embed_grid_layout_is_row_major():
    # A linear ramp along the width survives bilinear resampling (without antialias) exactly.
    h, w = 4, 6
    ramp = torch.arange(w, dtype=torch.float32).repeat(h, 1)  # value = column index
    pe = torch.cat([torch.full((1, 1, 1), 7.0), ramp.reshape(1, h * w, 1)], dim=1)
    out = resample_pos_embed(pe, (4, 12), old_grid=(h, w), mode="bilinear", antialias=False)
    grid = out[0, 1:, 0].reshape(4, 12)
    assert torch.allclose(grid[0], grid[3])  # rows identical
    assert torch.all(grid[0, 1:] >= grid[0, :-1])  # still increasing along the width
    assert out[0, 0, 0] == 7.0


def test_resample_pos_embed_same_grid_and_errors():
    pe = torch.randn(1, 17, 8)
    assert resample_pos_embed(pe, 4) is pe
    with pytest.raises(VitError, match="not a square; pass old_grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))
    with pytest.raises(VitError, match="does not match"):
        resample_pos_embed(pe, (8, 8), old_grid=(3, 5))
    with pytest.raises(VitError, match="interpolation mode"):
        resample_pos_embed(pe, 8, mode="lanczos")


def test_fine_tune_at_higher_resolution_end_to_end():
    torch.manual_seed(0)
    low = create_model("vit_pico")  # 8x8 images, 4x4 grid
    high = create_model("vit_pico", img_size=16)  # 8x8 grid
    sd = low.state_dict()
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], high.patch_embed.grid_size)
    high.load_state_dict(sd, strict=True)
    assert high(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def _tokens(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """<x, w> per output channel: the patch-embedding conv applied to one patch, without bias."""
    return torch.einsum("bchw,dchw->bd", x, w)


@pytest.mark.parametrize("old, new", [((8, 8), (16, 16)), ((4, 4), (6, 10)), ((2, 2), (3, 3))])
def test_resize_patch_embed_preserves_tokens_when_upsampling(old, new):
    # FlexiViT: <x, w> = <resize(x), resize_patch_embed(w)> for every patch x when the patch grows.
    torch.manual_seed(0)
    w = torch.randn(5, 3, *old, dtype=torch.float64)
    x = torch.randn(7, 3, *old, dtype=torch.float64)
    w2 = resize_patch_embed(w, new)
    assert w2.shape == (5, 3, *new) and w2.dtype == torch.float64
    x2 = F.interpolate(x, size=new, mode="bicubic", antialias=True)
    torch.testing.assert_close(_tokens(x2, w2), _tokens(x, w), atol=1e-8, rtol=1e-8)
    # and the token is not preserved by naive interpolation of the kernel itself (the point of PI-resize)
    naive = F.interpolate(w, size=new, mode="bicubic", antialias=True)
    assert not torch.allclose(_tokens(x2, naive), _tokens(x, w), atol=1e-2)


def test_resize_patch_embed_downsampling_is_least_squares():
    # Shrinking cannot be exact; w' minimises ||B^T w' - w|| so the residual is orthogonal to B's rows.
    torch.manual_seed(0)
    old, new = (8, 8), (5, 5)
    w = torch.randn(4, 2, *old, dtype=torch.float64)
    w2 = resize_patch_embed(w, new)
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, *old)
    b = F.interpolate(basis, size=new, mode="bicubic", antialias=True).reshape(64, 25).T  # (new, old)
    residual = w2.reshape(8, 25) @ b - w.reshape(8, 64)
    torch.testing.assert_close(residual @ b.T, torch.zeros(8, 25, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("new", [(16, 16), (12, 20), (5, 5)])
def test_resize_patch_embed_matches_timm(new):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 8, 8) * 0.02
    theirs = resample_patch_embed(w, list(new))
    ours = resize_patch_embed(w, new)
    assert ours.dtype == torch.float32
    # timm inverts in float32, we in float64: compare relative to the kernel scale
    torch.testing.assert_close(ours, theirs, atol=1e-4 * theirs.abs().max().item(), rtol=1e-3)


def test_resize_patch_embed_identity_and_errors():
    w = torch.randn(2, 3, 4, 4)
    assert resize_patch_embed(w, 4) is w
    with pytest.raises(VitError, match="conv kernel"):
        resize_patch_embed(torch.randn(2, 16), 8)
