"""The prepare stage: one source -> one prepared dataset directory.

Loads a source (``deit_repro.data.sources``), keeps a class-balanced seeded subset, optionally
resizes (bicubic, shorter side + center crop), and writes the documented format of
``deit_repro.data.store`` atomically, with a manifest and a content hash. The same inputs give
byte-identical files, so DVC sees an unchanged output when nothing that matters changed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deit_repro.config import DatasetCfg
from deit_repro.data.sources import (
    RawDataset,
    Split,
    decode_files,
    load_source,
    resize_arrays,
)
from deit_repro.data.store import write_prepared
from deit_repro.errors import DataError

_logger = logging.getLogger(__name__)

# Which per-class limit applies to which split.
_PER_CLASS_KEY = {"train": "train_per_class", "test": "test_per_class"}


def class_balanced_indices(
    labels: np.ndarray,
    per_class: int | None,
    classes: list[str],
    seed: int,
    *,
    split: str = "train",
) -> np.ndarray:
    """Pick ``per_class`` samples of every class, the same ones for the same seed.

    For each class, the first ``per_class`` of its indices in the order of one seeded permutation of
    the split are taken; the result is sorted ascending so the written bytes follow the source
    order.

    Args:
        labels: int labels ``[N]``.
        per_class: samples to keep per class; None keeps everything.
        classes: class names (for the error message and the class count).
        seed: seed of ``np.random.default_rng``.
        split: split name, for the error message.

    Returns:
        Sorted int64 indices into ``labels``.

    Raises:
        DataError: a class has fewer than ``per_class`` samples.
    """
    if per_class is None:
        return np.arange(len(labels), dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(labels))
    perm_labels = labels[perm]
    chosen = []
    for c, name in enumerate(classes):
        candidates = perm[perm_labels == c]
        if len(candidates) < per_class:
            raise DataError(
                f"class {name!r} of split {split} has {len(candidates)} images, fewer than "
                f"{_PER_CLASS_KEY.get(split, 'per_class')} = {per_class}",
                f"lower {_PER_CLASS_KEY.get(split, 'per_class')} to at most {len(candidates)} "
                "or set it to null "
                "(all images)",
            )
        chosen.append(candidates[:per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _materialise(
    split: Split, image_size: int | None, on_bad_image: str, name: str, skipped: dict
) -> Split:
    """Resize arrays, or decode files into arrays, when ``image_size`` is set (the pre-resized
    path)."""
    if image_size is None:
        return split
    if split.images is not None:
        return Split(labels=split.labels, images=resize_arrays(split.images, image_size))
    return decode_files(
        split, image_size, on_bad_image=on_bad_image, split_name=name, skipped=skipped
    )


def run_prepare(
    cfg: DatasetCfg,
    *,
    out: Path,
    source_dir: Path | None = None,
    verify_images: bool = True,
    splits: Sequence[str] = ("train", "test"),
) -> dict[str, Any]:
    """Prepare one dataset of the profile into ``out``.

    Args:
        cfg: the dataset's entry of ``params.yaml`` (source, subset sizes, resize, seed, ...),
            already validated by :func:`deit_repro.config.load_params`.
        out: output directory; replaced atomically.
        source_dir: the source's data directory; default ``cfg.root``, else the source's usual
            place (Fashion-MNIST: the Debian package's ``/usr/share/datasets/fashion-mnist``).
        verify_images: decode every image file whole before using it (file-list sources).
        splits: both, or ``("test",)``: an image tree's ``val/`` alone, for evaluating released
            checkpoints (the training stages refuse such a dataset: it has no ``train`` split).

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        DataError: the source is missing or malformed, or a class is too small for the subset.
    """
    if source_dir is None and cfg.root:
        source_dir = Path(cfg.root).expanduser()
    source, seed, image_size, on_bad_image = cfg.source, cfg.seed, cfg.image_size, cfg.on_bad_image
    train_per_class, test_per_class = cfg.train_per_class, cfg.test_per_class
    download, test_fraction = cfg.download, cfg.test_fraction
    start = time.perf_counter()
    params = {
        "source": source,
        "source_dir": None if source_dir is None else os.fspath(source_dir),
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "image_size": image_size,
        "seed": seed,
        "on_bad_image": on_bad_image,
        "download": download,
        "test_fraction": test_fraction,
        "verify_images": verify_images,
    }
    if tuple(splits) != ("train", "test"):  # only then: a full dataset's manifest keeps its bytes
        params["splits"] = list(splits)
    raw = load_source(
        source,
        source_dir=source_dir,
        download=download,
        seed=seed,
        test_fraction=test_fraction,
        verify_images=verify_images,
        on_bad_image=on_bad_image,
        splits=splits,
    )
    skipped = {k: list(v) for k, v in raw.skipped.items()}
    splits = {}
    for name, split in raw.splits.items():
        per_class = {"train": train_per_class, "test": test_per_class}.get(name)
        subset = split.take(
            class_balanced_indices(split.labels, per_class, raw.classes, seed, split=name)
        )
        splits[name] = _materialise(subset, image_size, on_bad_image, name, skipped)
        _logger.info("%s/%s: %d of %d images kept", raw.name, name, len(splits[name]), len(split))
    prepared = RawDataset(
        name=raw.name, source=raw.source, classes=raw.classes, splits=splits, skipped=skipped
    )
    manifest = write_prepared(out, prepared, params)
    _logger.info("prepared %s into %s in %.1f s", raw.name, out, time.perf_counter() - start)
    return manifest
