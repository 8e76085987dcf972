"""Distillation (objective: distill) and timm classifiers (model.name: timm:ARCH) as teachers and baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers import (ARGS, DIGITS, SETS, recipe_file, read_metrics, run_cli, sigterm_then_resume_matches_an_uninterrupted_run,
                     torchrun)
from vitcli.errors import VitError
from vitcli.models import create_model
from vitcli.models.load import load_model
from vitcli.objectives import OBJECTIVES, Distillation, Inputs, build_objective
from vitcli.objectives.distill import distillation_term
from vitcli.objectives.teacher import Teacher, load_teacher
from vitcli.recipe import DistillCfg, ObjectiveCfg

# timm's 0.4M-parameter ResNet at 16 px (at 8 px timm's ResNets run 15x slower on this CPU) on the tests' digits
CNN = [x for s in ["model.name=timm:test_resnet", "model.img_size=16", "data.dataset=digits", "data.train_subset=96",
                   "data.num_workers=0", "data.hflip=0.0", "optim.lr=1e-3",
                   "schedule.warmup_steps=2", "train.batch_size=8", "train.log_every=1"] for x in ("--set", s)]


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A timm CNN trained 8 steps on digits through vitcli's engine: the teacher of these tests."""
    tmp = tmp_path_factory.mktemp("cnn")
    assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 8}\n")), "--out", str(tmp / "cnn"), *CNN) == 0
    return tmp / "cnn"


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_hard_and_soft_distillation_terms_equal_the_formulas():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    s, t = student.double().numpy(), teacher.double().numpy()
    # hard: cross-entropy against the teacher's argmax
    hard = -np.mean(np.log(softmax(s))[np.arange(6), t.argmax(axis=1)])
    assert distillation_term(student, teacher, "hard", 1.0).item() == pytest.approx(hard, rel=1e-5)
    # soft: tau^2 * KL(p_teacher || p_student) at temperature tau, summed over classes, averaged over images
    tau = 3.0
    pt, ps = softmax(t / tau), softmax(s / tau)
    soft = tau ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    assert distillation_term(student, teacher, "soft", tau).item() == pytest.approx(soft, rel=1e-5)


def frozen(model: torch.nn.Module, size=None, preprocess=None) -> Teacher:
    return Teacher(model.eval().requires_grad_(False), "test", size, preprocess)


@pytest.mark.parametrize("mode, kind", [("token", "hard"), ("token", "soft"), ("logit", "hard"), ("logit", "soft")])
def test_the_loss_is_the_weighted_labels_and_teacher_terms(mode, kind):
    torch.manual_seed(0)
    student = create_model("vit_pico", num_classes=10, distilled=mode == "token")
    teacher = frozen(create_model("timm:test_resnet", num_classes=10, img_size=8))
    kd = Distillation(student, teacher, torch.nn.CrossEntropyLoss(), 10, mode=mode, kind=kind, alpha=0.3, tau=2.0).train()
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    loss, metrics = kd((images, labels))
    with torch.no_grad():
        t_logits = teacher.model(images)
    torch.manual_seed(1)  # the same dropout either way: none in vit_pico by default
    out = student(images)
    cls, dist = out if mode == "token" else (out, out)
    by_hand = 0.7 * F.cross_entropy(cls, labels) + 0.3 * distillation_term(dist, t_logits, kind, 2.0)
    torch.testing.assert_close(loss, by_hand)
    assert set(metrics) == {"task_loss", "distill_loss"}


def test_feature_mode_regresses_the_teachers_pooled_features_through_a_learned_projection():
    torch.manual_seed(0)
    student = create_model("vit_pico", num_classes=10)
    teacher = frozen(create_model("timm:test_resnet", num_classes=10, img_size=8))
    kd = Distillation(student, teacher, torch.nn.CrossEntropyLoss(), 10, mode="feature", alpha=0.5).train()
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, _ = kd((images, labels))
    with torch.no_grad():
        t_feat = teacher.model.forward_head(teacher.model.forward_features(images), pre_logits=True)
    feat = student.forward_head(student.forward_features(images), pre_logits=True)
    by_hand = 0.5 * F.cross_entropy(student.head(feat), labels) + 0.5 * F.mse_loss(feat @ kd.project.weight.T + kd.project.bias, t_feat)
    torch.testing.assert_close(loss, by_hand)
    # the projection is the objective's own (optimized, resumed); the teacher is nobody's
    assert set(kd.own_state()) == {"project.weight", "project.bias"} and kd.optimized() is kd
    assert not any(k.startswith("teacher") for k in kd.state_dict())
    assert all(not p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training


def test_the_teacher_sees_the_batch_normalised_and_sized_as_it_was_trained():
    from vitcli.io.meta import Preprocessing

    teacher = frozen(torch.nn.Identity(), size=(16, 16), preprocess=Preprocessing(mean=(0.2, 0.3, 0.4), std=(0.1, 0.2, 0.3)))
    images = torch.rand(2, 3, 8, 8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pixels = images * 0.25 + 0.5
    expected = (pixels - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    expected = F.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(teacher.inputs(images, mean, std), expected)


def test_the_teacher_is_checked_against_the_students_classes(cnn_run):
    teacher = load_teacher(DistillCfg(teacher=str(cnn_run)), 10, [str(i) for i in range(10)])
    assert teacher.num_classes == 10 and teacher.img_size == (16, 16) and not teacher.model.training
    with pytest.raises(VitError, match="predicts 10 classes and the student 5"):
        load_teacher(DistillCfg(teacher=str(cnn_run)), 5, None)
    with pytest.raises(VitError, match="the same classes in the same order"):
        load_teacher(DistillCfg(teacher=str(cnn_run)), 10, [str(9 - i) for i in range(10)])
    with pytest.raises(VitError, match="distillation token, which this model has not"):
        build_objective(ObjectiveCfg(name="distill", distill=DistillCfg(teacher=str(cnn_run))),
                        create_model("vit_pico", num_classes=10), Inputs(num_classes=10))


def test_a_timm_architecture_with_a_weights_file_is_a_teacher(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10).eval()
    save_file(net.state_dict(), tmp_path / "teacher.safetensors")
    teacher = load_teacher(DistillCfg(teacher="timm:test_resnet", teacher_weights=str(tmp_path / "teacher.safetensors")), 10, None)
    x = torch.randn(2, 3, 16, 16)
    # timm's normalisation for the architecture (ImageNet's) is applied to the student's (0.5, 0.5) batch
    mean = std = (0.5, 0.5, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(teacher.outputs(x, mean, std)[0], net(teacher.inputs(x, mean, std)))
    with pytest.raises(VitError, match="does not fit timm:test_resnet with 7 classes"):
        load_teacher(DistillCfg(teacher="timm:test_resnet", teacher_weights=str(tmp_path / "teacher.safetensors")), 7, None)


def test_a_timm_classifier_trains_and_checkpoints_through_the_engine_as_timm_reads_it(cnn_run, capsys):
    weights = cnn_run / "checkpoints" / "best" / "model.safetensors"
    meta = json.loads((cnn_run / "summary.json").read_text())
    assert meta["best_top1"] is not None
    net = timm.create_model("test_resnet", num_classes=10)
    net.load_state_dict(load_file(weights), strict=True)  # timm's own keys
    ours = load_model(str(cnn_run))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), net.eval()(x))
    capsys.readouterr()
    assert run_cli("eval", "--ckpt", str(cnn_run), "--json") == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(meta["best_top1"], abs=1e-6)  # the best checkpoint, on the whole split
    # fine-tuning reads it too, and what only a ViT has is refused by name
    assert run_cli("interpolate-pos", "--ckpt", str(cnn_run), "--res", "32", "--out", str(cnn_run.parent / "x.safetensors")) == 2
    assert "needs a Vision Transformer" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["model.patch_size=4", "objective.name=mae"])
def test_vit_only_settings_on_a_timm_classifier_are_one_clear_error(setting, tmp_path, capsys):
    code = run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "run"), *CNN, "--set", setting)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and ("needs a Vision Transformer" in err or "needs a plain ViT" in err)


def test_token_distillation_saves_a_deit_distilled_state_dict_timm_loads_strictly(cnn_run, tmp_path, capsys):
    run = tmp_path / "student"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 6}\n")), "--out", str(run), *DIGITS,
                   "--set", "model.distilled=true", "--set", "objective.name=distill",
                   "--set", f"objective.distill.teacher={cnn_run}") == 0
    # the student's 8x8 batch is resized for the 16x16 teacher, and the start says so
    assert f"Distilling from {cnn_run} (10 classes, fed 16x16 images): hard distillation token, alpha 0.5." in capsys.readouterr().out
    logged = [e for e in read_metrics(run) if e["kind"] == "train"]
    assert logged and all(np.isfinite(e["distill_loss"]) and np.isfinite(e["task_loss"]) for e in logged)
    from timm.models.deit import VisionTransformerDistilled

    deit = VisionTransformerDistilled(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    state = load_file(run / "checkpoints" / "best" / "model.safetensors")
    deit.load_state_dict(state, strict=True)
    ours = load_model(str(run))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), deit.eval()(x), atol=1e-5, rtol=1e-5)
        # at inference the two heads are averaged: the class token's and the distillation token's
        tokens = ours.forward_features(x)
        torch.testing.assert_close(ours(x), (ours.head(tokens[:, 0]) + ours.head_dist(tokens[:, 1])) / 2)


@pytest.mark.slow
def test_distillation_from_a_cnn_teacher_resumes_exactly_after_sigterm(cnn_run, tmp_path):
    sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, [*ARGS, "--set", "model.distilled=true", "--set",
                                                                "objective.name=distill", "--set",
                                                                f"objective.distill.teacher={cnn_run}"])


KD = ["--set", "objective.name=distill"]


@pytest.mark.slow
def test_distillation_trains_under_ddp_fsdp_ema_and_compile(cnn_run, tmp_path):
    recipe = recipe_file(tmp_path, "train: {steps: 4, batch_size: 8, micro_batch_size: 2, eval_every: 4}\n")
    teacher = ["--set", f"objective.distill.teacher={cnn_run}"]
    # DDP, 2 processes, DeiT's token: the teacher is replicated (each rank loads it), the student is what syncs
    ddp = tmp_path / "ddp"
    torchrun("-m", "vitcli", "pretrain", str(recipe), "--out", str(ddp), *DIGITS, *KD, *teacher, "--set", "model.distilled=true")
    assert json.loads((ddp / "summary.json").read_text())["steps"] == 4
    # FSDP (1 process), feature mode: the projection is the objective's own, sharded with it and kept in state.pt
    fsdp = tmp_path / "fsdp"
    assert run_cli("pretrain", str(recipe), "--out", str(fsdp), *DIGITS, *KD, *teacher, "--set", "objective.distill.mode=feature",
                   "--set", "train.strategy=fsdp") == 0
    # EMA and torch.compile, logit mode
    for name, extra in (("ema", ["--set", "train.ema_decay=0.5"]), ("compile", ["--set", "train.compile=true"])):
        assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / name), *DIGITS, *KD, *teacher,
                       "--set", "objective.distill.mode=logit", *extra) == 0
        losses = [e["loss"] for e in read_metrics(tmp_path / name) if e["kind"] in ("train", "eval")]
        assert losses and all(np.isfinite(losses))


def test_every_registered_objective_is_a_recipe_name_and_back():
    import typing

    from vitcli.recipe import ObjectiveCfg as Cfg

    assert set(typing.get_args(typing.get_type_hints(Cfg)["name"])) == set(OBJECTIVES)


def test_bench_times_the_distillation_step(capsys):
    assert run_cli("bench", "vit_pico", "--objective", "distill", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                   "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["objective"] == "distill" and report["vitcli"]["images_per_second"] > 0


def test_distillation_needs_a_teacher_and_says_so(tmp_path, capsys):
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "r"), *SETS,
                   "--set", "objective.name=distill") == 2
    assert "objective.distill.teacher' is needed" in capsys.readouterr().err
    assert run_cli("pretrain", "distill_digits", "--out", str(tmp_path / "r"), "--set",
                   f"objective.distill.teacher={tmp_path / 'none'}") == 2
    assert "does not exist. Train a teacher first" in capsys.readouterr().err and not (tmp_path / "r").exists()
