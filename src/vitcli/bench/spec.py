"""What `vit bench` is asked to time, as one typed spec checked once, where it enters.

    run_bench(BenchSpec("vit_s16", compare="timm", batch_size=16))          # what `vit bench` runs
    run_bench(BenchSpec(data="digits", img_size=(8, 8)))                    # the input pipeline alone
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vitcli.errors import VitError
from vitcli.objectives import OBJECTIVES

MODES = ("train", "infer")
DTYPES = ("fp32", "bf16", "auto")
CACHES = ("none", "decoded", "auto")
PIPELINES = ("auto", "pil", "tensor")


@dataclass(frozen=True)
class BenchSpec:
    """model: a registry name or alias (None: only the input pipeline of `data`). data: also time this data
    set's input pipeline. batch_size / steps / warmup None: the device's defaults (model_bench.defaults).
    compare "timm": also time timm's equivalent, interleaved. objective mpp / mae: their training step on
    the same encoder. peak_tflops: the GPU's peak for MFU where the built-in table lacks it. loader_only: time
    the input pipeline of `data` alone, the model (if named) giving only its resolution and batch."""

    model: Optional[str] = None
    data: Optional[str] = None
    mode: str = "train"
    batch_size: Optional[int] = None
    img_size: Optional[tuple[int, int]] = None
    dtype: str = "auto"
    compile: bool = False
    compare: Optional[str] = None
    device: str = "auto"
    steps: Optional[int] = None
    warmup: Optional[int] = None
    num_workers: int = 2
    data_dir: Optional[str] = None
    pipeline: str = "auto"
    reduced_decode: bool = True
    cache: str = "none"  # data.cache for --data: none | decoded | auto
    peak_tflops: Optional[float] = None
    objective: str = "supervised"
    loader_only: bool = False

    def __post_init__(self) -> None:
        if self.model is None and self.data is None:
            raise VitError("Name a model to benchmark (e.g. `vit bench vit_s16`), or --data DATASET for the input pipeline.")
        if self.loader_only and self.data is None:
            raise VitError("--loader-only times the input pipeline of --data DATASET: give one (e.g. --data runs/jpegs --loader-only).")
        if self.compare is not None and self.compare != "timm":
            raise VitError(f"--compare {self.compare!r}: the only library to compare with is timm (--compare timm).")
        for flag, value, choices in (("--mode", self.mode, MODES), ("--objective", self.objective, tuple(OBJECTIVES)),
                                     ("--dtype", self.dtype, DTYPES), ("--pipeline", self.pipeline, PIPELINES),
                                     ("--cache", self.cache, CACHES)):
            if value not in choices:
                raise VitError(f"{flag} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}.")
        if self.objective != "supervised" and (self.mode != "train" or self.compare is not None):
            raise VitError(f"--objective {self.objective} times a training step of vitcli's encoder: use --mode train without --compare.")
        if min(self.batch_size or 1, self.steps or 1) < 1 or (self.warmup or 0) < 0 or self.num_workers < 0:
            raise VitError("--batch-size and --steps must be >= 1, --warmup and --num-workers >= 0.")
