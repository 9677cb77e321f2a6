"""Prepared datasets as the engine consumes them: both splits opened, and their batches.

Training batches split the global batch over the DDP ranks (``train.batch_size`` is the global
batch, as in the official main.py where the per-GPU batch times the world size is the batch the
learning rate is scaled by); evaluation batches are the deterministic centre-crop of the official
``datasets.build_transform``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deit_repro.config import EvalCfg, TrainCfg
from deit_repro.core.batches import (
    ImageDataset,
    LoaderBatches,
    TensorAugment,
    TrainBatches,
    eval_tensor,
    timm_eval_transform,
    timm_train_transform,
)
from deit_repro.data.store import load_prepared
from deit_repro.errors import ConfigError


@dataclass
class Dataset:
    """A prepared dataset's train and test splits, as the engine consumes them."""

    path: Path
    train: Any
    test: Any
    classes: list[str]
    content_hash: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        shape = self.test.manifest.get("image_shape")
        return int(shape[0]) if shape else 3

    @property
    def in_memory(self) -> bool:
        return getattr(self.train, "images", None) is not None


def open_dataset(path: Path, *, need_train: bool = True) -> Dataset:
    """Load a prepared dataset (both splits), each data file checked against the sha256 of its
    manifest; errors name the path, the file and the prepare command. ``need_train=False``
    (evaluation) also opens a dataset prepared with its test split alone (``prepare --splits
    test``); its ``train`` is then None."""
    # Shape and class-count checks cannot see two swapped labels or one changed pixel; the hash
    # is computed on the bytes being loaded, so it costs no second read.
    test = load_prepared(path, "test", verify=True)
    only_test = not need_train and "train" not in test.manifest["splits"]
    train = None if only_test else load_prepared(path, "train", verify=True)
    return Dataset(
        path=Path(path),
        train=train,
        test=test,
        classes=list(test.classes),
        content_hash=test.manifest["content_hash"],
    )


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """The batch of one process: ``train.batch_size`` is the global batch."""
    if batch_size % world_size:
        raise ConfigError(
            f"params key 'batch_size' = {batch_size} is not divisible by the "
            f"{world_size} processes",
            "choose a multiple of the process count",
        )
    return batch_size // world_size


def train_batches(
    ds: Dataset,
    recipe: TrainCfg,
    *,
    img_size: int,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    device: torch.device = torch.device("cpu"),
):
    """This process's training batches (global batch split over ranks); the ``device``
    pipeline makes them on ``device``, the others on the CPU."""
    per_rank = per_rank_batch(recipe.batch_size, world_size)
    pipeline = recipe.aug.pipeline_on(gpu=device.type == "cuda")
    if pipeline == "device":
        from deit_repro.core.device_augment import DeviceAugment, DeviceBatches, EncodedImages

        return DeviceBatches(
            EncodedImages(
                files=getattr(ds.train, "files", None),
                images=getattr(ds.train, "images", None),
                labels=ds.train.labels,
            ),
            DeviceAugment(recipe.aug, img_size, ds.in_chans, device),
            batch_size=per_rank,
            seed=seed,
            in_chans=ds.in_chans,
            repeats=recipe.repeated_aug,
            world_size=world_size,
            rank=rank,
            num_workers=recipe.num_workers,
        )
    if pipeline == "tensor":
        if not ds.in_memory:
            raise ConfigError(
                f"aug.pipeline 'tensor' needs an in-memory dataset but {ds.path} is a file list",
                "use aug.pipeline: timm for image trees",
            )
        return TrainBatches(
            ds.train.images,
            ds.train.labels,
            per_rank,
            TensorAugment(recipe.aug, img_size, ds.in_chans),
            seed,
            recipe.repeated_aug,
            world_size,
            rank,
        )
    data = ImageDataset(
        timm_train_transform(recipe.aug, img_size, ds.in_chans),
        images=getattr(ds.train, "images", None),
        files=getattr(ds.train, "files", None),
        labels=ds.train.labels,
    )
    return LoaderBatches(
        data,
        batch_size=per_rank,
        seed=seed,
        repeats=recipe.repeated_aug,
        world_size=world_size,
        rank=rank,
        num_workers=recipe.num_workers,
    )


def eval_batches(
    ds: Dataset,
    ev: EvalCfg,
    img_size: int,
    *,
    split: str = "test",
    world_size: int = 1,
    rank: int = 0,
):
    """Deterministic test batches at ``img_size`` (the official centre-crop evaluation): this
    rank's shard, images ``rank, rank + world_size, ...`` (no padding: every image is counted
    once, whatever the process count). Image trees decode in ``ev.num_workers`` workers."""
    part = getattr(ds, split)
    if len(part.labels) < world_size:
        # Every rank must hold images: the sharded counts are one collective with one shape.
        raise ConfigError(
            f"the {split} split of {ds.path} has {len(part.labels)} images, fewer than the "
            f"{world_size} processes evaluating it",
            "prepare more test images or train with fewer processes",
        )
    shard = torch.arange(rank, len(part.labels), world_size)
    if getattr(part, "images", None) is not None:
        images = part.images if world_size == 1 else part.images[shard]
        labels = part.labels if world_size == 1 else part.labels[shard]
        x = eval_tensor(images, img_size, ev)
        return [
            (x[i : i + ev.batch_size], labels[i : i + ev.batch_size])
            for i in range(0, len(labels), ev.batch_size)
        ]
    data = ImageDataset(
        timm_eval_transform(ev, img_size, ds.in_chans), files=part.files, labels=part.labels
    )
    if world_size > 1:
        data = torch.utils.data.Subset(data, shard.tolist())
    return torch.utils.data.DataLoader(
        data,
        batch_size=ev.batch_size,
        shuffle=False,
        num_workers=ev.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
