"""Transforms, Mixup, and the loader's reproducibility guarantees (order, resume, workers, ranks, bad images)."""

from __future__ import annotations

import dataclasses

import io
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from timm.loss import SoftTargetCrossEntropy

from vitcli.data import (
    ImageSet,
    LoaderSpec,
    MixSpec,
    TransformSpec,
    build_mixup,
    build_train_loss,
    build_transform,
    load_split,
    make_loader,
)
from vitcli.errors import VitError

SIZE = (16, 16)


# offline (conftest), and a datasets cache of each test's own
pytestmark = pytest.mark.usefixtures("fresh_hf_cache")


@pytest.fixture(scope="module")
def digits_train() -> ImageSet:
    return load_split("digits", role="train", subset=200, seed=0)


def png(array: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def image_set_with_bad_image(bad_index: int, n: int = 10, truncated_index: int | None = None) -> ImageSet:
    cells = [png(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(n)]
    cells[bad_index] = {"bytes": b"this is not an image", "path": None}
    if truncated_index is not None:  # the usual real-world case: a JPEG cut short by a failed download
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        cells[truncated_index] = {"bytes": buf.getvalue()[: len(buf.getvalue()) // 2], "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": cells, "label": [i % 2 for i in range(n)]}, features=features)
    return ImageSet(ds, 2, ["a", "b"], "tiny", "train")


def augmenting_cfg() -> TransformSpec:
    return TransformSpec(crop_scale=[0.3, 1.0], hflip=0.5, randaugment="rand-m9-mstd0.5", random_erasing=0.5)


@pytest.fixture(params=["pil", "tensor"])
def train_cfg(request) -> TransformSpec:
    """Random augmentation through either pipeline: the loader's guarantees hold for both."""
    if request.param == "pil":
        return augmenting_cfg()
    return TransformSpec(crop_scale=[0.3, 1.0], hflip=0.5, pipeline="tensor")


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# ---------------------------------------------------------------------------------------------
# transforms


def test_eval_transform_of_a_constant_image_is_the_normalised_value():
    cfg = TransformSpec(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.9)
    tf = build_transform(cfg, (24, 32), train=False)
    out = tf(Image.new("RGB", (50, 40), (100, 150, 200)))
    assert out.shape == (3, 24, 32) and out.dtype == torch.float32
    expected = (torch.tensor([100, 150, 200]) / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 24, 32), atol=1e-5, rtol=0)


def test_grayscale_images_feed_rgb_models_and_one_channel_mean_gives_one_channel():
    rgb = build_transform(TransformSpec(), SIZE, train=False)(Image.new("L", (8, 8), 255))
    assert rgb.shape == (3, *SIZE) and torch.allclose(rgb, torch.ones_like(rgb))
    gray_cfg = TransformSpec(mean=[0.5], std=[0.5], randaugment="rand-m9-mstd0.5", random_erasing=0.25)
    gray = build_transform(gray_cfg, SIZE, train=True)(Image.new("RGB", (8, 8), (0, 0, 0)))
    assert gray.shape == (1, *SIZE)


def test_train_transform_uses_the_recipe_and_bad_randaugment_is_a_vit_error():
    tf = build_transform(augmenting_cfg(), SIZE, train=True)
    text = repr(tf)
    assert "RandomResizedCrop" in text and "scale=(0.3, 1.0)" in text and "RandAugment" in text
    assert "RandomErasing" in text and "bicubic" in text
    assert tf(Image.new("RGB", (40, 30))).shape == (3, *SIZE)
    with pytest.raises(VitError, match="data.randaugment"):
        build_transform(TransformSpec(randaugment="rand-zz9"), SIZE, train=True)


def test_mixup_and_loss_choice():
    assert build_mixup(MixSpec(), 10) is None
    assert isinstance(build_train_loss(MixSpec(label_smoothing=0.1)), torch.nn.CrossEntropyLoss)
    assert build_train_loss(MixSpec(label_smoothing=0.1)).label_smoothing == 0.1
    cfg = MixSpec(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    assert isinstance(build_train_loss(cfg), SoftTargetCrossEntropy)
    mixup = build_mixup(cfg, 10)
    for n in (6, 5):  # an odd batch (an unreadable image was dropped) must work too
        x, y = mixup(torch.randn(n, 3, 8, 8), torch.arange(n) % 10)
        assert x.shape == (n, 3, 8, 8) and y.shape == (n, 10)
        torch.testing.assert_close(y.sum(1), torch.ones(n))
        assert y.min() > 0  # label smoothing is inside the soft targets


# ---------------------------------------------------------------------------------------------
# loader


def test_batches_have_the_right_shape_and_labels(digits_train):
    tf = build_transform(TransformSpec(), SIZE, train=False)
    loader = make_loader(digits_train, tf, LoaderSpec.evaluation(64))
    batches = collect(loader)
    assert len(loader) == loader.batches_per_epoch == len(batches) == 4
    assert [len(y) for _, y in batches] == [64, 64, 64, 8]
    x, y = batches[0]
    assert x.shape == (64, 3, *SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.cat([y for _, y in batches]).tolist() == digits_train.dataset["label"]


def test_order_is_a_pure_function_of_seed_and_epoch_and_leaves_the_global_rng_alone(digits_train, train_cfg):
    tf = build_transform(train_cfg, SIZE, train=True)

    def run(seed, epoch):
        return collect(make_loader(digits_train, tf, LoaderSpec.training(32, seed=seed), epoch=epoch))

    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    a = run(0, 1)
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]

    torch.manual_seed(999)  # the global RNG has no say
    b = run(0, 1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other_epoch, other_seed = run(0, 2), run(1, 0)
    assert not torch.equal(a[0][1], other_epoch[0][1]) and not torch.equal(run(0, 0)[0][1], other_seed[0][1])

    loader = make_loader(digits_train, tf, LoaderSpec.training(32, seed=0), epoch=0)
    collect(loader)
    loader.set_epoch(1)
    again = collect(loader)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, again))


def test_start_batch_yields_exactly_the_tail_of_the_epoch(digits_train, train_cfg):
    tf = build_transform(train_cfg, SIZE, train=True)
    full = collect(make_loader(digits_train, tf, LoaderSpec.training(24, seed=5), epoch=3))
    resumed_loader = make_loader(digits_train, tf, LoaderSpec.training(24, seed=5), epoch=3, start_batch=5)
    assert len(resumed_loader) == len(full) - 5
    tail = collect(resumed_loader)
    assert len(tail) == len(full) - 5
    for (xf, yf), (xt, yt) in zip(full[5:], tail):
        assert torch.equal(xf, xt) and torch.equal(yf, yt)  # augmentation included
    assert len(collect(resumed_loader)) == len(full)  # the offset applies to one iteration only


def test_ranks_partition_every_global_batch(digits_train, train_cfg):
    tf = build_transform(train_cfg, SIZE, train=True)
    whole = collect(make_loader(digits_train, tf, LoaderSpec.training(30, seed=2), epoch=1))
    shards = [collect(make_loader(digits_train, tf, LoaderSpec.training(30, seed=2), epoch=1, rank=r, world_size=3))
              for r in range(3)]
    assert all(len(s) == len(whole) for s in shards)
    for step, (x, y) in enumerate(whole):
        assert [len(s[step][1]) for s in shards] == [10, 10, 10]
        # each image is augmented from (seed, epoch, index) alone, so the slices equal the global batch
        assert torch.equal(torch.cat([s[step][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)
    with pytest.raises(VitError, match="multiple of the number of processes"):
        make_loader(digits_train, tf, LoaderSpec.training(31, seed=2), epoch=1, world_size=3)


def test_workers_give_the_same_batches_as_the_main_process(digits_train, train_cfg):
    tf = build_transform(train_cfg, SIZE, train=True)
    spec = LoaderSpec(50, shuffle=True, drop_last=False, seed=4)
    main = collect(make_loader(digits_train, tf, spec, epoch=2))
    loader = make_loader(digits_train, tf, dataclasses.replace(spec, num_workers=2), epoch=2)
    workers = collect(loader)
    assert len(main) == len(workers) == 4
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(main, workers))
    loader.set_epoch(3)  # persistent workers still follow the epoch
    main3 = collect(make_loader(digits_train, tf, spec, epoch=3))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(main3, collect(loader)))
    loader.close()  # frees the workers; the next iteration starts new ones
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(main3, collect(loader)))


PIPELINES = [("pil", False), ("tensor", False), ("tensor", True)]  # (data.pipeline, JPEGs decoded on the device)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("pipeline,on_device", PIPELINES)
def test_bad_image_error_names_the_image_and_the_fix(num_workers, pipeline, on_device):
    tf = build_transform(TransformSpec(pipeline=pipeline), SIZE, train=False)
    loader = make_loader(image_set_with_bad_image(6), tf, LoaderSpec.evaluation(4, num_workers=num_workers, decode_on_device=on_device))
    with pytest.raises(VitError) as err:
        collect(loader)
    message = str(err.value)
    assert "Image 6 of data set 'tiny'" in message and "bad_images" in message and "skip" in message
    assert "Traceback" not in message


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("pipeline,on_device", PIPELINES)
def test_bad_image_skip_drops_and_counts_it(num_workers, pipeline, on_device):
    tf = build_transform(TransformSpec(pipeline=pipeline), SIZE, train=False)
    spec = LoaderSpec.evaluation(4, bad_images="skip", num_workers=num_workers, decode_on_device=on_device)
    loader = make_loader(image_set_with_bad_image(6, truncated_index=1), tf, spec)
    batches = collect(loader)
    assert [len(y) for _, y in batches] == [3, 3, 2]
    assert torch.cat([y for _, y in batches]).tolist() == [i % 2 for i in range(10) if i not in (1, 6)]
    assert loader.skipped == 2
    assert "Image 1" in loader.skipped_examples[0] and "Image 6" in loader.skipped_examples[1]


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_an_eval_loader_within_its_cache_budget_replays_its_first_pass(digits_train, pipeline, monkeypatch):
    tf = build_transform(TransformSpec(pipeline=pipeline), SIZE, train=False)
    one_pass = 200 * (3 * 16 * 16 * 4 + 8)  # float images + int64 labels
    loader = make_loader(digits_train, tf, LoaderSpec.evaluation(64, cache_bytes=one_pass))
    first = collect(loader)
    monkeypatch.setattr(loader.dataset, "load", lambda *a: pytest.fail("a cached pass must not read images"))
    again = collect(loader)
    assert len(again) == len(first) == 4
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(first, again))

    small = make_loader(digits_train, tf, LoaderSpec.evaluation(64, cache_bytes=one_pass - 1))
    collect(small)
    assert small.cached is None  # over budget: every pass reads again
    with pytest.raises(ValueError, match="evaluation loaders only"):
        make_loader(digits_train, build_transform(TransformSpec(), SIZE, train=True), LoaderSpec.training(64, cache_bytes=one_pass))


@pytest.mark.parametrize("pipeline,on_device", PIPELINES)
def test_a_batch_with_no_readable_image_is_dropped_and_counted(pipeline, on_device):
    tf = build_transform(TransformSpec(pipeline=pipeline), SIZE, train=False)
    loader = make_loader(image_set_with_bad_image(2, n=4, truncated_index=3), tf, LoaderSpec.evaluation(2, bad_images="skip", decode_on_device=on_device))
    assert [y.tolist() for _, y in loader] == [[0, 1]] and loader.skipped == 2
