"""Which split of a dense-task set (segmentation, detection) a run reads: the one asked for ("a+b"
concatenates), else the set's training or evaluation split by its usual names, else, when the set has a
single split, 90% of it for training and 10% for evaluation (seed 0), as classification folders do."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import datasets
import numpy as np

from vitcli.data.sources import CARVE_FRACTION, CARVE_SEED
from vitcli.errors import VitError

Role = Literal["train", "eval"]
TRAIN_SPLITS = ("train", "training")
EVAL_SPLITS = ("val", "validation", "test", "eval")


def pick_split(splits: dict[str, datasets.Dataset], split: Optional[str], role: Role, where: str, carve: bool
               ) -> tuple[datasets.Dataset, str]:
    """(the split's rows, its name as reports show it); carve False: a single split is used whole."""
    if split is not None:
        parts = split.split("+")
        missing = [p for p in parts if p not in splits]
        if missing:
            raise VitError(f"'{where}' has no split '{missing[0]}'. Its splits: {', '.join(splits)}.")
        chosen = [splits[p] for p in parts]
        return (chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)), split
    if len(splits) == 1:
        (only, ds), = splits.items()
        if not carve:
            return ds, only
        keep = carved_indices(len(ds), role)
        return ds.select(keep, keep_in_memory=True), f"{only}[{'90%' if role == 'train' else '10%'}]"
    for name in (TRAIN_SPLITS if role == "train" else EVAL_SPLITS):
        if name in splits:
            return splits[name], name
    raise VitError(f"'{where}' has no {'training' if role == 'train' else 'evaluation'} split among {', '.join(splits)}. "
                   f"Pick one with --set data.{'train' if role == 'train' else 'eval'}_split=NAME.")


def carved_indices(n: int, role: Role) -> np.ndarray:
    """The sorted indices of a single split's training (90%) or evaluation (10%) part."""
    if n < 2:
        raise VitError(f"Only {n} image(s): too few to split off evaluation images. Add images.")
    order = np.random.default_rng(CARVE_SEED).permutation(n)
    n_eval = max(1, round(CARVE_FRACTION * n))
    return np.sort(order[n_eval:] if role == "train" else order[:n_eval])


def seeded_subset(ds: datasets.Dataset, split_name: str, subset: Optional[int], seed: int) -> tuple[datasets.Dataset, str]:
    """`subset` images of the split drawn with `seed` (kept in their order), and the name reports show."""
    if not subset or subset >= len(ds):
        return ds, split_name
    keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:subset])
    return ds.select(keep, keep_in_memory=True), f"{split_name}[{subset}]"


def saved_splits(path: Path) -> Optional[dict[str, datasets.Dataset]]:
    """The splits of a `save_to_disk` folder (a DatasetDict, or one Dataset under its split name); None when
    `path` is not one."""
    if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return None
    loaded = datasets.load_from_disk(str(path))
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {str(loaded.split or "train"): loaded}
