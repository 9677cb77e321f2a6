"""Atomic writes: a reader sees either the old file or the complete new one, never a torn one.

Every output of every stage goes through these helpers, so no half-written output is ever taken for
a finished one (RELIABILITY.md, "Torn and half-written files"). The pattern is the usual one: write
to a temporary file in the same directory, flush + fsync, then ``os.replace`` onto the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; outputs are shared (DVC cache, cluster users): plain-open modes.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON with sorted keys and a trailing newline, so reruns are byte-identical."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file (a torn checkpoint is never left under ``path``).

    Serialised straight into the temporary sibling: no in-memory copy of the archive, which for a
    DeiT-B checkpoint (model, optimizer, EMA) is about a gigabyte, held while every rank waits.
    """
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            try:
                torch.save(obj, fh)
            except RuntimeError as err:
                # torch's zip writer closes the archive on the way out of any exception, and a
                # write cut short makes that fail with "unexpected pos ...", the real cause
                # being its context: raise that one. An OSError names the cause (the CLI turns
                # ENOSPC into its own exit status); a KeyboardInterrupt or SystemExit is a
                # signal landing mid-write (Ctrl-C, submitit's exit after a USR2 requeue), which
                # must stay what it is, not become a failure with a traceback.
                cause = err.__context__
                if isinstance(cause, OSError) or (
                    cause is not None and not isinstance(cause, Exception)
                ):
                    raise cause from None
                raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    Used for directory outputs (a prepared dataset): either the complete old directory or the
    complete new one exists, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give a plain mkdir's mode
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
