"""Detection data: digits-det against its own ink, the COCO folder and Hugging Face schema readers on sets the
tests write, joint box transforms against the pixels they move, and loader batches of sized lists."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vitcli.data import LoaderSpec, builtin, make_loader
from vitcli.data.boxes import decode_objects
from vitcli.data.det_sources import is_detection_source, load_box_split
from vitcli.data.det_transforms import DetTransform, DetTransformSpec
from vitcli.errors import VitError


def test_digits_det_boxes_are_the_tight_boxes_of_the_digits_ink():
    val = load_box_split("digits-det", role="eval")
    assert (val.num_classes, val.split, len(val)) == (10, "val", 500)
    counts = []
    for row in val.dataset.select(range(60)):
        ink = np.asarray(row["image"]) >= builtin.DIGITS_SEG_INK
        target = decode_objects(row["objects"])
        covered = np.zeros_like(ink)
        for x0, y0, x1, y1 in target["boxes"].int().tolist():
            part = ink[y0:y1, x0:x1]
            # tight: ink on each of the box's four edges
            assert part[0].any() and part[-1].any() and part[:, 0].any() and part[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert not (ink & ~covered).any()  # no ink outside the boxes
        assert ((target["labels"] >= 1) & (target["labels"] <= 10)).all()
        counts.append(len(target["labels"]))
    assert min(counts) >= 1 and max(counts) <= 5 and len(set(counts)) > 2
    builtin.digits_det_splits.cache_clear()
    again = load_box_split("digits-det", role="eval").dataset[:5]["objects"]
    assert again == val.dataset[:5]["objects"]  # seeded: the same set every time


def _png(path, size=(40, 30), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_a_coco_folder_reads_with_contiguous_categories_and_its_image_folders(tmp_path):
    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        _png(root / split / f"a_{split}.png")
        _png(root / split / f"b_{split}.png", size=(20, 20))
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    for split in ("train2017", "val2017"):
        data = {"images": [{"id": 1, "file_name": f"a_{split}.png", "width": 40, "height": 30},
                           {"id": 2, "file_name": f"b_{split}.png", "width": 20, "height": 20}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5], "area": 40.0, "iscrowd": 0},
                                {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1}],
                "categories": categories}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    assert is_detection_source(str(root))
    train = load_box_split(str(root), role="train")
    val = load_box_split(str(root), role="eval")
    assert (train.split, val.split, train.class_names, train.num_classes) == ("train", "val", ["cat", "dog"], 2)
    target = decode_objects(val.dataset[0]["objects"])
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 5.0, 5.0]]))
    assert target["labels"].tolist() == [2, 1]  # dog (id 7) is the second category: label 1 + 1
    assert target["iscrowd"].tolist() == [0, 1] and target["area"].tolist() == [40.0, 25.0]
    assert decode_objects(val.dataset[1]["objects"])["boxes"].shape == (0, 4)  # an image without objects
    assert val.dataset[0]["image"].size == (40, 30)
    (root / "val2017" / "a_val2017.png").unlink()
    with pytest.raises(VitError, match="a_val2017.png"):
        load_box_split(str(root), role="eval")


def test_a_hub_schema_copy_reads_its_class_names_and_boxes(tmp_path):
    objects = datasets.Sequence({"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                 "category": datasets.ClassLabel(names=["coverall", "mask"]), "area": datasets.Value("float32")})
    features = datasets.Features({"picture": datasets.Image(), "objects": objects})
    image = Image.fromarray(np.zeros((16, 24, 3), dtype=np.uint8))
    rows = {"picture": [image, image], "objects": [{"bbox": [[2, 3, 4, 5]], "category": [1], "area": [20.0]},
                                                   {"bbox": [], "category": [], "area": []}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                          "test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "ppe"))
    assert is_detection_source(str(tmp_path / "ppe"))
    val = load_box_split(str(tmp_path / "ppe"), role="eval")
    assert (val.split, val.class_names) == ("test", ["coverall", "mask"])
    target = decode_objects(val.dataset[0]["objects"])
    assert target["boxes"].tolist() == [[2.0, 3.0, 6.0, 8.0]] and target["labels"].tolist() == [2]
    with pytest.raises(VitError, match="is a classification set"):
        load_box_split("digits")


def _rectangles(h=120, w=160):
    """An image of three rectangles, each lit in its own colour channel, and their boxes (one a crowd)."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    boxes = [[10, 10, 60, 50], [80, 30, 150, 110], [20, 70, 70, 115]]
    for channel, (x0, y0, x1, y1) in enumerate(boxes):
        image[y0:y1, x0:x1, channel] = 255
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, 2, 3]),
              "iscrowd": torch.tensor([0, 0, 1]), "area": torch.tensor([2000.0, 5600.0, 2250.0])}
    return Image.fromarray(image), target


@pytest.mark.parametrize("seed", range(6))
def test_large_scale_jitter_moves_boxes_with_their_pixels(seed):
    image, target = _rectangles()
    transform = DetTransform(DetTransformSpec(size=128, scale_range=(0.4, 1.6), hflip=0.5, channels=3), train=True)
    torch.manual_seed(seed)
    pixels, moved = transform(image, target)
    assert pixels.shape == (3, 128, 128) and pixels.dtype == torch.float32 and 0 <= pixels.min() and pixels.max() <= 1
    assert 3 not in moved["labels"].tolist()  # the crowd region is left out of training
    for channel in (0, 1):
        ys, xs = torch.nonzero(pixels[channel] > 0.5, as_tuple=True)  # the rectangle, its edges at half intensity
        boxes = moved["boxes"][moved["labels"] == channel + 1].tolist()
        if len(ys) < 4:  # cropped away (or to a sliver): its box goes too
            assert not boxes or min(boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]) < 2
            continue
        inside = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert boxes == [pytest.approx(inside, abs=1.0)]


def test_evaluation_keeps_the_image_and_its_targets_as_they_are():
    image, target = _rectangles()
    pixels, same = DetTransform(DetTransformSpec(size=64), train=False)(image, target)
    assert pixels.shape == (3, 120, 160) and same is target
    torch.testing.assert_close(pixels, torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)


def test_loader_batches_images_of_different_sizes_as_lists_of_targets(tmp_path):
    image, target = _rectangles()
    small = image.resize((80, 60))
    rows = {"image": [image, small, image],
            "objects": [{"bbox": [[10, 10, 50, 40]], "category": [0]}, {"bbox": [[5, 5, 20, 20], [30, 30, 10, 10]], "category": [1, 2]},
                        {"bbox": [], "category": []}]}
    objects = datasets.Sequence({"bbox": datasets.Sequence(datasets.Value("float32"), length=4), "category": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "objects": objects}))
    ds.save_to_disk(str(tmp_path / "set"))
    box_set = load_box_split(str(tmp_path / "set"), carve=False)
    images, targets = next(iter(make_loader(box_set, DetTransform(DetTransformSpec(size=64, channels=1), train=False),
                                            LoaderSpec.evaluation(3, num_workers=0))))
    assert [tuple(i.shape) for i in images] == [(1, 120, 160), (1, 60, 80), (1, 120, 160)]
    assert [t["labels"].tolist() for t in targets] == [[1], [2, 3], []]
    assert targets[1]["boxes"].tolist() == [[5.0, 5.0, 25.0, 25.0], [30.0, 30.0, 40.0, 40.0]]
    train_images, train_targets = next(iter(make_loader(box_set, DetTransform(DetTransformSpec(size=64, channels=1), train=True),
                                                        LoaderSpec.evaluation(3, num_workers=0))))
    assert all(tuple(i.shape) == (1, 64, 64) for i in train_images) and len(train_targets) == 3
