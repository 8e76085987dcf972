"""torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 train the same weights as one process with
the same global batch and seed, and runs resume across process counts (2 -> 1, 1 -> 2, DCP reshards).

The tiny model has no dropout; augmentation is seeded per image, so every process count sees the same
images augmented the same way and only float summation order differs (hence 1e-5, not bitwise).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import offline_env, run_cli, torchrun
from vitcli.engine.batches import eval_batches
from vitcli.engine.plan import StepPlan
from vitcli.engine.setup import build_data
from vitcli.errors import VitError
from vitcli.recipe import recipe_from_dict

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)

STEPS = 12
# batch 8 from micro-batches of 2: one process accumulates 4, each of two processes accumulates 2 (no_sync).
RECIPE = f"""# tiny distributed test recipe
name: tiny
model: {{name: vit_pico, img_size: 8, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2}}
data: {{dataset: digits, num_workers: 0, hflip: 0.0, train_subset: 96, eval_subset: 30}}
optim: {{lr: 1.0e-3}}
schedule: {{warmup_steps: 2}}
train: {{steps: {STEPS}, batch_size: 8, micro_batch_size: 2, log_every: 4, checkpoint_every: 4, keep: 10}}
"""
FSDP = ["--set", "train.strategy=fsdp", "--set", "train.activation_checkpointing=true"]

# Runs `vit` under torchrun and saves every rank's state of the module BUILDER built (the trainer's model, or
# its objective with the model inside).
DUMP = """
import sys, torch, torch.distributed as dist
import vitcli.engine.run as run
from vitcli.cli import main
built = []
_build = run.BUILDER
run.BUILDER = lambda *a, **k: built.append(_build(*a, **k)) or built[-1]
try:
    main(sys.argv[2:])
except SystemExit as e:
    if e.code:
        raise
torch.save({k: v.detach().clone() for k, v in built[0].state_dict().items()}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
"""
DUMP_WEIGHTS = DUMP.replace("BUILDER", "build_model")


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["kind"] == kind]


def forget_after(run: Path, step: int) -> None:
    """Delete the checkpoints after `step`, as if the run had been killed there."""
    for d in (run / "checkpoints").glob("step-*"):
        if int(d.name.removeprefix("step-")) > step:
            shutil.rmtree(d)
    (run / "summary.json").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """The same recipe in one process, without torchrun."""
    run = tmp_path_factory.mktemp("reference") / "run"
    with offline_env():
        assert run_cli("pretrain", str(recipe), "--out", str(run)) == 0
    return run


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_and_resume_in_one(recipe, reference, tmp_path, capsys):
    run = tmp_path / "ddp"
    script = tmp_path / "dump.py"
    script.write_text(DUMP_WEIGHTS)
    proc = torchrun(str(script), str(tmp_path), "pretrain", str(recipe), "--out", str(run))

    # both replicas hold bitwise the same weights, which rank 0 saved ...
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert max_diff(rank0, weights(run, STEPS)) == 0.0
    # ... and they are the one-process weights after every checkpoint
    for step in (4, 8, STEPS):
        assert max_diff(weights(run, step), weights(reference, step)) < 1e-5
    # rank 0 alone printed and logged; the global batch was spelled out; evaluation is all-reduced
    assert proc.stdout.count("Training vit_pico") == 1 and "2 processes x 2 x 2" in proc.stdout
    assert "8 images" in proc.stdout
    assert len(events(run, "train")) == STEPS // 4 and len(events(run, "checkpoint")) == STEPS // 4
    (ddp_eval,), (ref_eval,) = events(run, "eval"), events(reference, "eval")
    assert ddp_eval["num_images"] == ref_eval["num_images"] == 30  # 30 images, no padding, none twice
    assert ddp_eval["top1"] == ref_eval["top1"] and abs(ddp_eval["loss"] - ref_eval["loss"]) < 1e-5

    # killed after step 8: the 2-process checkpoint resumes in one process and ends where the reference does
    forget_after(run, 8)
    assert run_cli("pretrain", str(recipe), "--out", str(run)) == 0
    assert "Resuming" in capsys.readouterr().out
    assert max_diff(weights(run, STEPS), weights(reference, STEPS)) < 1e-5
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_fsdp_checkpoints_reshard_from_one_to_two_processes_and_back(recipe, reference, tmp_path):
    # one process with strategy fsdp: nothing to shard, but checkpoints are in the sharded (DCP) format
    run = tmp_path / "fsdp"
    assert run_cli("pretrain", str(recipe), "--out", str(run), *FSDP) == 0
    step4 = run / "checkpoints" / "step-00000004"
    assert (step4 / "sharded" / ".metadata").is_file() and not (step4 / "model.safetensors").exists()
    assert max_diff(weights(run, STEPS), weights(reference, STEPS)) < 1e-5  # best, consolidated at the end

    # 1 -> 2: two processes (fully_shard per block + root, activation checkpointing) continue from step 4
    forget_after(run, 4)
    proc = torchrun("-m", "vitcli", "pretrain", str(recipe), "--out", str(run), *FSDP)
    assert "Resuming" in proc.stdout and "fsdp" in proc.stdout
    step8 = run / "checkpoints" / "step-00000008"
    assert sorted(p.name for p in (step8 / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(step8 / "state.pt", weights_only=True)["world_size"] == 2
    assert max_diff(weights(run, STEPS), weights(reference, STEPS)) < 1e-5
    (fsdp_eval,), (ref_eval,) = events(run, "eval"), events(reference, "eval")
    assert fsdp_eval["num_images"] == 30 and fsdp_eval["top1"] == ref_eval["top1"]

    # `vit consolidate` turns the 2-process shards into one .safetensors in one process
    out = tmp_path / "step8.safetensors"
    assert run_cli("consolidate", str(step8), "--out", str(out)) == 0
    assert max_diff(load_file(str(out)), weights(reference, 8)) < 1e-5

    # 2 -> 1: the step-8 shards written by two processes resume in one
    forget_after(run, 8)
    assert run_cli("pretrain", str(recipe), "--out", str(run), *FSDP) == 0
    assert max_diff(weights(run, STEPS), weights(reference, STEPS)) < 1e-5


def test_eval_shards_count_every_image_once(tmp_path):
    r = recipe_from_dict({"model": {"name": "vit_pico"}, "data": {"dataset": "digits", "num_workers": 0, "eval_subset": 13},
                          "train": {"steps": 1, "batch_size": 4}})
    data = build_data(r)
    seen = []
    for rank in (0, 1, 2):
        batches = list(eval_batches(data, r, torch.device("cpu"), batch_size=2, rank=rank, world_size=3, lockstep=True))
        assert len(batches) == 3  # ceil(13 / 6) global batches on every rank, dummies included
        seen.append(sum(len(labels) for _, labels in batches))
    assert seen == [5, 4, 4]  # 13 images, none padded or repeated; the short last batch has no third share


def test_global_batch_plan_and_fsdp_refuses_ema():
    def plan(world: int, micro: int | None) -> tuple[int, int]:
        r = recipe_from_dict({"train": {"steps": 1, "batch_size": 16, "micro_batch_size": micro}})
        p = StepPlan.make(r.train, 64, world)
        return p.micro_batch, p.accum

    assert plan(1, None) == (16, 1) and plan(2, None) == (8, 1) and plan(2, 4) == (4, 2) and plan(4, 2) == (2, 2)
    with pytest.raises(VitError, match="multiple of micro_batch_size x processes"):
        plan(3, None)
    with pytest.raises(VitError, match="fsdp"):
        recipe_from_dict({"train": {"steps": 1, "strategy": "fsdp", "ema_decay": 0.999}})


MAE = ["--set", "objective.name=mae", "--set", "objective.mae.decoder_dim=32", "--set", "objective.mae.decoder_depth=1",
       "--set", "objective.mae.decoder_heads=4", "--set", "objective.fewshot=[1]"]


@pytest.mark.slow
def test_mae_trains_under_ddp_and_fsdp_and_reshards_its_decoder(recipe, tmp_path):
    # DDP, 2 processes: both replicas end identical; the encoder and the decoder are checkpointed
    run = tmp_path / "ddp"
    script = tmp_path / "dump.py"
    script.write_text(DUMP_WEIGHTS)
    torchrun(str(script), str(tmp_path), "pretrain", str(recipe), "--out", str(run), *MAE)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0) and max_diff(rank0, weights(run, STEPS)) == 0.0
    state = torch.load(run / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=True)
    assert "decoder.pred.weight" in state["objective"]
    assert {"loss", "fewshot_1"} <= set(events(run, "eval")[-1])

    # FSDP: one process writes DCP shards of encoder + decoder; two processes resume them at step 4
    fsdp = tmp_path / "fsdp"
    assert run_cli("pretrain", str(recipe), "--out", str(fsdp), *MAE, *FSDP) == 0
    forget_after(fsdp, 4)
    proc = torchrun("-m", "vitcli", "pretrain", str(recipe), "--out", str(fsdp), *MAE, *FSDP)
    assert "Resuming" in proc.stdout
    out = tmp_path / "encoder.safetensors"
    assert run_cli("consolidate", str(fsdp / "checkpoints" / f"step-{STEPS:08d}"), "--out", str(out)) == 0
    encoder = load_file(str(out))
    assert set(encoder) == set(weights(run, STEPS)) and not any(k.startswith(("decoder", "model.")) for k in encoder)


@pytest.mark.slow
def test_ranks_stream_disjoint_shards_and_resume_each_at_its_next_sample(recipe, tmp_path):
    shards = tmp_path / "shards"
    assert run_cli("shards", "digits", str(shards), "--samples-per-shard", "50") == 0  # 29 training shards
    stream = ["--set", f"data.dataset={shards}", "--set", "data.train_subset=null", "--set", "data.shuffle_buffer=20"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun("-m", "vitcli", "pretrain", str(recipe), "--out", str(full), *stream)
    shutil.copytree(full, cut, symlinks=True)  # the same deterministic run, then "killed" after its step-4 checkpoint
    state = torch.load(cut / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    positions = [rank["loader"]["dataset_state"] for rank in state["data_per_rank"]]
    assert [(p["reader"], p["readers"]) for p in positions] == [(0, 2), (1, 2)]  # one reader a rank, each its own
    forget_after(cut, 4)
    (cut / "checkpoints" / "last").unlink()
    proc = torchrun("-m", "vitcli", "pretrain", str(recipe), "--out", str(cut), *stream)
    assert "Resuming" in proc.stdout and "restarts" not in proc.stdout
    assert max_diff(weights(cut, STEPS), weights(full, STEPS)) == 0.0  # the same batches after the resume
    assert [e["loss"] for e in events(cut, "train")] == [e["loss"] for e in events(full, "train")]


def ddp_trains_what_one_process_does(recipe, tmp_path, args: list[str]):
    """(one process's run, two processes' run) of `recipe` with `args`: the two replicas end identical, and
    their weights equal the one process's."""
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    assert run_cli("pretrain", str(recipe), "--out", str(one), *args) == 0
    script = tmp_path / "dump.py"
    script.write_text(DUMP_WEIGHTS)
    torchrun(str(script), str(tmp_path), "pretrain", str(recipe), "--out", str(ddp), *args)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert max_diff(weights(ddp, STEPS), weights(one, STEPS)) < 1e-5
    return one, ddp


SEGMENT = ["--set", "task=segmentation", "--set", "data.dataset=digits-seg", "--set", "model.img_size=16",
           "--set", "model.decoder=mask_transformer", "--set", "model.decoder_dim=32", "--set", "model.decoder_heads=2",
           "--set", "model.decoder_dropout=0.0"]


@pytest.mark.slow
def test_segmentation_trains_the_same_under_ddp_and_fsdp(recipe, tmp_path):
    one, ddp = ddp_trains_what_one_process_does(recipe, tmp_path, SEGMENT)  # encoder.* and decoder.* alike
    # the evaluation's confusion matrix is all-reduced: each process scores half the images, the sums are the whole
    assert events(ddp, "eval")[-1]["miou"] == pytest.approx(events(one, "eval")[-1]["miou"], abs=1e-4)
    fsdp = tmp_path / "fsdp"
    torchrun("-m", "vitcli", "pretrain", str(recipe), "--out", str(fsdp), *SEGMENT, *FSDP)
    assert events(fsdp, "eval")[-1]["miou"] == pytest.approx(events(one, "eval")[-1]["miou"], abs=1e-4)
    assert events(fsdp, "eval")[-1]["num_images"] == events(one, "eval")[-1]["num_images"] == 30


DINO = ["--set", "objective.name=dino", "--set", "objective.dino.out_dim=64", "--set", "objective.dino.hidden_dim=32",
        "--set", "objective.dino.bottleneck_dim=16", "--set", "objective.dino.local_crops_number=2",
        "--set", "objective.dino.local_crops_size=4", "--set", "objective.fewshot=[1]"]

DUMP_DINO = DUMP.replace("BUILDER", "build_objective")  # student, teacher, heads and centre


@pytest.mark.slow
def test_dino_under_ddp_keeps_replicas_teachers_and_centres_identical(recipe, tmp_path):
    run = tmp_path / "ddp"
    script = tmp_path / "dump.py"
    script.write_text(DUMP_DINO)
    torchrun(str(script), str(tmp_path), "pretrain", str(recipe), "--out", str(run), *DINO)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert sorted(rank0) == sorted(rank1) and {"centre", "teacher.head.mlp.0.weight", "model.cls_token"} <= set(rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert rank0["centre"].abs().sum() > 0  # it moved, by the all-reduced mean of both ranks' teacher outputs
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in rank0.items() if k.startswith("teacher.backbone.")}
    assert max_diff(teacher, weights(run, STEPS)) == 0.0  # model.safetensors holds the teacher's backbone


DETECT = ["--set", "task=detection", "--set", "data.dataset=digits-det", "--set", "model.img_size=32", "--set", "model.patch_size=4",
          "--set", "model.detector=fcos", "--set", "model.pyramid_channels=32", "--set", "model.pyramid_scales=[2.0, 1.0, 0.5]",
          "--set", "model.score_thresh=0.0", "--set", "data.resize_range=[0.5, 1.5]", "--set", "model.window_size=4",
          "--set", "model.global_blocks=[1]", "--set", "optim.name=sgd", "--set", "optim.momentum=0.9", "--set", "optim.lr=0.01"]


@pytest.mark.slow
def test_detection_trains_the_same_under_ddp_and_counts_every_image_once(recipe, tmp_path):
    """FCOS samples nothing at random, so two processes train the weights one does; the COCO records of both
    processes are gathered, so AP over the split equals one process's. (SGD: Adam's first steps move every
    weight by +-lr whatever its gradient's size, so summation-order noise in near-zero gradients of the
    heads would show as lr-sized differences.)"""
    one, ddp = ddp_trains_what_one_process_does(recipe, tmp_path, DETECT)
    last_one, last_ddp = events(one, "eval")[-1], events(ddp, "eval")[-1]
    assert last_ddp["num_images"] == last_one["num_images"] == 30
    assert last_ddp["ap50"] == pytest.approx(last_one["ap50"], abs=1e-4) and last_ddp["ap"] == pytest.approx(last_one["ap"], abs=1e-4)
