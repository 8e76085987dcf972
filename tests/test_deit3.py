"""DeiT III's training pieces (Touvron et al., 2022): repeated augmentation, BCE, 3-Augment, LAMB, LayerScale."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import Mixup

from helpers import ARGS, image_set, recipe_file, run_cli, sigterm_then_resume_matches_an_uninterrupted_run
from vitcli import data as vdata
from vitcli.data.loader import BatchDataset, EpochBatchSampler
from vitcli.data.transforms import RandomBlur, deit3_stages
from vitcli.engine.optim import build_optimizer
from vitcli.recipe import recipe_from_dict


def epoch_of(rank: int, *, n=60, batch=12, repeats=3, world=2, epoch=0, start=0):
    sampler = EpochBatchSampler(n, batch, shuffle=True, drop_last=True, seed=7, epoch=epoch, start_batch=start,
                                rank=rank, world_size=world, repeats=repeats)
    return [(i, c) for b in sampler for i, c in zip(b.indices, b.copies)]


def test_repeated_augmentation_covers_each_chosen_image_k_times_across_two_ranks():
    ranks = [epoch_of(r) for r in (0, 1)]
    assert [len(r) for r in ranks] == [30, 30]  # the epoch keeps its n samples, split evenly
    both = ranks[0] + ranks[1]
    assert len(set(both)) == 60  # no (image, copy) twice
    per_image = Counter(i for i, _ in both)
    assert len(per_image) == 20 and set(per_image.values()) == {3}  # n / k distinct images, each k times
    assert all({c for i2, c in both if i2 == i} == {0, 1, 2} for i in per_image)
    # as DeiT's sampler: the copies of an image are spread over the ranks, not kept on one
    assert all(i in {j for j, _ in ranks[0]} and i in {j for j, _ in ranks[1]} for i in per_image)
    # another epoch draws other images; a resumed epoch skips whole batches and goes on identically
    assert {i for i, _ in epoch_of(0, epoch=1)} != {i for i, _ in ranks[0]}
    assert epoch_of(1, start=2) == ranks[1][2 * 6:]
    # off, the sampler is what it was: contiguous slices of a plain permutation
    plain = EpochBatchSampler(60, 12, shuffle=True, drop_last=True, seed=7, rank=0, world_size=2)
    assert all(b.copies is None for b in plain) and sum(len(b.indices) for b in plain) == 30


def test_each_copy_of_an_image_is_augmented_on_its_own():
    rng = np.random.default_rng(0)
    cells = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]
    spec = vdata.TransformSpec(crop_scale=(0.2, 1.0), pipeline="pil")
    dataset = BatchDataset(image_set(cells), vdata.build_transform(spec, (16, 16), train=True), seed=1)
    plain = dataset.load([1, 1, 1], epoch=0)
    copies = dataset.load([1, 1, 1], epoch=0, copies=[0, 1, 2])
    assert torch.equal(copies.images[0], plain.images[0])  # the first copy is the image's usual draw
    assert not torch.equal(copies.images[1], copies.images[0]) and not torch.equal(copies.images[2], copies.images[1])


@pytest.mark.slow
def test_repeated_augmentation_resumes_exactly_after_sigterm(tmp_path):
    sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, [*ARGS, "--set", "data.repeated_augment=3"])


def test_bce_on_mixup_targets_is_the_per_class_binary_cross_entropy():
    loss = vdata.build_train_loss(vdata.MixSpec(mixup=0.8, cutmix=1.0, label_smoothing=0.1, loss="bce"))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, targets = mix(images, labels)
    logits = torch.randn(4, 5)
    x, t = logits.double().numpy(), targets.double().numpy()
    p = 1 / (1 + np.exp(-x))
    by_hand = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    assert loss(logits, targets).item() == pytest.approx(by_hand, rel=1e-5)
    # class ids become smoothed one-hot targets: on = 1 - s + s / C, off = s / C
    t = np.full((4, 5), 0.1 / 5)
    t[np.arange(4), labels.numpy()] = 1 - 0.1 + 0.1 / 5
    by_hand = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    assert loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-5)


def test_three_augment_applies_exactly_one_of_greyscale_solarize_and_blur():
    spec = vdata.TransformSpec(three_augment=True, pipeline="pil")
    tf = vdata.build_transform(spec, (16, 16), train=True)
    choice = next(t for t in tf.transforms if type(t).__name__ == "RandomChoice")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    seen = set()
    for seed in range(30):
        random.seed(seed)
        got = np.asarray(choice(img))
        random.seed(seed)  # the same draws by hand: which of the three, then the blur radius
        pick = random.choices(range(3))[0]
        expected = [ImageOps.grayscale(img).convert("RGB"), ImageOps.solarize(img, 128),
                    None][pick] or img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        np.testing.assert_array_equal(got, np.asarray(expected))
        seen.add(pick)
    assert seen == {0, 1, 2}
    assert isinstance(choice.transforms[2], RandomBlur)


def test_simple_crop_resizes_and_crops_with_reflect_padding():
    spec = vdata.TransformSpec(simple_crop=True, color_jitter=0.3, pipeline="pil")
    primary = timm.data.create_transform((16, 16), is_training=True, separate=True)
    stages = deit3_stages(spec, (16, 16), *primary)
    names = [type(t).__name__ for t in stages]
    assert names[:3] == ["Resize", "RandomCrop", "RandomHorizontalFlip"] and "RandomResizedCropAndInterpolation" not in names
    crop = stages[1]
    assert crop.padding == 4 and crop.padding_mode == "reflect" and "ColorJitter" in names


def test_lamb_and_layer_scale_come_from_the_recipe():
    r = recipe_from_dict({"train": {"steps": 1}, "model": {"name": "vit_pico", "init_values": 1e-4},
                          "optim": {"name": "lamb", "lr": 4e-3, "betas": [0.9, 0.95]}})
    from vitcli.engine.setup import build_model

    model = build_model(r.model, 10)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((64,), 1e-4))
    # timm's deit3 model (LayerScale) reads the weights strictly and computes the same logits
    theirs = timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4,
                                                              num_classes=10, init_values=1e-4)
    theirs.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    opt = build_optimizer(model, r.optim, torch.device("cpu"))
    assert isinstance(opt, timm.optim.Lamb) and opt.defaults["betas"] == (0.9, 0.95)


def test_the_deit3_pieces_train_together_end_to_end(tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 4}\n")), "--out", str(run), *ARGS,
                   "--set", "data.three_augment=true", "--set", "data.simple_crop=true", "--set", "data.color_jitter=0.3",
                   "--set", "data.loss=bce", "--set", "data.mixup=0.8", "--set", "data.cutmix=1.0",
                   "--set", "data.repeated_augment=3", "--set", "optim.name=lamb", "--set", "model.init_values=1e-4") == 0
    assert (run / "checkpoints" / "last" / "model.safetensors").exists()


@pytest.mark.parametrize("setting, message", [
    ("data.repeated_augment=0", "'data.repeated_augment' is how many times"),
    ("data.pipeline=tensor", "cannot run data.three_augment"),
    ("model.init_values=0", "'model.init_values' must be > 0"),
])
def test_bad_deit3_settings_are_one_clear_error(setting, message, tmp_path, capsys):
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "r"), *ARGS,
                   "--set", "data.three_augment=true", "--set", setting) == 2
    assert message in capsys.readouterr().err
