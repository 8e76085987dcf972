"""Weighted k-NN on frozen features (objectives.knn, `vit eval --knn`) against a brute-force numpy version."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitcli import data as vdata
from vitcli.data import LoaderSpec
from vitcli.engine.evalrun import EvalSpec, run_eval
from vitcli.errors import VitError
from vitcli.objectives.knn import knn_accuracy, knn_predictions, parse_ks

from helpers import lay_out_cache, make_ckpt, perturbed, run_cli


def brute_force_knn(train, train_labels, test, num_classes, k, temperature=0.07):
    """DINO's weighted vote, one test image at a time: full similarity row, argsort, sum exp(sim / T) per class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for row in test:
        sims = train @ row
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_labels[j]] += np.exp(sims[j] / temperature)
        out.append(int(np.argmax(votes)))
    return np.array(out)


@pytest.mark.parametrize("chunk", [7, 1024])
def test_knn_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    train_labels = rng.integers(0, 5, size=300)
    test_labels = rng.integers(0, 5, size=53)
    train = centres[train_labels] + 1.5 * rng.normal(size=(300, 16))
    test = centres[test_labels] + 1.5 * rng.normal(size=(53, 16))
    got = knn_predictions(train, train_labels, test, 5, ks=(1, 5, 20, 100), chunk=chunk)
    for k in (1, 5, 20, 100):
        assert np.array_equal(got[k].numpy(), brute_force_knn(train, train_labels, test, 5, k)), k
    acc = knn_accuracy(train, train_labels, test, test_labels, 5, ks=(20,), chunk=chunk)
    assert acc["20"] == pytest.approx(np.mean(brute_force_knn(train, train_labels, test, 5, 20) == test_labels))


def test_votes_are_weighted_by_similarity():
    # Two close neighbours of class 0 outvote three distant ones of class 1 at T = 0.07, not at T = 100
    # (where the vote is nearly a plain majority).
    train = np.array([[1.0, 0.05], [1.0, -0.05], [0.5, 1.0], [0.5, -1.0], [0.4, 1.0]])
    labels = np.array([0, 0, 1, 1, 1])
    test = np.array([[1.0, 0.0]])
    assert knn_predictions(train, labels, test, 2, ks=(5,))[5].item() == 0
    assert knn_predictions(train, labels, test, 2, ks=(5,), temperature=100.0)[5].item() == 1


def test_k_larger_than_the_training_split_uses_all_of_it():
    train = np.eye(3)
    got = knn_predictions(train, np.array([0, 1, 1]), np.array([[1.0, 0.1, 0.1]]), 2, ks=(2, 50))
    assert got[2].item() == 0 and got[50].item() == 0  # 50 > 3: all three vote, the close one outweighs
    assert np.array_equal(got[50].numpy(), brute_force_knn(train, np.array([0, 1, 1]), np.array([[1.0, 0.1, 0.1]]), 2, 3))


def test_parse_ks():
    assert parse_ks("20") == (20,) and parse_ks("200,10, 20,10") == (10, 20, 200) and parse_ks(None) == ()
    with pytest.raises(ValueError):
        parse_ks("0")
    with pytest.raises(VitError, match="--knn"):
        EvalSpec("x", "digits", knn="twenty")


def features_by_hand(model, split) -> tuple[np.ndarray, np.ndarray]:
    tf = vdata.build_transform(vdata.TransformSpec(), (8, 8), train=False)
    images = torch.stack([tf(img) for img in split.dataset["image"]])
    with torch.no_grad():
        feats = model.eval().forward_head(model.forward_features(images), pre_logits=True)
    return feats.numpy(), np.asarray(split.dataset["label"])


def test_eval_knn_of_an_encoder_without_a_fitting_head(tmp_path):
    """A 7-class checkpoint on 10-class digits: only frozen-feature evaluations are possible; k-NN's accuracy
    equals the brute-force vote over features computed here from the whole training split."""
    from vitcli.models.adapt import model_from_checkpoint

    path = make_ckpt(tmp_path / "p.safetensors", num_classes=7)
    result = run_eval(EvalSpec(path, "digits", knn="10,20", loader=LoaderSpec.evaluation(128, num_workers=0)))
    assert result["top1"] is None and set(result["knn"]) == {"10", "20"}
    model, _ = model_from_checkpoint(path)
    train_f, train_y = features_by_hand(model, vdata.load_split("digits", None, role="train", seed=0))
    test_f, test_y = features_by_hand(model, vdata.load_split("digits", role="eval"))
    for k in (10, 20):
        expected = np.mean(brute_force_knn(train_f, train_y, test_f, 10, k) == test_y)
        assert result["knn"][str(k)] == pytest.approx(expected, abs=1.5 / len(test_y))  # float32 vs float64 ties
    json.dumps(result, allow_nan=False)


def test_cli_knn_json_and_a_bad_k(trained, capsys):
    assert run_cli("eval", "--ckpt", str(trained), "--knn", "0") == 2
    assert "--knn" in capsys.readouterr().err
    assert run_cli("eval", "--ckpt", str(trained), "--knn", "20", "--json", "--num-workers", "0") == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["knn"]["20"] <= 1.0 and result["top1"] is not None


@pytest.mark.slow
def test_knn_of_a_timm_name_from_the_cache(hf_cache, capsys):
    """`vit eval --ckpt timm:NAME --knn`: DINOv2's published name (random weights laid out in a private
    Hugging Face cache), at 28 px, against the brute-force vote over its own features."""
    import timm
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    from vitcli.models.adapt import model_from_checkpoint

    name = "vit_small_patch14_dinov2.lvd142m"
    torch.manual_seed(0)
    theirs = perturbed(timm.create_model(name, pretrained=False))  # LayerScale off its 1e-5 start: varied features
    lay_out_cache(hf_cache, get_pretrained_cfg(name).hf_hub_id, {"model.safetensors": lambda p: save_file(theirs.state_dict(), str(p))})
    assert run_cli("eval", "--ckpt", f"timm:{name}", "--dataset", "digits", "--res", "28", "--knn", "20", "--json",
                   "--num-workers", "0", "--batch-size", "512") == 0
    result = json.loads(capsys.readouterr().out)
    model, ck = model_from_checkpoint(f"timm:{name}", img_size=(28, 28))
    tf = vdata.build_transform(vdata.TransformSpec.from_checkpoint(ck.meta, 3), (28, 28), train=False)

    def feats(split):
        images = torch.stack([tf(img) for img in split.dataset["image"]])
        with torch.no_grad():
            return model.eval().forward_head(model.forward_features(images), pre_logits=True).numpy(), np.asarray(split.dataset["label"])

    train_f, train_y = feats(vdata.load_split("digits", None, role="train", seed=0))
    test_f, test_y = feats(vdata.load_split("digits", role="eval"))
    expected = np.mean(brute_force_knn(train_f, train_y, test_f, 10, 20) == test_y)
    assert result["knn"]["20"] == pytest.approx(expected, abs=1.5 / len(test_y)) and expected > 0.3
