"""`vit inspect`: the numbers behind the paper's Fig. 7 (left, centre, right) and Fig. 6, checked against
independent computations, and the figures written as PNGs."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitcli import create_model
from vitcli.errors import VitError
from vitcli.inspect import features as ft
from vitcli.inspect.run import FILES, run_inspect
from vitcli.models.adapt import meta_for_model, model_from_checkpoint, save_state_dict

from helpers import run_cli


def tiny(seed: int = 0, **kw) -> torch.nn.Module:
    """A 2-block ViT on 32x32 images with 8x8 patches (a 4x4 grid), unless kw says otherwise."""
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    return create_model("vit_pico", **{**args, **kw}).eval()


def force_uniform(model: torch.nn.Module) -> None:
    """Zero the query and key projections: every logit is 0, so each token attends equally to all."""
    d = model.embed_dim
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:2 * d] = 0
            block.attn.qkv.bias[:2 * d] = 0


def force_identity(model: torch.nn.Module, gain: float = 12.0) -> None:
    """q = k = gain * (LayerNorm'ed token) with one head: the logit of a token with itself exceeds every
    other by gain^2 (D - <x_i, x_j>) / sqrt(D), so the softmax saturates to the identity."""
    d = model.embed_dim
    assert all(b.attn.num_heads == 1 for b in model.blocks)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:d] = gain * torch.eye(d)
            block.attn.qkv.weight[d:2 * d] = gain * torch.eye(d)
            block.attn.qkv.bias[:2 * d] = 0


def probe(model, images: torch.Tensor, rollout_images: int = 0) -> ft.AttentionProbe:
    p = ft.AttentionProbe(model, rollout_images=rollout_images)
    with p, torch.no_grad():
        model(images)
    return p


def brute_mean_distance(rows: int, cols: int, cell: float) -> float:
    """Mean Euclidean distance (pixels) between patch centres over all ordered pairs, self-pairs included."""
    cells = list(itertools.product(range(rows), range(cols)))
    total = sum(math.hypot(cell * (r1 - r2), cell * (c1 - c2)) for (r1, c1), (r2, c2) in itertools.product(cells, cells))
    return total / len(cells) ** 2


# --------------------------------------------------------------------------------------------------
# Fig. 7 centre: position embeddings


def test_position_similarity_is_one_on_the_diagonal_symmetric_and_cosine():
    model = tiny()
    sim = ft.position_similarity(model)
    assert sim.shape == (4, 4, 4, 4)
    flat = sim.reshape(16, 16)
    np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-12)
    np.testing.assert_allclose(flat, flat.T, atol=1e-12)
    pos = model.pos_embed.detach()[0, 1:].double()  # the class token's slot is left out
    direct = F.cosine_similarity(pos[:, None], pos[None], dim=-1)
    np.testing.assert_allclose(flat, direct.numpy(), atol=1e-10)
    assert sim[1, 2, 3, 0] == pytest.approx(direct[1 * 4 + 2, 3 * 4 + 0].item(), abs=1e-10)


def average_ranks(values: list[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (the textbook definition)."""
    ordered = sorted(values)
    return np.asarray([np.mean([k + 1 for k, o in enumerate(ordered) if o == v]) for v in values])


def test_position_structure_counts_pairs_and_matches_spearman():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 20))
    sim = (a + a.T).reshape(4, 5, 4, 5) / 10
    s = ft.position_structure(sim)
    near, far, dist, vals, row, col, other = [], [], [], [], [], [], []
    cells = list(itertools.product(range(4), range(5)))
    for i, j in itertools.combinations(range(20), 2):
        (r1, c1), (r2, c2) = cells[i], cells[j]
        d = math.hypot(r1 - r2, c1 - c2)
        v = sim[r1, c1, r2, c2]
        dist.append(d)
        vals.append(v)
        near += [v] if d == 1 else []
        far += [v] if d >= 3 else []
        (row if r1 == r2 else col if c1 == c2 else other).append(v)
    assert (s.n_pairs, s.n_near, s.n_far) == (190, len(near), len(far)) == (190, 31, len(far))
    assert s.near == pytest.approx(np.mean(near), abs=1e-12)
    assert s.far == pytest.approx(np.mean(far), abs=1e-12)
    assert (s.same_row, s.same_column, s.other) == pytest.approx((np.mean(row), np.mean(col), np.mean(other)), abs=1e-12)
    rho = np.corrcoef(average_ranks(dist), average_ranks(vals))[0, 1]  # Spearman = Pearson of the ranks
    assert s.spearman == pytest.approx(rho, abs=1e-12)
    assert len(set(dist)) < len(dist)  # the distances do tie


def test_position_structure_sees_2d_structure_in_an_embedding_built_from_the_grid():
    # Each position embedding is a Gaussian bump centred on its cell: similarity falls with grid distance.
    coords = ft.grid_coords((5, 5)).astype(float)
    emb = np.exp(-((coords[:, None] - coords[None]) ** 2).sum(-1) / 2.0)
    model = tiny(img_size=40)
    with torch.no_grad():
        model.pos_embed[0, 1:, :25] = torch.from_numpy(emb)
        model.pos_embed[0, 1:, 25:] = 0
    s = ft.position_structure(ft.position_similarity(model))
    assert s.near > 0.5 > s.far
    assert s.spearman < -0.9


# --------------------------------------------------------------------------------------------------
# Fig. 7 left: patch-embedding filters


def test_patch_embedding_pca_equals_numpy_svd():
    model = tiny()
    comps, explained = ft.patch_embedding_pca(model, k=28)
    w = model.patch_embed.proj.weight.detach().double().numpy().reshape(64, -1)
    _, s, vt = np.linalg.svd(w - w.mean(axis=0), full_matrices=False)
    assert comps.shape == (28, 3, 8, 8) and explained.shape == (28,)
    np.testing.assert_allclose(explained, (s**2 / (s**2).sum())[:28], rtol=1e-9)
    flat = comps.reshape(28, -1)
    np.testing.assert_allclose(np.abs((flat * vt[:28]).sum(axis=1)), 1.0, atol=1e-9)  # same up to sign
    np.testing.assert_allclose(np.abs(flat), np.abs(vt[:28]), atol=1e-9)
    assert (flat[np.arange(28), np.abs(flat).argmax(axis=1)] > 0).all()  # the documented sign choice
    assert np.all(np.diff(explained) <= 1e-15)


# --------------------------------------------------------------------------------------------------
# Fig. 7 right and Fig. 6: attention


ROTARY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


@pytest.mark.parametrize("name,kw,tokens", [
    ("vit_pico", {}, 17),
    ("vit_pico", dict(reg_tokens=4, no_embed_class=True, init_values=0.1, qk_norm=True), 21),
    ("eva02_b14", dict(ROTARY, scale_attn_inner=True), 17),  # rotary, separate q/k/v, inner norm
    ("vit_s16_dinov3", ROTARY, 21),  # rotary with half rotation, registers
])
def test_attention_weights_reproduce_the_blocks_own_output(name, kw, tokens):
    model = tiny(seed=1, **kw) if name == "vit_pico" else create_model(name, **kw).eval()
    attn = model.blocks[1].attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], kw=k), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    h1.remove(), h2.remove()
    with torch.no_grad():
        weights = ft.attention_weights(attn, seen["x"], **seen["kw"])
        v = attn.qkv_heads(seen["x"], **seen["kw"])[2]
    assert weights.shape == (3, 4, tokens, tokens)
    np.testing.assert_allclose(weights.sum(-1).numpy(), 1.0, atol=1e-6)
    b, n, _ = seen["x"].shape
    with torch.no_grad():
        mixed = (weights @ v).transpose(1, 2).reshape(b, n, -1)
        again = attn.proj(getattr(attn, "norm", torch.nn.Identity())(mixed))
    torch.testing.assert_close(again, seen["out"], atol=1e-5, rtol=1e-5)


def test_registers_are_left_out_of_the_attention_distance_and_rollout():
    """With uniform attention over 16 patches, a class token and 4 registers, the distance over patch keys
    is the grid's mean pairwise distance and the class token's rollout spreads over the 4x4 patches only."""
    model = tiny(reg_tokens=4, no_embed_class=True, init_values=0.1)
    force_uniform(model)
    p = probe(model, torch.randn(2, 3, 32, 32), rollout_images=2)
    np.testing.assert_allclose(p.mean_distance(), brute_mean_distance(4, 4, cell=8.0), rtol=1e-6)
    maps = p.rollout_maps()
    assert maps.shape == (2, 4, 4)
    np.testing.assert_allclose(maps, maps[0, 0, 0], rtol=1e-5)  # the same share from every patch


@pytest.mark.parametrize("img_size", [32, (16, 24)])
def test_uniform_attention_distance_is_the_grids_mean_pairwise_distance(img_size):
    model = tiny(img_size=img_size)
    force_uniform(model)
    rows, cols = model.patch_embed.grid_size
    p = probe(model, torch.randn(5, 3, *model.patch_embed.img_size))
    dist = p.mean_distance()
    assert dist.shape == (2, 4)
    expected = brute_mean_distance(rows, cols, cell=8.0)
    np.testing.assert_allclose(dist, expected, rtol=1e-9)
    assert ft.mean_pairwise_distance((rows, cols), (8.0, 8.0)) == pytest.approx(expected, rel=1e-12)


def test_identity_attention_has_zero_distance_and_uniform_rollout():
    model = tiny(num_heads=1, class_token=False, global_pool="avg")
    force_identity(model)
    p = probe(model, torch.randn(4, 3, 32, 32), rollout_images=4)
    np.testing.assert_allclose(p.mean_distance(), 0.0, atol=1e-9)
    np.testing.assert_allclose(p.rollout().numpy(), np.broadcast_to(np.eye(16), (4, 16, 16)), atol=1e-9)
    np.testing.assert_allclose(p.rollout_maps(), 1 / 16, atol=1e-9)  # the mean token draws equally on all


def test_identity_attention_class_token_draws_nothing_from_patches():
    model = tiny(num_heads=1)
    force_identity(model)
    maps = probe(model, torch.randn(2, 3, 32, 32), rollout_images=2).rollout_maps()
    np.testing.assert_allclose(maps, 0.0, atol=1e-9)  # equal on every patch; the class token only sees itself


def test_uniform_attention_rollout_has_its_closed_form():
    # Each layer is 0.5 U + 0.5 I with U = 1 1^T / T, and U^2 = U, so L layers give 0.5^L I + (1 - 0.5^L) U:
    # the class token draws (1 - 0.5^L) / T from every patch.
    model = tiny(depth=3)
    force_uniform(model)
    p = probe(model, torch.randn(6, 3, 32, 32), rollout_images=4)
    maps = p.rollout_maps()
    assert maps.shape == (4, 4, 4)  # only the first 4 images are kept
    np.testing.assert_allclose(maps, (1 - 0.5**3) / 17, rtol=1e-9)


def test_rollout_of_given_matrices():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    np.testing.assert_allclose(ft.attention_rollout([eye] * 4).numpy(), np.broadcast_to(np.eye(5), (2, 5, 5)))
    a = torch.softmax(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    b = torch.softmax(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)), dim=-1)

    def step(x):
        x = 0.5 * x.mean(1).double() + 0.5 * torch.eye(5, dtype=torch.float64)
        return x / x.sum(-1, keepdim=True)

    torch.testing.assert_close(ft.attention_rollout([a, b]), step(b) @ step(a))
    maps = ft.rollout_to_patches(ft.attention_rollout([a, b]), 1, "token", (2, 2))
    torch.testing.assert_close(maps, (step(b) @ step(a))[:, 0, 1:].reshape(2, 2, 2))


# --------------------------------------------------------------------------------------------------
# The command


def digits_ckpt(path: Path, dataset: str | None = "digits") -> Path:
    torch.manual_seed(0)
    model = create_model("vit_pico", num_classes=10)
    return save_state_dict(path, model.state_dict(), meta_for_model(model, {"dataset": dataset} if dataset else {}))


def open_png(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def test_inspect_writes_every_figure_and_the_numbers(tmp_path):
    ckpt = digits_ckpt(tmp_path / "pico.safetensors")
    out = tmp_path / "figs"
    said = []
    result = run_inspect(ckpt, out=out, num_images=24, show=3, batch_size=16, device="cpu", say=said.append)
    assert set(result["figures"]) == {"filters", "position", "distance", "rollout", "per_class"}
    for key, name in FILES.items():
        assert Path(result["figures"][key]) == out / name
        w, h = open_png(out / name)
        assert 300 <= w <= 3000 and 250 <= h <= 3000, (name, w, h)
    assert result["num_images"] == 24 and result["dataset"] == "digits"
    assert np.asarray(result["attention_distance"]).shape == (4, 4)
    assert result["uniform_distance"] == pytest.approx(brute_mean_distance(4, 4, cell=2.0))
    saved = json.loads((out / "inspect.json").read_text())
    model, _ = model_from_checkpoint(ckpt)
    expected = ft.position_structure(ft.position_similarity(model))
    assert saved["position"]["spearman"] == pytest.approx(expected.spearman)
    assert saved["position"]["near"] == pytest.approx(expected.near)
    assert len(saved["rollout_patch_mass"]) == 3 and all(0 < m <= 1 for m in saved["rollout_patch_mass"])
    plt = sys.modules.get("matplotlib.pyplot")
    assert plt is None or not plt.get_fignums()  # drawn on Agg canvases: no pyplot figures left open


def test_inspect_without_a_data_set_draws_the_weight_figures_and_says_why(tmp_path):
    ckpt = digits_ckpt(tmp_path / "bare.safetensors", dataset=None)
    result = run_inspect(ckpt, out=tmp_path / "o", say=lambda m: None)
    assert set(result["figures"]) == {"filters", "position"}
    assert any("--dataset" in n for n in result["notes"])


def test_inspect_cli_prints_where_and_refuses_mistakes(tmp_path, capsys):
    ckpt = digits_ckpt(tmp_path / "pico.safetensors")
    assert run_cli("inspect", "--ckpt", str(ckpt), "--out", str(tmp_path / "cli"), "--images", "8", "--show", "2",
                   "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "cli" / FILES["rollout"]) in printed and "Spearman" in printed
    assert run_cli("inspect", "--ckpt", str(tmp_path / "missing.safetensors")) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps at the terminal width
    assert "not found" in err and "Traceback" not in err
    with pytest.raises(VitError, match="--images"):
        run_inspect(ckpt, num_images=0)
