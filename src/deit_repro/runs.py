"""What the training stages share: loading data onto batches, saving and loading trained models,
run directories with their provenance, and released teacher weights (pinned sha256).

A trained model is a directory::

    model.pt      plain state dict (tensors only: loads with torch.load(weights_only=True))
    model.json    how to rebuild it: role, factory kwargs, classes, the dataset's content hash
    metrics.json  final-epoch metrics (never best-on-test, STYLE.md rule 11) + eval settings
    history.csv   per-epoch metrics (Figure 3)
    run.json      provenance: resolved params, git commit, versions, hardware, command line
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deit_repro import atomic, provenance
from deit_repro.batches import (ImageDataset, LoaderBatches, TensorAugment, TrainBatches,
                                eval_tensor, timm_eval_transform, timm_train_transform)
from deit_repro.config import EvalCfg, ModelCfg, TrainCfg, WeightsCfg, to_dict
from deit_repro.data.store import load_prepared
from deit_repro.errors import CheckpointError, ConfigError
from deit_repro.models import create_student, create_teacher, load_state_dict_checked

_logger = logging.getLogger(__name__)

MODEL_FORMAT = "deit-repro/model-v1"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


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
        shape = self.train.manifest.get("image_shape")
        return int(shape[0]) if shape else 3

    @property
    def in_memory(self) -> bool:
        return getattr(self.train, "images", None) is not None


def open_dataset(path: Path) -> Dataset:
    """Load a prepared dataset (both splits); errors name the path and the prepare command."""
    train = load_prepared(path, "train")
    test = load_prepared(path, "test")
    return Dataset(path=Path(path), train=train, test=test, classes=list(train.classes),
                   content_hash=train.manifest["content_hash"])


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """The batch of one process: ``train.batch_size`` is the global batch (issue #4)."""
    if batch_size % world_size:
        raise ConfigError(f"params key 'batch_size' = {batch_size} is not divisible by the "
                          f"{world_size} processes", "choose a multiple of the process count")
    return batch_size // world_size


def train_batches(ds: Dataset, recipe: TrainCfg, *, img_size: int, seed: int, world_size: int = 1,
                  rank: int = 0):
    """This process's training batches (global batch split over ranks)."""
    per_rank = per_rank_batch(recipe.batch_size, world_size)
    if recipe.aug.pipeline == "tensor":
        if not ds.in_memory:
            raise ConfigError(f"aug.pipeline 'tensor' needs an in-memory dataset but {ds.path} is "
                              "a file list", "use aug.pipeline: timm for image trees")
        return TrainBatches(ds.train.images, ds.train.labels, per_rank,
                            TensorAugment(recipe.aug, img_size, ds.in_chans), seed,
                            recipe.repeated_aug, world_size, rank)
    data = ImageDataset(timm_train_transform(recipe.aug, img_size, ds.in_chans),
                        images=getattr(ds.train, "images", None),
                        files=getattr(ds.train, "files", None), labels=ds.train.labels)
    return LoaderBatches(data, batch_size=per_rank, seed=seed, repeats=recipe.repeated_aug,
                         world_size=world_size, rank=rank, num_workers=recipe.num_workers)


def eval_batches(ds: Dataset, ev: EvalCfg, img_size: int, *, split: str = "test",
                 num_workers: int = 0):
    """Deterministic test batches at ``img_size`` (the official centre-crop evaluation)."""
    part = getattr(ds, split)
    if getattr(part, "images", None) is not None:
        x = eval_tensor(part.images, img_size, ev)
        y = part.labels
        return [(x[i:i + ev.batch_size], y[i:i + ev.batch_size])
                for i in range(0, len(y), ev.batch_size)]
    data = ImageDataset(timm_eval_transform(ev, img_size, ds.in_chans), files=part.files,
                        labels=part.labels)
    return torch.utils.data.DataLoader(data, batch_size=ev.batch_size, shuffle=False,
                                       num_workers=num_workers)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def student_kwargs(m: ModelCfg, *, distilled: bool, num_classes: int, in_chans: int,
                   img_size: int | None = None, drop_path: float = 0.0) -> dict[str, Any]:
    """Adapter from the config object to :func:`create_student`'s explicit kwargs.

    A timm name stands for the family: the distilled student of ``deit_base_patch16_224`` is
    ``deit_base_distilled_patch16_224`` and vice versa (timm's naming), so one ``student.model``
    serves the Table 3 rows with and without the distillation token.
    """
    name = m.name
    if name is not None:
        plain = name.replace("_distilled_patch", "_patch")
        name = plain.replace("_patch", "_distilled_patch", 1) if distilled else plain
    return dict(name=name, distilled=distilled, num_classes=num_classes,
                img_size=img_size or m.img_size, in_chans=in_chans, patch_size=m.patch_size,
                embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                mlp_ratio=m.mlp_ratio, drop_path_rate=drop_path)


def teacher_kwargs(m: ModelCfg, *, num_classes: int, in_chans: int,
                   drop_path: float = 0.0) -> dict[str, Any]:
    """Adapter from the config object to :func:`create_teacher`'s explicit kwargs."""
    kw: dict[str, Any] = dict(name=m.name, arch=m.arch, num_classes=num_classes,
                              in_chans=in_chans, img_size=m.img_size)
    if m.name is None and m.arch == "vit":
        kw.update(patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                  num_heads=m.num_heads, drop_path_rate=drop_path)
    elif m.name is None:
        kw.update(channels=tuple(m.channels), depths=tuple(m.depths))
    return kw


def build_model(role: str, kwargs: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)  # weights are overwritten by a state dict or reseeded by the caller
    return create_student(**kwargs) if role == "student" else create_teacher(**kwargs)


def save_model(out: Path, model: nn.Module, *, role: str, kwargs: dict[str, Any],
               ds: Dataset, img_size: int, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.pt`` (plain state dict) and ``model.json`` (how to rebuild it)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic.torch_save(state, out / "model.pt")
    atomic.write_json(out / "model.json", {
        "format": MODEL_FORMAT, "role": role, "kwargs": _jsonable(kwargs),
        "img_size": img_size, "in_chans": ds.in_chans, "classes": ds.classes,
        "dataset": {"path": str(ds.path), "content_hash": ds.content_hash}, **(extra or {})})


def resolve_model_dir(path: Path, seed: int) -> Path:
    """A model directory, or the ``seed<k>/`` run inside a multi-seed stage output.

    Multi-seed stages write one run per seed (``<out>/seed<k>/``); a downstream run of seed k
    uses the upstream run of the same seed, or the single run when there is only one (teacher).
    """
    path = Path(path)
    if (path / "model.json").is_file():
        return path
    seeded = path / f"seed{seed}"
    if (seeded / "model.json").is_file():
        return seeded
    have = sorted(p.name for p in path.glob("seed*") if (p / "model.json").is_file())
    if have:
        raise CheckpointError(f"{path} has runs {', '.join(have)} but not seed{seed}",
                              "train the upstream stage with the same seeds (params seeds)")
    raise CheckpointError(f"{path} holds no trained model (model.json + model.pt)",
                          "run the stage that produces it first (see dvc.yaml)")


def load_model(path: Path, *, drop_path: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model`; a bad directory is a CheckpointError."""
    import json

    path = Path(path)
    meta_path, weights = path / "model.json", path / "model.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} holds no trained model (model.json + model.pt)",
                              "run the stage that produces it first (see dvc.yaml)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path} is not a deit-repro model description",
                              "point at a directory written by deit-repro")
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
        first = (f"it pickles {found.group(1)}, not only tensors" if found else
                 text.splitlines()[0][:160] if text else "")
        raise CheckpointError(f"weights file {path} cannot be loaded as plain tensors with "
                              f"weights_only=True ({type(err).__name__}: {first})",
                              "use a state dict saved with torch.save(model.state_dict())") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path} is not a plain state dict (name -> tensor)",
                              "save it with torch.save(model.state_dict())")
    return obj


def fetch_weights(weights: WeightsCfg, local: Path | None, cache_dir: Path) -> Path:
    """The released weights as a local file whose sha256 matches the pinned one.

    ``local`` (a file the user already has) wins over ``weights.url``. The pin may be a full
    sha256 or, like torch.hub's ``check_hash``, the prefix in the file name (``-a5fe301d``).
    """
    if local is not None:
        if not Path(local).is_file():
            raise CheckpointError(f"teacher weights file {local} not found",
                                  "pass an existing file to --weights")
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
                raise CheckpointError(f"cannot download teacher weights {weights.url} ({err})",
                                      "download them where a network exists and pass --weights "
                                      "FILE") from None
    digest = atomic.sha256_file(path)
    if not digest.startswith(weights.sha256):
        raise CheckpointError(f"weights file {path} has sha256 {digest}, not the pinned "
                              f"{weights.sha256}", "get the released file again (or fix the pin "
                              "in params.yaml if the release changed)")
    return path


# --------------------------------------------------------------------------------------------------
# Run outputs
# --------------------------------------------------------------------------------------------------


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Per-epoch metrics as CSV (columns: the union of every row's keys, first-seen order)."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: _fmt(row.get(k)) for k in keys})
    atomic.write_text(path, buf.getvalue())


def write_run(out: Path, params: Any, **extra: Any) -> None:
    atomic.write_json(out / "run.json", _jsonable(provenance.record(to_dict(params), **extra)))


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def round_metrics(obj: Any) -> Any:
    """Metrics rounded to 6 significant decimals, so files are stable across reruns."""
    return _jsonable(obj)

