"""Every random number generator a run touches: seeding, saving and restoring, per rank and per image.

- `seed_everything(seed)`: python `random`, numpy and torch (CPU and CUDA) from one recipe seed.
- `derive_seed(*key)`: a well-mixed 63-bit seed from integer parts (data order, loader workers, ranks),
  through numpy's SeedSequence, so (seed, epoch) and (seed + 1, epoch - 1) do not collide.
- `seed_all(*key)` inside `preserved_rng()`: per-image augmentation seeding that leaves the training
  RNG untouched (see vitcli.data.loader).
- `rng_state()` / `set_rng_state()`: every global generator in a form torch.load(weights_only=True)
  reads back; `rank_rng_state` / `restore_rank_rng` / `seed_rank` add the per-process rules of a
  torchrun run (each rank its own dropout stream; rank 0 keeps the recipe's seed).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch


def seed_words(*key: int, n: int = 4) -> np.ndarray:
    """n well-mixed 32-bit words from integer key parts."""
    return np.random.SeedSequence([k % 2**63 for k in key]).generate_state(n, dtype=np.uint32)


def derive_seed(*key: int) -> int:
    """A 63-bit seed from integer key parts (for torch.Generator.manual_seed and seed_everything)."""
    hi, lo = (int(w) for w in seed_words(*key, n=2))
    return (hi << 32 | lo) & (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_all(*key: int) -> None:
    """Seed random, numpy and the torch CPU generator from key (not CUDA: the trainer's GPU RNG stays put)."""
    words = [int(w) for w in seed_words(*key)]
    random.seed(words[0] << 32 | words[1])
    np.random.seed(words[2])
    torch.default_generator.manual_seed(words[3] << 32 | words[0])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block, then put the random / numpy / torch CPU generator states back as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def rng_state() -> dict:
    """Every global RNG, in a form torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- one process of several (torchrun) ---------------------------------------------------------


def seed_rank(rank: int, seed: int) -> None:
    """Give ranks > 0 their own RNG streams (dropout, drop-path, Mixup draws); rank 0 keeps the
    recipe's seed, so one process is exactly rank 0 of a larger run. Call after building the model
    (every rank builds the same initial weights from the same seed)."""
    if rank > 0:
        seed_everything(derive_seed(seed, rank))


def rank_rng_state(device: torch.device, distributed: bool) -> dict:
    """This process's RNG state; under torchrun on CUDA only this process's GPU generator."""
    mine = rng_state()
    if distributed and device.type == "cuda":
        mine["cuda"] = [torch.cuda.get_rng_state(device)]
    return mine


def restore_rank_rng(state: dict, rank: int, world_size: int, device: torch.device, distributed: bool, seed: int,
                     say: Callable[[str], object] = print) -> None:
    """Each rank's own saved RNG when the number of processes is unchanged; otherwise re-seed from
    (seed, step, rank). Data order and augmentation never depend on this: they are seeded per image."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) != world_size:
        seed_everything(derive_seed(seed, state["step"], rank))
        say(f"The checkpoint was written by {len(per_rank)} process(es), this run has {world_size}: data order "
            "and augmentation continue exactly; dropout/drop-path RNG streams are re-seeded from (seed, step, rank).")
        return
    mine = per_rank[rank]
    if not distributed:
        set_rng_state(mine)
        return
    mine = dict(mine)
    cuda = mine.pop("cuda", None)
    set_rng_state(mine)
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda[0], device)
