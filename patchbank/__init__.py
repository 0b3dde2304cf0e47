"""patchbank: training data, patch geometry and banks of training patches (no diffusion time here)."""

from .bank import BankError, BankSpec, PatchBank, bucket_id
from .base import Bank
from .clusters import ClusteredPatches, cluster_patches
from .datasets import (
    DATASETS_ENV,
    ImageData,
    load_dataset,
    load_folder,
    load_npz,
    random_images,
    resize_uint8,
    to_model_range,
    two_image,
)
from .geometry import BucketKey, boundary_class, dictionary_groups, extract_patches, pad_images, patches_at
from .index import Neighbours, PatchIndex, SearchResult, merge_neighbours, torch_search
from .memory import MemoryBank
from .sharded import ShardedBank, open_bank
from .tables import Chunk, UniquePatches

__all__ = [
    "Bank",
    "BankError",
    "BankSpec",
    "Neighbours",
    "PatchBank",
    "ShardedBank",
    "open_bank",
    "PatchIndex",
    "SearchResult",
    "bucket_id",
    "merge_neighbours",
    "torch_search",
    "DATASETS_ENV",
    "BucketKey",
    "Chunk",
    "ClusteredPatches",
    "ImageData",
    "MemoryBank",
    "UniquePatches",
    "boundary_class",
    "cluster_patches",
    "dictionary_groups",
    "extract_patches",
    "load_dataset",
    "load_folder",
    "load_npz",
    "pad_images",
    "patches_at",
    "random_images",
    "resize_uint8",
    "to_model_range",
    "two_image",
]
