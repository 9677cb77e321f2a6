"""Reader for the IDX format of MNIST and Fashion-MNIST (raw or gzip-compressed).

Format (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a big-endian 4-byte magic number
``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the payload in
row-major order. Fashion-MNIST uses dtype ``0x08`` (unsigned byte) only: ``0x00000803`` for images
``[N, 28, 28]`` and ``0x00000801`` for labels ``[N]``. Used by the prepare stage
(``deit_repro.stages.prepare``) to read the files of the Debian package ``dataset-fashion-mnist``
without a network.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from deit_repro.errors import DataError

_logger = logging.getLogger(__name__)

_UBYTE = 0x08
_ALLOWED_NDIM = (1, 3)  # labels, images
_REINSTALL = (
    "re-download the file or reinstall dataset-fashion-mnist "
    "(apt-get install --reinstall dataset-fashion-mnist)"
)

# Split name in the prepared format -> IDX file stem prefix (MNIST calls its test set "t10k").
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IDX_NAMES = tuple(
    f"{prefix}-{kind}"
    for prefix in _SPLIT_PREFIX.values()
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
)


def _read_bytes(path: Path) -> bytes:
    """Return the decompressed bytes of ``path`` (gzip when the name ends in ``.gz``)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"IDX file not found: {path}", _REINSTALL) from exc
    # BadGzipFile is an OSError; a truncated gzip stream raises EOFError, a corrupt one zlib.error.
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"corrupt IDX file {path} ({type(exc).__name__}: {exc})", _REINSTALL
        ) from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file of unsigned bytes.

    Args:
        path: an IDX file, raw or ``.gz``.

    Returns:
        A uint8 array of the file's shape (``[N]`` for labels, ``[N, H, W]`` for images).

    Raises:
        DataError: the file is missing, is not valid gzip, has a wrong magic number, or its payload
            length differs from the product of its dimensions (truncated or padded).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"corrupt IDX file {path}: {len(data)} bytes, shorter than the header", _REINSTALL
        )
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or ndim not in _ALLOWED_NDIM:
        raise DataError(
            f"not an IDX file of unsigned bytes: {path} has magic 0x{data[:4].hex()} "
            "(expected 0x00000803 for images or 0x00000801 for labels)",
            _REINSTALL,
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"corrupt IDX file {path}: truncated inside the header", _REINSTALL)
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header_len
    if payload != expected:
        state = "truncated" if payload < expected else "padded"
        raise DataError(
            f"corrupt IDX file {path}: {state}, payload is {payload} bytes "
            f"but dims {list(dims)} need {expected}",
            _REINSTALL,
        )
    # frombuffer gives a read-only view of `data`; copy so callers own a normal writable array.
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def _find_one(directory: Path, stem: str) -> Path | None:
    # Prefer the raw file: torchvision's downloader leaves both and the raw one is faster to read.
    for name in (stem, f"{stem}.gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def find_idx_files(directory: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Locate the four MNIST-style IDX files in ``directory``.

    Args:
        directory: a folder holding ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
            ``t10k-labels-idx1-ubyte[.gz]``.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}``.

    Raises:
        DataError: any of the four files is missing (the message lists which).
    """
    directory = Path(directory)
    found: dict[str, Path | None] = {stem: _find_one(directory, stem) for stem in IDX_NAMES}
    missing = [stem for stem, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found at {directory} "
            f"(need {', '.join(s + '[.gz]' for s in IDX_NAMES)}; "
            f"missing {', '.join(missing)})",
            "install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) "
            "or pass --source-dir DIR holding the four IDX files",
        )
    result = {}
    for split, prefix in _SPLIT_PREFIX.items():
        result[split] = (found[f"{prefix}-images-idx3-ubyte"], found[f"{prefix}-labels-idx1-ubyte"])
    _logger.debug("IDX files in %s: %s", directory, result)
    return result
