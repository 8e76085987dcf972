"""Every test runs offline (the hub cannot be reached here) with a private Hugging Face cache; the
fixtures several modules share."""

from __future__ import annotations

import socket
from pathlib import Path

import datasets
import pytest

from helpers import DIGITS, offline_env, recipe_file, run_cli


@pytest.fixture(autouse=True)
def _offline_private_hf_cache(tmp_path_factory):
    with offline_env() as mp:  # the one offline setting (module-scoped fixtures enter it themselves)
        cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield


@pytest.fixture
def fresh_hf_cache(monkeypatch, tmp_path):
    """A datasets cache of this test's own (for tests about what indexing writes there)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A vit_pico trained 8 steps on digits (8x8, bilinear, crop_pct 1): a run directory."""
    tmp = tmp_path_factory.mktemp("run")
    with offline_env():
        assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 8}\n")), "--out", str(tmp / "run"), *DIGITS,
                       "--set", "data.interpolation=bilinear", "--set", "data.crop_pct=1.0") == 0
    return tmp / "run"


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """A private, empty Hugging Face hub cache; any attempt to open a network connection fails the test."""
    import huggingface_hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache
