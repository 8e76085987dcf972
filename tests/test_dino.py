"""DINO (objective dino): multi-crop views, the loss and its schedules against DINO's formulas, the EMA
teacher, the frozen last layer, KoLeo and iBOT, and what a run's checkpoints hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from vitcli import data as vdata
from vitcli.data.views import MultiView, ViewSpec
from vitcli.models import create_model
from vitcli.objectives.dino import Dino
from vitcli.objectives.dino_parts import (DinoHead, cross_view_loss, koleo_loss, sinkhorn_knopp, teacher_momentum,
                                          teacher_temperature, updated_centre)
from vitcli.recipe import DinoCfg, recipe_from_dict

from helpers import ARGS, read_metrics, recipe_file, run_cli, sigterm_then_resume_matches_an_uninterrupted_run

TINY_VIT = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=0)
SMALL_HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)
DINO_ARGS = ["--set", "objective.name=dino", "--set", "objective.dino.out_dim=64", "--set", "objective.dino.hidden_dim=32",
             "--set", "objective.dino.bottleneck_dim=16", "--set", "objective.dino.local_crops_number=2",
             "--set", "objective.dino.local_crops_size=4", "--set", "objective.dino.warmup_teacher_temp_epochs=2",
             "--set", "objective.fewshot=[1]"]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    return np.log(softmax(x, axis))


# ---- multi-crop ---------------------------------------------------------------------------------------


def test_multi_crop_views_have_the_stated_sizes_and_scales(monkeypatch):
    areas = []
    draw = transforms.RandomResizedCrop.get_params

    def spy(img, scale, ratio):
        i, j, h, w = draw(img, scale, ratio)
        areas.append(h * w / (img.size[0] * img.size[1]))
        return i, j, h, w

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(spy))
    views = ViewSpec.dino((32, 32), (0.4, 1.0), local_number=3, local_size=16, local_scale=(0.05, 0.4))
    transform = MultiView(vdata.TransformSpec(mean=(0.5,), std=(0.5,), hflip=0.5), views)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320), dtype=np.uint8))
    for _ in range(40):
        out = transform(image)
        assert [tuple(v.shape) for v in out] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 3
    per_image = np.array(areas).reshape(40, 5)
    assert views.sizes == [(32, 32)] * 2 + [(16, 16)] * 3
    # rounding a crop's sides to whole pixels moves its area by under 3%
    assert (per_image[:, :2] >= 0.4 * 0.97).all() and (per_image[:, :2] <= 1.0).all()
    assert (per_image[:, 2:] >= 0.05 * 0.97).all() and (per_image[:, 2:] <= 0.4 * 1.03).all()
    assert per_image[:, 2:].mean() < per_image[:, :2].mean()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_view_without_photometric_changes_is_torchvisions_crop_to_tensor_and_normalize(mode):
    """Changes of probability 0 are left out and the view is normalised in one pass: the same pixels as
    torchvision's RandomResizedCrop -> ToTensor -> Normalize from the same torch seed."""
    mean, std = ((0.5,), (0.25,)) if mode == "L" else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    views = ViewSpec.dino((12, 12), (0.3, 1.0), local_number=0, local_size=4, local_scale=(0.1, 0.3), jitter=0.0, grayscale=0.0,
                          solarize=0.0, blur=False)
    ours = MultiView(vdata.TransformSpec(mean=mean, std=std, hflip=0.0, interpolation="bilinear"), views)
    reference = transforms.Compose([transforms.RandomResizedCrop((12, 12), scale=(0.3, 1.0)), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert(mode)
    for seed in range(5):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        want = (reference(image), reference(image))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_loader_hands_one_batch_per_view():
    from vitcli.engine.setup import build_data

    recipe = recipe_from_dict({"model": {"name": "vit_pico", "img_size": 8}, "data": {"num_workers": 0, "hflip": 0.0},
                               "objective": {"name": "dino", "dino": {"local_crops_number": 3, "local_crops_size": 4}},
                               "train": {"steps": 1}})
    data = build_data(recipe)
    loader = vdata.make_loader(data.train, data.train_transform, vdata.LoaderSpec.training(6, num_workers=0))
    views, labels = next(iter(loader))
    c = len(recipe.data.mean)
    assert isinstance(views, tuple) and [tuple(v.shape) for v in views] == [(6, c, 8, 8)] * 2 + [(6, c, 4, 4)] * 3
    assert len(labels) == 6 and not torch.equal(views[0], views[1])  # two different crops of each image


# ---- the loss and its schedules -------------------------------------------------------------------


@pytest.mark.parametrize("student_views", [2, 5])
def test_cross_view_loss_is_dinos_over_pairs_of_different_views(student_views):
    rng = np.random.default_rng(1)
    b, k = 3, 7
    s, t, c = rng.normal(size=(student_views * b, k)), rng.normal(size=(2 * b, k)), rng.normal(size=(1, k))
    got = cross_view_loss(torch.tensor(s), torch.tensor(t), torch.tensor(c), student_views=student_views, teacher_views=2,
                          student_temp=0.1, teacher_temp=0.04)
    terms = []
    for q in range(2):
        target = softmax((t[q * b:(q + 1) * b] - c) / 0.04)
        for v in range(student_views):
            if v != q:
                terms.append(np.mean(np.sum(-target * log_softmax(s[v * b:(v + 1) * b] / 0.1), axis=1)))
    assert len(terms) == 2 * student_views - 2
    assert got.item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_centre_update_matches_the_formula():
    rng = np.random.default_rng(2)
    centre, teacher = rng.normal(size=(1, 5)), rng.normal(size=(8, 5))
    got = updated_centre(torch.tensor(centre), torch.tensor(teacher), 0.9)
    np.testing.assert_allclose(got.numpy(), 0.9 * centre + 0.1 * teacher.mean(axis=0, keepdims=True), rtol=1e-6)


def test_teacher_momentum_and_temperature_follow_dinos_tables():
    epochs, per_epoch = 10, 7
    iters = np.arange(epochs * per_epoch)  # DINO's utils.cosine_scheduler(0.996, 1, epochs, per_epoch)
    table = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * iters / len(iters)))
    ours = [teacher_momentum(i, epochs * per_epoch, 0.996) for i in iters]
    np.testing.assert_allclose(ours, table, rtol=0, atol=1e-12)
    assert ours[0] == pytest.approx(0.996) and ours[-1] < 1 and teacher_momentum(len(iters), len(iters), 0.996) == 1
    temps = np.concatenate((np.linspace(0.04, 0.07, 4), np.ones(epochs - 4) * 0.07))  # main_dino.py's DINOLoss
    np.testing.assert_allclose([teacher_temperature(e, 0.04, 0.07, 4) for e in range(epochs)], temps, rtol=1e-12)


def test_koleo_is_minus_mean_log_distance_to_the_nearest_neighbour():
    x = np.random.default_rng(3).normal(size=(9, 4))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.linalg.norm(unit[:, None] - unit[None], axis=-1) + np.diag([np.inf] * 9)
    assert koleo_loss(torch.tensor(x)).item() == pytest.approx(-np.mean(np.log(dist.min(axis=1) + 1e-8)), rel=1e-5)


def test_sinkhorn_knopp_is_dinov2s_equipartition():
    rng = np.random.default_rng(4)
    t = rng.normal(size=(12, 5))  # 12 images, 5 prototypes
    q = np.exp(t / 0.1).T  # DINOv2's sinkhorn_knopp_teacher, one process, 3 iterations
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(axis=1, keepdims=True) * 5
        q /= q.sum(axis=0, keepdims=True) * 12
    expected = (q * 12).T
    got = sinkhorn_knopp(torch.tensor(t), 0.1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)  # each image: a distribution
    mild = sinkhorn_knopp(torch.tensor(t), 2.0).numpy()  # at a mild temperature 3 iterations equipartition
    np.testing.assert_allclose(mild.sum(axis=0), 12 / 5, rtol=0.01)
    loss = cross_view_loss(torch.tensor(t), torch.tensor(t[:12]), None, student_views=2, teacher_views=2,
                           student_temp=0.1, teacher_temp=0.1)
    targets = expected.reshape(2, 6, 5)  # the targets span both teacher views, as DINOv2's
    terms = [np.mean(np.sum(-targets[q] * log_softmax(t[v * 6:(v + 1) * 6] / 0.1), axis=1)) for q, v in ((0, 1), (1, 0))]
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_head_batch_norm_follows_each_hidden_layer():
    head = DinoHead(32, 64, hidden_dim=16, bottleneck_dim=8, layers=3, batch_norm=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]


def test_head_last_layer_is_weight_normalised_with_a_fixed_norm():
    head = DinoHead(32, 64, hidden_dim=16, bottleneck_dim=8, layers=3)
    w = head.last_layer.weight
    np.testing.assert_allclose(w.norm(dim=1).detach().numpy(), np.ones(64), rtol=1e-5)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3


# ---- the objective: teacher, freezing, iBOT ---------------------------------------------------------


def dino(**settings) -> Dino:
    torch.manual_seed(0)
    cfg = DinoCfg(**{**SMALL_HEAD, "local_crops_number": 2, "local_crops_size": 4, **settings})
    return Dino(create_model("vit_pico", **TINY_VIT), cfg, steps_per_epoch=5, total_steps=20)


def views(batch: int = 4, local: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, 3, s, s, generator=g) for s in [8, 8] + [4] * local)


def test_the_teacher_gets_no_gradients_and_follows_the_student_by_ema():
    objective = dino()
    objective.train()
    loss, metrics = objective((views(), torch.zeros(4)))
    loss.backward()
    teacher = dict(objective.teacher.named_parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.values())
    assert all(p.grad is not None for n, p in objective.model.named_parameters())
    assert set(metrics) == {"dino_loss", "teacher_temp"} and metrics["teacher_temp"].item() == pytest.approx(0.04)
    with torch.no_grad():  # move the student, then let the teacher follow
        for p in objective.model.parameters():
            p.add_(0.1)
    before = {n: p.clone() for n, p in teacher.items()}
    student = {**{f"backbone.{n}": p for n, p in objective.model.named_parameters()},
               **{f"head.{n}": p for n, p in objective.head.named_parameters()}}
    objective.begin_step(3)
    objective.after_update()
    m = teacher_momentum(2, 20, 0.996)
    for name, p in teacher.items():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * student[name], rtol=1e-6, atol=1e-7)


def test_the_last_layer_is_frozen_for_the_first_epoch_only():
    objective = dino(freeze_last_layer=1.0)  # 5 steps per epoch
    last = objective.head.last_layer.parametrizations.weight.original1
    for number, frozen in ((1, True), (5, True), (6, False)):
        objective.zero_grad()
        objective.begin_step(number)
        objective((views(), torch.zeros(4)))[0].backward()
        objective.before_update()
        assert (last.grad is None) == frozen, number
        assert objective.head.mlp[0].weight.grad is not None


def test_ibot_masks_a_share_of_the_global_crops_and_trains_the_mask_token():
    objective = dino(ibot_weight=1.0, ibot_mask_probability=0.5, ibot_mask_ratio=[0.25, 0.5])
    g = torch.Generator().manual_seed(0)
    mask = objective.ibot_mask(torch.zeros(4000, 3, 8, 8), g)  # 16 patches each
    counts = mask.sum(dim=1)
    assert abs((counts > 0).float().mean().item() - 0.5) < 0.03
    assert counts[counts > 0].min() >= 4 and counts.max() <= 8
    objective.train()
    loss, metrics = objective((views(), torch.zeros(4)), generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert metrics["ibot_loss"] > 0 and objective.mask_token.grad is not None and objective.mask_token.grad.abs().sum() > 0


# ---- runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    from helpers import offline_env

    tmp = tmp_path_factory.mktemp("dino")
    with offline_env():
        assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 12}\n")), "--out", str(tmp / "run"), *ARGS,
                       *DINO_ARGS, "--set", "objective.knn=5", "--set", "train.eval_every=6") == 0
    return tmp / "run"


def test_a_dino_run_checkpoints_the_teacher_backbone_under_timms_keys(dino_run):
    step = dino_run / "checkpoints" / "step-00000012"
    published = load_file(str(step / "model.safetensors"))
    state = torch.load(step / "state.pt", weights_only=True)
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in state["objective"].items() if k.startswith("teacher.backbone.")}
    assert set(teacher) == set(published) and all(torch.equal(teacher[k], published[k]) for k in published)
    assert set(state["model"]) == set(published)  # the student, for resuming
    assert any(not torch.equal(state["model"][k], published[k]) for k in published)  # the two differ
    assert {"head.mlp.0.weight", "teacher.head.mlp.0.weight", "centre"} <= set(state["objective"])
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32,
                                  depth=2, num_heads=2, num_classes=0)
    reference.load_state_dict(published, strict=True)
    evals = [e for e in read_metrics(dino_run) if e["kind"] == "eval"]
    assert len(evals) == 2 and all(0 <= e["knn_5"] <= 1 and math.isfinite(e["loss"]) for e in evals)


def test_vit_eval_knn_reads_a_dino_run(dino_run, capsys):
    import json

    assert run_cli("eval", "--ckpt", str(dino_run), "--knn", "5", "--json", "--num-workers", "0") == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["knn"]["5"] <= 1.0


def test_a_dino_encoder_fine_tunes_with_a_new_head(dino_run, tmp_path):
    out = tmp_path / "ft"
    assert run_cli("finetune", "--ckpt", str(dino_run), "--out", str(out), "--set", "train.steps=3", "--set", "train.batch_size=8",
                   "--set", "data.num_workers=0", "--set", "data.train_subset=64", "--set", "data.eval_subset=20") == 0
    teacher = load_file(str(dino_run / "checkpoints" / "best" / "model.safetensors"))
    tuned = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert tuned["head.weight"].shape[0] == 10 and set(teacher) < set(tuned)  # the teacher's backbone under a new head


def test_dino_refuses_ema_and_fsdp(tmp_path, capsys):
    recipe = recipe_file(tmp_path, "train: {steps: 2}\n")
    for extra in (["--set", "train.ema_decay=0.99"], ["--set", "train.strategy=fsdp"]):
        assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "r"), *ARGS, *DINO_ARGS, *extra) == 2
        assert "objective dino" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_then_resume_equals_an_uninterrupted_dino_run(tmp_path):
    sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, [*ARGS, *DINO_ARGS, "--set", "objective.dino.ibot_weight=1.0",
                                                                "--set", "objective.dino.koleo_weight=0.1"])
