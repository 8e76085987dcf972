"""Engine parts against closed forms: schedule, optimizer groups, evaluation metrics, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitcli.io import checkpoint as ckpt
from vitcli.objectives import ECE_BINS, EvalAccumulator, evaluate
from vitcli.engine.optim import build_optimizer, lr_at
from vitcli.rng import rng_state, set_rng_state
from vitcli.errors import VitError
from vitcli.models import create_model
from vitcli.recipe import OptimCfg, ScheduleCfg


def test_schedule_warmup_then_cosine_and_linear():
    cos = ScheduleCfg(warmup_steps=10, decay="cosine", min_lr=0.1)
    lin = ScheduleCfg(warmup_steps=10, decay="linear", min_lr=0.0)
    assert lr_at(0, 110, 1.0, cos) == pytest.approx(0.1)  # first update: 1/10 of the peak
    assert lr_at(9, 110, 1.0, cos) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 109):
        p = (step - 10) / 100
        assert lr_at(step, 110, 1.0, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        assert lr_at(step, 110, 1.0, lin) == pytest.approx(1 - p)
    assert lr_at(50, 110, 1.0, ScheduleCfg(warmup_steps=0, decay="constant")) == 1.0


def test_step_decay_drops_by_its_factor_at_each_milestone_as_detectron2():
    # ViTDet's 100-epoch schedule: 184,375 iterations, x0.1 at iterations 163,889 and 177,546, 250 warmup
    vitdet = ScheduleCfg(warmup_steps=250, decay="step", step_milestones=[163889 / 184375, 177546 / 184375], step_factor=0.1)
    got = [lr_at(s, 184375, 1e-4, vitdet) for s in (249, 250, 163888, 163889, 177545, 177546, 184374)]
    assert got == pytest.approx([1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])


def test_no_weight_decay_on_norms_biases_pos_embed_and_tokens():
    model = create_model("vit_pico")
    opt = build_optimizer(model, OptimCfg(name="adamw", lr=1e-3, weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | free == set(names.values())
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= free
    assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight", "head.weight"} <= decayed
    assert isinstance(opt, torch.optim.AdamW)
    sgd = build_optimizer(model, OptimCfg(name="sgd", lr=0.1, weight_decay=0.0, momentum=0.9), torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and not sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9


def test_weight_decay_schedule_is_dinos_cosine_on_the_decayed_groups_only():
    from vitcli.engine.optim import set_lr, weight_decay_at

    cfg = OptimCfg(name="adamw", lr=1e-3, weight_decay=0.04, weight_decay_end=0.4)
    opt = build_optimizer(create_model("vit_pico"), cfg, torch.device("cpu"))
    total = 90  # DINO's utils.cosine_scheduler(0.04, 0.4, epochs, niter_per_ep): one value per iteration
    table = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * np.arange(total) / total))
    for step in (0, 17, 45, 89):
        wd = weight_decay_at(step, total, cfg)
        assert wd == pytest.approx(table[step])
        set_lr(opt, 1e-3, wd)
        assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, pytest.approx(table[step])]
    assert weight_decay_at(5, total, OptimCfg(weight_decay=0.05)) is None


@pytest.mark.parametrize("name,kw,stem", [
    ("vit_pico", {}, ["patch_embed.proj.weight", "cls_token", "pos_embed"]),
    ("vit_pico", dict(distilled=True, init_values=0.1), ["dist_token", "cls_token"]),   # DeiT distilled, LayerScale
    ("vit_pico", dict(reg_tokens=4, no_embed_class=True, pre_norm=True), ["reg_token", "norm_pre.weight"]),  # DINOv2 reg, CLIP
    ("vit_s16_dinov3", dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4), ["reg_token", "cls_token"]),
])
def test_layer_decay_scales_lr_by_depth(name, kw, stem):
    model = create_model(name, **kw)  # depth 4
    opt = build_optimizer(model, OptimCfg(name="sgd", lr=1.0, weight_decay=0.0, layer_decay=0.5), torch.device("cpu"))
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[names[id(p)]] = g["lr_scale"]
    assert set(scale) == set(names.values())
    assert scale["head.weight"] == pytest.approx(1.0)
    assert scale["blocks.3.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["blocks.0.mlp.fc1.weight"] == pytest.approx(0.5**4)
    for key in stem + ["patch_embed.proj.weight"]:  # the embeddings and every prefix token: the bottom layer
        assert scale[key] == pytest.approx(0.5**5), key


def test_eval_metrics_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 12, generator=g) * 3
    labels = torch.randint(0, 12, (257,), generator=g)
    acc = EvalAccumulator(12, torch.device("cpu"))
    for chunk in range(0, 257, 50):  # in batches, as a loader gives them
        acc.update(logits[chunk : chunk + 50], labels[chunk : chunk + 50])
    r = acc.result()
    pred = logits.numpy().argsort(axis=1)[:, ::-1]
    y = labels.numpy()
    assert r["top1"] == pytest.approx(np.mean(pred[:, 0] == y))
    assert r["top5"] == pytest.approx(np.mean([y[i] in pred[i, :5] for i in range(len(y))]))
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert r["num_images"] == 257
    for c in range(12):
        m = y == c
        assert r["per_class_accuracy"][c] == pytest.approx(np.mean(pred[m, 0] == c))


def test_ece_hand_worked_example():
    # Two confident right answers (p=0.9), one confident wrong (p=0.9), one unsure right (p=0.6).
    # Bins (15 equal widths): 0.9 -> bin 13, 0.6 -> bin 9.
    # ECE = 3/4 * |0.9 - 2/3| + 1/4 * |0.6 - 1| = 0.175 + 0.1 = 0.275
    def row(p, cls):  # two classes: softmax gives p to cls
        z = math.log(p / (1 - p))
        return [z, 0.0] if cls == 0 else [0.0, z]

    logits = torch.tensor([row(0.9, 0), row(0.9, 1), row(0.9, 0), row(0.6, 1)])
    labels = torch.tensor([0, 1, 1, 1])
    acc = EvalAccumulator(2, torch.device("cpu"))
    acc.update(logits, labels)
    assert ECE_BINS == 15
    assert acc.result()["ece"] == pytest.approx(0.275)


def test_evaluate_runs_the_model_in_eval_mode_and_restores_it():
    model = create_model("vit_pico", drop_rate=0.5)
    model.train()
    images = torch.randn(6, 3, 8, 8)
    labels = torch.arange(6) % 10
    out = evaluate(model, [(images[:3], labels[:3]), (images[3:], labels[3:])], 10, torch.device("cpu"))
    assert model.training
    model.eval()
    with torch.no_grad():
        direct = (model(images).argmax(1) == labels).float().mean().item()
    assert out["top1"] == pytest.approx(direct) and out["num_images"] == 6 and out["images_per_second"] > 0


def _save(root, step, value=1.0):
    return ckpt.save_checkpoint(root, step, {"w": torch.full((4,), value)}, {"step": step}, {"step": step, "x": torch.arange(3)}, is_best=False, keep=10)


def test_checkpoint_round_trip_and_links(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10, 1.0)
    c = ckpt.save_checkpoint(root, 20, {"w": torch.full((4,), 2.0)}, {"step": 20}, {"step": 20}, is_best=True, keep=10)
    assert (root / "last").resolve() == c.path.resolve() == (root / "best").resolve()
    weights, meta = ckpt.read_weights(root / "last" / ckpt.WEIGHTS)
    assert torch.equal(weights["w"], torch.full((4,), 2.0)) and meta == {"step": 20}
    assert not list(root.glob(".tmp*")), "no temporary files are left behind"


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10, 1.0)
    newest = _save(root, 20, 2.0)
    data = (newest.path / ckpt.STATE).read_bytes()
    (newest.path / ckpt.STATE).write_bytes(data[: len(data) // 2])
    notes = []
    found = ckpt.newest_loadable(root, warn=notes.append)
    assert found.step == 10 and torch.equal(found.weights["w"], torch.ones(4)) and found.state["step"] == 10
    assert any("step-00000020" in n for n in notes)


def test_truncated_weights_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    ckpt.save_weights(path, {"w": torch.randn(100)}, {"a": 1})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(VitError, match="cannot be read"):
        ckpt.read_weights(path)


def test_prune_keeps_last_best_and_newest(tmp_path):
    root = tmp_path / "c"
    ckpt.save_checkpoint(root, 1, {"w": torch.ones(1)}, {}, {"step": 1}, is_best=True, keep=1)
    for s in (2, 3, 4):
        ckpt.save_checkpoint(root, s, {"w": torch.ones(1)}, {}, {"step": s}, is_best=False, keep=1)
    assert sorted(c.step for c in ckpt.step_dirs(root)) == [1, 3, 4]  # best (1), last (4), one more (3)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    state = rng_state()
    torch.save(state, tmp_path / "s.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
