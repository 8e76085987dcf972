"""data.pipeline: tensor — same crops and flips as timm's PIL transforms, decoded by TorchCodec, JPEGs
optionally left for the device (nvJPEG on CUDA; the host fallback on CPU)."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import coordinate_image, encode, image_set, rotated_jpeg
from vitcli.data import ImageSet, LoaderSpec, TensorTransform, TransformSpec, build_transform, make_loader
from vitcli.data.decode import decode_host, decode_on_device, jpeg_size
from vitcli.errors import VitError
from vitcli.recipe import DataCfg, recipe_from_dict

SIZES = [(60, 40), (40, 60), (97, 31), (50, 50), (120, 90), (33, 47), (64, 64), (45, 80)]








@pytest.fixture(scope="module")
def mixed_set() -> ImageSet:
    """JPEGs and PNGs of different sizes and aspect ratios."""
    cells = [{"bytes": encode(coordinate_image(w, h), "JPEG" if i % 2 else "PNG", **({"quality": 95} if i % 2 else {})),
              "path": None} for i, (w, h) in enumerate(SIZES)]
    return image_set(cells)


def batches(image_set: ImageSet, cfg: TransformSpec, train: bool, *, epoch: int = 0, device=None,
            **settings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tf = build_transform(cfg, (24, 32), train=train)
    loader = make_loader(image_set, tf, LoaderSpec(4, shuffle=train, drop_last=False, seed=3, **settings), epoch=epoch,
                         device=device)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("train", [True, False])
def test_tensor_pipeline_matches_timms_pil_transforms_within_one_grey_level(mixed_set, interpolation, train):
    cfg = dict(interpolation=interpolation, crop_scale=[0.2, 1.0], hflip=0.5, crop_pct=0.875)
    pil = batches(mixed_set, TransformSpec(pipeline="pil", **cfg), train, epoch=1)
    tensor = batches(mixed_set, TransformSpec(pipeline="tensor", **cfg), train, epoch=1)
    for (xp, yp), (xt, yt) in zip(pil, tensor, strict=True):
        assert torch.equal(yp, yt) and xt.shape == xp.shape == (len(yp), 3, 24, 32) and xt.dtype == torch.float32
        levels = (xp - xt).abs() * 0.5 * 255  # std 0.5: back to 0..255 units
        # Same box and flip for every image (a different one would move whole gradients), and the
        # antialiased resizes agree with PIL's to rounding. Nearest: PIL's rule ("nearest-exact"); a
        # sample exactly between two source pixels may round to the other one in float arithmetic.
        if interpolation == "nearest":
            assert levels.mean() < 0.5 and (levels > 1.001).float().mean() < 0.05
        else:
            assert levels.max() <= 1.0 + 1e-3 and levels.mean() < 0.25
    if train:  # the augmentation is random: another epoch crops differently
        other = batches(mixed_set, TransformSpec(pipeline="tensor", **cfg), train, epoch=2)
        assert not torch.equal(other[0][0], tensor[0][0]) or not torch.equal(other[0][1], tensor[0][1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_jpegs_left_for_the_device_give_the_same_batches(mixed_set, num_workers):
    cfg = TransformSpec(pipeline="tensor", crop_scale=[0.2, 1.0])
    host = batches(mixed_set, cfg, True, epoch=4)
    deferred = batches(mixed_set, cfg, True, epoch=4, decode_on_device=True, num_workers=num_workers)
    for (xa, ya), (xb, yb) in zip(host, deferred, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_deferred_batches_merge_in_order_and_send_only_plain_jpegs(mixed_set):
    tf = build_transform(TransformSpec(pipeline="tensor"), (24, 32), train=True)
    loader = make_loader(mixed_set, tf, LoaderSpec.evaluation(8, decode_on_device=True))
    batch = loader.dataset.load(list(range(8)), epoch=0)
    assert [d.position for d in batch.deferred] == [1, 3, 5, 7]  # the JPEGs; the PNGs were decoded in the worker
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 24, 32)
    assert batch.labels.tolist() == [i % 2 for i in range(8)]


def test_jpeg_size_reads_the_header_and_refuses_what_nvjpeg_should_not_get():
    rgb = coordinate_image(40, 30)
    assert jpeg_size(encode(rgb, "JPEG"), "RGB") == (40, 30)
    assert jpeg_size(encode(rgb, "PNG"), "RGB") is None
    assert jpeg_size(encode(rgb, "JPEG", progressive=True), "RGB") is None
    assert jpeg_size(encode(rgb, "JPEG"), "L") is None  # colour file, greyscale model: host converts
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    assert jpeg_size(cmyk.getvalue(), "RGB") is None
    assert jpeg_size(rotated_jpeg(rgb), "RGB") is None
    assert jpeg_size(b"\xff\xd8 not really a jpeg", "RGB") is None




def test_host_decoding_applies_exif_orientation_as_hf_datasets_does():
    data = rotated_jpeg(coordinate_image(40, 30))
    expected = np.asarray(datasets.Image().decode_example({"bytes": data, "path": None}).convert("RGB"))
    assert expected.shape == (40, 30, 3)  # datasets rotated it
    ours = decode_host(data, "RGB")
    assert ours.shape == (3, 40, 30)
    assert (ours.permute(1, 2, 0).int() - torch.from_numpy(expected.copy()).int()).abs().max() <= 1


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_host_decoding_reads_every_common_format_like_pil(fmt, mode):
    array = coordinate_image(23, 17)
    data = encode(array, fmt, **({"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}))
    expected = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert(mode)).copy())
    ours = decode_host(data, mode)
    assert ours.dtype == torch.uint8 and ours.shape == (1 if mode == "L" else 3, 17, 23)
    diff = (ours.permute(1, 2, 0).reshape(expected.shape).int() - expected.int()).abs()
    assert diff.max() <= (1 if mode == "L" else 0)  # greyscale: luma weights may round differently


def test_decode_on_device_reports_unreadable_images_one_by_one():
    good = torch.frombuffer(bytearray(encode(coordinate_image(20, 10), "JPEG")), dtype=torch.uint8)
    bad = good[: len(good) // 2].clone()
    out = decode_on_device([good, bad, good], "RGB", torch.device("cpu"))
    assert out[0].shape == (3, 10, 20) and torch.equal(out[0], out[2]) and isinstance(out[1], Exception)


def truncated_jpeg_set() -> ImageSet:
    cells = [{"bytes": encode(coordinate_image(w, h), "JPEG"), "path": None} for w, h in SIZES[:6]]
    cells[2] = {"bytes": cells[2]["bytes"][: len(cells[2]["bytes"]) // 2], "path": None}  # header intact, body cut
    return image_set(cells, name="cut")


def test_a_truncated_jpeg_decoded_on_the_device_is_named_or_skipped():
    tf = build_transform(TransformSpec(pipeline="tensor"), (24, 32), train=False)
    loader = make_loader(truncated_jpeg_set(), tf, LoaderSpec.evaluation(4, decode_on_device=True))
    with pytest.raises(VitError, match=r"Image 2 of data set 'cut'.*bad_images"):
        list(loader)
    loader = make_loader(truncated_jpeg_set(), tf, LoaderSpec.evaluation(4, decode_on_device=True, bad_images="skip"))
    got = [(x.shape[0], y.tolist()) for x, y in loader]
    assert got == [(3, [0, 1, 1]), (2, [0, 1])] and loader.skipped == 1 and "Image 2" in loader.skipped_examples[0]


def test_the_transform_alone_is_callable_on_a_pil_image_like_timms():
    tf = build_transform(TransformSpec(pipeline="tensor", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), (24, 32),
                         train=False)
    assert isinstance(tf, TensorTransform) and "CenterCrop" in repr(tf)
    out = tf(Image.new("RGB", (50, 40), (100, 150, 200)))
    expected = (torch.tensor([100, 150, 200]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 24, 32), atol=1e-5, rtol=0)
    grey = build_transform(TransformSpec(pipeline="tensor", mean=[0.5], std=[0.5]), (8, 8), train=True)(Image.new("RGB", (9, 9)))
    assert grey.shape == (1, 8, 8) and torch.allclose(grey, torch.full_like(grey, -1.0))


def test_auto_picks_the_pil_pipeline_for_pil_only_augmentations_and_tensor_refuses_them():
    assert TransformSpec.of(DataCfg()).tensor_pipeline
    assert not TransformSpec.of(DataCfg(randaugment="rand-m9-mstd0.5")).tensor_pipeline
    assert not TransformSpec.of(DataCfg(random_erasing=0.25)).tensor_pipeline
    assert not TransformSpec.of(DataCfg(pipeline="pil")).tensor_pipeline
    with pytest.raises(VitError, match=r"data.pipeline.*data.randaugment.*data.pipeline: pil"):
        recipe_from_dict({"data": {"pipeline": "tensor", "randaugment": "rand-m9-mstd0.5"}})
    with pytest.raises(VitError, match="data.pipeline"):
        recipe_from_dict({"data": {"pipeline": "gpu"}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_equal_the_cpu_ones_within_a_grey_level(mixed_set):
    cfg = TransformSpec(pipeline="tensor", crop_scale=[0.2, 1.0])
    cpu = batches(mixed_set, cfg, True, epoch=1)
    cuda = batches(mixed_set, cfg, True, epoch=1, device=torch.device("cuda"))  # nvJPEG + crops on the GPU
    for (xa, ya), (xb, yb) in zip(cpu, cuda, strict=True):
        assert xb.device.type == "cuda" and torch.equal(ya, yb.cpu())
        assert ((xa - xb.cpu()).abs() * 0.5 * 255).max() <= 3  # nvJPEG's IDCT differs from libjpeg's slightly


def test_batches_with_deferred_jpegs_survive_the_dataloaders_pinning_step(mixed_set, monkeypatch):
    # On CUDA the DataLoader pins every batch by rebuilding it field by field; the deferred JPEGs must
    # come through as tensors (python bytes would be rebuilt element by element) with their plans.
    from torch.utils.data._utils.pin_memory import pin_memory

    from vitcli.data.batches import Batch, Deferred

    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self)
    tf = build_transform(TransformSpec(pipeline="tensor"), (24, 32), train=True)
    loader = make_loader(mixed_set, tf, LoaderSpec.evaluation(8, decode_on_device=True))
    batch = loader.dataset.load(list(range(8)), epoch=0)
    out = pin_memory(batch)
    assert isinstance(out, Batch) and all(isinstance(d, Deferred) for d in out.deferred)
    assert [d.plan for d in out.deferred] == [d.plan for d in batch.deferred]
    assert all(any(d.data is p for p in pinned) for d in out.deferred) and any(batch.images is p for p in pinned)


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_the_dataset_indexed_directly_gives_the_loaders_image(mixed_set, pipeline):
    tf = build_transform(TransformSpec(pipeline=pipeline), (24, 32), train=True)
    loader = make_loader(mixed_set, tf, LoaderSpec.evaluation(4, seed=3), epoch=2)
    first_batch, labels = next(iter(loader))
    loader.dataset.set_epoch(2)
    image, label = loader.dataset[1]
    assert torch.equal(image, first_batch[1]) and label == int(labels[1])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_channels_last_resize_gives_the_planar_kernels_pixels(interpolation, channels):
    """The resize runs channels-last (torch's vectorised uint8 kernels); its pixels equal torchvision's
    planar resize of the same crop, bit for bit, up and down."""
    import torchvision.transforms.v2.functional as TF

    from vitcli.data.tensor_transforms import _resized

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (channels, 120, 90), dtype=np.uint8))
    mode = TF.InterpolationMode(interpolation)
    for top, left, h, w, size in [(0, 0, 120, 90, [32, 32]), (10, 5, 40, 70, [64, 48]), (3, 7, 13, 11, [40, 40])]:
        crop = image[:, top:top + h, left:left + w]
        expected = TF.resize(crop.contiguous(), size, interpolation=mode, antialias=True)
        assert torch.equal(_resized(crop, size, mode), expected)
