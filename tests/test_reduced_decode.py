"""data.reduced_decode: large JPEGs decoded at 1/2, 1/4 or 1/8 size when the crop keeps the output's pixels
(libjpeg's DCT scaling), for the folder/Arrow loader and the tar-shard stream alike."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import by_hand, coordinate_image, encode, image_set, rotated_jpeg, run_cli
from vitcli.data import LoaderSpec, TransformSpec, build_transform, make_loader, make_stream_loader
from vitcli.data import collate
from vitcli.data.decode import decode_reduced, scalable_jpeg_size
from vitcli.data.shard_sets import ShardSet
from vitcli.data.tarshards import ShardWriter
from vitcli.data.tensor_transforms import CropPlan, TensorTransform
from vitcli.recipe import DataCfg

LARGE = [(1200, 900), (900, 1200), (1000, 1000), (1300, 700)]


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_a_reduced_decode_is_pils_draft_at_the_same_scale(mode, factor):
    rng = np.random.default_rng(factor)
    photo = np.clip(coordinate_image(203, 150).astype(int) + rng.normal(0, 20, (150, 203, 3)), 0, 255).astype(np.uint8)
    data = encode(photo, "JPEG", quality=90)
    ours = decode_reduced(data, mode, factor)
    with Image.open(io.BytesIO(data)) as img:  # PIL asks libjpeg for the same scaled IDCT
        img.draft(mode, (203 // factor, 150 // factor))
        expected = np.asarray(img.convert(mode))
    height, width = -(-150 // factor), -(-203 // factor)
    assert ours.dtype == torch.uint8 and ours.shape == (1 if mode == "L" else 3, height, width)
    assert expected.shape[:2] == (height, width)
    diff = ours.permute(1, 2, 0).reshape(expected.shape).int() - torch.from_numpy(expected.copy()).int()
    assert diff.abs().max() <= 1


def test_only_jpegs_libjpeg_can_scale_as_they_stand_are_offered():
    rgb = coordinate_image(40, 30)
    assert scalable_jpeg_size(encode(rgb, "JPEG")) == (40, 30)
    assert scalable_jpeg_size(encode(rgb, "JPEG", progressive=True)) == (40, 30)
    assert scalable_jpeg_size(encode(rgb[..., 0], "JPEG")) == (40, 30)  # greyscale
    assert scalable_jpeg_size(encode(rgb, "PNG")) is None
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    assert scalable_jpeg_size(cmyk.getvalue()) is None
    assert scalable_jpeg_size(rotated_jpeg(rgb)) is None  # EXIF rotation: the full decoder rotates it
    assert scalable_jpeg_size(b"\xff\xd8 not really a jpeg") is None


def test_the_reduction_keeps_at_least_the_outputs_pixels_on_both_sides():
    train = TensorTransform(TransformSpec(), (224, 224), train=True)
    plan = lambda h, w: CropPlan(0, 0, h, w, False)  # noqa: E731
    assert train.reduction(4000, 3000, plan(448, 448)) == 2
    assert train.reduction(4000, 3000, plan(447, 900)) == 1  # one side too short for half size
    assert train.reduction(4000, 3000, plan(900, 1800)) == 4
    assert train.reduction(4000, 3000, plan(1792, 2000)) == 8
    assert train.reduction(4000, 3000, plan(1791, 2000)) == 4
    wide = TensorTransform(TransformSpec(), (224, 320), train=True)
    assert wide.reduction(4000, 3000, plan(600, 639)) == 1 and wide.reduction(4000, 3000, plan(600, 640)) == 2
    # Eval: the short side goes to int(224 / 0.875) = 256, so 512 allows half size.
    evaluate = TensorTransform(TransformSpec(), (224, 224), train=False)
    assert evaluate.eval_resize == 256
    assert [evaluate.reduction(w, h, None) for w, h in ((640, 511), (640, 512), (4000, 1024), (4000, 3000))] == [1, 2, 4, 8]
    off = TensorTransform(TransformSpec(reduced_decode=False), (224, 224), train=True)
    assert off.reduction(4000, 3000, plan(1792, 2000)) == 1
    assert not TransformSpec.of(DataCfg(reduced_decode=False)).reduced_decode and TransformSpec.of(DataCfg()).reduced_decode


def test_a_reduced_plan_is_the_same_box_in_whole_pixels_inside_the_image():
    rng = random.Random(0)
    for _ in range(2000):
        width, height, factor = rng.randint(64, 3000), rng.randint(64, 3000), rng.choice([2, 4, 8])
        h, w = rng.randint(factor, height), rng.randint(factor, width)
        box = CropPlan(rng.randint(0, height - h), rng.randint(0, width - w), h, w, rng.random() < 0.5)
        small_h, small_w = -(-height // factor), -(-width // factor)
        r = box.reduced(factor, small_h, small_w)
        assert r.flip == box.flip and r.top + r.height <= small_h and r.left + r.width <= small_w
        assert min(r.top, r.left) >= 0 and min(r.height, r.width) >= 1
        for got, want in ((r.top, box.top), (r.left, box.left), (r.height, box.height), (r.width, box.width)):
            assert abs(got - want / factor) <= 1


@pytest.fixture
def factors(monkeypatch) -> list[int]:
    """The factor of every reduced decode made in this process."""
    seen: list[int] = []

    def spy(data, mode, factor):
        seen.append(factor)
        return decode_reduced(data, mode, factor)

    monkeypatch.setattr(collate, "decode_reduced", spy)
    return seen


def large_jpegs() -> list[bytes]:
    return [encode(coordinate_image(w, h), "JPEG", quality=95) for w, h in LARGE]


def assert_close_in_grey_levels(full: list[torch.Tensor], reduced: list[torch.Tensor]) -> None:
    # R encodes x and G encodes y across the whole image: the same box and flip give the same
    # gradients; a box off by a few output pixels, or flipped, would differ by tens of levels.
    for a, b in zip(full, reduced, strict=True):
        levels = (a - b).abs() * 0.5 * 255
        assert levels.mean() < 1.0 and levels.max() <= 4.0, (levels.mean(), levels.max())


@pytest.mark.parametrize("train", [True, False])
def test_the_loader_gives_the_full_size_images_from_reduced_decodes(factors, train):
    cells = [{"bytes": data, "path": None} for data in large_jpegs()]
    out = {}
    for reduced in (False, True):
        tf = build_transform(TransformSpec(crop_scale=(0.2, 1.0), reduced_decode=reduced), (24, 32), train=train)
        loader = make_loader(image_set(cells, "large"), tf, LoaderSpec.evaluation(2, seed=5))
        out[reduced] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(factors) == len(LARGE) and all(f > 1 for f in factors)  # only the reduced run decoded smaller
    assert [y.tolist() for _, y in out[False]] == [y.tolist() for _, y in out[True]]
    assert_close_in_grey_levels([x for x, _ in out[False]], [x for x, _ in out[True]])


def test_tar_shards_stream_reduced_decodes_too(tmp_path, factors):
    writer = ShardWriter(str(tmp_path / "large-000.tar"))
    for i, data in enumerate(large_jpegs()):
        writer.add(f"{i:04d}", data, "jpg", i % 2)
    writer.close()
    shards = ShardSet(len(LARGE), 2, ["a", "b"], "large", "train", urls=[str(tmp_path / "large-000.tar")])
    out = {}
    for reduced in (False, True):
        tf = build_transform(TransformSpec(crop_scale=(0.2, 1.0), reduced_decode=reduced), (24, 32), train=True)
        batches = iter(make_stream_loader(shards, tf, LoaderSpec.training(len(LARGE), num_workers=0, seed=2), buffer=2))
        out[reduced] = next(batches)
    assert len(factors) == len(LARGE) and all(f > 1 for f in factors)
    assert torch.equal(out[False][1], out[True][1])
    assert_close_in_grey_levels(list(out[False][0]), list(out[True][0]))


def test_an_exif_rotated_jpeg_is_decoded_whole_and_rotated(factors):
    cells = [{"bytes": rotated_jpeg(coordinate_image(1200, 900)), "path": None}] * 2
    out = {}
    for reduced in (False, True):
        tf = build_transform(TransformSpec(reduced_decode=reduced), (24, 32), train=True)
        out[reduced] = next(iter(make_loader(image_set(cells, "rotated"), tf, LoaderSpec.evaluation(2))))[0]
    assert factors == [] and torch.equal(out[False], out[True])


def test_eval_and_predict_decode_reduced_by_default_and_whole_with_full_decode(tmp_path, trained, factors, capsys):
    # `trained` is an 8x8 model (crop_pct 1.0: the short side resized to 8): 120+ px sides allow 1/8.
    folder = tmp_path / "large"
    for i in range(10):  # one image per class of the checkpoint's 10
        w, h = ((160, 120), (120, 200), (240, 128))[i % 3]
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / f"{i}.jpg").write_bytes(encode(coordinate_image(w, h), "JPEG", quality=95))
    files = sorted(folder.rglob("*.jpg"))
    probabilities = {}
    for flag in ("--reduced-decode", "--full-decode"):
        factors.clear()
        assert run_cli("predict", "--ckpt", str(trained), str(folder), "--json", "--topk", "10", flag) == 0
        rows = json.loads(capsys.readouterr().out)
        probabilities[flag] = torch.tensor([[t["probability"] for t in sorted(r["top"], key=lambda t: t["index"])] for r in rows])
        assert factors == ([8] * 10 if flag == "--reduced-decode" else [])
        factors.clear()
        assert run_cli("eval", "--ckpt", str(trained), "--dataset", str(folder), "--num-workers", "0", "--json", flag) == 0
        assert json.loads(capsys.readouterr().out)["num_images"] == 10
        assert factors == ([8] * 10 if flag == "--reduced-decode" else [])
    whole = by_hand(trained / "checkpoints" / "best" / "model.safetensors", files).softmax(dim=1)
    torch.testing.assert_close(probabilities["--full-decode"], whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities["--reduced-decode"], whole, atol=0.02, rtol=0)
