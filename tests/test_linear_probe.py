"""The linear probe of frozen features (objectives.linear_probe, `vit eval --linear-probe`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from vitcli.models import create_model
from vitcli.objectives.linear_probe import linear_probe, probe_features

from helpers import make_ckpt, run_cli


def gaussian_classes(n: int, seed: int, dim: int = 12, classes: int = 4):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * 1.2
    y = rng.integers(0, classes, size=n)
    return torch.tensor(centres[y] + rng.normal(size=(n, dim)), dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("protocol", ["dino", "mae"])
def test_probe_accuracy_is_that_of_a_logistic_regression(protocol):
    train_x, train_y = gaussian_classes(600, 0)
    test_x, test_y = gaussian_classes(400, 1)
    got = linear_probe(train_x, train_y, test_x, test_y, 4, protocol, epochs=30)
    reference = LogisticRegression(max_iter=2000).fit(train_x.numpy(), train_y.numpy()).score(test_x.numpy(), test_y.numpy())
    assert got["protocol"] == protocol and got["lr"] in {float(k) for k in got["heldout_accuracy"]}
    assert abs(got["accuracy"] - reference) < 0.04, (got, reference)


def test_the_learning_rate_is_chosen_without_the_test_split():
    train_x, train_y = gaussian_classes(300, 0)
    test_x, test_y = gaussian_classes(200, 1)
    a = linear_probe(train_x, train_y, test_x, test_y, 4, "dino", epochs=10)
    b = linear_probe(train_x, train_y, test_x, test_y[torch.randperm(len(test_y))], 4, "dino", epochs=10)
    assert a["lr"] == b["lr"] and a["heldout_accuracy"] == b["heldout_accuracy"]


def test_dino_protocol_reads_the_last_four_class_tokens_through_the_final_norm():
    torch.manual_seed(0)
    model = create_model("vit_pico", img_size=8, patch_size=2, embed_dim=32, depth=5, num_heads=2, num_classes=0).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():  # by hand: the blocks one by one
        tokens = model.embed_tokens(model.patch_embed(x))
        outs = []
        for block in model.blocks:
            tokens = block(tokens)
            outs.append(model.norm(tokens)[:, 0])
        expected = torch.cat(outs[-4:], dim=-1)
        torch.testing.assert_close(probe_features(model, x, "dino"), expected)
        torch.testing.assert_close(probe_features(model, x, "mae"), model.forward_features(x)[:, 0])


def test_dino_protocol_for_wide_models_is_class_token_and_pooled_patches():
    model = create_model("vit_pico", img_size=8, patch_size=2, embed_dim=768, depth=1, num_heads=12, num_classes=0).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(probe_features(model, x, "dino"), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))


def test_cli_linear_probe_json(tmp_path, capsys):
    path = make_ckpt(tmp_path / "p.safetensors", num_classes=0)
    assert run_cli("eval", "--ckpt", str(path), "--dataset", "digits", "--linear-probe", "--json", "--num-workers", "0") == 0
    probe = json.loads(capsys.readouterr().out)["linear_probe"]
    assert probe["protocol"] == "dino" and 0.1 < probe["accuracy"] <= 1.0 and probe["lr"] > 0
    assert run_cli("eval", "--ckpt", str(path), "--dataset", "digits", "--linear-probe", "--probe-protocol", "bn") == 2
    assert "--probe-protocol" in capsys.readouterr().err
