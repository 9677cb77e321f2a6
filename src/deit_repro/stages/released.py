"""The import-weights command: released checkpoints as model directories, the evaluate-only path.

A user with ImageNet but no cluster fills the tables' released rows (Tables 1, 3, 4, 5) from the
released weights: each checkpoint (a URL or a local file, pinned by sha256 and loaded with
``weights_only=True``) becomes a model directory like the ones the training stages write; evaluate
measures it under the name ``released/<timm name>``, and ``tables --released`` reads that file::

    deit-repro prepare --dataset imagenet --splits test --out released/data/imagenet_val
    deit-repro import-weights --model deit_base_distilled_patch16_224 \\
      --weights https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth \\
      --sha256 df68dfff --data released/data/imagenet_val \\
      --out released/models/deit_base_distilled
    deit-repro evaluate --data released/data/imagenet_val \\
      --model released/deit_base_distilled_patch16_224=released/models/deit_base_distilled \\
      --out released/metrics/released.json
    deit-repro tables --metrics released/metrics --released released/metrics/released.json \\
      --out released/results
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from deit_repro import atomic
from deit_repro.config import WeightsCfg, check_sha256_pin
from deit_repro.core.datasets import open_dataset
from deit_repro.core.model_dirs import build_model, fetch_weights, load_weights_file, save_model
from deit_repro.core.models import load_state_dict_checked
from deit_repro.errors import ConfigError

_logger = logging.getLogger(__name__)


def downloads() -> Path:
    """Where released weights are downloaded, for ``import-weights`` and the teacher stage alike:
    ``$DEIT_REPRO_DOWNLOADS``, else ``~/.cache/deit-repro/downloads`` (as torch.hub keeps its
    checkpoints in ``~/.cache/torch``); a file already there with the pinned digest is reused."""
    env = os.environ.get("DEIT_REPRO_DOWNLOADS")
    return Path(env) if env else Path.home() / ".cache" / "deit-repro" / "downloads"


def fetch(pin: WeightsCfg, what: str, *, local: Path | None = None) -> Path:
    """The pinned released file: ``local`` if given (checked against the pin), else the url's
    file (a path, ``file://``, or a download into :func:`downloads`)."""
    return fetch_weights(pin, local, downloads(), what)


def load(role: str, kwargs: dict[str, Any], path: Path, *, what: str) -> nn.Module:
    """The model ``role`` (student | teacher) built from ``kwargs`` with the weights of ``path``
    (``weights_only=True``; keys and shapes checked)."""
    model = build_model(role, kwargs)
    load_state_dict_checked(model, load_weights_file(path), what=f"{what} {path}")
    return model


def import_weights(
    *,
    model: str,
    weights: str,
    sha256: str,
    data: Path,
    out: Path,
    img_size: int | None = None,
) -> dict[str, Any]:
    """Write a model directory for released weights of a timm DeiT (or convnet teacher).

    Args:
        model: exact timm name, e.g. ``deit_base_distilled_patch16_224`` or ``regnety_160``.
        weights: a local file, or a URL downloaded into :func:`downloads`.
        sha256: the pinned digest (full, or the release file name's prefix, >= 8 hex digits).
        data: the prepared dataset the model is evaluated on (classes and channels): both
            splits, or the test split alone (``prepare --splits test``).
        out: the model directory to write.
        img_size: input resolution; default: the one in the timm name (``..._384``) or 224.

    Returns:
        The model description written to ``out/model.json``.
    """
    pin = WeightsCfg(url=weights, sha256=check_sha256_pin(sha256, "--sha256"))
    what = f"released {model} weights"
    path = fetch(pin, what)
    ds = open_dataset(data, need_train=False)
    size = img_size or (384 if model.endswith("_384") else 224)
    role = "student" if model.startswith("deit") else "teacher"
    if role == "student":
        kwargs = dict(
            name=model,
            distilled="distilled" in model,
            num_classes=ds.num_classes,
            img_size=size,
            in_chans=ds.in_chans,
            drop_path_rate=0.0,
        )
    elif model.startswith(("regnet", "resnet")):
        kwargs = dict(name=model, num_classes=ds.num_classes, in_chans=ds.in_chans, img_size=size)
    else:
        raise ConfigError(
            f"--model {model} is neither a timm DeiT nor a convnet teacher",
            "use an exact timm name such as deit_base_distilled_patch16_224",
        )
    net = load(role, kwargs, path, what=what)
    extra = {"source": weights, "sha256": atomic.sha256_file(path), "released": True}
    if role == "student":
        extra.update(
            distill="hard" if kwargs["distilled"] else "none", dist_token=bool(kwargs["distilled"])
        )
    with atomic.atomic_dir(out) as tmp:  # whole or not at all
        save_model(tmp, net, role=role, kwargs=kwargs, ds=ds, img_size=size, extra=extra)
    _logger.info("imported %s (%s) into %s", model, path, out)
    return {"role": role, "kwargs": kwargs, "img_size": size, **extra}
