"""Data sources: registry names, built-in digits, image folders, save_to_disk copies, Hub failures."""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vitcli.data import SourceSpec, build, hub, list_datasets, load_split, lookup
from vitcli.errors import VitError


# offline (conftest), and a datasets cache of each test's own
pytestmark = pytest.mark.usefixtures("fresh_hf_cache")


def make_folder(root: Path, classes=("cat", "dog", "emu"), per_class=10, fmt="png") -> None:
    """Tiny images whose pixel value encodes (class, index), in one sub-folder per class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((6, 5, 3), 20 * c + i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{fmt}")


def paths_and_labels(image_set):
    rows = image_set.dataset.cast_column("image", datasets.Image(decode=False))[:]
    return [Path(cell["path"]) for cell in rows["image"]], rows["label"]


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_aliases():
    names = list_datasets()
    for name in ("digits", "synthetic", "cifar10", "cifar100", "imagenet-1k", "imagenet-21k",
                 "oxford-iiit-pet", "oxford-flowers102", "food101", "svhn"):
        assert name in names
    assert lookup("CIFAR_100").name == "cifar100"
    assert lookup("in1k").name == lookup("imagenet").name == "imagenet-1k"
    assert lookup("pets").name == "oxford-iiit-pet"
    assert lookup("flowers102").name == "oxford-flowers102"
    assert lookup("cifar100").label_column == "fine_label" and lookup("cifar100").image_column == "img"
    assert lookup("svhn").config == "cropped_digits"
    assert lookup("uoft-cs/cifar100").name == "cifar100"  # a Hub id finds its registry entry
    assert lookup("food101").eval_split == "validation"
    assert lookup("imagenet-1k").gated and lookup("imagenet-1k").eval_split == "validation"


def test_unknown_name_suggests_closest_and_a_path():
    with pytest.raises(VitError) as err:
        load_split("cifar1000")
    message = str(err.value)
    assert "Did you mean" in message and "cifar100" in message
    assert "path" in message and "save_to_disk" in message


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(VitError, match="does not exist"):
        load_split(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_sizes_stratification_and_pixels():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    start = time.perf_counter()
    train = load_split("digits", role="train")
    test = load_split("digits", role="eval")
    assert time.perf_counter() - start < 5  # built once per process, well under a second after imports
    assert (len(train), len(test)) == (1437, 360)
    assert (train.split, test.split) == ("train", "test")
    assert train.num_classes == 10 and train.class_names == [str(i) for i in range(10)]

    digits = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0
    )
    assert np.bincount(train.dataset["label"]).tolist() == np.bincount(digits.target[idx_train]).tolist()
    assert test.dataset["label"] == digits.target[idx_test].tolist()
    for k in (0, 17, 359):
        img = test.dataset[k]["image"]
        assert img.size == (8, 8) and img.mode == "L"
        expected = np.round(digits.images[idx_test[k]] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(img), expected)
    start = time.perf_counter()
    again = load_split("digits", role="train")
    assert time.perf_counter() - start < 0.2  # cached in-process
    assert again.dataset["label"] == train.dataset["label"]


def test_subsets_are_seeded_and_eval_subset_ignores_the_training_seed():
    a = load_split("digits", role="train", seed=1, subset=100)
    b = load_split("digits", role="train", seed=1, subset=100)
    c = load_split("digits", role="train", seed=2, subset=100)
    assert len(a) == 100 and a.dataset["label"] == b.dataset["label"]
    assert paths_or_pixels(a) == paths_or_pixels(b) != paths_or_pixels(c)
    cfg = SourceSpec(dataset="digits", eval_subset=50, train_subset=5000)
    assert len(build(cfg, "train", seed=3)) == 1437  # a subset larger than the split is the whole split
    assert paths_or_pixels(build(cfg, "eval", seed=3)) == paths_or_pixels(build(cfg, "eval", seed=4))


def paths_or_pixels(image_set):
    return [np.asarray(image_set.dataset[i]["image"]).tobytes() for i in range(0, len(image_set), 10)]


def test_synthetic_has_requested_size():
    s = load_split("synthetic", role="eval", img_size=32, seed=0)
    assert len(s) == 256 and s.num_classes == 1000
    assert s.dataset[0]["image"].size == (32, 32) and s.dataset[0]["image"].mode == "RGB"


# ---------------------------------------------------------------------------------------------
# image folders


def test_image_folder_with_class_subfolders_carves_a_stratified_eval_split(tmp_path):
    make_folder(tmp_path / "animals")
    train = load_split(str(tmp_path / "animals"), role="train")
    val = load_split(str(tmp_path / "animals"), role="eval")
    assert train.class_names == ["cat", "dog", "emu"] and train.num_classes == 3
    assert (len(train), len(val)) == (27, 3)
    assert sorted(val.dataset["label"]) == [0, 1, 2]  # stratified: one per class
    train_paths, train_labels = paths_and_labels(train)
    val_paths, val_labels = paths_and_labels(val)
    assert not set(train_paths) & set(val_paths)
    for path, label in zip(train_paths + val_paths, train_labels + val_labels):
        assert path.parent.name == train.class_names[label]
    assert val.split.startswith("train")


def test_image_folder_with_train_and_val_subfolders(tmp_path):
    make_folder(tmp_path / "ds" / "train", per_class=4, fmt="jpg")
    make_folder(tmp_path / "ds" / "val", per_class=2, fmt="jpg")
    train = load_split(str(tmp_path / "ds"), role="train")
    val = load_split(str(tmp_path / "ds"), role="eval")
    assert (len(train), len(val)) == (12, 6)
    assert (train.split, val.split) == ("train", "validation")
    paths, labels = paths_and_labels(val)
    assert all(p.parts[-3] == "val" and p.parent.name == val.class_names[y] for p, y in zip(paths, labels))
    with pytest.raises(VitError, match="Available splits: train, validation"):
        load_split(str(tmp_path / "ds"), "holdout", role="eval")


def test_folder_without_class_subfolders_or_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitError, match="sub-folder"):
        load_split(str(tmp_path / "empty"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / f"{i}.png")
    with pytest.raises(VitError, match="no labels"):
        load_split(str(flat))


# ---------------------------------------------------------------------------------------------
# save_to_disk copies


def cifar100_like(n: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    features = datasets.Features({
        "img": datasets.Image(),
        "fine_label": datasets.ClassLabel(names=[f"fine{i}" for i in range(100)]),
        "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)]),
    })
    return datasets.Dataset.from_dict({
        "img": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)],
        "fine_label": rng.integers(0, 100, n).tolist(),
        "coarse_label": rng.integers(0, 20, n).tolist(),
    }, features=features)


def test_save_to_disk_with_cifar100_schema_by_path_and_as_data_dir(tmp_path):
    copy = datasets.DatasetDict({"train": cifar100_like(20, 0), "test": cifar100_like(8, 1)})
    copy.save_to_disk(str(tmp_path / "c100"))
    for image_set in (
        load_split(str(tmp_path / "c100"), role="eval"),
        load_split("cifar100", role="eval", data_dir=str(tmp_path / "c100")),
    ):
        assert image_set.dataset.column_names == ["image", "label"]
        assert isinstance(image_set.dataset.features["image"], datasets.Image)
        assert image_set.num_classes == 100 and image_set.class_names[7] == "fine7"
        assert len(image_set) == 8 and image_set.split == "test"
        assert image_set.dataset["label"] == copy["test"]["fine_label"]
        assert image_set.dataset[3]["image"].size == (32, 32)
    train = load_split("cifar-100", role="train", data_dir=str(tmp_path / "c100"))
    assert train.name == "cifar100" and len(train) == 20


def test_single_saved_dataset_with_string_labels_is_encoded_and_carved(tmp_path):
    images = [Image.fromarray(np.full((4, 4, 3), i, np.uint8)) for i in range(20)]
    ds = datasets.Dataset.from_dict(
        {"picture": images, "labels": ["b", "a"] * 10},
        features=datasets.Features({"picture": datasets.Image(), "labels": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "one"))
    train = load_split(str(tmp_path / "one"), role="train")
    val = load_split(str(tmp_path / "one"), role="eval")
    assert train.class_names == ["a", "b"] and (len(train), len(val)) == (18, 2)
    assert sorted(val.dataset["label"]) == [0, 1]


# ---------------------------------------------------------------------------------------------
# the Hub, offline


def test_offline_named_set_fails_fast_with_the_fix():
    start = time.perf_counter()
    with pytest.raises(VitError) as err:
        load_split("cifar10", role="train")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "cifar10" in message and "offline" in message and "HF_HUB_OFFLINE" in message
    assert "--data-dir PATH" in message and "--dataset PATH" in message and "HF_DATASETS_OFFLINE=1" in message
    with pytest.raises(VitError, match="huggingface-cli login"):
        load_split("imagenet-1k", role="eval")


def test_unreachable_hub_without_offline_env_fails_fast(monkeypatch):
    """The one test without HF_HUB_OFFLINE: an endpoint that cannot resolve must not cost ~20 s of retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    start = time.perf_counter()
    with pytest.raises(VitError, match="cannot be reached"):
        load_split("svhn", role="eval")
    assert time.perf_counter() - start < 5
    assert datasets.config.HF_HUB_OFFLINE is False  # the forced offline mode was undone
    assert hub.offline_reason() is not None


def test_builtin_set_rejects_data_dir(tmp_path):
    with pytest.raises(VitError, match="built in"):
        load_split("digits", data_dir=str(tmp_path))
