"""What `vit eval` is asked to do, as typed settings checked once, where they enter (the CLI or a caller).

    spec = EvalSpec(ckpt="runs/b16-cifar100", dataset="cifar100", res=(384, 384),
                    loader=LoaderSpec.evaluation(128, num_workers=8), fewshot=FewshotSpec.parse("1,5,10,25"))
    result = run_eval(spec)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vitcli.data import LoaderSpec
from vitcli.errors import VitError
from vitcli.objectives.fewshot import DEFAULT_L2
from vitcli.objectives.knn import parse_ks
from vitcli.objectives.linear_probe import PROTOCOLS


@dataclass(frozen=True)
class FewshotSpec:
    """The few-shot linear evaluation on frozen pre-logit features: K training images per class for each
    K in `shots` (none: no few-shot), averaged over `seeds` choices of them starting at `seed`
    (big_vision: 3), ridge strength `l2`."""

    shots: tuple[int, ...] = ()
    seeds: int = 1
    seed: int = 0
    l2: float = DEFAULT_L2

    def __post_init__(self) -> None:
        shots = tuple(sorted({int(k) for k in self.shots}))
        if any(k < 1 for k in shots):
            raise VitError(f"--fewshot takes positive numbers of images per class (e.g. 1,5,10,25), got {list(shots)}.")
        if self.seeds < 1:
            raise VitError(f"the number of few-shot seeds must be at least 1, got {self.seeds}.")
        object.__setattr__(self, "shots", shots)

    @classmethod
    def parse(cls, text: str | None, **settings) -> FewshotSpec:
        """From the command line's "1,5,10,25" (None or "": no few-shot evaluation)."""
        try:
            shots = tuple(int(k) for k in (text or "").split(",") if k.strip())
        except ValueError:
            raise VitError(f"--fewshot {text!r} must be comma-separated whole numbers, e.g. 1,5,10,25.") from None
        return cls(shots, **settings)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))


@dataclass(frozen=True)
class EvalSpec:
    """ckpt: anything `load_checkpoint` accepts; None: the best checkpoint of the newest run under
    `runs_root`. dataset: a registry name or path; None: the one the checkpoint was trained on. split:
    None: the set's own test/validation split, or all of a folder of class folders. res: evaluate at this
    (height, width), position embeddings resampled; None: the checkpoint's. data_dir: a local copy of a
    named set. subset: a seeded random choice of this many images. predictions / confusion: write a
    per-image CSV / a confusion-matrix image there. reduced_decode: decode a large JPEG at 1/2-1/8 size
    when the resize allows (False: every image whole, as timm's validate.py). labels: a multi-label folder's
    labels file (None: the run's data.labels). knn: weighted k-NN accuracy for each k, from the frozen
    features of the whole training split ("20" or (10, 20) on entry). linear_probe: a linear probe of the
    frozen features (objectives.linear_probe) by protocol dino or mae (auto: mae for an MAE checkpoint)."""

    ckpt: Optional[str | Path] = None
    dataset: Optional[str] = None
    split: Optional[str] = None
    res: Optional[tuple[int, int]] = None
    data_dir: Optional[str] = None
    labels: Optional[str] = None
    device: str = "auto"
    subset: Optional[int] = None
    predictions: Optional[Path] = None
    confusion: Optional[Path] = None
    runs_root: Path = Path("runs")
    reduced_decode: bool = True
    window_stride: Optional[int] = None  # segmentation: the sliding windows' stride (None: the window, no overlap)
    multi_scale: bool = False  # segmentation: Segmenter's scales 0.5-1.75 with flips, probabilities averaged
    loader: LoaderSpec = field(default_factory=lambda: LoaderSpec.evaluation(256, num_workers=2))
    fewshot: FewshotSpec = field(default_factory=FewshotSpec)
    knn: tuple[int, ...] = ()  # weighted k-NN on frozen features (objectives.knn) for each k; (): none
    linear_probe: Optional[str] = None  # a linear probe of frozen features by this protocol: dino | mae | auto

    def __post_init__(self) -> None:
        if self.loader.shuffle or self.loader.drop_last:
            raise ValueError("an evaluation loader neither shuffles nor drops images: use LoaderSpec.evaluation")
        if self.subset is not None and self.subset < 1:
            raise VitError(f"the evaluation subset must hold at least 1 image, got {self.subset}.")
        try:
            object.__setattr__(self, "knn", parse_ks(self.knn))
        except ValueError:
            raise VitError(f"--knn takes positive numbers of neighbours, e.g. 20 or 10,20,100,200; got {self.knn!r}.") from None
        if self.linear_probe not in (None, "auto", *PROTOCOLS):
            raise VitError(f"--probe-protocol must be dino, mae or auto; got {self.linear_probe!r}.")
        if self.window_stride is not None and self.window_stride < 1:
            raise VitError(f"--window-stride must be at least 1 pixel, got {self.window_stride}.")
