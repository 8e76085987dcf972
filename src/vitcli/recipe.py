"""Recipes: YAML files loaded once into typed, validated dataclasses.

A recipe has six sections (model, objective, data, optim, schedule, train) plus a name. Every field has a
default, so a recipe only states what differs. `--set section.key=value` overrides any field; the
value is read as YAML (`--set optim.lr=3e-4`, `--set data.crop_scale=[0.5,1]`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from vitcli.errors import VitError, did_you_mean, path_error


@dataclass
class ModelCfg:
    name: str = "vit_b16"  # a registered ViT (`vit models`), or timm:ARCH for any timm classifier (a CNN baseline or teacher)
    # Weights to start from (fine-tuning): anything `vit finetune --ckpt` accepts. The architecture
    # then comes from the checkpoint; img_size / patch_size resample it, the head is replaced.
    init_ckpt: Optional[str] = None
    num_classes: Optional[int] = None  # None: taken from the data set
    img_size: Optional[Union[int, list[int]]] = None  # None: the model's own
    patch_size: Optional[int] = None
    # None: the model's own (token for the paper's ViT, map for SigLIP ...); "avg" pools the patch tokens
    global_pool: Optional[Literal["token", "avg", "map"]] = None
    class_token: Optional[bool] = None
    in_chans: int = 3
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    qkv_bias: Optional[bool] = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: Optional[float] = None  # LayerScale's initial value on each residual branch (DeiT III: 1e-4); None: off
    distilled: Optional[bool] = None  # DeiT's distillation token and second head (objective.distill.mode: token)
    # Fine-tuning: a head trained on the very classes being fine-tuned on (same data set, same class names)
    # is kept; true replaces it by a zero-initialised one anyway (the paper's §3.2 head for new classes).
    new_head: bool = False
    # task: segmentation. Segmenter's decoders on the last block's patch tokens: linear (a linear layer per
    # patch) or mask_transformer (decoder_layers blocks over the patches and one learned embedding per
    # class, decoder_dim wide (null: the encoder's), decoder_heads (null: width / 64), dropout decoder_dropout)
    decoder: Literal["linear", "mask_transformer"] = "linear"
    decoder_layers: int = 2
    decoder_dim: Optional[int] = None
    decoder_heads: Optional[int] = None
    decoder_dropout: float = 0.1
    # task: detection. One of torchvision's detectors (faster_rcnn, retinanet, fcos, mask_rcnn) on ViTDet's simple
    # feature pyramid (pyramid_channels wide, the patch grid rescaled by pyramid_scales), window attention
    # in window_size x window_size patches (0: global everywhere) but in global_blocks (ViTDet's ViT-B:
    # 14 and [2, 5, 8, 11]); score_thresh and detections_per_img filter what it reports
    detector: Literal["faster_rcnn", "retinanet", "fcos", "mask_rcnn"] = "faster_rcnn"
    window_size: int = 0
    global_blocks: list[int] = field(default_factory=list)
    pyramid_channels: int = 256
    pyramid_scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    score_thresh: float = 0.05
    detections_per_img: int = 100
    detector_args: dict = field(default_factory=dict)  # more torchvision arguments: rpn_post_nms_top_n_train ...


@dataclass
class MppCfg:
    """The paper's masked patch prediction (§4.6, Appendix B.1.2)."""

    mask_ratio: float = 0.5  # share of patches corrupted
    # what a corrupted patch's output token predicts: its mean colour (2^(bits x channels) classes, 512 for
    # RGB at 3 bits), its 4x4 downsized colours (16 such predictions), or its pixels (L2)
    target: Literal["mean_color", "downsized", "pixels"] = "mean_color"
    bits: int = 3
    replace: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # [mask] / another patch / unchanged


@dataclass
class MaeCfg:
    """Masked autoencoder (He et al., 2022): the light decoder that reconstructs the masked patches."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512  # MAE's ViT-B/16 default: 512 wide, 8 deep
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # reconstruct per-patch normalised pixels


@dataclass
class DistillCfg:
    """Knowledge distillation from a frozen teacher (DeiT, Touvron et al., 2021; timm's --kd-model-name)."""

    # a vitcli run or checkpoint, any file vitcli reads, or timm:ARCH (weights from the Hugging Face
    # cache, or from teacher_weights)
    teacher: Optional[str] = None
    teacher_weights: Optional[str] = None  # a .safetensors/.pth state dict for a timm:ARCH teacher
    # token: DeiT's distillation token and head_dist; logit: KL divergence of the class logits at tau;
    # feature: a learned projection of the student's pooled features onto the teacher's
    mode: Literal["token", "logit", "feature"] = "token"
    type: Literal["hard", "soft"] = "hard"  # the teacher's argmax, or its distribution at temperature tau
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs the labels' loss
    tau: float = 1.0


@dataclass
class DinoCfg:
    """Self-distillation with no labels (DINO, Caron et al., 2021; defaults: main_dino.py's for ViT-S/16) and
    DINOv2's additions (Oquab et al., 2023): the KoLeo regulariser and iBOT's masked-patch loss, each off at 0."""

    out_dim: int = 65536  # prototypes of the head's weight-normalised last layer
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True  # the last layer's weight norm fixed at 1 (DINO's ViT-B); false for its ViT-S
    head_batch_norm: bool = False  # DINO's use_bn_in_head: a BatchNorm after each hidden layer of the head
    freeze_last_layer: float = 1.0  # epochs at the start whose last-layer gradients are dropped
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # reached after the warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # centre: DINO's running centre subtracted before the teacher's softmax; sinkhorn_knopp: DINOv2's
    # equipartition of each batch over the prototypes (3 iterations), no running state, no early transient
    centering: Literal["centre", "sinkhorn_knopp"] = "centre"
    momentum_teacher: float = 0.996  # the EMA teacher's momentum, cosine-scheduled to 1 at the last step
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # 2 at the model's resolution
    local_crops_number: int = 8
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_crops_size: int = 96
    # DINO's photometric changes, as probabilities: colour jitter and greyscale on every crop, solarization
    # on the second global crop; blur: its Gaussian blur (first global always, second 10%, locals 50%)
    color_jitter: float = 0.8
    grayscale: float = 0.2
    solarize: float = 0.2
    blur: bool = True
    koleo_weight: float = 0.0  # DINOv2: 0.1
    ibot_weight: float = 0.0  # DINOv2: 1.0
    ibot_mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # per masked image, uniform
    ibot_mask_probability: float = 0.5  # share of the global crops that are masked


# Keys of the flat objective section that earlier versions wrote (and their run directories' recipe.yaml
# still hold): key -> (section, key there); mask_ratio went to the section of the objective named.
LEGACY_OBJECTIVE_KEYS = {
    "mpp_target": ("mpp", "target"), "mpp_bits": ("mpp", "bits"), "mpp_replace": ("mpp", "replace"),
    "decoder_dim": ("mae", "decoder_dim"), "decoder_depth": ("mae", "decoder_depth"),
    "decoder_heads": ("mae", "decoder_heads"), "norm_pix_loss": ("mae", "norm_pix_loss"),
    "mask_ratio": (None, "mask_ratio"),
}


@dataclass
class ObjectiveCfg:
    """What training learns from, and each objective's own settings in its section (objective.mae.*).
    supervised: the paper's classification of labelled images (multilabel on multi-label data: a sigmoid per
    class). distill: the same, with a teacher. mpp: the
    paper's masked patch prediction. mae: masked autoencoder. dino: self-distillation from an EMA teacher over
    multi-crop views. mpp, mae and dino read no labels."""

    name: Literal["supervised", "multilabel", "distill", "mpp", "mae", "dino", "segmentation", "detection"] = "supervised"
    # Closed-form few-shot accuracy at every evaluation, where the data has labels; None: [10] for
    # objectives that read no labels (watch the representation improve), none otherwise.
    fewshot: Optional[list[int]] = None
    # Weighted k-NN accuracy (this k) of the frozen features at every evaluation of an objective that reads
    # no labels, the training split as neighbours, where the data has labels; it then picks the best checkpoint.
    knn: Optional[int] = None
    mpp: MppCfg = field(default_factory=MppCfg)
    mae: MaeCfg = field(default_factory=MaeCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    dino: DinoCfg = field(default_factory=DinoCfg)


@dataclass
class DataCfg:
    dataset: str = "digits"  # registry name, image folder, save_to_disk directory, or tar shards (index or pattern)
    data_dir: Optional[str] = None  # local copy of a named set (folder or save_to_disk)
    train_split: Optional[str] = None  # None: the data set's own train split
    eval_split: Optional[str] = None  # None: the data set's own test/validation split
    num_workers: int = 2
    train_subset: Optional[int] = None  # use only the first N (shuffled, seeded) training images
    eval_subset: Optional[int] = None
    # Hold out this fraction of the training split (seeded, stratified) and evaluate on it instead
    # of the eval split: for choosing hyper-parameters without touching the test set.
    holdout: Optional[float] = None
    # tar shards (streamed): training samples, when the shards come by pattern without an index (sets
    # the epoch length), and the shuffle buffer each loader worker keeps
    num_samples: Optional[int] = None
    shuffle_buffer: int = 1000
    # multi-label: a CSV (rows path,labels; labels separated by ';') or JSON file of a folder's images and
    # their classes; a Hub or saved set is multi-label when its label column is a Sequence(ClassLabel).
    # task auto: multilabel when the data is, stated on the start line
    labels: Optional[str] = None
    task: Literal["auto", "single", "multilabel"] = "auto"
    # imbalanced classes: imbalance R subsamples the training split to a long tail (class 0 keeps as many images
    # as the smallest class has, the last 1/R of that; for experiments). balance: none, a class-balanced
    # sampler (a stream: class-balanced draws from its shuffle buffer), or loss_weights per class by
    # class_weights: inverse frequency or effective number (Cui et al., 2019, with effective_beta; tar
    # shards take the counts from their index)
    imbalance: Optional[float] = None
    balance: Literal["none", "sampler", "loss_weights"] = "none"
    class_weights: Literal["inverse", "effective"] = "inverse"
    effective_beta: float = 0.999
    # stream the training split (datasets' streaming=True for a Hub set; any other set streams its table)
    # instead of reading it whole first; tar shards always stream
    streaming: bool = False
    # task: detection. Training crops of crop_size (null: the model's img_size) after large-scale jitter:
    # the image resized to fit crop x U(resize_range) (ViTDet's 0.1-2.0), then flipped (hflip); evaluation
    # resizes the longer side to the crop size (the detector does, and maps its boxes back).
    # task: segmentation. Training crops of crop_size (null: the model's img_size) from images whose shorter
    # side is resized to crop x U(resize_range), flipped (hflip), colour-jittered (photometric); evaluation
    # resizes the shorter side to the crop size and slides crop-size windows every window_stride pixels
    # (null: the crop size), at eval_scales (several: multi-scale, probabilities averaged), with eval_flip
    crop_size: Optional[Union[int, list[int]]] = None
    resize_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    photometric: bool = True
    window_stride: Optional[int] = None
    eval_scales: list[float] = field(default_factory=lambda: [1.0])
    eval_flip: bool = False
    # augmentation (timm.data)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    hflip: float = 0.5
    randaugment: Optional[str] = None  # timm RandAugment spec, e.g. "rand-m9-mstd0.5"
    random_erasing: float = 0.0
    # DeiT III (Touvron et al., 2022): 3-Augment applies one of greyscale, solarization and Gaussian blur to
    # each image after the crop and flip; simple_crop replaces RandomResizedCrop by a resize and a random
    # crop with 4 px of reflect padding; color_jitter the brightness/contrast/saturation strength (0: off)
    three_augment: bool = False
    simple_crop: bool = False
    color_jitter: float = 0.0
    # repeated augmentation (DeiT, DeiT III: 3): each epoch draws n / k images, each k times, augmented
    # independently, the copies on different processes; 1: off
    repeated_augment: int = 1
    mixup: float = 0.0  # Mixup alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    label_smoothing: float = 0.0
    # the labels' loss: ce (softmax cross-entropy) or bce (DeiT III: a sigmoid per class, binary
    # cross-entropy against the one-hot or Mixup/CutMix targets; timm's BinaryCrossEntropy)
    loss: Literal["ce", "bce"] = "ce"
    # evaluation transform and normalisation
    crop_pct: float = 0.875
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    bad_images: Literal["error", "skip"] = "error"
    # pil: timm's PIL transforms in the loader workers (every augmentation). tensor: uint8 tensors,
    # crops by torchvision, normalised on the training device; on CUDA the workers send JPEG bytes
    # and the GPU decodes them (nvJPEG). auto: tensor unless RandAugment or random erasing is on.
    pipeline: Literal["auto", "pil", "tensor"] = "auto"
    # tensor pipeline, host decode: a JPEG whose crop (or eval resize) spans at least 2x, 4x or 8x the
    # output on both sides is decoded at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling), cropped and
    # resized from there; false: always decode at full size
    reduced_decode: bool = True
    # decode each image once, before its first batch, and read its pixels after (data/decoded_cache.py):
    # none; decoded (in memory within cache_budget, else memory-mapped under the datasets cache and kept for
    # later runs); auto (decoded when it fits in memory). Map-style sets only: tar shards and Hub streams stream.
    cache: Literal["none", "decoded", "auto"] = "none"
    cache_budget: Optional[int] = None  # bytes; null: a quarter of the machine's RAM


@dataclass
class OptimCfg:
    name: Literal["adamw", "adam", "sgd", "lamb"] = "adam"  # lamb: timm's LAMB (DeiT III)
    lr: float = 1e-3
    weight_decay: float = 0.1
    # DINO's schedule: weight decay from weight_decay at the first step to this at the last, on a cosine
    # (0.04 -> 0.4); None: constant
    weight_decay_end: Optional[float] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    eps: float = 1e-8
    clip_grad_norm: Optional[float] = 1.0  # global-norm clipping; None: off
    layer_decay: Optional[float] = None  # layer-wise lr decay (fine-tuning); None: off
    # the head's rate (a classifier's head, a segmenter's decoder) times this, on top of layer decay: mmseg's
    # decode-head lr_mult; on digits-seg the mask transformer's decoder wants 5e-4 (recipes/segment_digits_mask.yaml)
    head_lr_scale: float = 1.0


@dataclass
class ScheduleCfg:
    warmup_steps: int = 10_000
    decay: Literal["cosine", "linear", "poly", "constant", "step"] = "linear"  # poly: (1 - t)^0.9 (Segmenter, mmseg)
    min_lr: float = 0.0
    # decay step (detectron2's multi-step schedule): the rate is multiplied by step_factor at each of these
    # fractions of the run's steps (ViTDet's 100 epochs: [0.889, 0.963], 0.1)
    step_milestones: list[float] = field(default_factory=lambda: [0.889, 0.963])
    step_factor: float = 0.1


@dataclass
class TrainCfg:
    epochs: Optional[float] = None  # exactly one of epochs / steps
    steps: Optional[int] = None
    batch_size: int = 4096  # global batch: micro_batch_size x accumulation x world size
    micro_batch_size: Optional[int] = None  # per device and step; None: the whole batch at once
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    ema_decay: Optional[float] = None  # Polyak averaging of weights; None: off
    eval_every: Optional[int] = None  # steps between evaluations; None: once per epoch
    log_every: int = 50
    checkpoint_every: Optional[int] = None  # steps; None: at every evaluation
    keep: int = 1  # step checkpoints kept besides last and best
    max_bad_steps: int = 10  # non-finite losses in a row before the run stops
    linear_probe: bool = False  # train only the head; the backbone stays frozen
    # Under torchrun: ddp replicates the model; fsdp shards it (FSDP2 fully_shard per block + root)
    # and writes sharded checkpoints (torch.distributed.checkpoint).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward (memory)
    tensorboard: bool = False
    wandb: Optional[str] = None  # a W&B project name turns W&B logging on


@dataclass
class Recipe:
    name: str = "recipe"
    # segmentation: a decoder on the ViT, masks per pixel; detection: a detector on the ViT, boxes per object
    task: Literal["classification", "segmentation", "detection"] = "classification"
    model: ModelCfg = field(default_factory=ModelCfg)
    objective: ObjectiveCfg = field(default_factory=ObjectiveCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The fully resolved recipe as YAML text (what a run directory's recipe.yaml holds)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        return f"# fully resolved recipe written by vitcli\n{text}"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


SECTIONS = {f.name: f for f in dataclasses.fields(Recipe)}
TOP_LEVEL = ("name", "task")  # the recipe's plain settings; everything else is section.field


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (or only defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    name = "recipe"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            problem = "is a folder; pass" if path.is_dir() else "does not exist. Pass"
            raise VitError(f"Recipe file '{path}' {problem} the path of a YAML recipe, e.g. recipes/quickstart.yaml.")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise (path_error(e, path, "recipe", reading=True) if isinstance(e, OSError)
                   else VitError(f"recipe {path} is not a text file ({e}). Pass a YAML recipe.")) from e
        raw = parse_yaml(text, str(path))
        name = path.stem
    return recipe_from_dict(raw, overrides, default_name=name)


def parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VitError(f"{where} is not valid YAML{at}: {problem}. Fix the file's syntax.") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise VitError(f"{where} must be a YAML mapping with sections {', '.join(SECTIONS)}; got {type(raw).__name__}.")
    return raw


def recipe_from_dict(raw: dict[str, Any], overrides=(), default_name: str = "recipe") -> Recipe:
    raw = copy.deepcopy(raw)
    parsed = [(item, *parse_override(item)) for item in overrides]
    objective = raw.get("objective") if isinstance(raw.get("objective"), dict) else {}
    name = next((v for _, k, v in reversed(parsed) if k == "objective.name"), objective.get("name", "supervised"))
    if objective:
        raw["objective"] = nest_legacy_objective(objective, name)
    for item, key, value in parsed:
        path = key.split(".")
        if len(path) == 1:
            if key not in TOP_LEVEL:
                raise VitError(f"--set {item}: the key must be section.field (e.g. optim.lr=3e-4) or one of "
                               f"{', '.join(TOP_LEVEL)}; sections: {', '.join(s for s in SECTIONS if s not in TOP_LEVEL)}.")
            raw[key] = value
            continue
        if path[0] not in SECTIONS or path[0] in TOP_LEVEL:
            sections = ", ".join(s for s in SECTIONS if s not in TOP_LEVEL)
            raise VitError(f"--set {item}: unknown section '{path[0]}'.{did_you_mean(path[0], SECTIONS)} Sections: {sections}.")
        if path[0] == "objective" and len(path) == 2 and path[1] in LEGACY_OBJECTIVE_KEYS:
            path = ["objective", *_legacy_path(path[1], value, name)]
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    raw.setdefault("name", default_name)
    recipe = build_dataclass(Recipe, raw, "recipe")
    validate(recipe)
    return recipe


def nest_legacy_objective(section: dict[str, Any], name: str) -> dict[str, Any]:
    """An objective section with earlier versions' flat keys (mask_ratio, decoder_dim, mpp_target ...) moved
    into the sections of today's layout, so their recipes and run directories still load."""
    out = {k: v for k, v in section.items() if k not in LEGACY_OBJECTIVE_KEYS}
    for key in LEGACY_OBJECTIVE_KEYS.keys() & section.keys():
        path = _legacy_path(key, section[key], name)
        if not path:
            continue
        sub, leaf = path
        if not isinstance(out.get(sub), dict):
            out[sub] = {}
        if leaf in out[sub]:
            raise VitError(f"'objective.{key}' and 'objective.{sub}.{leaf}' say the same thing; keep the second.")
        out[sub][leaf] = section[key]
    return out


def _legacy_path(key: str, value: Any, name: str) -> tuple[str, ...]:
    sub, leaf = LEGACY_OBJECTIVE_KEYS[key]
    if sub is not None:
        return sub, leaf
    if name in ("mpp", "mae"):
        return name, leaf
    if value is None:  # a resolved supervised recipe of earlier versions: nothing to move
        return ()
    raise VitError(f"'objective.{key}' belongs to an objective's section: write objective.mae.{leaf} or objective.mpp.{leaf}.")


def parse_override(item: str) -> tuple[str, Any]:
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise VitError(f"--set '{item}' must look like section.key=value, e.g. --set optim.lr=3e-4.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def build_dataclass(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise VitError(f"'{where}' must be a mapping of keys to values; got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            full, scope = (key, "the recipe's top level") if where == "recipe" else (f"{where}.{key}", f"'{where}'")
            raise VitError(f"Unknown recipe key '{full}'.{did_you_mean(str(key), fields)} Valid keys in {scope}: {', '.join(fields)}.")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, key if where == "recipe" else f"{where}.{key}")
        else:
            kwargs[key] = coerce(value, hint, f"{where}.{key}" if where != "recipe" else key)
    return cls(**kwargs)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check value against a type hint; convert the safe cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except VitError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else VitError(f"'{where}' has the wrong type: {value!r} ({_type_name(value)}); expected {_hint_name(hint)}.")
    if origin is Literal:
        if value not in args:
            raise VitError(f"'{where}' must be one of {', '.join(map(str, args))}; got {value!r}.{did_you_mean(str(value), map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise VitError(f"'{where}' must be a list of {_hint_name(args[0])}; got {value!r}.")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Any:
        return value
    elif hint is dict:  # free-form settings passed through by name (model.detector_args)
        if isinstance(value, dict):
            return dict(value)
    raise VitError(f"'{where}' has the wrong type: {value!r} ({_type_name(value)}); expected {_hint_name(hint)}.")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _hint_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_hint_name(args[0])}"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


# ---------------------------------------------------------------------------------------------
# Range checks: everything that typing alone cannot say


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise VitError(f"'{where}' {message}")


def validate(r: Recipe) -> None:
    m, d, o, s, t, j = r.model, r.data, r.optim, r.schedule, r.train, r.objective
    _check(m.num_classes is None or m.num_classes >= 0, "model.num_classes", f"must be >= 0; got {m.num_classes}.")
    if isinstance(m.img_size, list):
        _check(len(m.img_size) == 2 and all(v > 0 for v in m.img_size), "model.img_size", f"must be one size or [height, width] > 0; got {m.img_size}.")
    else:
        _check(m.img_size is None or m.img_size > 0, "model.img_size", f"must be > 0; got {m.img_size}.")
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        v = getattr(m, key)
        _check(v is None or v > 0, f"model.{key}", f"must be > 0; got {v}.")
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        v = getattr(m, key)
        _check(0.0 <= v < 1.0, f"model.{key}", f"must be in [0, 1); got {v}.")
    _check(m.class_token is not False or m.global_pool in ("avg", "map"), "model.class_token",
           "false needs model.global_pool: avg or map (there is no class token to pool).")
    _check(m.decoder_layers >= 1, "model.decoder_layers", f"must be >= 1; got {m.decoder_layers}.")
    _check(all(v is None or v > 0 for v in (m.decoder_dim, m.decoder_heads)), "model.decoder_dim",
           f"and model.decoder_heads must be > 0; got {m.decoder_dim}, {m.decoder_heads}.")
    _check(m.decoder_dim is None or m.decoder_heads is None or m.decoder_dim % m.decoder_heads == 0, "model.decoder_dim",
           f"({m.decoder_dim}) must be divisible by model.decoder_heads ({m.decoder_heads}).")
    _check(0.0 <= m.decoder_dropout < 1.0, "model.decoder_dropout", f"must be in [0, 1); got {m.decoder_dropout}.")
    _check(m.window_size >= 0, "model.window_size", f"must be >= 0 (0: global attention); got {m.window_size}.")
    _check(m.pyramid_channels > 0, "model.pyramid_channels", f"must be > 0; got {m.pyramid_channels}.")
    _check(len(m.pyramid_scales) >= 1 and all(v in (4.0, 2.0, 1.0, 0.5) for v in m.pyramid_scales), "model.pyramid_scales",
           f"must be some of 4, 2, 1, 0.5 (ViTDet's), finest first; got {m.pyramid_scales}.")
    _check(0.0 <= m.score_thresh < 1.0, "model.score_thresh", f"must be in [0, 1); got {m.score_thresh}.")
    _check(m.detections_per_img > 0, "model.detections_per_img", f"must be > 0; got {m.detections_per_img}.")
    crop = d.crop_size if isinstance(d.crop_size, list) else [d.crop_size] * 2 if d.crop_size is not None else [1, 1]
    _check(len(crop) == 2 and all(v > 0 for v in crop), "data.crop_size", f"must be one size or [height, width] > 0; got {d.crop_size}.")
    _check(len(d.resize_range) == 2 and 0 < d.resize_range[0] <= d.resize_range[1], "data.resize_range",
           f"must be [min, max] with 0 < min <= max; got {d.resize_range}.")
    _check(d.window_stride is None or d.window_stride > 0, "data.window_stride", f"must be > 0; got {d.window_stride}.")
    _check(len(d.eval_scales) >= 1 and all(v > 0 for v in d.eval_scales), "data.eval_scales",
           f"must be one or more scales > 0 (e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]); got {d.eval_scales}.")

    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0; got {d.num_workers}.")
    _check(d.cache_budget is None or d.cache_budget >= 0, "data.cache_budget", f"is bytes >= 0 (null: a quarter of the RAM); got {d.cache_budget}.")
    for key in ("train_subset", "eval_subset"):
        v = getattr(d, key)
        _check(v is None or v > 0, f"data.{key}", f"must be > 0; got {v}.")
    _check(d.holdout is None or 0 < d.holdout < 1, "data.holdout", f"is a fraction in (0, 1); got {d.holdout}.")
    _check(d.num_samples is None or d.num_samples > 0, "data.num_samples", f"must be > 0; got {d.num_samples}.")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1 (1: no shuffling within shards); got {d.shuffle_buffer}.")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
           f"must be [min, max] with 0 < min <= max <= 1; got {d.crop_scale}.")
    _check(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", f"must be [min, max] with 0 < min <= max; got {d.crop_ratio}.")
    for key in ("hflip", "random_erasing"):
        v = getattr(d, key)
        _check(0.0 <= v <= 1.0, f"data.{key}", f"is a probability in [0, 1]; got {v}.")
    _check(0.0 <= d.label_smoothing < 1.0, "data.label_smoothing", f"must be in [0, 1); got {d.label_smoothing}.")
    _check(d.imbalance is None or d.imbalance >= 1, "data.imbalance", f"is a max:min ratio >= 1; got {d.imbalance}.")
    _check(0 < d.effective_beta < 1, "data.effective_beta", f"must be in (0, 1); got {d.effective_beta}.")
    _check(d.repeated_augment >= 1, "data.repeated_augment", f"is how many times each image repeats (1: off); got {d.repeated_augment}.")
    _check(0.0 <= d.color_jitter <= 1.0, "data.color_jitter", f"is a strength in [0, 1]; got {d.color_jitter}.")
    _check(m.init_values is None or m.init_values > 0, "model.init_values", f"must be > 0 (or null for no LayerScale); got {m.init_values}.")
    _check(d.mixup >= 0 and d.cutmix >= 0, "data.mixup", "and data.cutmix are Beta alphas and must be >= 0.")
    _check(0.0 < d.crop_pct <= 1.0, "data.crop_pct", f"must be in (0, 1]; got {d.crop_pct}.")
    _check(len(d.mean) == len(d.std) == m.in_chans, "data.mean", f"and data.std need one value per input channel ({m.in_chans}).")
    _check(all(v > 0 for v in d.std), "data.std", f"values must be > 0; got {d.std}.")
    pil_only = [k for k in ("randaugment", "random_erasing", "three_augment", "simple_crop", "color_jitter") if getattr(d, k)]
    _check(d.pipeline != "tensor" or not pil_only, "data.pipeline",
           f"'tensor' cannot run data.{' or data.'.join(pil_only)} (timm implements them on PIL images only); "
           "set data.pipeline: pil (or auto, which picks pil for them).")

    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number; got {o.lr}.")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {o.weight_decay}.")
    _check(o.weight_decay_end is None or (o.weight_decay_end >= 0 and o.weight_decay > 0), "optim.weight_decay_end",
           f"schedules a weight decay that starts at optim.weight_decay (> 0) and must be >= 0; got {o.weight_decay_end} "
           f"from {o.weight_decay}.")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two numbers in [0, 1); got {o.betas}.")
    _check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1); got {o.momentum}.")
    _check(o.eps > 0, "optim.eps", f"must be > 0; got {o.eps}.")
    _check(o.clip_grad_norm is None or o.clip_grad_norm > 0, "optim.clip_grad_norm", f"must be > 0 (or null to turn clipping off); got {o.clip_grad_norm}.")
    _check(o.layer_decay is None or 0 < o.layer_decay <= 1, "optim.layer_decay", f"must be in (0, 1]; got {o.layer_decay}.")

    _check(s.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0; got {s.warmup_steps}.")
    _check(0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in [0, optim.lr]; got {s.min_lr}.")
    _check(all(0 < m < 1 for m in s.step_milestones) and s.step_milestones == sorted(s.step_milestones), "schedule.step_milestones",
           f"must be increasing fractions of the run in (0, 1); got {s.step_milestones}.")
    _check(0 < s.step_factor <= 1, "schedule.step_factor", f"must be in (0, 1]; got {s.step_factor}.")

    _check((t.epochs is None) != (t.steps is None), "train.epochs", "and train.steps: set exactly one of them.")
    _check(t.epochs is None or t.epochs > 0, "train.epochs", f"must be > 0; got {t.epochs}.")
    _check(t.steps is None or t.steps > 0, "train.steps", f"must be > 0; got {t.steps}.")
    _check(t.batch_size > 0, "train.batch_size", f"must be > 0; got {t.batch_size}.")
    if t.micro_batch_size is not None:
        _check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0; got {t.micro_batch_size}.")
        _check(t.batch_size % t.micro_batch_size == 0, "train.micro_batch_size", f"({t.micro_batch_size}) must divide train.batch_size ({t.batch_size}).")
    _check(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", f"must be in (0, 1); got {t.ema_decay}.")
    _check(t.ema_decay is None or t.strategy != "fsdp", "train.ema_decay",
           "is not supported with train.strategy: fsdp yet; use strategy ddp or set ema_decay: null.")
    _check(t.eval_every is None or t.eval_every > 0, "train.eval_every", f"must be > 0; got {t.eval_every}.")
    _check(t.log_every > 0, "train.log_every", f"must be > 0; got {t.log_every}.")
    _check(t.checkpoint_every is None or t.checkpoint_every > 0, "train.checkpoint_every", f"must be > 0; got {t.checkpoint_every}.")
    _check(t.keep >= 0, "train.keep", f"must be >= 0; got {t.keep}.")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1; got {t.max_bad_steps}.")
    validate_objective(j, r)


def validate_objective(j: ObjectiveCfg, r: Recipe) -> None:
    """Each objective's section, whichever is named (the defaults are valid, so a typo is caught early)."""
    mpp, mae, kd = j.mpp, j.mae, j.distill
    for where, ratio in (("mpp", mpp.mask_ratio), ("mae", mae.mask_ratio)):
        _check(0 < ratio < 1, f"objective.{where}.mask_ratio", f"must be in (0, 1); got {ratio}.")
    _check(1 <= mpp.bits <= 8, "objective.mpp.bits", f"must be 1 to 8 bits per channel; got {mpp.bits}.")
    _check(len(mpp.replace) == 3 and all(v >= 0 for v in mpp.replace) and math.isclose(sum(mpp.replace), 1.0),
           "objective.mpp.replace", f"is [mask, random patch, unchanged] shares summing to 1; got {mpp.replace}.")
    _check(mae.decoder_dim > 0 and mae.decoder_depth > 0 and mae.decoder_heads > 0, "objective.mae.decoder_dim",
           f"decoder_depth and decoder_heads must be > 0; got {mae.decoder_dim}, {mae.decoder_depth}, {mae.decoder_heads}.")
    _check(mae.decoder_dim % mae.decoder_heads == 0, "objective.mae.decoder_dim",
           f"({mae.decoder_dim}) must be divisible by objective.mae.decoder_heads ({mae.decoder_heads}).")
    _check(0 <= kd.alpha <= 1, "objective.distill.alpha", f"weighs the teacher's term against the labels' and must be in [0, 1]; got {kd.alpha}.")
    _check(kd.tau > 0, "objective.distill.tau", f"is a temperature and must be > 0; got {kd.tau}.")
    _check(j.name != "distill" or kd.teacher is not None, "objective.distill.teacher",
           "is needed for objective distill: a run directory, a checkpoint file or timm:ARCH "
           "(e.g. --set objective.distill.teacher=runs/cnn_teacher_digits).")
    _check(all(k >= 1 for k in j.fewshot or []), "objective.fewshot", f"takes images per class >= 1; got {j.fewshot}.")
    _check(j.knn is None or j.knn >= 1, "objective.knn", f"is a number of neighbours >= 1 (DINO's: 20); got {j.knn}.")
    validate_dino(j.dino)


def validate_dino(d: DinoCfg) -> None:
    _check(min(d.out_dim, d.hidden_dim, d.bottleneck_dim) > 0 and d.head_layers >= 1, "objective.dino.out_dim",
           f"hidden_dim, bottleneck_dim and head_layers must be positive; got {d.out_dim}, {d.hidden_dim}, "
           f"{d.bottleneck_dim}, {d.head_layers}.")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        _check(getattr(d, key) > 0, f"objective.dino.{key}", f"is a temperature and must be > 0; got {getattr(d, key)}.")
    _check(0 <= d.center_momentum < 1, "objective.dino.center_momentum", f"must be in [0, 1); got {d.center_momentum}.")
    _check(0 <= d.momentum_teacher <= 1, "objective.dino.momentum_teacher", f"must be in [0, 1]; got {d.momentum_teacher}.")
    for key in ("global_crops_scale", "local_crops_scale", "ibot_mask_ratio"):
        low_high = getattr(d, key)
        _check(len(low_high) == 2 and 0 < low_high[0] <= low_high[1] <= 1, f"objective.dino.{key}",
               f"is [low, high] with 0 < low <= high <= 1; got {low_high}.")
    _check(d.local_crops_number >= 0 and d.local_crops_size > 0, "objective.dino.local_crops_number",
           f"must be >= 0 and local_crops_size > 0; got {d.local_crops_number}, {d.local_crops_size}.")
    for key in ("koleo_weight", "ibot_weight", "freeze_last_layer", "warmup_teacher_temp_epochs"):
        _check(getattr(d, key) >= 0, f"objective.dino.{key}", f"must be >= 0; got {getattr(d, key)}.")
    for key in ("color_jitter", "grayscale", "solarize"):
        _check(0 <= getattr(d, key) <= 1, f"objective.dino.{key}", f"is a probability in [0, 1]; got {getattr(d, key)}.")
    _check(0 <= d.ibot_mask_probability <= 1, "objective.dino.ibot_mask_probability",
           f"must be in [0, 1]; got {d.ibot_mask_probability}.")
