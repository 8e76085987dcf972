"""Loading checkpoints from files: every accepted form, safety against code in pickles, clear errors,
and adapting to a new resolution / patch size / class count (paper §3.2)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from vitcli.io.checkpoint import save_checkpoint
from vitcli.errors import VitError
from vitcli.models import create_model
from vitcli.models.adapt import adapt_checkpoint, meta_for_model, model_from_checkpoint, save_state_dict
from vitcli.models.load import LoadedCheckpoint, load_checkpoint

# Head width 64, so even a bare file's head count is inferred right.
TINY = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def theirs() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model: torch.nn.Module, img_size=(32, 32)) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, *img_size))


def assert_same_logits(ours, theirs) -> None:
    a, b = logits(ours), logits(theirs)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# timm files


@pytest.mark.parametrize("name", ["w.pth", "w.pt", "w.bin", "w.safetensors"])
def test_bare_timm_state_dict(tmp_path, theirs, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(theirs.state_dict(), str(path))
    else:
        torch.save(theirs.state_dict(), path)
    model, ck = model_from_checkpoint(path)
    assert ck.format == "timm" and ck.meta.inferred and ck.source == path
    assert ck.meta.model_args["num_heads"] == 2 and ck.meta.num_classes == 5
    assert_same_logits(model, theirs)


def test_timm_train_py_checkpoint(tmp_path, theirs):
    """timm's train.py: weights under 'state_dict', its argparse args beside them, EMA under 'state_dict_ema'."""
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": theirs.state_dict(),
                "state_dict_ema": theirs.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=1e-3), "version": 2, "metric": 71.5}, path)
    model, ck = model_from_checkpoint(path)
    assert any("'state_dict'" in n and "EMA" in n for n in ck.notes)
    assert_same_logits(model, theirs)


@pytest.mark.parametrize("key", ["model", "model_ema"])
def test_wrapped_and_ddp_prefixed(tmp_path, theirs, key):
    path = tmp_path / "ckpt.pth"
    torch.save({key: {f"module.{k}": v for k, v in theirs.state_dict().items()}, "epoch": 1}, path)
    model, _ = model_from_checkpoint(path)
    assert_same_logits(model, theirs)


def test_num_heads_override_for_bare_file(tmp_path):
    torch.manual_seed(0)
    four = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "num_heads": 4}).eval()
    path = tmp_path / "w.safetensors"
    save_file(four.state_dict(), str(path))
    ck = load_checkpoint(path)
    assert ck.meta.model_args["num_heads"] == 2 and any("attention heads" in n for n in ck.notes)
    model, _ = model_from_checkpoint(ck, model_args={"num_heads": 4})
    assert_same_logits(model, four)


def test_timm_hub_snapshot_directory(tmp_path):
    """A downloaded timm Hub folder: model.safetensors + config.json (name, input size, labels)."""
    torch.manual_seed(0)
    four = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "num_heads": 4}).eval()
    save_file(four.state_dict(), str(tmp_path / "model.safetensors"))
    # vit_pico has width 64, not 128: its head count must not be borrowed; model_args fixes it.
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_pico", "num_classes": 5, "label_names": list("abcde"),
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}}))
    ck = load_checkpoint(tmp_path)
    assert ck.meta.class_names == list("abcde") and ck.meta.preprocess.crop_pct == 0.9
    assert ck.meta.model_args["num_heads"] == 2
    model, _ = model_from_checkpoint(ck, model_args={"num_heads": 4})
    assert_same_logits(model, four)


def test_timm_no_embed_class(tmp_path):
    """timm's no_embed_class (DeiT III, big_vision): the class token gets no position; read as is."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, no_embed_class=True, **TINY).eval()
    assert model.pos_embed.shape[1] == 16
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    ours, ck = model_from_checkpoint(path)
    assert ck.meta.model_args["no_embed_class"] and ours.pos_embed.shape == model.pos_embed.shape
    assert_same_logits(ours, model)


# ---------------------------------------------------------------------------------------------------
# vitcli run directories


def _write_run(root, weights_by_step: dict[int, dict], best: int | None):
    root.mkdir()
    (root / "recipe.yaml").write_text("model: {name: vit_pico}\n")
    for step, sd in sorted(weights_by_step.items()):
        meta = {"format": "vitcli", "model": "vit_pico", "model_args": {"num_classes": 10},
                "num_classes": 10, "img_size": [8, 8], "mean": [0.5], "std": [0.5], "interpolation": "bicubic",
                "crop_pct": 1.0, "dataset": "digits", "class_names": [str(i) for i in range(10)],
                "step": step, "top1": 0.5}
        save_checkpoint(root / "checkpoints", step, sd, meta, {"step": step}, is_best=step == best, keep=5)


def test_run_directory_prefers_best_then_last(tmp_path):
    torch.manual_seed(0)
    a, b = create_model("vit_pico").state_dict(), create_model("vit_pico").state_dict()
    run = tmp_path / "run"
    _write_run(run, {100: a, 200: b}, best=100)
    ck = load_checkpoint(run)
    assert ck.format == "vitcli" and ck.meta.training["step"] == 100 and ck.meta.class_names[3] == "3"
    assert any("best" in n for n in ck.notes)
    torch.testing.assert_close(ck.state_dict["pos_embed"], a["pos_embed"])
    model, _ = model_from_checkpoint(run)
    torch.testing.assert_close(model.state_dict()["head.weight"], a["head.weight"])

    (run / "checkpoints" / "best").unlink()
    ck = load_checkpoint(run)
    assert ck.meta.training["step"] == 200 and any("last" in n for n in ck.notes)
    assert load_checkpoint(run / "checkpoints" / "step-00000100").meta.training["step"] == 100
    assert load_checkpoint(run / "checkpoints" / "step-00000100" / "model.safetensors").meta.training["step"] == 100


def test_run_directory_without_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(VitError, match="no checkpoint yet"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Safety and broken files


class _Touch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_not_run(tmp_path, writer):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"x": torch.zeros(1)}, "boom": _Touch(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with open(path, "rb") as f:  # the file really is an exploit: an unsafe load runs it (our own file)
        torch.load(f, weights_only=False) if writer == "torch.save" else pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(VitError, match="refusing to unpickle") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and ".safetensors" in str(err.value)
    assert not marker.exists()


def test_truncated_safetensors(tmp_path, theirs):
    path = tmp_path / "w.safetensors"
    save_file(theirs.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VitError, match="truncated") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_truncated_torch_file(tmp_path, theirs):
    path = tmp_path / "w.pth"
    torch.save(theirs.state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(VitError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_bad_npz_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(VitError, match="not a readable .npz"):
        load_checkpoint(bad)
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(VitError, match="refusing to unpickle"):
        load_checkpoint(obj)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(VitError, match="not a Google ViT"):
        load_checkpoint(other)


def test_missing_empty_unknown(tmp_path):
    with pytest.raises(VitError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty.pth").touch()
    with pytest.raises(VitError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(VitError, match="don't know how to read"):
        load_checkpoint(tmp_path / "w.h5")
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(VitError, match="does not look like a ViT"):
        load_checkpoint(tmp_path / "resnet.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(VitError, match="directory without a checkpoint"):
        load_checkpoint(tmp_path / "d")


def test_timm_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(VitError, match="offline") as err:
        load_checkpoint("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert time.monotonic() - start < 5
    assert "hf download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Adapting: resolution, patch size, classes


def _saved(tmp_path, model) -> LoadedCheckpoint:
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return load_checkpoint(path)


def test_new_img_size_resamples_pos_embed_like_timm(tmp_path, theirs):
    model, ck = model_from_checkpoint(_saved(tmp_path, theirs), img_size=48)
    expected = resample_abs_pos_embed(theirs.pos_embed.detach(), new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    assert model.config.img_size == (48, 48) and any("4x4 to a 6x6" in n for n in ck.notes)
    torch.testing.assert_close(model.head.weight, theirs.head.weight)  # head kept
    assert logits(model, (48, 48)).shape == (2, 5)


def test_new_num_classes_gives_zero_head(tmp_path, theirs):
    model, ck = model_from_checkpoint(_saved(tmp_path, theirs), num_classes=3)
    assert model.head.weight.shape == (3, 128) and not model.head.weight.any() and not model.head.bias.any()
    assert model.config.num_classes == 3
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, theirs.blocks[1].mlp.fc2.weight)
    assert not logits(model).any()  # a zero head predicts all-zero logits, as in the paper's fine-tuning start


def test_new_patch_size_resizes_kernel_and_grid(tmp_path, theirs):
    model, _ = model_from_checkpoint(_saved(tmp_path, theirs), patch_size=4)
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 128)
    expected = resample_patch_embed(theirs.patch_embed.proj.weight.detach(), [4, 4])
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), expected, atol=1e-4, rtol=1e-4)


def test_mismatch_names_the_tensor(tmp_path, theirs):
    ck = _saved(tmp_path, theirs)
    with pytest.raises(VitError, match=r"blocks\.0\.mlp\.fc1\.weight.*different architecture"):
        model_from_checkpoint(ck, model_args={"mlp_ratio": 2.0})
    ck.meta.model_args["num_classes"] = 7  # metadata that disagrees with the head
    with pytest.raises(VitError, match="head.weight.*class count"):
        model_from_checkpoint(ck)


def test_interpolate_pos_round_trip(tmp_path, theirs):
    """What `vit interpolate-pos` does: load -> resample -> save, keys unchanged, then it loads at 48."""
    ck = _saved(tmp_path, theirs)
    adapted = adapt_checkpoint(ck, img_size=48)
    assert adapted.state_dict.keys() == ck.state_dict.keys()
    out = save_state_dict(tmp_path / "out" / "w48.safetensors", adapted.state_dict, adapted.meta)
    back = load_checkpoint(out)
    assert back.meta.img_size == [48, 48] and back.state_dict["pos_embed"].shape == (1, 37, 128)
    model, _ = model_from_checkpoint(back)
    assert model.config.img_size == (48, 48)

    pth = save_state_dict(tmp_path / "w48.pth", adapted.state_dict, adapted.meta)
    plain = torch.load(pth, weights_only=True)
    assert plain.keys() == ck.state_dict.keys()
    torch.testing.assert_close(plain["pos_embed"], adapted.state_dict["pos_embed"])
    with pytest.raises(VitError, match=".safetensors"):
        save_state_dict(tmp_path / "w.h5", adapted.state_dict, adapted.meta)


def test_meta_for_model_rebuilds_the_model(tmp_path, theirs):
    model, ck = model_from_checkpoint(_saved(tmp_path, theirs), img_size=48, num_classes=3)
    path = save_state_dict(tmp_path / "ft.safetensors", model.state_dict(), meta_for_model(model, ck.meta))
    again, back = model_from_checkpoint(path)
    assert back.format == "vitcli" and again.config == model.config
    torch.testing.assert_close(again.pos_embed, model.pos_embed)


def test_checkpoint_meta_reads_and_writes_the_flat_layout_of_earlier_versions():
    from vitcli.io.meta import CheckpointMeta, Preprocessing

    old = {"format": "vitcli", "model": "vit_pico", "model_args": {"num_classes": 10, "img_size": [8, 8]},
           "num_classes": 10, "img_size": [8, 8], "mean": [0.5], "std": [0.25], "interpolation": "bilinear",
           "crop_pct": 1.0, "dataset": "digits", "class_names": [str(i) for i in range(10)], "step": 7, "top1": 0.5}
    meta = CheckpointMeta.from_dict(old)
    assert meta.preprocess == Preprocessing(mean=(0.5,), std=(0.25,), interpolation="bilinear", crop_pct=1.0)
    assert meta.training == {"step": 7, "top1": 0.5} and meta.dataset == "digits" and meta.num_classes == 10
    assert meta.to_dict() == old
    assert CheckpointMeta.from_dict(meta.to_dict()) == meta
