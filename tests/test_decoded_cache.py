"""data.cache (data/decoded_cache.py): images decoded once give the same batches as decoding every time, in
memory or memory-mapped by the budget, keyed so an edited image is decoded again."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ARGS, comparable, run_cli, sigterm_then_resume_matches_an_uninterrupted_run
from vitcli.data import ImageSet, LoaderSpec, TransformSpec, build_transform, load_split, make_loader
from vitcli.data.decoded_cache import cache_root, decode_split, tensor_decoder
from vitcli.data.specs import CacheSpec

pytestmark = pytest.mark.usefixtures("fresh_hf_cache")

SIZE = (16, 16)
PIPELINES = {"pil": TransformSpec(crop_scale=[0.3, 1.0], hflip=0.5, randaugment="rand-m9-mstd0.5"),
             "tensor": TransformSpec(crop_scale=[0.3, 1.0], hflip=0.5, pipeline="tensor")}


def folder_set(root: Path, n: int = 16, fmt: str = "PNG") -> ImageSet:
    """A class folder of RGB images of varied sizes (the index datasets builds, image cells by path)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        side = 12 + 3 * i
        Image.fromarray(rng.integers(0, 256, (side, side + i, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:02d}.{fmt.lower()}", fmt)
    return load_split(str(root), role="train")


def batches(image_set: ImageSet, pipeline: str, cache: CacheSpec, *, train: bool = True, epochs: int = 2, start_batch: int = 0,
            reduced_decode: bool = True):
    tf = build_transform(replace(PIPELINES[pipeline], reduced_decode=reduced_decode), SIZE, train=train)
    spec = LoaderSpec.training(4, seed=3, cache=cache) if train else LoaderSpec.evaluation(4, cache=cache)
    loader = make_loader(image_set, tf, spec, start_batch=start_batch)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out, loader.dataset.decoded


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_cached_batches_equal_decoding_every_time(tmp_path, pipeline, fmt):
    """(The cache holds full-size pixels: the uncached tensor pipeline compared without its reduced-size JPEG decode.)"""
    image_set = folder_set(tmp_path / "imgs", fmt=fmt)
    plain, none = batches(image_set, pipeline, CacheSpec("none"), reduced_decode=False)
    cached, decoded = batches(image_set, pipeline, CacheSpec("decoded"))
    assert none is None and decoded is not None and decoded.stored == "memory"
    assert len(plain) == len(cached) == 6
    for (x, y), (cx, cy) in zip(plain, cached):
        assert torch.equal(x, cx) and torch.equal(y, cy)


def test_cached_named_set_train_and_eval_equal(tmp_path):
    """A named (built-in, bytes in the cells) set, with the eval transform too."""
    digits = load_split("digits", role="train", subset=40, seed=0)
    for train in (True, False):
        plain, _ = batches(digits, "tensor", CacheSpec("none"), train=train, epochs=1)
        cached, decoded = batches(digits, "tensor", CacheSpec("auto"), train=train, epochs=1)
        assert decoded is not None and all(torch.equal(a[0], b[0]) for a, b in zip(plain, cached))


def test_pixels_are_the_decoders(tmp_path):
    image_set = folder_set(tmp_path / "imgs", n=4)
    hf = image_set.dataset.cast_column("image", datasets.Image(decode=False))
    decoded = decode_split(hf, "pil", "L", CacheSpec("decoded"))
    for i in range(len(hf)):
        expected = np.asarray(Image.open(hf[i]["image"]["path"]).convert("L"))
        assert np.array_equal(decoded[i][..., 0], expected)
    decoded = decode_split(hf, "tensor", "RGB", CacheSpec("decoded"))  # TorchCodec's pixels, stored (H, W, C) as PIL's
    for i in range(len(hf)):
        assert np.array_equal(decoded[i], np.asarray(Image.open(hf[i]["image"]["path"]).convert("RGB")))


def test_budget_chooses_a_memory_mapped_file_and_auto_declines(tmp_path):
    image_set = folder_set(tmp_path / "imgs", n=6)
    hf = image_set.dataset.cast_column("image", datasets.Image(decode=False))
    total = sum(np.asarray(Image.open(cell["path"])).size for cell in hf["image"])  # RGB bytes, by PIL
    fits = decode_split(hf, "tensor", "RGB", CacheSpec("decoded", cache_budget=total))
    mapped = decode_split(hf, "tensor", "RGB", CacheSpec("decoded", cache_budget=total - 1))
    assert fits.stored == "memory" and fits.nbytes == total
    assert mapped.stored == "mapped" and isinstance(mapped.pixels, np.memmap)
    assert [p.name for p in cache_root().iterdir()] and not any(p.name.startswith(".") for p in cache_root().iterdir())
    assert decode_split(hf, "tensor", "RGB", CacheSpec("auto", cache_budget=total - 1)) is None
    decode = tensor_decoder("RGB")
    for i in range(len(hf)):
        assert np.array_equal(mapped[i], decode(hf[i]["image"])) and np.array_equal(fits[i], mapped[i])


def test_an_edited_image_is_decoded_again(tmp_path):
    root = tmp_path / "imgs"
    image_set = folder_set(root, n=4)
    hf = image_set.dataset.cast_column("image", datasets.Image(decode=False))
    tiny = CacheSpec("decoded", cache_budget=0)  # memory-mapped, kept for later runs
    first = decode_split(hf, "tensor", "RGB", tiny)
    again = decode_split(hf, "tensor", "RGB", tiny)
    assert len(list(cache_root().iterdir())) == 1 and np.array_equal(first[2], again[2])
    path = hf[2]["image"]["path"]
    edited = np.full_like(np.asarray(Image.open(path)), 200)  # same size as before, other pixels
    Image.fromarray(edited).save(path)
    os.utime(path, ns=(1, 1))  # even a file whose time went backwards
    after = decode_split(hf, "tensor", "RGB", tiny)
    assert len(list(cache_root().iterdir())) == 2
    assert np.array_equal(after[2], edited) and not np.array_equal(after[2], first[2])


def test_an_unreadable_image_is_reported_as_without_the_cache(tmp_path):
    image_set = folder_set(tmp_path / "imgs", n=6)
    broken = Path(image_set.dataset.cast_column("image", datasets.Image(decode=False))[3]["image"]["path"])
    broken.write_bytes(b"not an image")
    spec = LoaderSpec.evaluation(4, cache=CacheSpec("decoded"), bad_images="skip")
    loader = make_loader(image_set, build_transform(PIPELINES["tensor"], SIZE, train=False), spec)
    images = [x for x, _ in loader]
    assert loader.dataset.decoded[3] is None and sum(len(x) for x in images) == len(image_set.dataset) - 1 and loader.skipped == 1
    assert str(broken) in loader.skipped_examples[0]


def test_cached_training_batches_cross_as_one_buffer_of_crops_resized_on_the_device(tmp_path):
    """The tensor pipeline's training crops of the cache leave the worker cut, in one flat buffer; the main
    process resizes and flips them as one batch, and that equals the image-by-image transform of the same
    plans. An image the cache could not hold is decoded as before and takes its place in the batch."""
    image_set = folder_set(tmp_path / "imgs", n=10)  # 9 training images
    tf = build_transform(PIPELINES["tensor"], SIZE, train=True)
    loader = make_loader(image_set, tf, LoaderSpec.training(8, seed=5, cache=CacheSpec("decoded")))
    raw = loader.dataset.load(list(range(8)), epoch=0)
    assert raw.images is None and raw.cuts is not None and raw.cuts.positions == tuple(range(8))
    assert raw.cuts.pixels.dim() == 1 and raw.cuts.pixels.numel() == sum(h * w * c for h, w, c in raw.cuts.shapes)
    assert any(p.flip for p in raw.cuts.plans) and not all(p.flip for p in raw.cuts.plans)
    by_image = []
    for k, plan in enumerate(raw.cuts.plans):  # the same plans through the per-image path, from the decoded pixels
        pixels = torch.from_numpy(np.array(loader.dataset.decoded[k])).permute(2, 0, 1)
        assert (plan.height, plan.width, 3) == raw.cuts.shapes[k]
        by_image.append(tf.apply(pixels[:, plan.top:plan.top + plan.height, plan.left:plan.left + plan.width],
                                 plan._replace(top=0, left=0)))
    assert torch.equal(tf.resize_cuts(raw.cuts, torch.device("cpu")), torch.stack(by_image))
    loader.dataset.decoded.shapes[5] = 0  # as if the cache could not decode image 5
    mixed = loader.dataset.load(list(range(8)), epoch=0)
    assert mixed.cuts.positions == (0, 1, 2, 3, 4, 6, 7) and mixed.images.shape[0] == 1
    from vitcli.data.batches import finish_batch
    whole, _, _ = finish_batch(raw, tf, "error", torch.device("cpu"))
    assembled, _, _ = finish_batch(mixed, tf, "error", torch.device("cpu"))
    assert torch.equal(whole, assembled)


def test_a_training_loader_normalises_into_two_buffers_in_turn(tmp_path):
    image_set = folder_set(tmp_path / "imgs")
    tf = build_transform(PIPELINES["tensor"], SIZE, train=True)
    fresh = [x.clone() for x, _ in make_loader(image_set, tf, LoaderSpec.training(4, seed=3, cache=CacheSpec("decoded")))]
    reused = make_loader(image_set, tf, LoaderSpec.training(4, seed=3, cache=CacheSpec("decoded"), reuse_buffers=True))
    seen, pointers = [], []
    for x, _ in reused:
        seen.append(x.clone())
        pointers.append(x.data_ptr())
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(fresh, seen))
    assert pointers[0] == pointers[2] != pointers[1]


def test_resumed_mid_epoch_with_the_cache_equals_the_whole_epoch(tmp_path):
    image_set = folder_set(tmp_path / "imgs")
    whole, _ = batches(image_set, "tensor", CacheSpec("decoded"), epochs=1)
    resumed, _ = batches(image_set, "tensor", CacheSpec("decoded"), epochs=1, start_batch=1)
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(whole[1:], resumed))


@pytest.mark.slow
def test_a_cached_run_resumes_exactly_and_equals_an_uncached_one(tmp_path):
    """SIGTERM mid-epoch with data.cache: decoded, resume: the metrics equal a run left alone, and a run
    that decodes every time (digits are PNGs: no reduced decode either way)."""
    cached = sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, [*ARGS, "--set", "data.cache=decoded"])
    plain = tmp_path / "plain"
    assert run_cli("pretrain", str(tmp_path / "tiny.yaml"), "--out", str(plain), *ARGS) == 0
    assert comparable(plain) == cached


@pytest.mark.parametrize("setting,named", [("data.cache=always", "data.cache"), ("data.cache_budget=-1", "data.cache_budget")])
def test_bad_cache_settings_are_refused(tmp_path, capsys, setting, named):
    assert run_cli("pretrain", str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml"), "--out", str(tmp_path / "run"), "--set", setting) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_full_disk_while_writing_the_file_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    from vitcli.errors import VitError

    image_set = folder_set(tmp_path / "imgs", n=4)
    hf = image_set.dataset.cast_column("image", datasets.Image(decode=False))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
    monkeypatch.setattr(np.lib.format, "open_memmap", full)
    with pytest.raises(VitError, match="disk is full"):
        decode_split(hf, "tensor", "RGB", CacheSpec("decoded", cache_budget=0))
    assert not cache_root().exists() or not any(cache_root().iterdir())  # nothing half-made left behind


def test_joint_transforms_get_the_same_batches_from_the_cache():
    """Segmentation (masks) and detection (boxes): the image comes from the cache, its target as before."""
    from vitcli.data.det_sources import load_box_split
    from vitcli.data.det_transforms import DetTransform, DetTransformSpec
    from vitcli.data.seg_sources import load_mask_split
    from vitcli.data.seg_transforms import SegTransform, SegTransformSpec

    cases = [(load_mask_split("digits-seg", role="train", subset=24, seed=0),
              SegTransform(SegTransformSpec(crop_size=(24, 24), resize_range=(0.75, 1.5), mean=(0.5,), std=(0.5,)), train=True)),
             (load_box_split("digits-det", role="train", subset=24, seed=0),
              DetTransform(DetTransformSpec(size=48, scale_range=(0.5, 1.5), channels=1), train=True))]
    for image_set, tf in cases:
        runs = []
        for cache in ("none", "decoded"):
            loader = make_loader(image_set, tf, LoaderSpec.training(8, seed=1, cache=CacheSpec(cache)))
            runs.append(list(loader))
        assert loader.dataset.decoded is not None and len(runs[0]) == len(runs[1]) == 3
        for (x, y), (cx, cy) in zip(*runs):
            if isinstance(x, list):  # detection: lists of images and of targets
                assert all(torch.equal(a, b) for a, b in zip(x, cx))
                assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"]) for a, b in zip(y, cy))
            else:
                assert torch.equal(x, cx) and torch.equal(y, cy)
