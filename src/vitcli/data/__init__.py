"""Data: named sets / local folders -> ImageSet -> timm transforms -> reproducible batches.

    train_set = build(SourceSpec.of(recipe.data), "train", img_size=224, seed=recipe.train.seed)
    tf = build_transform(TransformSpec.of(recipe.data), (224, 224), train=True)
    loader = make_loader(train_set, tf, LoaderSpec.training(batch_size, seed=seed))
"""

from vitcli.data.balance import class_counts
from vitcli.data.loader import BatchDataset, EpochBatchSampler, Loader, make_loader
from vitcli.data.registry import ALIASES, REGISTRY, DatasetSpec, get_spec, list_datasets, lookup
from vitcli.data.hub_stream import HubSet
from vitcli.data.stream_loader import StreamLoader, first_images, is_streamed, make_stream_loader
from vitcli.data.shard_sets import ShardSet, stream_split
from vitcli.data.sources import ImageSet, build, label_array, load_split, take_subset
from vitcli.data.tensor_transforms import TensorTransform
from vitcli.data.specs import CacheSpec, LoaderSpec, MixSpec, SourceSpec, TransformSpec
from vitcli.data.transforms import build_mixup, build_train_loss, build_transform

__all__ = [
    "ALIASES",
    "REGISTRY",
    "BatchDataset",
    "CacheSpec",
    "DatasetSpec",
    "EpochBatchSampler",
    "ImageSet",
    "HubSet",
    "StreamLoader",
    "ShardSet",
    "MixSpec",
    "SourceSpec",
    "TransformSpec",
    "Loader",
    "TensorTransform",
    "build",
    "build_mixup",
    "build_train_loss",
    "build_transform",
    "class_counts",
    "label_array",
    "first_images",
    "get_spec",
    "list_datasets",
    "load_split",
    "lookup",
    "make_loader",
    "LoaderSpec",
    "is_streamed",
    "make_stream_loader",
    "stream_split",
    "take_subset",
]
