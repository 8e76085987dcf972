"""Data: named sets / local folders -> ImageSet -> timm transforms -> reproducible batches.

    train_set = build(recipe.data, "train", img_size=224, seed=recipe.train.seed)
    tf = build_transform(recipe.data, (224, 224), train=True)
    loader = make_loader(train_set, tf, batch_size, shuffle=True, drop_last=True, seed=seed)
"""

from vitcli.data.loader import BatchDataset, EpochBatchSampler, Loader, make_loader, preserved_rng, seed_all
from vitcli.data.registry import ALIASES, REGISTRY, DatasetSpec, get_spec, list_datasets, lookup
from vitcli.data.sources import ImageSet, build, load_split, take_subset
from vitcli.data.tensor_transforms import TensorTransform
from vitcli.data.transforms import build_mixup, build_train_loss, build_transform, uses_tensor_pipeline

__all__ = [
    "ALIASES",
    "REGISTRY",
    "BatchDataset",
    "DatasetSpec",
    "EpochBatchSampler",
    "ImageSet",
    "Loader",
    "TensorTransform",
    "build",
    "build_mixup",
    "build_train_loss",
    "build_transform",
    "get_spec",
    "list_datasets",
    "load_split",
    "lookup",
    "make_loader",
    "preserved_rng",
    "seed_all",
    "take_subset",
    "uses_tensor_pipeline",
]
