"""A Segmenter's checkpoint: one safetensors file of `encoder.*` (the ViT under timm's keys) and `decoder.*`
weights; its metadata describes the encoder (model, model_args) as any vitcli checkpoint does, with
`task: segmentation`, the decoder's settings, the class count and names. Reading it rebuilds both, the
encoder through the same adaptation as any ViT (another resolution resamples its position table)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from torch import nn

from vitcli.errors import VitError
from vitcli.io.meta import CheckpointMeta
from vitcli.models.load import LoadedCheckpoint
from vitcli.models.segmenter import Segmenter, make_decoder


def segmenter_meta(model: Segmenter, base: CheckpointMeta | None, **training: Any) -> CheckpointMeta:
    from vitcli.models.adapt import meta_for_model

    names = base.class_names if base is not None and base.class_names and len(base.class_names) == model.num_classes else None
    encoder = meta_for_model(model.encoder, base.replace(class_names=None) if base is not None else None, **training)
    return encoder.replace(num_classes=model.num_classes, class_names=names, task="segmentation",
                           decoder=dict(model.decoder.settings))


def split_weights(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(encoder's, decoder's) weights, their prefixes dropped."""
    encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    decoder = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
    return encoder, decoder


def segmenter_from_checkpoint(ck: LoadedCheckpoint, *, num_classes: int | None = None, **encoder_options: Any
                              ) -> tuple[Segmenter, LoadedCheckpoint]:
    """The Segmenter a checkpoint holds (eval mode); `num_classes` other than its own: a new decoder of the
    same kind; `encoder_options` (img_size, patch_size, model_args ...) adapt the encoder as model_from_checkpoint does."""
    from vitcli.models.adapt import model_from_checkpoint

    settings = dict(ck.meta.decoder or {})
    kind = settings.pop("kind", None)
    if kind not in ("linear", "mask_transformer"):
        raise VitError(f"{ck.source} is a segmentation checkpoint without a decoder vitcli knows ({kind!r}); write it again with vitcli.")
    encoder_sd, decoder_sd = split_weights(ck.state_dict)
    encoder_ck = replace(ck, state_dict=encoder_sd, meta=ck.meta.replace(task=None, decoder=None, num_classes=0, class_names=None))
    encoder, read = model_from_checkpoint(encoder_ck, **encoder_options)
    decoder = make_decoder(kind, encoder.embed_dim, ck.meta.num_classes, **settings)
    missing, unexpected = decoder.load_state_dict(decoder_sd, strict=False)
    if missing or unexpected:
        raise VitError(f"{ck.source}: the decoder's weights do not fit a {kind} decoder (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}). The file is damaged or was written by another program.")
    model = Segmenter(encoder, decoder, ck.meta.num_classes)
    notes = list(read.notes)
    if num_classes is not None and num_classes != model.num_classes:
        notes.append(f"decoder replaced: {model.num_classes} -> {num_classes} classes")
        model.reset_classifier(num_classes)
    return model.eval(), replace(ck, notes=notes)


def is_segmenter(model: nn.Module) -> bool:
    return isinstance(model, Segmenter)
