"""The models under test and the one step each is timed on.

train: the trainer's own step (engine.step.train_step on the objective: supervised cross-entropy,
       distill (with the teacher's forward), mpp / mae, whose masking the step includes, or dino on 2 + 10
       views, the teacher's forward, centring and EMA update included): autocast
       forward -> loss -> backward -> unscale -> global-norm clip at 1.0 -> AdamW step (timm's, fused, no
       decay on norms, biases and embeddings; engine.step.build_step) -> zero_grad, with bf16 autocast
       when asked. So the bench times exactly what `vit pretrain` runs per step.
infer: forward under `torch.inference_mode` (and autocast), model in eval mode.

`--compare timm` builds timm's model of the same configuration (the timm architecture of the model's
family, e.g. vit_small_patch14_reg4_dinov2, given our sizes) and loads our initial weights into it (the
keys are the same), so both compute the same function from the same start.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import copy
import dataclasses
import itertools

import torch
from torch import nn

from vitcli.engine.step import build_step, train_step
from vitcli.errors import VitError
from vitcli.objectives import Distillation, Inputs, build_objective
from vitcli.objectives.teacher import Teacher
from vitcli.models import create_model
from vitcli.models.config import ModelConfig
from vitcli.recipe import DinoCfg, MaeCfg, ObjectiveCfg, OptimCfg


@dataclass
class ModelUnderTest:
    """A model with its inputs, optimizer and step functions.

    `step` is what is timed (compiled when asked); `eager_step` runs the same work on the eager model
    (FLOPs and CPU memory are measured on it).
    """

    label: str  # "vitcli" or "timm"
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    inputs: tuple  # (images, labels); images: a tensor, or a tuple of views
    step: Callable[[], None]
    eager_step: Callable[[], None]

    @property
    def input_tensors(self) -> list[torch.Tensor]:
        """The batch's tensors (a multi-view batch holds one per view)."""
        return [t for x in self.inputs for t in (x if isinstance(x, tuple) else (x,))]

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def resident_bytes(self) -> int:
        """Bytes held between steps: parameters, gradients, optimizer state and the input batch."""
        tensors = list(self.model.parameters()) + [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [b for b in self.model.buffers()] + self.input_tensors
        if self.optimizer is not None:
            tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        seen, total = set(), 0
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def timm_equivalent(cfg: ModelConfig) -> tuple[nn.Module, str]:
    """timm's model for our config: (model, the timm architecture it is built from, with our sizes)."""
    import timm

    from vitcli.models.formats.timm import timm_architecture

    name, args = timm_architecture(cfg)
    drops = dict(drop_rate=cfg.drop_rate, pos_drop_rate=cfg.drop_rate, proj_drop_rate=cfg.drop_rate,
                 attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate)
    return timm.create_model(name, pretrained=False, **args, **drops), name


def build_models(cfg: ModelConfig, *, compare: str | None, seed: int = 0) -> list[tuple[str, str, nn.Module]]:
    """[(label, name, model)] for vitcli's model and, with compare='timm', timm's with the same weights."""
    torch.manual_seed(seed)
    ours = create_model(cfg)
    out = [("vitcli", cfg.name, ours)]
    if compare == "timm":
        theirs, name = timm_equivalent(cfg)
        try:
            theirs.load_state_dict(ours.state_dict(), strict=True)
        except RuntimeError as e:  # a config we translate wrongly: a bug, not a user mistake
            raise RuntimeError(f"timm's {name} does not have vitcli's {cfg.name} parameters: {e}") from e
        out.append(("timm", name, theirs))
    elif compare is not None:
        raise VitError(f"--compare {compare!r}: the only model library to compare with is 'timm'.")
    return out


def bench_objective(name: str, model: nn.Module, num_classes: int) -> nn.Module:
    """The objective a bench step trains: supervised classification, or mpp / mae with their defaults
    (MAE's decoder 512 wide and 8 deep; for an encoder narrower than 512: its own width and heads, 2 deep),
    or distill in logit mode from a frozen copy of the model (the teacher's forward pass is in the step)."""
    if name == "distill":
        teacher = Teacher(copy.deepcopy(model).eval().requires_grad_(False), "a copy of the student", None, None)
        return Distillation(model, teacher, nn.CrossEntropyLoss(), num_classes, mode="logit")
    cfg = ObjectiveCfg(name=name)
    if name == "dino":  # DINO's defaults with its best multi-crop (2 x 224 + 10 x 96 for a /16 model at 224)
        cfg.dino = DinoCfg(local_crops_number=BENCH_LOCAL_CROPS, local_crops_size=dino_local_size(model))
    if name == "mae" and model.embed_dim < 512:
        cfg.mae = MaeCfg(decoder_dim=model.embed_dim, decoder_heads=model.blocks[0].attn.num_heads, decoder_depth=2)
    return build_objective(cfg, model, Inputs(num_classes=num_classes))


BENCH_LOCAL_CROPS = 10


def dino_local_size(model: nn.Module) -> int:
    """DINO's local crop: 96/224 of the resolution, a whole number of patches (at least one)."""
    patch, size = model.patch_embed.patch_size[0], min(model.patch_embed.img_size)
    return max(patch, round(size * 96 / 224 / patch) * patch)


def prepare(label: str, name: str, model: nn.Module, cfg: ModelConfig, *, mode: str, batch_size: int, device: torch.device,
            amp_dtype: torch.dtype | None, compile: bool, seed: int = 0, objective: str = "supervised") -> ModelUnderTest:
    """Move the model to device and build its step; inputs are a fixed random batch on the device."""
    model.to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = cfg.img_size
    images = torch.randn(batch_size, cfg.in_chans, h, w, generator=g).to(device)
    labels = torch.randint(0, max(cfg.num_classes, 1), (batch_size,), generator=g).to(device)
    if objective == "dino":  # its batch is the views of each image: 2 global crops, then the local ones
        local = dino_local_size(model)
        images = tuple([images, torch.randn(batch_size, cfg.in_chans, h, w, generator=g).to(device)] +
                       [torch.randn(batch_size, cfg.in_chans, local, local, generator=g).to(device)
                        for _ in range(BENCH_LOCAL_CROPS)])
    if mode == "infer":
        model.eval()
        amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
        forward = torch.compile(model) if compile else model

        def make_infer(fn):
            def step() -> None:
                with torch.inference_mode(), amp():
                    fn(images)
            return step

        return ModelUnderTest(label, name, model, None, (images, labels), make_infer(forward), make_infer(model))

    model.train()
    # The trainer's own step and optimizer settings (timm's AdamW, decay-free norms/biases/embeddings, fused).
    optim = OptimCfg(name="adamw", lr=1e-4, weight_decay=0.05, clip_grad_norm=1.0)
    trained = bench_objective(objective, model, max(cfg.num_classes, 1)).to(device)
    timed = build_step(trained, optim, device, amp_dtype=amp_dtype, compile=compile)
    eager = dataclasses.replace(timed, module=trained)  # the same optimizer, uncompiled
    batches = itertools.repeat((images, labels))

    def make_train(parts):
        def step() -> None:
            train_step(parts, batches, optim.lr, 1)
        return step

    # the trained module: the model, and for mpp / mae the objective's own parts (decoder, head)
    return ModelUnderTest(label, name, trained.optimized(), timed.optimizer, (images, labels),
                          make_train(timed), make_train(eager))
