"""The `vit` command: parses arguments, builds a Recipe, calls one function per subcommand.

No training logic lives here. User mistakes arrive as VitError and leave as one message and exit
code 2; `--debug` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitcli.engine.signals import STOPPED_EXIT_CODE, StopRequested
from vitcli.errors import DiskFull, VitError, path_error
from vitcli.io.paths import writable_file

app = typer.Typer(
    name="vit",
    help="Pretrain, fine-tune and evaluate Vision Transformers (Dosovitskiy et al., ICLR 2021).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Under torchrun only rank 0 prints (errors still come from every rank).
console = Console(quiet=os.environ.get("RANK", "0") != "0", soft_wrap=True)  # only rank 0 prints; long lines stay whole in logs
err_console = Console(stderr=True, soft_wrap=True)

SET_HELP = "Override a recipe field, e.g. --set optim.lr=3e-4 (repeatable)."


@app.command()
def pretrain(
    recipe: str = typer.Argument(..., help="A YAML recipe file, or a shipped recipe's name (quickstart, vit_b16; `vit recipes` lists them)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<recipe>-<time>)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (or the newest run of this recipe) from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Delete the run already in --out and start again."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (default: the recipe's train.device)."),
    keep: Optional[int] = typer.Option(None, "--keep", min=0, help="Step checkpoints kept besides last and best (recipe: train.keep)."),
) -> None:
    """Train a model from scratch as the recipe says; writes a run directory."""
    from vitcli.engine.trainer import train
    from vitcli.io.rundir import default_run_dir, newest_run
    from vitcli.recipe import load_recipe
    from vitcli.recipe_files import locate

    found = locate(recipe)
    r = load_recipe(found.path, _overrides(set_, device=device, keep=keep))
    console.print(f"Training with {found.origin}.", highlight=False)
    if out is None:
        out = newest_run(prefix=f"{r.name}-") if resume else None
        if resume and out is None:
            raise VitError(f"--resume: no earlier run of '{r.name}' under runs/. Pass --out RUN_DIR.")
        out = out or default_run_dir(r.name)
    summary = train(r, out, resume=resume, force=force, console=console)
    _print_summary(summary)


def _overrides(set_: list[str] | None, *, device: str | None = None, keep: int | None = None,
               layer_decay: float | None = None, linear_probe: bool = False, new_head: bool = False) -> list[str]:
    """The recipe overrides of a command: its --set items, then the dedicated flags that map onto fields."""
    flags = {"train.device": device, "train.keep": keep, "optim.layer_decay": layer_decay,
             "train.linear_probe": "true" if linear_probe else None, "model.new_head": "true" if new_head else None}
    return [*(set_ or []), *(f"{key}={value}" for key, value in flags.items() if value is not None)]


def _print_summary(summary: dict) -> None:
    if summary.get("objective"):  # multilabel (mAP), mpp / mae (few-shot accuracy, else loss): best and last evaluation
        final = summary["final"] or {}
        shown = ("map", "f1", "loss")
        scores = ", ".join(f"{k.replace('fewshot_', '')}-shot {v:.4f}" if k.startswith("fewshot_") else f"{k} {v:.4f}"
                           for k, v in final.items() if k in shown or k.startswith("fewshot_"))
        best = (f"best {summary['best_metric']} {summary['best_score']:.4f}, "
                if summary.get("best_score") is not None and summary["best_metric"] != "loss" else "")
        result = f"{summary['objective']}; {best}final {scores or 'n/a'}"
    else:
        best, final = summary["best_top1"], summary["final_top1"]
        result = f"best top-1 {best:.4f}, final top-1 {final:.4f}" if best is not None and final is not None else "no evaluation"
    console.print(
        f"done: {summary['steps']} steps in {summary['wall_seconds']:.1f}s; {result}\n"
        f"run: {summary['run_dir']}\nbest checkpoint: {summary['checkpoint']}"
    )


def _parse_res(text: str | None, flag: str = "--res") -> tuple[int, int] | None:
    """'384' -> (384, 384); '384x512' -> (384, 512) (height x width)."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) <= 0:
        raise VitError(f"{flag} {text!r} is not a resolution: pass one number (384) or HEIGHTxWIDTH (384x512).")
    return size  # type: ignore[return-value]


def _parse_floats(text: str | None, flag: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VitError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.001,0.003,0.01,0.03.") from None


@app.command()
def finetune(
    ckpt: str = typer.Option(..., "--ckpt", help="Pretrained weights: a vitcli run or checkpoint, a timm/HF .safetensors/.pth/.bin, a Google .npz, or timm:<name>."),
    res: Optional[str] = typer.Option(None, "--res", help="Fine-tuning resolution, 384 or 384x512; position embeddings are 2D-interpolated."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Data set name or path (default: the one the checkpoint was trained on)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A fine-tuning recipe file or shipped name (default: the one shipped for the data set, else the paper's settings)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/finetune_<dataset>-<time>)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    lr_sweep: Optional[str] = typer.Option(None, "--lr-sweep", help="Try these rates on a held-out 10% first, e.g. 0.001,0.003,0.01,0.03."),
    layer_decay: Optional[float] = typer.Option(None, "--layer-decay", help="Layer-wise lr decay, e.g. 0.75."),
    linear_probe: bool = typer.Option(False, "--linear-probe", help="Train only the new head on a frozen backbone."),
    new_head: bool = typer.Option(False, "--new-head", help="A zero-initialised head even when the classes are the checkpoint's own (kept by default)."),
    task: Optional[str] = typer.Option(None, "--task", help="classification, segmentation (a decoder on the ViT; masks per pixel) or detection (ViTDet: boxes). Default: the recipe's, else the checkpoint's."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="task segmentation: linear (default) or mask_transformer (Segmenter's)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="task detection: faster_rcnn (default), retinanet, fcos or mask_rcnn (torchvision's; mask_rcnn needs instance masks)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Delete the run already in --out and start again."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda."),
    keep: Optional[int] = typer.Option(None, "--keep", min=0, help="Step checkpoints kept besides last and best."),
) -> None:
    """Fine-tune a pretrained model on a (smaller) data set, at a higher resolution (paper §3.2); with --task
    segmentation, under a Segmenter decoder; with --task detection, under a detector on ViTDet's pyramid."""
    from vitcli.engine.finetune import build_finetune_recipe, finetune as run_finetune
    from vitcli.io.rundir import default_run_dir
    from vitcli.recipe_files import locate

    overrides = _overrides(set_, device=device, keep=keep, layer_decay=layer_decay, linear_probe=linear_probe,
                           new_head=new_head)
    plan = build_finetune_recipe(ckpt, res=_parse_res(res), dataset=dataset, recipe_file=locate(recipe) if recipe else None,
                                 overrides=overrides, task=task, decoder=decoder, detector=detector)
    for note in plan.init.notes:
        console.print(f"[dim]{note}[/]")
    console.print(f"Fine-tuning with {plan.source}.", highlight=False)
    r = plan.recipe
    summary = run_finetune(r, out or default_run_dir(r.name), lr_sweep=_parse_floats(lr_sweep, "--lr-sweep"), resume=resume, force=force, console=console, init=plan.init)
    _print_summary(summary)


@app.command("interpolate-pos")
def interpolate_pos(
    ckpt: str = typer.Option(..., "--ckpt", help="Input checkpoint (any format --ckpt accepts)."),
    res: str = typer.Option(..., "--res", help="New resolution: 384 or 384x512."),
    out: Path = typer.Option(..., "--out", help="Output file: .safetensors (recommended) or .pth."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="Also resize the patch embedding to this patch size (FlexiViT)."),
    mode: str = typer.Option("bicubic", "--mode", help="bicubic | bilinear | nearest | area."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Resample a checkpoint's position embeddings to a new resolution (and patch size); keys unchanged."""
    from vitcli.models.adapt import adapt_checkpoint, save_state_dict
    from vitcli.models.load import load_checkpoint
    from vitcli.models.posemb import MODES

    if mode not in MODES:
        raise VitError(f"--mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if out.exists() and not force:
        raise VitError(f"--out {out} exists. Choose another path or pass --force to overwrite it.")
    if out.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise VitError(f"--out {out} must end in .safetensors (recommended) or .pth.")
    writable_file(out, "--out")  # before reading and resampling, not after
    size = _parse_res(res)
    src = load_checkpoint(ckpt)
    old_args = src.meta.model_args
    new = adapt_checkpoint(src, img_size=size, patch_size=patch_size, interpolation=mode)
    new_args = new.meta.model_args

    def grid(args):
        h, w = args["img_size"] if isinstance(args["img_size"], (list, tuple)) else (args["img_size"],) * 2
        p = args["patch_size"]
        return f"{h // p}x{w // p} (image {h}x{w}, patch {p})"

    save_state_dict(out, new.state_dict, new.meta, what="--out")
    console.print(f"position grid {grid(old_args)} -> {grid(new_args)}, {mode}; wrote {out}")


@app.command("eval")
def eval_cmd(
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="Checkpoint (any format finetune accepts); default: the best of the newest run under runs/."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Data set name or path (default: the checkpoint's)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to evaluate (default: the set's test/validation split; a folder of class folders: all of it, or train[10%] for the part training held out)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local copy of a named set (image folder or save_to_disk)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="A multi-label folder's labels file (CSV rows path,labels with ';' between labels, or JSON); default: the run's data.labels."),
    res: Optional[str] = typer.Option(None, "--res", help="Evaluate at this resolution, 384 or 384x512 (position embeddings interpolated)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per batch."),
    fewshot: Optional[str] = typer.Option(None, "--fewshot", help="Few-shot linear evaluation with K images per class, e.g. 1,5,10,25."),
    knn: Optional[str] = typer.Option(None, "--knn", help="Weighted k-NN accuracy of the frozen features (DINO's), the training split as neighbours, e.g. 20 or 10,20,100,200."),
    linear_probe: bool = typer.Option(False, "--linear-probe", help="A linear probe of the frozen features: several learning rates at once, chosen on held-out training images."),
    probe_protocol: str = typer.Option("auto", "--probe-protocol", help="dino (last-4 class tokens; ViT-B+: class token + pooled patches) | mae (BatchNorm before the head) | auto (mae for an MAE checkpoint)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write one CSV row per image."),
    confusion: Optional[Path] = typer.Option(None, "--confusion", help="Draw the confusion matrix to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    num_workers: int = typer.Option(2, "--num-workers", min=0, help="Loader processes."),
    bad_images: str = typer.Option("error", "--bad-images", help="error: stop at an unreadable image, naming it | skip: drop it and count it."),
    reduced_decode: bool = typer.Option(True, "--reduced-decode/--full-decode", help="Decode a large JPEG at 1/2-1/8 size when its short side is 2-8x the resize target, or every image whole (as timm's validate.py)."),
    window_stride: Optional[int] = typer.Option(None, "--window-stride", help="Segmentation: the sliding windows' stride in pixels (default: the window, i.e. the training crop)."),
    multi_scale: bool = typer.Option(False, "--multi-scale", help="Segmentation: Segmenter's multi-scale test (scales 0.5-1.75 with flips)."),
) -> None:
    """Evaluate a checkpoint: top-1/top-5, loss, calibration, per-class accuracy, few-shot, k-NN, linear probe; for a segmentation
    checkpoint mIoU, pixel and mean accuracy, per-class IoU."""
    from vitcli.data import LoaderSpec
    from vitcli.engine.evalrun import EvalSpec, FewshotSpec, print_eval, run_eval

    spec = EvalSpec(ckpt, dataset, split=split, res=_parse_res(res), data_dir=data_dir, labels=labels, device=device,
                    predictions=predictions, confusion=confusion, reduced_decode=reduced_decode,
                    window_stride=window_stride, multi_scale=multi_scale,
                    loader=LoaderSpec.evaluation(batch_size, num_workers=num_workers, bad_images=bad_images),
                    fewshot=FewshotSpec.parse(fewshot), knn=knn or (), linear_probe=probe_protocol if linear_probe else None)
    shown = err_console if as_json else console
    say = lambda message: shown.print(message, markup=False, highlight=False)  # noqa: E731
    result = run_eval(spec, say=say)
    if as_json:
        print(json.dumps(result))
    else:
        print_eval(result, console)


@app.command("predict")
def predict_cmd(
    inputs: list[str] = typer.Argument(..., help="Images, folders of images (searched recursively) or quoted globs such as 'photos/*.jpg'."),
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="A classifier checkpoint (any format eval accepts); default: the best of the newest run under runs/."),
    topk: int = typer.Option(5, "--topk", min=1, help="Classes shown per image."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON array: [{path, top: [{label, index, probability}]}]."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV row per image to this file."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="Loader processes."),
    reduced_decode: bool = typer.Option(True, "--reduced-decode/--full-decode", help="Decode a large JPEG at 1/2-1/8 size when its short side is 2-8x the resize target, or every image whole."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="A segmentation checkpoint: write one palette PNG mask per image into this folder."),
    overlay: bool = typer.Option(False, "--overlay", help="With --masks: also write each image with its mask's colours blended in (NAME_overlay.png)."),
    score_thresh: float = typer.Option(0.5, "--score-thresh", help="A detection checkpoint: report the boxes scoring at least this."),
    draw: Optional[Path] = typer.Option(None, "--draw", help="A detection checkpoint: write each image with its boxes drawn into this folder."),
) -> None:
    """Classify images: each image's top-k classes and probabilities; with a segmentation checkpoint and
    --masks DIR, each image's mask and class areas; with a detection checkpoint, each image's boxes
    (--draw DIR draws them) (exit code 4 if some could not be read)."""
    from vitcli.predict import PARTIAL_EXIT_CODE, Predictions, predict
    from vitcli.predict.masks import predict_masks
    from vitcli.predict.output import CsvRows, JsonArray, progress_bar, text_line

    if overlay and masks is None:
        raise VitError("--overlay draws each mask over its image: give the folder for them with --masks DIR.")
    if masks is not None and csv_out is not None:
        raise VitError("--csv lists classes per image; with --masks use --json for each image's class areas.")
    csv_path = writable_file(csv_out, "--csv") if csv_out is not None else None  # before any work
    info = Predictions()
    say = lambda message: err_console.print(message, markup=False, highlight=False)  # noqa: E731
    with progress_bar(err_console) as progress, JsonArray(sys.stdout, as_json) as json_rows, CsvRows(csv_path, topk) as csv_rows:
        rows = predict_masks(ckpt, inputs, masks, overlay=overlay, device=device, info=info, progress=progress, say=say) \
            if masks is not None else \
            predict(ckpt, inputs, topk=topk, batch_size=batch_size, device=device, num_workers=num_workers,
                    reduced_decode=reduced_decode, info=info, progress=progress, say=say, score_thresh=score_thresh, draw=draw)
        for row in rows:
            json_rows.add(row)
            csv_rows.add(row)
            if not as_json:
                console.print(text_line(row), markup=False, highlight=False, soft_wrap=True)
    if csv_path is not None:
        say(f"wrote {csv_path}")
    if info.skipped:
        say(f"{len(info.skipped)} of {info.total} image(s) could not be read and were skipped: {', '.join(info.skipped[:10])}"
            + (" ..." if len(info.skipped) > 10 else "") + (f" ({info.reasons[0]})" if info.reasons else ""))
        sys.exit(PARTIAL_EXIT_CODE)


@app.command("export")
def export_cmd(
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="A classifier checkpoint (any format finetune accepts); default: the best of the newest run under runs/."),
    fmt: str = typer.Option(..., "--format", help="onnx | exported-program (torch.export .pt2) | hf (transformers folder) | timm (timm Hub-layout folder) | vitcli (.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Output file (onnx: .onnx, exported-program: .pt2, vitcli: .safetensors) or folder (hf, timm)."),
    res: Optional[str] = typer.Option(None, "--res", help="Export at this resolution, 384 or 384x512 (position embeddings interpolated)."),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="onnx / exported-program: any batch size (default) or only the verification batch's."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Export a classifier (onnx, torch.export, transformers, timm, vitcli) and verify it in that runtime."""
    from vitcli.export import export

    say = lambda message: err_console.print(message, markup=False, highlight=False)  # noqa: E731
    report = export(ckpt, fmt, out, res=_parse_res(res), dynamic_batch=dynamic_batch, force=force, say=say)
    if as_json:
        print(json.dumps(report))
    else:
        console.print(f"wrote {report['out']} ({report['format']}, {report['img_size'][0]}x{report['img_size'][1]}, "
                      f"{report['num_classes']} classes); largest logit difference to PyTorch on a random batch: "
                      f"{report['max_abs_diff']:.2e}", markup=False, highlight=False)
    if not report["verified"]:
        raise VitError(f"the {fmt} export differs from the PyTorch model by {report['max_abs_diff']:.2e} (more than "
                       "1e-4): it was written to --out but should not be trusted; please report this.")


@app.command("inspect")
def inspect_cmd(
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="Checkpoint (any format eval accepts); default: the best of the newest run under runs/."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Images for the attention figures (default: the checkpoint's data set)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to take the images from (default: the evaluation split)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local copy of a named set (image folder or save_to_disk)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNGs (default RUN_DIR/inspect, else ./inspect-<name>)."),
    images: int = typer.Option(128, "--images", help="Images averaged over for the mean attention distance."),
    show: int = typer.Option(8, "--show", help="Images drawn with their attention rollout."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Draw the paper's inspection figures: filter PCA, position similarity, attention distance (Fig. 7), rollout (Fig. 6)."""
    from vitcli.inspect.run import print_inspect, run_inspect

    say = lambda message: console.print(message, markup=False, highlight=False)  # noqa: E731
    result = run_inspect(ckpt, dataset, split=split, data_dir=data_dir, out=out, num_images=images, show=show,
                         batch_size=batch_size, device=device, say=say)
    print_inspect(result, console)


@app.command("plot")
def plot_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories (each with a metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Image to write (default RUN_DIR/curves.png for one run, ./curves.png for several)."),
    title: str = typer.Option("", "--title", help="A title above the three panels."),
) -> None:
    """Plot training loss, learning rate and eval top-1 against steps; several runs are overlaid."""
    from vitcli.inspect.plots import plot_command

    path, curves = plot_command(run_dirs, out, title)
    for c in curves:
        best = f", best {c.metric_label} {100 * c.top1.max():.2f}%" if len(c.top1) else ""
        console.print(f"{c.name}: {len(c.train_step)} train and {len(c.eval_step)} eval records{best}", markup=False, highlight=False)
        for note in c.notes:
            console.print(note, style="dim", markup=False, highlight=False)
    console.print(f"wrote {path}", markup=False, highlight=False)


@app.command("consolidate")
def consolidate_cmd(
    ckpt: Path = typer.Argument(..., help="A run directory (its best, else last, checkpoint) or a checkpoints/step-N directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .safetensors (default: model.safetensors inside the step directory)."),
) -> None:
    """Turn a sharded (train.strategy: fsdp) checkpoint into one .safetensors file, on one process."""
    from vitcli.io.sharded import consolidate_checkpoint

    if out is not None and out.suffix != ".safetensors":
        raise VitError(f"--out {out} must end in .safetensors.")
    written = consolidate_checkpoint(ckpt, out)
    console.print(f"wrote {written}")


@app.command("shards")
def shards_cmd(
    src: str = typer.Argument(..., help="Any data set vitcli reads: an image folder, a save_to_disk copy, a named set, digits."),
    out: Path = typer.Argument(..., help="Folder for the tar shards and their index.json."),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Split to write (repeatable; default: the training and evaluation splits training reads)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="A multi-label folder's labels file (CSV or JSON, as data.labels): samples get KEY.json {\"labels\": [...]}."),
    shard_size: str = typer.Option("256MB", "--shard-size", help="Close a shard at about this size (e.g. 256MB, 1GB)."),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", min=1, help="Close a shard at this many samples instead."),
    max_size: Optional[int] = typer.Option(None, "--max-size", min=8, help="Downsize images whose longer side exceeds this (re-encoded); default: stored as they are."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="Write the training split in a seeded random order (default), as streaming needs."),
    force: bool = typer.Option(False, "--force", help="Replace shards already in OUT."),
) -> None:
    """Write a data set as WebDataset tar shards with a JSON index (splits, counts, class names, sizes, checksums)."""
    from vitcli.data.shard_writer import ShardPlan, parse_size, write_shards
    from vitcli.io.paths import make_dirs, writable_dir

    plan = ShardPlan(None if samples_per_shard else parse_size(shard_size), samples_per_shard, max_size, 0 if shuffle else None)
    folder = make_dirs(writable_dir(out, "the shards"), "the shards")
    old = [p for p in folder.iterdir() if p.suffix == ".tar" or p.name == "index.json"]
    if old and not force:
        raise VitError(f"{out} already holds shards ({len(old)} file(s)). Pass --force to replace them, or pick another folder.")
    for p in old:
        p.unlink()
    result = write_shards(src, folder, plan, splits=split, say=console.print, label_file=labels)
    console.print(f"wrote {result['index']}")


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="Model name or alias, e.g. vit_s16 or ViT-B/16 (optional with --data)."),
    mode: str = typer.Option("train", "--mode", help="train (forward, backward, AdamW step) | infer (forward only)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per step (default 128 on CUDA, 16 on CPU; 64 for --data alone)."),
    res: Optional[str] = typer.Option(None, "--res", help="Image resolution, 224 or 224x320 (default: the model's)."),
    dtype: str = typer.Option("auto", "--dtype", help="fp32 | bf16 (autocast) | auto: bf16 on CUDA, fp32 on CPU."),
    compile_: bool = typer.Option(False, "--compile", help="Time torch.compile'd models (warm-up includes compilation)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="timm: also time timm's equivalent model, interleaved, and print the ratio."),
    data: Optional[str] = typer.Option(None, "--data", help="Also (or only) time the input pipeline of this data set: decode, augment, collate, transfer."),
    num_workers: int = typer.Option(2, "--num-workers", min=0, help="Loader processes for --data."),
    pipeline: str = typer.Option("auto", "--pipeline", help="For --data: auto | pil (timm PIL transforms) | tensor (uint8 tensors; JPEGs decoded on the GPU on CUDA)."),
    reduced_decode: bool = typer.Option(True, "--reduced-decode/--full-decode", help="For --data, tensor pipeline: decode JPEGs at 1/2-1/8 size when the crop allows (data.reduced_decode), or always at full size."),
    cache: str = typer.Option("none", "--cache", help="For --data: data.cache, none | decoded (decode each image once, before the timing) | auto."),
    loader_only: bool = typer.Option(False, "--loader-only", help="With --data: time the input pipeline alone (a MODEL then only sets the resolution and batch)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Timed steps per model (default 50 on CUDA, 10 on CPU; 20 batches for --data)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Untimed steps first (default 10 on CUDA, 2 on CPU)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="The GPU's peak TFLOP/s for MFU, if it is not in the built-in table."),
    objective: str = typer.Option("supervised", "--objective", help="supervised | distill | mpp | mae: the training step's objective (masking, a teacher's forward included)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Time training or inference steps (images/s, step time, memory, FLOP/s, MFU), optionally against timm."""
    from vitcli.bench import BenchSpec, print_bench, run_bench

    shown = err_console if as_json else console
    say = lambda message: shown.print(f"[dim]{message}[/]", highlight=False)  # noqa: E731
    spec = BenchSpec(model, data=data, mode=mode, batch_size=batch_size, img_size=_parse_res(res), dtype=dtype,
                     compile=compile_, compare=compare, device=device, steps=steps, warmup=warmup, num_workers=num_workers,
                     pipeline=pipeline, reduced_decode=reduced_decode, cache=cache, peak_tflops=peak_tflops, objective=objective,
                     loader_only=loader_only)
    result = run_bench(spec, say=say)
    if as_json:
        print(json.dumps(result))
    else:
        print_bench(result, console if console.is_terminal else Console(width=160))


@app.command("models")
def models_cmd(
    pattern: str = typer.Argument("*", help="Shell-style pattern, e.g. 'vit_b*'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the registered models with their sizes."""
    from vitcli.models import list_models, model_info

    infos = [model_info(name) for name in list_models(pattern)]
    if not infos:
        raise VitError(f"No model matches '{pattern}'. Run `vit models` to see them all.")
    if as_json:
        print(json.dumps(infos, indent=2))
        return
    table = Table(title=f"vitcli models ({len(infos)})")
    for col in ("name", "paper / timm name", "params", "resolution", "patch", "width", "depth", "heads", "MLP", "pool", "features"):
        table.add_column(col, justify="left" if col in ("name", "paper / timm name", "pool", "features") else "right", no_wrap=True)
    for i in infos:
        size = i["img_size"]
        res = f"{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
        aliases = i.get("aliases", [])
        paper = next((a for a in aliases if "/" in a), aliases[0] if aliases else "")
        table.add_row(i["name"], paper, f"{i['params'] / 1e6:,.1f}M", res, str(i["patch_size"]), str(i["embed_dim"]),
                      str(i["depth"]), str(i["num_heads"]), str(i["mlp_dim"]), i["global_pool"], ", ".join(i["features"]))
    # Off a terminal (a pipe, a log) the table keeps its full width instead of squeezing to 80 columns.
    (console if console.is_terminal else Console(width=160)).print(table)


recipes_app = typer.Typer(help="The recipes shipped with vitcli: list them, print one to copy and edit.",
                          add_completion=False, pretty_exceptions_enable=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes_list(ctx: typer.Context) -> None:
    """List the shipped recipes with their purpose (`vit pretrain NAME` runs one)."""
    if ctx.invoked_subcommand is not None:
        return
    from vitcli.recipe_files import purpose, shipped, shipped_names

    table = Table(title="vitcli recipes (vit pretrain NAME; vit recipes show NAME > my.yaml to edit one)")
    table.add_column("name", no_wrap=True)
    table.add_column("purpose")
    for name in shipped_names():
        table.add_row(name, escape(purpose(shipped(name))))
    (console if console.is_terminal else Console(width=200)).print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="A shipped recipe's name, e.g. quickstart.")) -> None:
    """Print a shipped recipe, comments included (redirect it to a file to edit it)."""
    from vitcli.recipe_files import shipped, shipped_names
    from vitcli.errors import did_you_mean

    path = shipped(name)
    if path is None:
        raise VitError(f"No shipped recipe is called '{name}'.{did_you_mean(name, shipped_names())} `vit recipes` lists them.")
    sys.stdout.write(path.read_text())


def _resume_command(args: list[str], run_dir) -> str:
    """The command line that continues the run: these arguments without --force, with --out and --resume."""
    args = [a for a in args if a != "--force"]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(run_dir)]
    return shlex.join(["vit", *args, *([] if "--resume" in args else ["--resume"])])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        # standalone mode: usage errors print with exit code 2, --help exits 0, as click does.
        app(args=args, prog_name="vit")
    except VitError as e:
        if debug:
            raise
        resume = f" Free space (or move {e.run_dir} to a larger disk), then resume: {_resume_command(args, e.run_dir)}" \
            if isinstance(e, DiskFull) and e.run_dir is not None else ""
        err_console.print(f"[bold red]error:[/] {escape(str(e))}{escape(resume)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except StopRequested as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped at the same step; one says so
            err_console.print(f"Stopped at step {e.step}; checkpoint saved in {e.run_dir}. Resume with the same command plus --out {e.run_dir} --resume.")
        sys.exit(STOPPED_EXIT_CODE)
    except OSError as e:  # a path no check caught (a disk filling up mid-run, permissions changed)
        if debug or e.filename is None:
            raise
        err_console.print(f"[bold red]error:[/] {path_error(e, e.filename)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        # A second Ctrl-C: no checkpoint was written now, but the last one on disk is intact.
        err_console.print("Interrupted. The last checkpoint written is intact: resume with the same command plus --resume.")
        sys.exit(130)
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError" or debug:
            raise
        err_console.print(
            "[bold red]error:[/] the GPU ran out of memory. Lower train.micro_batch_size (gradient accumulation keeps "
            "the global batch), use train.precision bf16, or a smaller --batch-size / --res; the last checkpoint is intact.",
            highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
