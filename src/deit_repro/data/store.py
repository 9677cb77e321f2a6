"""The on-disk format of a prepared dataset (output of the prepare stage).

Every later stage reads datasets only through ``load_prepared``; this docstring is the format's
documentation.

Layout of ``<out>/`` for ``kind = "arrays"`` (decoded images)::

    manifest.json
    <split>_images.npy   uint8 [N, C, H, W]  channels-first, ready for torch.from_numpy
    <split>_labels.npy   int64 [N]           class index into manifest["classes"]

and for ``kind = "files"`` (large image trees kept as files, decoded by the data loader)::

    manifest.json
    <split>_files.csv    header "path,label"; absolute image path, int class index

Splits are ``train`` and ``test`` (``test`` = the split the paper reports on, e.g. ImageNet
``val``). The ``.npy`` files are written with ``np.save`` (no pickles), so equal arrays give equal
bytes.

``manifest.json`` (sorted keys, written last into the same atomic directory)::

    format        "deit-repro/prepared-v1"
    name          dataset name ("Fashion-MNIST")
    source        source key ("fashion_mnist", see deit_repro.data.sources.SOURCES)
    kind          "arrays" | "files"
    classes       [class names]; label i is classes[i]
    num_classes   len(classes)
    image_shape   [C, H, W] for arrays, null for files
    splits        {split: {"count": N,
                           "per_class": [N_0, ..., N_{K-1}]   (in class order),
                           "files": {filename: sha256 hex}}}
    content_hash  sha256 hex of the text made of one line "<filename> <sha256>\\n" per data file
                  of all splits, sorted by filename (covers data bytes, not manifest metadata; for
                  kind "files" it covers the path/label lists, not the image files themselves)
    skipped       {split: {"count": n, "files": [paths]}}, unreadable images dropped by
                  on_bad_image = "skip"
    params        the prepare parameters that produced it

The directory is written through ``atomic_dir``: a crash leaves either the previous complete dataset
or none, never a mix, and the manifest is the last file written into it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deit_repro.atomic import atomic_dir, sha256_file, write_json
from deit_repro.data.sources import RawDataset, Split
from deit_repro.errors import DataError

_logger = logging.getLogger(__name__)

FORMAT = "deit-repro/prepared-v1"
MANIFEST = "manifest.json"
_REQUIRED_KEYS = (
    "format",
    "name",
    "source",
    "kind",
    "classes",
    "num_classes",
    "image_shape",
    "splits",
    "content_hash",
)
_RERUN = "re-run `deit-repro prepare` for this dataset"


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    """One split of a prepared dataset, as loaded by ``load_prepared``.

    Attributes:
        labels: int64 ``[N]``.
        images: uint8 ``[N, C, H, W]`` for ``kind = "arrays"``, else None.
        files: absolute image paths for ``kind = "files"``, else None.
        classes: class names.
        num_classes: ``len(classes)``.
        manifest: the dataset's whole manifest.
    """

    labels: torch.Tensor
    images: torch.Tensor | None
    files: list[str] | None
    classes: list[str]
    num_classes: int
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def compute_content_hash(file_hashes: dict[str, str]) -> str:
    """sha256 over ``"<filename> <sha256>\\n"`` lines sorted by filename (see the module
    docstring)."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fsync(path: Path) -> None:
    # atomic_dir renames the directory; fsync the files first so a power loss cannot leave it
    # complete-looking with empty files.
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_arrays(tmp: Path, split: str, data: Split) -> list[str]:
    names = [f"{split}_images.npy", f"{split}_labels.npy"]
    # [N, H, W, C] -> [N, C, H, W], contiguous so the file is the plain C-order array.
    images = np.ascontiguousarray(data.images.transpose(0, 3, 1, 2))
    np.save(tmp / names[0], images, allow_pickle=False)
    np.save(tmp / names[1], np.ascontiguousarray(data.labels, dtype=np.int64), allow_pickle=False)
    return names


def _write_files(tmp: Path, split: str, data: Split) -> list[str]:
    name = f"{split}_files.csv"
    with open(tmp / name, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(zip(data.files, (int(x) for x in data.labels)))
    return [name]


def _image_shape(raw: RawDataset) -> list[int] | None:
    if raw.kind != "arrays":
        return None
    shapes = {tuple(s.images.shape[1:]) for s in raw.splits.values()}
    if len(shapes) != 1:
        raise ValueError(f"splits have different image shapes {sorted(shapes)}")
    h, w, c = shapes.pop()
    return [c, h, w]


def write_prepared(
    out: str | os.PathLike, raw: RawDataset, params: dict[str, Any]
) -> dict[str, Any]:
    """Write ``raw`` to ``out`` in the prepared format, replacing any previous ``out`` atomically.

    Args:
        out: the dataset directory.
        raw: the (already subset and resized) dataset.
        params: the prepare parameters, recorded in the manifest (JSON-serialisable).

    Returns:
        The manifest, as written.
    """
    num_classes = len(raw.classes)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": raw.name,
        "source": raw.source,
        "kind": raw.kind,
        "classes": list(raw.classes),
        "num_classes": num_classes,
        "image_shape": _image_shape(raw),
        "splits": {},
        "skipped": {},
        "params": params,
    }
    all_hashes: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        for split, data in raw.splits.items():
            if len(data) and (data.labels.min() < 0 or data.labels.max() >= num_classes):
                raise ValueError(f"split {split}: labels outside 0..{num_classes - 1}")
            writer = _write_arrays if raw.kind == "arrays" else _write_files
            names = writer(tmp, split, data)
            hashes = {}
            for name in names:
                _fsync(tmp / name)
                hashes[name] = sha256_file(tmp / name)
            all_hashes.update(hashes)
            skipped = sorted(raw.skipped.get(split, []))
            manifest["splits"][split] = {
                "count": len(data),
                "per_class": np.bincount(data.labels, minlength=num_classes).tolist(),
                "files": hashes,
            }
            manifest["skipped"][split] = {"count": len(skipped), "files": skipped}
        manifest["content_hash"] = compute_content_hash(all_hashes)
        write_json(tmp / MANIFEST, manifest)
    _logger.info(
        "wrote prepared dataset %s (%s, content_hash %s)",
        out,
        raw.name,
        manifest["content_hash"][:12],
    )
    return manifest


def _not_prepared(path: Path, why: str) -> DataError:
    return DataError(
        f"not a prepared dataset: {path} ({why})",
        "run `deit-repro prepare ...` to create it (or point at the right directory)",
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<path>/manifest.json``.

    Raises:
        DataError: the manifest is missing, not JSON, of another format or lacks a required key.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise _not_prepared(path, f"no {MANIFEST}") from exc
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _not_prepared(path, f"{MANIFEST} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise _not_prepared(path, f"format is {found!r}, expected {FORMAT!r}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _not_prepared(path, f"{MANIFEST} lacks {missing}")
    return manifest


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(f"corrupt prepared dataset {path}: {why}", _RERUN)


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _corrupt(path.parent, f"cannot read {path.name} ({exc})") from exc
    # np.load normally returns a writable array; copy otherwise (torch warns on read-only memory).
    return arr if arr.flags.writeable else arr.copy()


def _load_csv(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or rows[0] != ["path", "label"]:
            raise ValueError("header is not 'path,label'")
        return [r[0] for r in rows[1:]], np.asarray([int(r[1]) for r in rows[1:]], dtype=np.int64)
    except (OSError, ValueError, IndexError) as exc:
        raise _corrupt(path.parent, f"cannot read {path.name} ({exc})") from exc


def _check_labels(path: Path, labels: np.ndarray, entry: dict[str, Any], num_classes: int) -> None:
    if labels.dtype != np.int64 or labels.shape != (entry["count"],):
        raise _corrupt(
            path,
            f"labels are {labels.dtype} {list(labels.shape)}, "
            f"manifest says int64 [{entry['count']}]",
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, f"labels outside 0..{num_classes - 1}")
    if np.bincount(labels, minlength=num_classes).tolist() != entry["per_class"]:
        raise _corrupt(path, "per-class counts differ from the manifest")


def load_prepared(path: str | os.PathLike, split: str, *, verify: bool = False) -> PreparedSplit:
    """Load one split of a prepared dataset, checking it against its manifest.

    Args:
        path: the dataset directory written by ``write_prepared``.
        split: ``"train"`` or ``"test"``.
        verify: also check every data file's sha256 (reads each file twice; worth it before a long
            run).

    Raises:
        DataError: not a prepared dataset, an unknown split, a missing file, a sha256 mismatch
            (with ``verify``), or shapes/dtypes/counts that disagree with the manifest.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise DataError(
            f"prepared dataset {path} has no split {split!r} (it has {sorted(manifest['splits'])})",
            "use one of those splits",
        )
    entry = manifest["splits"][split]
    for name, digest in entry["files"].items():
        if not (path / name).is_file():
            raise _corrupt(path, f"{name} is missing")
        # Hash before parsing, so a corrupt header is reported as corruption rather than a parse
        # error.
        if verify and sha256_file(path / name) != digest:
            raise _corrupt(path, f"{name} does not match its sha256 in {MANIFEST}")
    num_classes = int(manifest["num_classes"])
    images_t, files = None, None
    if manifest["kind"] == "arrays":
        images = _load_npy(path / f"{split}_images.npy")
        labels = _load_npy(path / f"{split}_labels.npy")
        expected = (entry["count"], *manifest["image_shape"])
        if images.dtype != np.uint8 or images.shape != expected:
            raise _corrupt(
                path,
                f"images are {images.dtype} {list(images.shape)}, "
                f"manifest says uint8 {list(expected)}",
            )
        images_t = torch.from_numpy(images)
    else:
        files, labels = _load_csv(path / f"{split}_files.csv")
    _check_labels(path, labels, entry, num_classes)
    return PreparedSplit(
        labels=torch.from_numpy(labels),
        images=images_t,
        files=files,
        classes=list(manifest["classes"]),
        num_classes=num_classes,
        manifest=manifest,
    )
