"""`vit predict` against `vit eval` and the model run by hand; `vit export` checked outside vitcli: the
written files run in onnxruntime, torch.export, transformers and timm and give the model's logits."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vitcli.models.adapt import meta_for_model, model_from_checkpoint, save_state_dict
from vitcli.predict import PARTIAL_EXIT_CODE

from helpers import DIGITS, by_hand, offline_env, recipe_file, run_cli





@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """60 of the held-out digits as PNG files in class folders."""
    from vitcli.data import load_split

    root = tmp_path_factory.mktemp("digits") / "held-out"
    split = load_split("digits", role="eval")
    for i in range(60):
        row = split.dataset[i]
        (root / str(row["label"])).mkdir(parents=True, exist_ok=True)
        row["image"].save(root / str(row["label"]) / f"{i:03d}.png")
    return root




# ---- vit predict ---------------------------------------------------------------------------------------


def test_predict_agrees_with_eval_and_with_the_model_run_by_hand(trained, digit_folder, capsys):
    assert run_cli("predict", "--ckpt", str(trained), str(digit_folder), "--json", "--topk", "3", "--batch-size", "16") == 0
    rows = json.loads(capsys.readouterr().out)
    files = sorted(digit_folder.rglob("*.png"))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    logits = by_hand(trained / "checkpoints" / "best" / "model.safetensors", files)
    probs = logits.softmax(dim=1)
    for r, p in zip(rows, probs):
        assert [t["index"] for t in r["top"]] == p.topk(3).indices.tolist()
        assert r["top"][0]["probability"] == pytest.approx(p.max().item(), abs=1e-5)
        assert r["top"][0]["label"] == str(r["top"][0]["index"])  # the digits' class names
    # vit eval on the same folder scores the same top-1
    assert run_cli("eval", "--ckpt", str(trained), "--dataset", str(digit_folder), "--num-workers", "0", "--json") == 0
    scored = json.loads(capsys.readouterr().out)
    correct = sum(int(r["top"][0]["label"]) == int(Path(r["path"]).parent.name) for r in rows)
    assert scored["num_images"] == 60 and scored["top1"] == pytest.approx(correct / 60)


def test_predict_writes_csv_and_lines_and_takes_globs(trained, digit_folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert run_cli("predict", "--ckpt", str(trained), str(digit_folder / "1" / "*.png"), str(digit_folder / "2"),
                   "--csv", str(out), "--topk", "2") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    files = sorted((digit_folder / "1").glob("*.png")) + sorted((digit_folder / "2").glob("*.png"))
    assert len(lines) == len(files) and lines[0].startswith(str(files[0]))
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == [str(p) for p in files]
    assert set(table[0]) == {"path", "label_1", "index_1", "probability_1", "label_2", "index_2", "probability_2"}
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in table)


def test_predict_names_and_skips_unreadable_images_with_exit_code_4(trained, digit_folder, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(digit_folder / "3", folder)
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert run_cli("predict", "--ckpt", str(trained), str(folder), "--json") == PARTIAL_EXIT_CODE == 4
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert len(rows) == len(list((digit_folder / "3").glob("*.png")))
    assert "zz-broken.png" in err and "1 of" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["nowhere/"], "does not exist"),
    (["*.nothing-matches"], "no file matches"),
])
def test_predict_bad_input_is_one_clear_error(trained, args, message, capsys):
    assert run_cli("predict", "--ckpt", str(trained), *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_and_export_refuse_an_encoder_without_a_head(tmp_path, digit_folder, capsys):
    with offline_env():
        assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 1}\n")), "--out", str(tmp_path / "mae"), *DIGITS,
                       "--set", "objective.name=mae", "--set", "objective.mae.decoder_dim=32",
                       "--set", "objective.mae.decoder_depth=1", "--set", "objective.mae.decoder_heads=4") == 0
    assert run_cli("predict", "--ckpt", str(tmp_path / "mae"), str(digit_folder)) == 2
    assert run_cli("export", "--ckpt", str(tmp_path / "mae"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")) == 2
    err = capsys.readouterr().err
    assert err.count("no classification head") == 2 and not (tmp_path / "m.onnx").exists()


# ---- vit export: every format, checked by its own runtime ---------------------------------------------


def model_and_batch(trained: Path, batch: int = 5):
    model, ck = model_from_checkpoint(trained)
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval(), ck, x, model(x)


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(trained, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert run_cli("export", "--ckpt", str(trained), "--format", "onnx", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] and report["max_abs_diff"] <= 1e-4
    _, _, x, expected = model_and_batch(trained, batch=5)  # not the batch size the export traced
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4


def test_exported_program_reloads_with_torch_export_load(trained, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert run_cli("export", "--ckpt", str(trained), "--format", "exported-program", "--out", str(out)) == 0
    assert "largest logit difference" in capsys.readouterr().out
    _, _, x, expected = model_and_batch(trained, batch=2)
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(x)
    assert (got - expected).abs().max() <= 1e-4


def test_hf_export_loads_in_transformers_with_no_missing_keys_and_the_same_logits(trained, tmp_path):
    import transformers

    out = tmp_path / "hf"
    assert run_cli("export", "--ckpt", str(trained), "--format", "hf", "--out", str(out)) == 0
    model, info = transformers.ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, ck, x, expected = model_and_batch(trained)
    with torch.no_grad():
        got = model.eval()(pixel_values=x).logits
    assert (got - expected).abs().max() <= 1e-4
    assert model.config.id2label[3] == "3" and model.config.image_size == 8
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == list(ck.meta.preprocess.mean) and pre["size"] == {"height": 8, "width": 8}


def test_timm_export_loads_with_create_model_local_dir_for_a_nonstandard_size(trained, tmp_path):
    import timm

    out = tmp_path / "timm"
    assert run_cli("export", "--ckpt", str(trained), "--format", "timm", "--out", str(out)) == 0
    config = json.loads((out / "config.json").read_text())
    assert {"architecture", "model_args", "pretrained_cfg", "label_names"} <= set(config)
    assert config["pretrained_cfg"]["input_size"] == [3, 8, 8] and config["label_names"][:2] == ["0", "1"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.patch_embed.patch_size == (2, 2) and model.embed_dim == 32
    _, _, x, expected = model_and_batch(trained)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-4


def test_export_converts_a_foreign_checkpoint_at_another_resolution(trained, tmp_path, capsys):
    """A timm-named .pth in, vitcli .safetensors out at 12x12: the conversion reports and holds its parity."""
    from vitcli.io.checkpoint import read_weights

    weights, _ = read_weights(trained / "checkpoints" / "best" / "model.safetensors")
    foreign = tmp_path / "timm_style.pth"
    torch.save(weights, foreign)
    out = tmp_path / "m12.safetensors"
    assert run_cli("export", "--ckpt", str(foreign), "--format", "vitcli", "--out", str(out), "--res", "12", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["img_size"] == [12, 12] and report["max_abs_diff"] == 0.0
    model, _ = model_from_checkpoint(out)
    assert model.pos_embed.shape == (1, 37, 32)


@pytest.mark.parametrize("args, message", [
    (["--format", "keras", "--out", "{tmp}/m.h5"], "not one vitcli writes"),
    (["--format", "onnx", "--out", "{tmp}/m.onnx", "--res", "13"], "not a multiple of the patch size"),
    (["--format", "onnx", "--out", "{tmp}/notes.txt/m.onnx"], "is a file"),
    (["--format", "onnx", "--out", "{tmp}/m.bin"], "one .onnx file"),
])
def test_export_bad_input_is_one_clear_error(trained, args, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file\n")
    args = [a.format(tmp=tmp_path) for a in args]
    assert run_cli("export", "--ckpt", str(trained), *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_hf_export_refuses_an_average_pooling_model(trained, tmp_path, capsys):
    model, ck = model_from_checkpoint(trained, model_args={"global_pool": "avg"})
    avg = save_state_dict(tmp_path / "avg.safetensors", model.state_dict(), meta_for_model(model, ck.meta))
    assert run_cli("export", "--ckpt", str(avg), "--format", "hf", "--out", str(tmp_path / "hf")) == 2
    assert "average pooling" in capsys.readouterr().err
