"""Every test runs offline (the hub cannot be reached here) with a private Hugging Face cache."""

from __future__ import annotations

import datasets
import pytest


@pytest.fixture(autouse=True)
def _offline_private_hf_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
