"""A/B a candidate change to the model or the step against the current code, interleaved, on this machine.

    .venv/bin/python benchmarks/ab_variant.py split-qkv vit_s16 --batch-size 16 --rounds 10 --steps-per-round 1
    .venv/bin/python benchmarks/ab_variant.py fused-adamw vit_pico --batch-size 64 --rounds 20 --steps-per-round 10
    .venv/bin/python benchmarks/ab_variant.py hybrid-fused-std r50_vit_b16 --batch-size 8 --rounds 8
    .venv/bin/python benchmarks/ab_variant.py compile vit_pico --batch-size 64 --rounds 20 --steps-per-round 10 --warmup 3

Both sides start from the same weights and batch; the variant's logits are checked against the baseline's
first. Rounds alternate A B / B A; each round gives a paired ratio (baseline median step / variant median
step, > 1: the variant is faster), which cancels load drift between rounds. Prints the median paired
ratio with its range, and the verdict is left to the reader: a gain inside the range of the ratios is
noise.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vitcli.bench.timing import Contestant, run_rounds
from vitcli.engine.optim import build_optimizer
from vitcli.models import create_model
from vitcli.models import vit as V
from vitcli.recipe import OptimCfg


def split_qkv_forward(self: V.Attention, x: torch.Tensor) -> torch.Tensor:
    """q, k, v as three column blocks of the qkv output (chunk) instead of unbind of a permuted view:
    the same views forward; backward one cat of the three gradients instead of stack + permute copy."""
    b, n, c = x.shape
    q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


def std_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Weight standardisation as one fused op (batch_norm over each output channel's weights, as timm's
    StdConv2dSame), and the 'SAME' padding passed to the conv when it is symmetric (stride 1, odd kernel)
    instead of an F.pad copy."""
    from vitcli.models.hybrid import pad_same

    w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                     eps=self.eps).reshape_as(self.weight)
    k, s = self.kernel_size[0], self.stride[0]
    if s == 1 and k % 2 == 1:
        return F.conv2d(x, w, None, 1, (k - 1) // 2)
    return F.conv2d(pad_same(x, self.kernel_size, self.stride), w, None, self.stride)


def group_norm_act_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ReLU in place on the GroupNorm output (its backward needs the input, not the output)."""
    x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    return F.relu_(x) if self.act else x


def patch_hybrid(model: torch.nn.Module) -> None:
    from vitcli.models import hybrid as H

    for m in model.modules():
        if isinstance(m, H.StdConv2dSame):
            m.forward = std_conv_forward.__get__(m)
        elif isinstance(m, H.GroupNormAct):
            m.forward = group_norm_act_forward.__get__(m)


def patch_attention(model: torch.nn.Module, forward: Callable) -> None:
    for m in model.modules():
        if isinstance(m, V.Attention):
            m.forward = forward.__get__(m)


VARIANTS: dict[str, dict] = {
    "split-qkv": {"model": lambda m: patch_attention(m, split_qkv_forward)},
    "fused-adamw": {"fused": True},
    "hybrid-fused-std": {"model": patch_hybrid},
    "threads-1": {"threads": 1},
    "compile": {"compile": True},  # torch.compile(model) against eager: --compile must never be slower
}


def make(name: str, batch: int, variant: dict | None, label: str) -> tuple[Contestant, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name)
    if variant and "model" in variant:
        variant["model"](model)
    model.train()
    opt = build_optimizer(model, OptimCfg(name="adamw", lr=1e-4, weight_decay=0.05), torch.device("cpu"))
    if variant and variant.get("fused"):
        opt = torch.optim.AdamW(opt.param_groups, lr=1e-4, fused=True)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    threads = (variant or {}).get("threads")
    forward = torch.compile(model) if (variant or {}).get("compile") else model

    def step() -> None:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if threads:
            torch.set_num_threads(before)

    return Contestant(label, step), model, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=sorted(VARIANTS))
    ap.add_argument("model")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    (a, ma, x), (b, mb, _) = make(args.model, args.batch_size, None, "baseline"), make(args.model, args.batch_size, VARIANTS[args.variant], args.variant)
    ma.eval(), mb.eval()
    with torch.no_grad():
        diff = (ma(x) - mb(x)).abs().max().item()
    ma.train(), mb.train()
    print(f"max |logit difference| variant vs baseline: {diff:.2e}")
    for c in (a, b):
        for _ in range(args.warmup):
            c.step()
    ratios = []
    for r in range(args.rounds):
        na, nb = len(a.times), len(b.times)
        run_rounds([a, b] if r % 2 == 0 else [b, a], steps=args.steps_per_round, rounds=1, device=torch.device("cpu"))
        ratios.append(statistics.median(a.times[na:]) / statistics.median(b.times[nb:]))
    ma_, mb_ = statistics.median(a.times), statistics.median(b.times)
    print(f"{args.model} batch {args.batch_size}: baseline {1e3 * ma_:.1f} ms, {args.variant} {1e3 * mb_:.1f} ms per step "
          f"({args.rounds} rounds x {args.steps_per_round} steps)")
    print(f"paired speed-up baseline/variant: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}–{max(ratios):.3f}, quartiles "
          f"{' / '.join(f'{q:.3f}' for q in statistics.quantiles(ratios, n=4))})" if len(ratios) > 1 else "")


if __name__ == "__main__":
    main()
