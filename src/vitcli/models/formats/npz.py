"""Google .npz checkpoints (`vision_transformer` and `big_vision`) -> vitcli (= timm) names.

HWIO conv kernels, head-split attention kernels (D, heads, head_dim), per-layer `encoderblock_{i}` or
the stacked 'scan' `encoderblock` layout, `params/`, `params/img/` and `opt/target/` prefixes, and the
R50 hybrid stem. Reading only: vitcli writes no .npz.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from vitcli.errors import VitError, few_keys

NAME = "npz"
Tensors = dict[str, torch.Tensor]


def detect(keys: Iterable[str]) -> bool:
    return any(k == "embedding/kernel" or k.endswith("/embedding/kernel") for k in keys)


_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def npz_prefix(keys: Iterable[str]) -> str:
    """The path in front of a ViT's `embedding/kernel` in a Google .npz ('' , 'params/', ...)."""
    keys = set(keys)
    found = [k[: -len("embedding/kernel")] for k in keys
             if k == "embedding/kernel" or k.endswith("/embedding/kernel")]
    if not found:
        raise VitError("no 'embedding/kernel' array: this .npz is not a Google ViT checkpoint")
    found.sort(key=lambda p: (f"{p}Transformer/encoder_norm/scale" not in keys, p not in _NPZ_PREFIXES, len(p)))
    return found[0]


def _np(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == np.dtype("V2"):  # bfloat16 saved through numpy (ml_dtypes): widen to float32
        a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a))


def _conv(k: torch.Tensor) -> torch.Tensor:
    """HWIO (Flax) -> OIHW (PyTorch)."""
    if k.ndim != 4:
        raise VitError(f"expected a 4-D (h, w, in, out) conv kernel, got shape {tuple(k.shape)}; flattened "
                       "(NaFlex-style) patch embeddings are not supported")
    return k.permute(3, 2, 0, 1).contiguous()


def _vec(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1)  # GroupNorm scales are sometimes stored as (1, 1, 1, C)


def npz_num_heads(arrays: Mapping[str, np.ndarray]) -> int | None:
    """Attention heads, read off the head-split query kernel (D, heads, head_dim) of a Google .npz."""
    for k, v in arrays.items():
        if re.search(r"/MultiHeadDotProductAttention_\d+/query/kernel$", k) and "MAPHead" not in k:
            return int(v.shape[-2])
    return None


def _block_parts(names: Iterable[str]) -> tuple[list[str], str, str]:
    """(two LayerNorm names, the attention name, the MLP name) inside one encoder block: big_vision
    numbers them LayerNorm_0/1, *_0, MlpBlock_0; vision_transformer LayerNorm_0/2, *_1, MlpBlock_3."""
    tops = {n.split("/")[0] for n in names}
    norms = sorted((t for t in tops if t.startswith("LayerNorm_")), key=lambda t: int(t.split("_")[1]))
    attn = [t for t in tops if t.startswith("MultiHeadDotProductAttention_")]
    mlp = [t for t in tops if t.startswith("MlpBlock_")]
    if len(norms) != 2 or len(attn) != 1 or len(mlp) != 1:
        raise VitError(f"unrecognised encoder block layout in the .npz (found {sorted(tops)}); expected two "
                       "LayerNorm_*, one MultiHeadDotProductAttention_* and one MlpBlock_*")
    return norms, attn[0], mlp[0]


def from_google_npz(arrays: Mapping[str, np.ndarray], notes: list[str] | None = None) -> Tensors:
    """A Google vision_transformer / big_vision ViT (or R50 hybrid) .npz in vitcli (= timm) names.

    A `pre_logits` (representation) layer is kept as `pre_logits.fc.weight/bias` (timm's old names); the
    loader refuses to use the head behind it, since vitcli's ViT has no such layer. big_vision's 'gap'
    models normalise before pooling while vitcli (as timm) normalises after: the encoder norm then maps to
    `fc_norm`, and a note says the outputs differ slightly.

    Args:
        arrays: name -> array, as from `numpy.load(path, allow_pickle=False)`.
        notes: if given, lines are appended for anything approximated or kept aside.
    """
    prefix = npz_prefix(arrays)
    w = {k[len(prefix):]: _np(v) for k, v in arrays.items() if k.startswith(prefix)}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in w:
            raise VitError(f"the .npz lacks '{prefix}{name}', which a ViT checkpoint needs")
        used.add(name)
        return w[name]

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in w else None

    out: Tensors = {"patch_embed.proj.weight": _conv(take("embedding/kernel"))}
    if "embedding/bias" in w:
        out["patch_embed.proj.bias"] = take("embedding/bias")
    if "conv_root/kernel" in w:
        out.update(_npz_resnet(w, take))

    cls = maybe("cls")
    if cls is not None:
        out["cls_token"] = cls.reshape(1, 1, -1)
    bv_pos = "pos_embedding" in w  # big_vision keeps it at the top level, without a class-token slot
    pos = maybe("pos_embedding") if bv_pos else maybe("Transformer/posembed_input/pos_embedding")
    if pos is None:
        raise VitError("the .npz has no learned position embedding (big_vision 'sincos2d' posemb?); vitcli "
                       "loads learned position embeddings only")
    pos = pos.reshape(1, -1, pos.shape[-1])
    if cls is not None and _grid_only(pos.shape[1], bv_pos):
        # big_vision adds posemb before prepending the class token: a zero slot reproduces that exactly.
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    out["pos_embed"] = pos

    out.update(_npz_blocks(w, take))
    norm = "norm" if cls is not None else "fc_norm"
    out[f"{norm}.weight"] = take("Transformer/encoder_norm/scale")
    out[f"{norm}.bias"] = take("Transformer/encoder_norm/bias")
    if cls is None and notes is not None:
        notes.append("no class token: loaded as global average pooling; the original normalises tokens "
                     "before pooling and vitcli (as timm) after, so outputs differ slightly")
    if "head/kernel" in w and w["head/kernel"].numel() > 0:
        out["head.weight"] = take("head/kernel").T.contiguous()
        out["head.bias"] = take("head/bias")
    else:
        used.update(n for n in ("head/kernel", "head/bias") if n in w)
    if "pre_logits/kernel" in w:
        out["pre_logits.fc.weight"] = take("pre_logits/kernel").T.contiguous()
        out["pre_logits.fc.bias"] = take("pre_logits/bias")

    left = sorted(set(w) - used)
    if left:
        what = " (an attention-pool 'MAP' head, which vitcli does not implement)" if any(
            k.startswith("MAPHead") for k in left) else ""
        raise VitError(f"the .npz has arrays vitcli cannot place{what}: {few_keys(prefix + k for k in left)}")
    return out


def _grid_only(n_tokens: int, big_vision: bool) -> bool:
    """Whether a position table with a class token beside it lacks the token's slot. n*n + 1 is never a
    square, so a square count is grid-only; other (rectangular) counts follow the layout's convention."""
    if math.isqrt(n_tokens) ** 2 == n_tokens:
        return True
    if math.isqrt(n_tokens - 1) ** 2 == n_tokens - 1:
        return False
    return big_vision


def _npz_blocks(w: Mapping[str, torch.Tensor], take) -> Tensors:
    scan = "Transformer/encoderblock/" in {k[: len("Transformer/encoderblock/")] for k in w}
    if scan:  # big_vision 'scan': one stack per parameter with a leading depth axis
        base = "Transformer/encoderblock/"
        names = [k[len(base):] for k in w if k.startswith(base)]
        depth = w[base + next(n for n in names if n.endswith("scale"))].shape[0]
        layers = [(base, i) for i in range(depth)]
    else:
        idx = sorted({int(m.group(1)) for k in w if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
        if idx != list(range(len(idx))) or not idx:
            raise VitError(f"the .npz encoder blocks are not numbered 0..n-1 (found {idx})")
        layers = [(f"Transformer/encoderblock_{i}/", None) for i in idx]
        names = [k[len(layers[0][0]):] for k in w if k.startswith(layers[0][0])]
    (ln1, ln2), mha, mlp = _block_parts(names)

    out: Tensors = {}
    for i, (base, row) in enumerate(layers):
        def get(name: str, base=base, row=row) -> torch.Tensor:
            t = take(base + name)
            return t[row] if row is not None else t

        b = f"blocks.{i}."
        out[b + "norm1.weight"], out[b + "norm1.bias"] = get(f"{ln1}/scale"), get(f"{ln1}/bias")
        out[b + "norm2.weight"], out[b + "norm2.bias"] = get(f"{ln2}/scale"), get(f"{ln2}/bias")
        q, k, v = (get(f"{mha}/{n}/kernel") for n in ("query", "key", "value"))  # (D, heads, head_dim)
        dim = q.shape[0]
        out[b + "attn.qkv.weight"] = torch.cat([t.reshape(dim, -1).T for t in (q, k, v)], dim=0).contiguous()
        if base + f"{mha}/query/bias" in w:
            out[b + "attn.qkv.bias"] = torch.cat(
                [get(f"{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        out[b + "attn.proj.weight"] = get(f"{mha}/out/kernel").reshape(-1, dim).T.contiguous()
        out[b + "attn.proj.bias"] = get(f"{mha}/out/bias")
        for j in (0, 1):
            out[b + f"mlp.fc{j + 1}.weight"] = get(f"{mlp}/Dense_{j}/kernel").T.contiguous()
            out[b + f"mlp.fc{j + 1}.bias"] = get(f"{mlp}/Dense_{j}/bias")
    return out


def _npz_resnet(w: Mapping[str, torch.Tensor], take) -> Tensors:
    """The R50 hybrid's stem and stages: `block{s}/unit{u}/conv{r}|gn{r}|conv_proj|gn_proj`."""
    bb = "patch_embed.backbone."
    out = {bb + "stem.conv.weight": _conv(take("conv_root/kernel")),
           bb + "stem.norm.weight": _vec(take("gn_root/scale")),
           bb + "stem.norm.bias": _vec(take("gn_root/bias"))}
    units = sorted({(int(m.group(1)), int(m.group(2))) for k in w
                    if (m := re.match(r"block(\d+)/unit(\d+)/", k))})
    for s, u in units:
        src, dst = f"block{s}/unit{u}/", f"{bb}stages.{s - 1}.blocks.{u - 1}."
        for r in (1, 2, 3):
            out[f"{dst}conv{r}.weight"] = _conv(take(f"{src}conv{r}/kernel"))
            out[f"{dst}norm{r}.weight"] = _vec(take(f"{src}gn{r}/scale"))
            out[f"{dst}norm{r}.bias"] = _vec(take(f"{src}gn{r}/bias"))
        if f"{src}conv_proj/kernel" in w:
            out[f"{dst}downsample.conv.weight"] = _conv(take(f"{src}conv_proj/kernel"))
            out[f"{dst}downsample.norm.weight"] = _vec(take(f"{src}gn_proj/scale"))
            out[f"{dst}downsample.norm.bias"] = _vec(take(f"{src}gn_proj/bias"))
    return out


