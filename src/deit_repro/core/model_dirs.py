"""Trained models as directories: how they are written, found, rebuilt and loaded, and released
weights pinned by sha256.

A trained model is a directory::

    model.pt      plain state dict (tensors only: loads with torch.load(weights_only=True))
    model.json    how to rebuild it: role, factory kwargs, classes, the dataset's content hash
    metrics.json  final-epoch metrics (never best-on-test) + eval settings
    predictions.npy  the final evaluation per test image: a structured array, one record per
                  image of the test split in its order, field ``label`` (the true class) and one
                  field per head (``cls``, ``dist``, ``joint``; ``before_finetune/<head>`` for a
                  fine-tune) holding that head's top-1 class
    history.csv   per-epoch metrics (paper Figure 3)
    run.json      provenance: resolved params, git commit, versions, hardware, command line
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from deit_repro import atomic
from deit_repro.config import ModelCfg, WeightsCfg
from deit_repro.core.datasets import Dataset
from deit_repro.core.models import create_student, create_teacher, load_state_dict_checked
from deit_repro.core.records import jsonable
from deit_repro.errors import CheckpointError

_logger = logging.getLogger(__name__)

MODEL_FORMAT = "deit-repro/model-v1"


def student_kwargs(
    m: ModelCfg,
    *,
    distilled: bool,
    num_classes: int,
    in_chans: int,
    img_size: int | None = None,
    drop_path: float = 0.0,
) -> dict[str, Any]:
    """Adapter from the config object to :func:`create_student`'s explicit kwargs.

    A timm name stands for the family: the distilled student of ``deit_base_patch16_224`` is
    ``deit_base_distilled_patch16_224`` and vice versa (timm's naming), so one ``student.model``
    serves the Table 3 rows with and without the distillation token.
    """
    name = m.name
    if name is not None:
        plain = name.replace("_distilled_patch", "_patch")
        name = plain.replace("_patch", "_distilled_patch", 1) if distilled else plain
    return dict(
        name=name,
        distilled=distilled,
        num_classes=num_classes,
        img_size=img_size or m.img_size,
        in_chans=in_chans,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        drop_path_rate=drop_path,
    )


def teacher_kwargs(
    m: ModelCfg, *, num_classes: int, in_chans: int, drop_path: float = 0.0
) -> dict[str, Any]:
    """Adapter from the config object to :func:`create_teacher`'s explicit kwargs."""
    kw: dict[str, Any] = dict(
        name=m.name, arch=m.arch, num_classes=num_classes, in_chans=in_chans, img_size=m.img_size
    )
    if m.name is not None:
        kw.update(drop_path_rate=drop_path)
    elif m.arch == "vit":
        kw.update(
            patch_size=m.patch_size,
            embed_dim=m.embed_dim,
            depth=m.depth,
            num_heads=m.num_heads,
            drop_path_rate=drop_path,
        )
    else:
        kw.update(channels=tuple(m.channels), depths=tuple(m.depths))
    return kw


def build_model(role: str, kwargs: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)  # weights are overwritten by a state dict or reseeded by the caller
    return create_student(**kwargs) if role == "student" else create_teacher(**kwargs)


def save_model(
    out: Path,
    model: nn.Module,
    *,
    role: str,
    kwargs: dict[str, Any],
    ds: Dataset,
    img_size: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model.pt`` (plain state dict) and ``model.json`` (how to rebuild it)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic.torch_save(state, out / "model.pt")
    atomic.write_json(
        out / "model.json",
        {
            "format": MODEL_FORMAT,
            "role": role,
            "kwargs": jsonable(kwargs),
            "img_size": img_size,
            "in_chans": ds.in_chans,
            "classes": ds.classes,
            "dataset": {"path": str(ds.path), "content_hash": ds.content_hash},
            **(extra or {}),
        },
    )


PREDICTIONS = "predictions.npy"


def save_predictions(
    path: Path, labels: torch.Tensor, classes: dict[str, torch.Tensor], num_classes: int
) -> None:
    """Write the per-image top-1 classes of every head beside the true labels (``.npy``, a
    structured array: plain bytes, so a rerun writes the same file, and ``np.load`` reads it
    without pickle)."""
    n = len(labels)
    dtype = np.int16 if num_classes <= 2**15 else np.int32
    fields = [("label", dtype)] + [(name, dtype) for name in classes]
    table = np.empty(n, dtype=fields)
    table["label"] = np.asarray(labels).astype(dtype)
    for name, cls in classes.items():
        if len(cls) != n:
            raise ValueError(f"head {name}: {len(cls)} predictions for {n} test images")
        table[name] = cls.numpy().astype(dtype)
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    atomic.write_bytes(path, buf.getvalue())


def resolve_model_dir(path: Path, seed: int) -> Path:
    """A model directory, or the ``seed<k>/`` run inside a multi-seed stage output.

    Multi-seed stages write one run per seed (``<out>/seed<k>/``), trained teachers included; a
    downstream run of seed k uses the upstream run of the same seed, or the single run when there
    is only one (released teacher weights). A directory holding both is refused: which one a seed
    would read is not clear (a stale output of another layout).
    """
    path = Path(path)
    runs = sorted(p.name for p in path.glob("seed*") if (p / "model.json").is_file())
    if (path / "model.json").is_file():
        if runs:
            raise CheckpointError(
                f"{path} holds a single run (model.json) and per-seed runs ({', '.join(runs)})",
                "remove the stale one, or re-run the stage that writes it (dvc repro --force)",
            )
        return path
    seeded = path / f"seed{seed}"
    if (seeded / "model.json").is_file():
        return seeded
    if runs:
        raise CheckpointError(
            f"{path} has runs {', '.join(runs)} but not seed{seed}",
            "train the upstream stage with the same seeds (params seeds)",
        )
    raise CheckpointError(
        f"{path} holds no trained model (model.json + model.pt)",
        "run the stage that produces it first (see dvc.yaml)",
    )


def load_model(path: Path, *, drop_path: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model`; a bad directory is a CheckpointError."""

    path = Path(path)
    meta_path, weights = path / "model.json", path / "model.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path} holds no trained model (model.json + model.pt)",
            "run the stage that produces it first (see dvc.yaml)",
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(
            f"{meta_path} is not a deit-repro model description",
            "point at a directory written by deit-repro",
        )
    kwargs = dict(meta["kwargs"])
    if drop_path is not None and "drop_path_rate" in kwargs:
        kwargs["drop_path_rate"] = drop_path
    model = build_model(meta["role"], kwargs)
    load_state_dict_checked(model, load_weights_file(weights), what=str(weights))
    return model, meta


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a plain state dict; anything else is refused.

    Accepts the official DeiT layout ``{"model": state_dict}`` too.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with code objects, a torn file, not a torch file, ...
        # torch's weights_only message is many lines with ANSI bold; the useful part is the global.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        first = (
            f"it pickles {found.group(1)}, not only tensors"
            if found
            else text.splitlines()[0][:160]
            if text
            else ""
        )
        raise CheckpointError(
            f"weights file {path} cannot be loaded as plain tensors with "
            f"weights_only=True ({type(err).__name__}: {first})",
            "use a state dict saved with torch.save(model.state_dict())",
        ) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"weights file {path} is not a plain state dict (name -> tensor)",
            "save it with torch.save(model.state_dict())",
        )
    return obj


def fetch_weights(
    weights: WeightsCfg, local: Path | None, cache_dir: Path, what: str = "teacher weights"
) -> Path:
    """The released weights as a local file whose sha256 matches the pinned one.

    ``local`` (a file the user already has) wins over ``weights.url``; a url without a scheme
    is a local path, ``file://`` one too (a compute node without internet reads a pre-placed
    file). The pin may be a full sha256 or, like torch.hub's ``check_hash``, the prefix in the
    file name (``-a5fe301d``); the full digest is logged, to pin it in its place.
    ``what`` names the weights in errors ("teacher weights", "released weights").
    """
    parsed = urllib.parse.urlparse(weights.url)
    if local is None and parsed.scheme in ("", "file"):
        local = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else weights.url)
    if local is not None:
        if not Path(local).is_file():
            raise CheckpointError(
                f"{what} file {local} not found",
                "pass an existing file (--weights FILE, or its path as the url)",
            )
        path = Path(local)
    else:
        name = os.path.basename(urllib.parse.urlparse(weights.url).path) or "weights.pth"
        path = cache_dir / name
        if not path.is_file():
            _logger.info("downloading %s", weights.url)
            try:
                with atomic.atomic_path(path) as tmp:
                    torch.hub.download_url_to_file(weights.url, str(tmp), progress=False)
            except OSError as err:
                raise CheckpointError(
                    f"cannot download {what} {weights.url} ({err})",
                    "download them where a network exists and give the file's path as the url",
                ) from None
    digest = atomic.sha256_file(path)
    if not digest.startswith(weights.sha256.lower()):
        raise CheckpointError(
            f"{what} file {path} has sha256 {digest}, not the pinned {weights.sha256}",
            "get the released file again (or fix the pin if the release changed)",
        )
    _logger.info("%s %s: sha256 %s", what, path, digest)
    return path


def weights_hash(model_dir: Path | None) -> str | None:
    """sha256 of a model directory's weights (a checkpoint's fingerprint of its upstream model:
    a teacher or a pretrained student); None when there is none."""
    if model_dir is None:
        return None
    weights = Path(model_dir) / "model.pt"
    return atomic.sha256_file(weights) if weights.is_file() else None
