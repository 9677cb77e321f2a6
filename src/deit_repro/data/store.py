"""The on-disk format of a prepared dataset (output of the prepare stage).

Every later stage reads datasets only through ``load_prepared``, with ``verify=True`` (see
``deit_repro.core.datasets.open_dataset``): each data file is checked against its sha256 below, so
an edit that keeps shapes and class counts (two swapped labels) is refused. This docstring is the
format's documentation.

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
import io
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
# Bytes per read, hashed right after they are read, while they are still in the CPU cache.
_CHUNK = 1 << 20
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


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


def _mismatch(path: Path) -> str:
    return f"{path.name} does not match its sha256 in {MANIFEST}"


def _read_npy(fh, hasher) -> np.ndarray:
    """The array of an open ``.npy`` file, read once, straight into the array's memory (no second
    copy, no zero-filled buffer); every byte of the file also goes through ``hasher`` if given."""
    version = np.lib.format.read_magic(fh)
    if version not in _NPY_HEADER_READERS:
        raise ValueError(f"npy format version {version} (np.save writes 1.0 or 2.0)")
    shape, fortran, dtype = _NPY_HEADER_READERS[version](fh)
    if dtype.hasobject:
        raise ValueError("it holds Python objects (pickles are refused)")
    offset = fh.tell()
    fh.seek(0)  # the header is hashed too
    if hasher is not None:
        hasher.update(fh.read(offset))
    else:
        fh.seek(offset)
    arr = np.empty(shape, dtype, order="F" if fortran else "C")
    data = memoryview(arr.ravel(order="A").view(np.uint8))  # a view: arr is contiguous
    pos = 0
    while pos < len(data):
        n = fh.readinto(data[pos : pos + _CHUNK])
        if not n:
            raise ValueError(f"it ends {len(data) - pos} bytes short of its {list(shape)} array")
        if hasher is not None:
            hasher.update(data[pos : pos + n])
        pos += n
    if hasher is not None:
        while rest := fh.read(_CHUNK):  # bytes after the array are part of the file's sha256
            hasher.update(rest)
    return arr


def _load_npy(path: Path, digest: str | None) -> np.ndarray:
    hasher = None if digest is None else hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            arr = _read_npy(fh, hasher)
    except (OSError, ValueError, EOFError) as exc:
        why = f"cannot read {path.name} ({exc})"
        if digest is not None and not isinstance(exc, OSError):
            # A broken header of a file that also fails its sha256 is reported as the mismatch:
            # the file was changed after prepare, not written wrong by it.
            try:
                why = _mismatch(path) if sha256_file(path) != digest else why
            except OSError:
                pass
        raise _corrupt(path.parent, why) from exc
    if hasher is not None and hasher.hexdigest() != digest:
        raise _corrupt(path.parent, _mismatch(path))
    return arr


def _load_csv(path: Path, digest: str | None) -> tuple[list[str], np.ndarray]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _corrupt(path.parent, f"cannot read {path.name} ({exc})") from exc
    if digest is not None and hashlib.sha256(raw).hexdigest() != digest:
        raise _corrupt(path.parent, _mismatch(path))
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
        if not rows or rows[0] != ["path", "label"]:
            raise ValueError("header is not 'path,label'")
        return [r[0] for r in rows[1:]], np.asarray([int(r[1]) for r in rows[1:]], dtype=np.int64)
    except (ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
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


def _data_files(kind: str, split: str) -> list[str]:
    """The files of one split, as ``write_prepared`` names them."""
    if kind == "arrays":
        return [f"{split}_images.npy", f"{split}_labels.npy"]
    return [f"{split}_files.csv"]


def load_prepared(path: str | os.PathLike, split: str, *, verify: bool = False) -> PreparedSplit:
    """Load one split of a prepared dataset, checking it against its manifest.

    Args:
        path: the dataset directory written by ``write_prepared``.
        split: ``"train"`` or ``"test"``.
        verify: check each data file's sha256 against the manifest, on the bytes that are loaded
            (no second read). For ``kind = "files"`` that is the path/label list, not every image
            (decoding the images is the loader's job). Every stage verifies, through
            ``open_dataset``; ``verify=False`` skips only the hash (shape, dtype and per-class
            checks stay) and remains for tests that load a tampered file to show that only the
            hash catches it.

    Raises:
        DataError: not a prepared dataset, an unknown split, a missing file, a sha256 mismatch,
            or shapes/dtypes/counts that disagree with the manifest.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise DataError(
            f"prepared dataset {path} has no split {split!r} (it has {sorted(manifest['splits'])})",
            "prepare it again with both splits (deit-repro prepare without --splits)",
        )
    entry = manifest["splits"][split]
    names = _data_files(manifest["kind"], split)
    for name in entry["files"]:
        if not (path / name).is_file():
            raise _corrupt(path, f"{name} is missing")
    if verify and sorted(entry["files"]) != names:
        # Without this, a manifest that lists no files would make the hash check vacuous.
        raise _corrupt(
            path, f"{MANIFEST} lists {sorted(entry['files'])} for split {split!r}, not {names}"
        )
    digests = entry["files"] if verify else {}
    num_classes = int(manifest["num_classes"])
    images_t, files = None, None
    if manifest["kind"] == "arrays":
        images = _load_npy(path / names[0], digests.get(names[0]))
        labels = _load_npy(path / names[1], digests.get(names[1]))
        expected = (entry["count"], *manifest["image_shape"])
        if images.dtype != np.uint8 or images.shape != expected:
            raise _corrupt(
                path,
                f"images are {images.dtype} {list(images.shape)}, "
                f"manifest says uint8 {list(expected)}",
            )
        images_t = torch.from_numpy(images)
    else:
        files, labels = _load_csv(path / names[0], digests.get(names[0]))
    _check_labels(path, labels, entry, num_classes)
    return PreparedSplit(
        labels=torch.from_numpy(labels),
        images=images_t,
        files=files,
        classes=list(manifest["classes"]),
        num_classes=num_classes,
        manifest=manifest,
    )
