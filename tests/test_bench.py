"""`vit bench`: FLOP counting against the closed form, the timing harness, the JSON report, --compare timm,
the input-pipeline benchmark and user errors. Timings themselves are never asserted on."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from timm.optim import create_optimizer_v2

import vitcli.bench.steps as bench_steps
import vitcli.engine.step as engine_step
import vitcli.engine.trainer as trainer
from vitcli.bench.flops import count_flops, vit_flops
from vitcli.bench.hardware import GPU_PEAKS, MatmulProbe, peak_flops
from vitcli.bench.steps import build_models, prepare
from vitcli.bench.timing import Contestant, Stats, run_rounds
from vitcli.models import create_model, resolve_config

from helpers import run_cli

CPU = torch.device("cpu")
FAST = ("--steps", "2", "--warmup", "1", "--batch-size", "4")

MODEL_KEYS = {"model", "mode", "device", "device_name", "dtype", "batch_size", "img_size", "compile", "steps", "warmup",
              "rounds", "threads", "peak_flops_per_second", "matmul", "memory_method", "load_average", "vitcli", "timm", "ratio", "data"}
SIDE_KEYS = {"name", "params", "images_per_second", "step_ms_median", "step_ms_iqr", "step_ms_min", "step_ms_max",
             "peak_memory_bytes", "flops_per_step", "flops_by_op", "flops_per_second", "mfu", "fraction_of_matmul",
             "first_step_seconds", "warmup_seconds"}


@pytest.fixture(autouse=True)
def _small_matmul_probe(monkeypatch):
    """A 256x256 probe: the figure is not asserted on, and the 2048x2048 one costs seconds per call."""
    monkeypatch.setattr(MatmulProbe, "for_device", classmethod(lambda cls, device, dtype: cls(device, torch.float32, 256)))


def closed_form(cfg, batch: int, train: bool) -> int:
    return vit_flops(batch=batch, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                     embed_dim=cfg.embed_dim, depth=cfg.depth, mlp_dim=cfg.mlp_dim, num_classes=cfg.num_classes,
                     prefix_tokens=cfg.num_prefix_tokens, train=train)


@pytest.mark.parametrize("overrides", [
    {},                                                                   # vit_pico: 4x4 patches of 2, class token
    {"img_size": (8, 12), "global_pool": "avg", "class_token": False, "num_classes": 7, "mlp_ratio": 3.0},
    {"reg_tokens": 4, "no_embed_class": True, "init_values": 1e-5},        # DINOv2 with registers: N = P + 5
])
def test_flop_count_of_a_vit_equals_the_closed_form(overrides):
    cfg = resolve_config("vit_pico", **overrides)
    model = create_model(cfg)
    x = torch.randn(3, cfg.in_chans, *cfg.img_size)
    forward, by_op = count_flops(lambda: model(x))
    assert forward == closed_form(cfg, 3, train=False)
    # attention counted on the CPU kernel as well: 4·B·N²·D per block
    n = cfg.seq_len
    assert by_op["_scaled_dot_product_flash_attention_for_cpu"] == cfg.depth * 4 * 3 * n * n * cfg.embed_dim
    both, _ = count_flops(lambda: model(x).sum().backward())
    assert both == closed_form(cfg, 3, train=True)


def test_train_step_flops_match_between_vitcli_and_timm_and_the_closed_form():
    cfg = resolve_config("vit_pico")
    counts = []
    for label, name, module in build_models(cfg, compare="timm"):
        mut = prepare(label, name, module, cfg, mode="train", batch_size=4, device=CPU, amp_dtype=None, compile=False)
        counts.append(count_flops(mut.eager_step)[0])
    assert counts[0] == counts[1] == closed_form(cfg, 4, train=True)


@pytest.mark.parametrize("name,res,timm_arch", [
    ("vit_pico", None, "vit_base_patch16_224"), ("vit_s16", (32, 48), "vit_small_patch16_224"),
    ("deit_ti16_distilled", (32, 32), "deit_tiny_distilled_patch16_224"),
    ("vit_s14_dinov2_reg4", (28, 28), "vit_small_patch14_reg4_dinov2"),
    ("vit_b16_siglip", (32, 32), "vit_base_patch16_siglip_224"),
    ("vit_b32_clip_quickgelu", (64, 64), "vit_base_patch32_clip_quickgelu_224"),
])
def test_timm_equivalent_has_our_parameters_and_computes_the_same(name, res, timm_arch):
    cfg = resolve_config(name, **({"img_size": res} if res else {}))
    (_, _, ours), (_, timm_name, theirs) = build_models(cfg, compare="timm")
    assert timm_name == timm_arch
    ours.eval(), theirs.eval()
    x = torch.randn(2, cfg.in_chans, *cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_bench_times_the_trainers_own_step():
    """`vit bench` runs engine.step.train_step, the function the training loop calls, with the trainer's
    gradient clipping: one bench step equals a hand-written reference step (forward, cross-entropy,
    backward, clip to norm 1, timm's AdamW), and differs from the same step without clipping."""
    assert bench_steps.train_step is engine_step.train_step is trainer.train_step
    cfg = resolve_config("vit_pico", num_classes=10)
    model = create_model(cfg)
    clipped, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    mut = prepare("vitcli", cfg.name, model, cfg, mode="train", batch_size=8, device=CPU, amp_dtype=None, compile=False)
    images, labels = mut.inputs
    mut.step()
    norms = []
    for ref, clip in ((clipped, True), (unclipped, False)):
        ref.train()
        opt = create_optimizer_v2(ref, "adamw", lr=1e-4, weight_decay=0.05)
        torch.nn.functional.cross_entropy(ref(images), labels).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0 if clip else float("inf"))))
        opt.step()
    assert norms[0] > 1.0  # the clip was active
    ours, ref_clipped, ref_unclipped = model.state_dict(), clipped.state_dict(), unclipped.state_dict()
    assert max((ours[k] - ref_clipped[k]).abs().max().item() for k in ours) < 1e-6
    assert max((ours[k] - ref_unclipped[k]).abs().max().item() for k in ours) > 1e-5


def test_rounds_alternate_order_and_time_every_step():
    order = []
    a = Contestant("a", lambda: order.append("a"))
    b = Contestant("b", lambda: order.append("b"))
    probe = Contestant("mm", lambda: order.append("mm"), per_round=1)
    run_rounds([a, b, probe], steps=5, rounds=3, device=CPU)
    # 5 steps over 3 rounds: 2, 2, 1; the order reverses every other round (drift hits both alike)
    assert "".join(x[0] for x in order) == "aabbm" + "mbbaa" + "abm"
    assert len(a.times) == len(b.times) == 5 and len(probe.times) == 3
    s = Stats.of([3.0, 1.0, 2.0, 4.0])
    assert (s.n, s.median, s.min, s.max) == (4, 2.5, 1.0, 4.0) and s.iqr == pytest.approx(1.5)


def test_gpu_peak_table_matches_device_names():
    """Every row is reachable: a device name made of its own words gets that row, not an earlier, looser one
    (H100 PCIe is not H100 SXM, H20 is not H200, GH200 is not H200); unknown cards and dtypes get None."""
    bf16 = torch.bfloat16
    for pattern, bf16_peak, fp32_peak in GPU_PEAKS:
        name = "NVIDIA " + pattern.replace(r"\b", "").replace(".*", " ") + " 80GB"
        assert peak_flops(name, bf16) == (bf16_peak * 1e12 if bf16_peak else None), name
        assert peak_flops(name, torch.float32) == fp32_peak * 1e12, name
        assert peak_flops(name, torch.float16) is None
        assert bf16_peak is None or bf16_peak > fp32_peak  # tensor cores outrun plain fp32 on every card
    assert peak_flops("Some Future GPU", bf16) is None and peak_flops("NVIDIA H2000", bf16) is None
    probe = MatmulProbe(CPU, torch.float32, 64)
    assert probe.flops == 2 * 64 ** 3
    probe.step()
    torch.testing.assert_close(probe.out, probe.a @ probe.b)


def test_bench_json_has_the_documented_keys(capsys):
    assert run_cli("bench", "vit_pico", "--json", *FAST) == 0
    r = json.loads(capsys.readouterr().out)
    assert MODEL_KEYS <= set(r)
    assert set(r["vitcli"]) == SIDE_KEYS
    assert r["timm"] is None and r["ratio"] is None and r["data"] is None
    assert (r["model"], r["mode"], r["device"], r["dtype"], r["batch_size"], r["img_size"]) == ("vit_pico", "train", "cpu", "fp32", 4, [8, 8])
    ours = r["vitcli"]
    cfg = resolve_config("vit_pico")
    assert ours["flops_per_step"] == closed_form(cfg, 4, train=True)
    assert ours["images_per_second"] > 0 and ours["flops_per_second"] > 0 and ours["fraction_of_matmul"] > 0
    assert ours["mfu"] is None and r["peak_flops_per_second"] is None  # no MFU on a CPU
    assert ours["peak_memory_bytes"] > 4 * ours["params"]  # weights + grads + AdamW state + activations
    assert r["matmul"]["flops_per_second"] > 0


def test_bench_compare_timm_reports_both_and_the_ratio(capsys):
    from rich.console import Console

    from vitcli.bench import print_bench

    assert run_cli("bench", "ViT-Pico/2", "--compare", "timm", "--mode", "infer", "--json", *FAST) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "infer" and r["timm"]["name"] == "vit_base_patch16_224"
    assert r["vitcli"]["params"] == r["timm"]["params"]
    assert r["vitcli"]["flops_per_step"] == r["timm"]["flops_per_step"] == closed_form(resolve_config("vit_pico"), 4, train=False)
    assert r["ratio"] == pytest.approx(r["vitcli"]["images_per_second"] / r["timm"]["images_per_second"])
    console = Console(record=True, width=160)
    print_bench(r, console)  # the table `vit bench` prints without --json
    out = console.export_text()
    assert "ours / timm" in out and "images/s" in out and "peak memory" in out and "MFU" not in out


@pytest.mark.parametrize("pipeline,expected", [("auto", "tensor"), ("pil", "pil"), ("tensor", "tensor")])
def test_bench_data_gives_a_positive_rate(capsys, pipeline, expected):
    assert run_cli("bench", "--data", "digits", "--res", "8", "--num-workers", "0", "--steps", "3", "--batch-size", "32",
                   "--pipeline", pipeline, "--json") == 0
    r = json.loads(capsys.readouterr().out)
    d = r["data"]
    assert d["dataset"] == "digits" and d["images_per_second"] > 0 and d["img_size"] == [8, 8]
    assert d["batch_size"] == 32 and d["num_workers"] == 0 and "RandomResizedCrop" in d["transforms"]
    assert d["pipeline"] == expected and d["decode_on_device"] is False  # CPU: decoded in the loader
    assert "vitcli" not in r
    from rich.console import Console

    from vitcli.bench import print_bench

    console = Console(record=True, width=160)
    print_bench(r, console)
    assert f"{expected} pipeline" in console.export_text()


@pytest.mark.parametrize("cache", ["decoded", "auto"])
def test_bench_data_with_the_decoded_cache(capsys, cache):
    assert run_cli("bench", "--data", "digits", "--res", "8", "--num-workers", "0", "--steps", "3", "--batch-size", "32",
                   "--cache", cache, "--json") == 0
    captured = capsys.readouterr()
    d = json.loads(captured.out)["data"]
    assert d["cache"] == cache and d["cache_seconds"] >= 0 and d["images_per_second"] > 0
    assert f"data.cache {cache}: {d['num_images']:,} images decoded once" in captured.err


def test_bench_model_and_data_name_the_bottleneck(capsys):
    assert run_cli("bench", "vit_pico", "--data", "digits", "--num-workers", "0", "--json", *FAST) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bottleneck"] in ("loader", "model") and "input pipeline" in r["bottleneck_note"]
    assert r["data"]["img_size"] == [8, 8] and r["data"]["batch_size"] == 4  # the model's resolution and batch


def test_bench_loader_only_times_the_pipeline_at_the_models_size(capsys):
    assert run_cli("bench", "vit_pico", "--data", "digits", "--loader-only", "--num-workers", "0", "--cache", "decoded",
                   "--json", *FAST) == 0
    r = json.loads(capsys.readouterr().out)
    assert "vitcli" not in r and "bottleneck" not in r  # no model step was timed
    assert r["data"]["img_size"] == [8, 8] and r["data"]["batch_size"] == 4 and r["data"]["images_per_second"] > 0


@pytest.mark.parametrize("args,message", [
    (("bench", "vit_pico", "--loader-only"), "--loader-only times the input pipeline of --data"),
    (("bench", "vit_s61"), "Did you mean: vit_s16"),
    (("bench", "vit_pico", "--compare", "torchvision"), "only library to compare with is timm"),
    (("bench", "vit_pico", "--mode", "eval"), "--mode must be train or infer"),
    (("bench", "vit_pico", "--dtype", "fp8"), "--dtype must be fp32, bf16 or auto"),
    (("bench", "vit_pico", "--res", "9"), "not a multiple of the patch size"),
    (("bench",), "Name a model to benchmark"),
    (("bench", "--data", "no-such-set", "--num-workers", "0"), "no-such-set"),
])
def test_bench_user_mistakes_exit_2_with_one_message(capsys, args, message):
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert run_cli("bench", "vit_pico", "--device", "cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda_reports_memory_flops_and_mfu_fields(capsys):
    assert run_cli("bench", "vit_pico", "--device", "cuda", "--compare", "timm", "--json", *FAST) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"] == "cuda" and r["dtype"] == "bf16"  # bf16 autocast by default on CUDA
    # the same count for both (exactly the closed form when the fused attention kernel runs, as on CPU)
    assert r["vitcli"]["flops_per_step"] == r["timm"]["flops_per_step"] > 0
    for side in ("vitcli", "timm"):
        assert r[side]["peak_memory_bytes"] > 0
        assert (r[side]["mfu"] is None) == (r["peak_flops_per_second"] is None)


def test_the_load_note_warns_only_when_other_work_ran_before_the_bench(capsys, monkeypatch):
    from rich.console import Console

    from vitcli.bench import print_bench

    assert run_cli("bench", "vit_pico", "--json", *FAST) == 0
    r = json.loads(capsys.readouterr().out)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    for load, noisy in (((0.2, 2.1), False), ((1.5, 3.0), True)):
        r["load_average"] = list(load)
        console = Console(record=True, width=200)
        print_bench(r, console)
        text = console.export_text()
        assert f"load average {load[0]:.2f} before" in text and ("expect noisy times" in text) == noisy


def test_flops_of_an_attention_pool_head_are_counted_in_inference_mode_as_timms():
    """SigLIP's pool expands a parameter inside inference_mode, which FlopCounterMode's module tracker cannot
    follow; the count (global totals only) still equals timm's for the same model."""
    import timm

    cfg = resolve_config("vit_b16_siglip", img_size=32, depth=2, embed_dim=64, num_heads=2, num_classes=5)
    ours = create_model(cfg).eval()
    theirs = timm.create_model("vit_base_patch16_siglip_224", img_size=32, depth=2, embed_dim=64, num_heads=2,
                               num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        counts = [count_flops(lambda m=m: m(x)) for m in (ours, theirs)]
    assert counts[0] == counts[1] and counts[0][0] > closed_form(cfg, 2, train=False) - 2 * 2 * 64 * 5
