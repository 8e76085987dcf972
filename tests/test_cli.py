"""The `vit` command itself: model listing, python -m, error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitcli.models import model_info

from helpers import run_cli


def test_models_json_lists_every_variant_with_its_size(capsys):
    assert run_cli("models", "--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_h14", "r50_vit_b16", "vit_pico"} <= set(rows)
    assert rows["vit_b16"]["params"] == 86_567_656
    assert (rows["vit_l16"]["embed_dim"], rows["vit_l16"]["depth"], rows["vit_l16"]["num_heads"], rows["vit_l16"]["mlp_dim"]) == (1024, 24, 16, 4096)


def test_models_table_and_pattern(capsys):
    assert run_cli("models", "vit_h*") == 0
    out = capsys.readouterr().out
    assert "vit_h14" in out and "ViT-H/14" in out and "632.0M" in out and "vit_b16" not in out
    assert model_info("vit_h14")["params"] == 632_045_800


def test_models_pattern_without_match_is_a_clear_error(capsys):
    assert run_cli("models", "resnet*") == 2
    assert "No model matches 'resnet*'" in capsys.readouterr().err


def test_python_dash_m_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "vitcli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("pretrain", "finetune", "eval", "interpolate-pos", "models"):
        assert command in proc.stdout


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(Exception) as info:
        from vitcli.cli import main

        main(["--debug", "pretrain", str(tmp_path / "missing.yaml")])
    assert "does not exist" in str(info.value)


def test_unknown_subcommand_exits_2(capsys):
    assert run_cli("pretrian") == 2
