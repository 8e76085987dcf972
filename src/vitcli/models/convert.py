"""Foreign ViT checkpoints -> vitcli's parameter names (which are timm's), and the architecture a state
dict was made for.

Pure functions on tensors and arrays (no file I/O; `vitcli.models.load` reads files):

- `detect_format(keys, meta)`: "vitcli" | "timm" | "hf" | "npz" | "unknown".
- `from_hf_transformers(sd)`: Hugging Face `ViTModel` / `ViTForImageClassification`, in the on-disk
  (transformers 4) names `encoder.layer.{i}.attention.attention.query` and the in-memory transformers 5
  names `layers.{i}.attention.q_proj`; separate q/k/v are fused into timm's `qkv`, the pooler dropped.
- `from_google_npz(arrays)`: Google `vision_transformer` and `big_vision` .npz files: HWIO conv kernels,
  head-split attention kernels (D, heads, head_dim), per-layer `encoderblock_{i}` or the stacked 'scan'
  `encoderblock` layout, `params/`, `params/img/` and `opt/target/` prefixes, and the R50 hybrid stem.
- `infer_model_args(sd)` / `closest_model(args)`: the create_model settings a state dict fits, and the
  registered name that matches them, so a bare timm / HF / npz file loads without naming its model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from vitcli.errors import VitError

Tensors = dict[str, torch.Tensor]

FORMATS = ("vitcli", "timm", "hf", "npz", "unknown")
HEAD_DIM = 64  # ViT-Ti/S/B/L all use 64-wide heads; the fallback when nothing says how many heads
HYBRID_LAYERS = (3, 4, 9)  # the only ResNet stage layout the registry builds (R50+ViT-B/16)

# Prefixes that wrappers add in front of a model's own names: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# timm features vitcli's ViT does not implement: key pattern -> what it is.
UNSUPPORTED = {
    r"^reg_token$": "register tokens",
    r"^dist_token$|^head_dist\.": "a distillation token (DeiT)",
    r"\.ls[12]\.(gamma|weight)$|\.gamma_[12]$": "layer scale",
    r"\.attn\.[qk]_norm\.": "query/key normalisation",
    r"^norm_pre\.": "a pre-encoder LayerNorm (CLIP-style)",
    r"^attn_pool\.": "an attention-pool (MAP) head",
    r"\.mlp\.(norm|fc1_g|fc1_x|w12|w3)\.": "a gated or normalised MLP",
}


# ---------------------------------------------------------------------------------------------------
# Format detection


def strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes shared by every key."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def detect_format(keys: Iterable[str], meta: Mapping[str, Any] | None = None) -> str:
    """Which naming a checkpoint uses: "vitcli" (our metadata), "timm" (our names without it), "hf"
    (transformers ViT), "npz" (Google JAX/Flax, '/'-separated) or "unknown"."""
    keys = list(keys)
    if meta and meta.get("format") == "vitcli":
        return "vitcli"
    if any(k == "embedding/kernel" or k.endswith("/embedding/kernel") for k in keys):
        return "npz"
    stripped = [k[4:] if k.startswith("vit.") else k for k in keys]
    if any(k.startswith("embeddings.patch_embeddings.") for k in stripped):
        return "hf"
    if any(k == "patch_embed.proj.weight" for k in keys):
        return "timm"
    return "unknown"


# ---------------------------------------------------------------------------------------------------
# timm


def from_timm(state_dict: Mapping[str, torch.Tensor], img_size: int | tuple[int, int] | None = None,
              notes: list[str] | None = None) -> Tensors:
    """A timm ViT state dict in vitcli names: wrapper prefixes removed, and a timm `no_embed_class`
    position table (no slot for the class token, which gets no position) given a zero slot, which is
    the same computation in vitcli's layout.

    Args:
        state_dict: timm names, possibly under `module.` / `_orig_mod.`.
        img_size: the checkpoint's resolution when known; otherwise a square grid is assumed.
        notes: if given, a line is appended when the table is padded.
    """
    sd = strip_wrappers(state_dict)
    pos, proj = sd.get("pos_embed"), sd.get("patch_embed.proj.weight")
    if "cls_token" not in sd or pos is None or proj is None or pos.ndim != 3:
        return sd
    n = pos.shape[1]
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        stride = 16 if any(k.startswith("patch_embed.backbone.") for k in sd) else proj.shape[-1]
        grid_only = math.ceil(h / stride) * math.ceil(w / stride) == n
    else:
        grid_only = math.isqrt(n) ** 2 == n  # n*n + 1 is never a square
    if grid_only:
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        if notes is not None:
            notes.append("the position table has no class-token slot (timm no_embed_class): added a zero slot, "
                         "which computes the same")
    return sd


# ---------------------------------------------------------------------------------------------------
# Hugging Face transformers

# Per-layer names (after `encoder.layer.{i}.` or `layers.{i}.`) -> vitcli names (after `blocks.{i}.`).
_HF_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",  # transformers 4 / files on the Hub
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.o_proj": "attn.proj",  # transformers 5 in memory
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {  # the three projections fused into timm's qkv, in q, k, v order
    "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_DROPPED = ("pooler.", "embeddings.mask_token")  # unused by image classification
_HF_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def from_hf_transformers(state_dict: Mapping[str, torch.Tensor], notes: list[str] | None = None) -> Tensors:
    """A transformers `ViTModel` / `ViTForImageClassification` state dict in vitcli (= timm) names.

    Args:
        state_dict: HF names, with or without the `vit.` prefix of ViTForImageClassification.
        notes: if given, a line is appended for anything dropped (the pooler).
    """
    out: Tensors = {}
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    unknown, dropped = [], []
    for key, value in strip_wrappers(state_dict).items():
        k = key[4:] if key.startswith("vit.") else key
        if k.startswith(_HF_DROPPED):
            dropped.append(key)
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = value
            continue
        m = _HF_LAYER_RE.match(k)
        if m and m.group(2) in _HF_QKV:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[_HF_QKV[m.group(2)]] = value
        elif m and m.group(2) in _HF_LAYER:
            out[f"blocks.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise VitError(f"unexpected tensors for a transformers ViT: {few_keys(unknown)}; vitcli converts "
                       "ViTModel / ViTForImageClassification checkpoints only (not DeiT, BEiT, hybrid or "
                       "MAE variants)")
    for (layer, kind), parts in sorted(qkv.items()):
        if sorted(parts) != [0, 1, 2]:
            raise VitError(f"layer {layer} of the transformers checkpoint lacks some of query/key/value {kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    if dropped and notes is not None:
        notes.append(f"dropped {len(dropped)} transformers tensors vitcli does not use (pooler / mask token)")
    return out


# ---------------------------------------------------------------------------------------------------
# Google .npz (vision_transformer and big_vision)

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


# ---------------------------------------------------------------------------------------------------
# Architecture inference


def check_supported(state_dict: Mapping[str, Any]) -> None:
    """VitError when a timm-named state dict uses a feature vitcli's ViT lacks, or is not a ViT."""
    for pattern, what in UNSUPPORTED.items():
        hits = [k for k in state_dict if re.search(pattern, k)]
        if hits:
            raise VitError(f"this checkpoint uses {what} ({few_keys(hits)}), which vitcli's ViT does not "
                           "implement; use a plain ViT checkpoint (paper / AugReg / DeiT-without-distillation)")
    if "patch_embed.proj.weight" not in state_dict or "blocks.0.norm1.weight" not in state_dict:
        raise VitError(f"not a Vision Transformer state dict (no patch_embed.proj.weight / blocks.0.*; first "
                       f"keys: {few_keys(state_dict)})")


def hybrid_layers(state_dict: Mapping[str, Any]) -> tuple[int, ...]:
    """Blocks per ResNet stage of a hybrid's backbone ((3, 4, 9) for R50+ViT-B/16); () if not a hybrid."""
    blocks: dict[int, set[int]] = {}
    for k in state_dict:
        m = re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(blocks[s]) for s in sorted(blocks))


def infer_model_args(state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                     img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """The architecture a vitcli/timm-named state dict was made for.

    Returns embed_dim, depth, num_heads, mlp_ratio, patch_size, img_size [h, w], in_chans, num_classes,
    class_token, global_pool, qkv_bias and hybrid. Nothing in the weights says how many heads attention
    has: `num_heads` wins when given, else a registered model of the same width, depth and MLP gives
    it, else the standard head width of 64 does.

    Args:
        state_dict: vitcli (= timm) names, e.g. from `from_hf_transformers` or `from_google_npz`.
        num_heads: attention heads when known (HF config, .npz kernel shape, user).
        img_size: the training resolution when the position grid is not square.
    """
    check_supported(state_dict)
    sd = state_dict
    layers = hybrid_layers(sd)
    hybrid = bool(layers)
    if hybrid and layers != HYBRID_LAYERS:
        raise VitError(f"hybrid checkpoint with ResNet stages {layers}; vitcli builds the R50 hybrid "
                       f"{HYBRID_LAYERS} (R50+ViT-B/16) only")
    proj = sd["patch_embed.proj.weight"]
    embed_dim = int(proj.shape[0])
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    class_token = "cls_token" in sd
    if hybrid:
        patch_size, stride = 16, 16
        in_chans = int(sd["patch_embed.backbone.stem.conv.weight"].shape[1])
    else:
        if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
            raise VitError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}; expected a square "
                           "(embed_dim, in_chans, p, p) conv kernel")
        patch_size = stride = int(proj.shape[-1])
        in_chans = int(proj.shape[1])

    n_grid = sd["pos_embed"].shape[1] - int(class_token)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        gh, gw = math.ceil(h / stride), math.ceil(w / stride)
        if gh * gw != n_grid:
            raise VitError(f"img_size {h}x{w} gives a {gh}x{gw} grid, but the position embedding has {n_grid} "
                           "grid tokens; pass the resolution the checkpoint was trained at")
        size = [int(h), int(w)]
    else:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise VitError(f"the position embedding has {n_grid} grid tokens, not a square grid; pass the "
                           "checkpoint's img_size")
        size = [side * stride, side * stride]

    return {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads or _registered_heads(embed_dim, depth, mlp_ratio, hybrid) or _head_dim_rule(embed_dim),
        "mlp_ratio": mlp_ratio,
        "patch_size": patch_size,
        "img_size": size,
        "in_chans": in_chans,
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        "class_token": class_token,
        "global_pool": "avg" if "fc_norm.weight" in sd else "token",
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "hybrid": hybrid,
    }


def _head_dim_rule(embed_dim: int) -> int:
    """Heads giving the head width closest to 64 among the divisors of embed_dim."""
    divisors = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0]
    return min(divisors, key=lambda h: (abs(embed_dim / h - HEAD_DIM), h))


def _registered(hybrid: bool):
    from vitcli.models import list_models
    from vitcli.models.registry import resolve_config

    for name in list_models():
        cfg = resolve_config(name)
        if cfg.hybrid == hybrid:
            yield cfg


def _registered_heads(embed_dim: int, depth: int, mlp_ratio: float, hybrid: bool) -> int | None:
    for cfg in _registered(hybrid):
        if (cfg.embed_dim, cfg.depth) == (embed_dim, depth) and math.isclose(cfg.mlp_ratio, mlp_ratio):
            return cfg.num_heads
    return None


ARCH_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
             "mlp_ratio", "qkv_bias", "class_token", "global_pool")


def closest_model(args: Mapping[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(registered name, create_model overrides, exact) for inferred args.

    `exact` is True when a registered model has the same width, depth, heads, MLP and patch size (the
    overrides then only set resolution, classes, pooling...). Otherwise the name is the nearest plain
    model and the overrides spell out the whole architecture. The overrides always carry every
    architecture setting, so the result rebuilds the same model even if registry defaults change.
    """
    hybrid = bool(args.get("hybrid"))
    overrides = {k: args[k] for k in ARCH_KEYS if k in args}
    candidates = list(_registered(hybrid))
    if not candidates:
        raise VitError("no registered model of this kind (hybrid)" if hybrid else "no registered ViT model")

    def same(cfg) -> bool:
        return ((cfg.embed_dim, cfg.depth, cfg.num_heads) == (args["embed_dim"], args["depth"], args["num_heads"])
                and math.isclose(cfg.mlp_ratio, args["mlp_ratio"]) and (hybrid or cfg.patch_size == args["patch_size"]))

    exact = [c for c in candidates if same(c)]
    if exact:
        return exact[0].name, overrides, True
    near = min(candidates, key=lambda c: (c.patch_size != args.get("patch_size"), abs(c.embed_dim - args["embed_dim"]),
                                          abs(c.depth - args["depth"]), c.name))
    return near.name, overrides, False


def few_keys(keys: Iterable[str], n: int = 5) -> str:
    """'a, b, c (+7 more)': the first n names, for error messages."""
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def to_hf_transformers(state_dict: Mapping[str, torch.Tensor], hf_keys: Iterable[str]) -> Tensors:
    """vitcli (= timm) tensors under the names of a transformers ViT state dict (`hf_keys`, as the
    installed transformers names them): the inverse of from_hf_transformers, qkv split into q, k, v."""
    out: Tensors = {}
    for key in hf_keys:
        k = key[4:] if key.startswith("vit.") else key
        m = _HF_LAYER_RE.match(k)
        if k in _HF_TOP:
            out[key] = state_dict[_HF_TOP[k]]
        elif m and m.group(2) in _HF_QKV:
            fused = state_dict[f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}"]
            out[key] = fused.chunk(3, dim=0)[_HF_QKV[m.group(2)]]
        elif m and m.group(2) in _HF_LAYER:
            out[key] = state_dict[f"blocks.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"]
        else:
            raise VitError(f"transformers ViT tensor {key} has no vitcli counterpart")
    return out
