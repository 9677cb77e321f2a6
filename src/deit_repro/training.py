"""The training stages: teacher, pretrain, finetune, transfer (DESIGN.md stages 2–5).

Each ``run_*`` function takes the parsed params, explicit paths and the variant (distillation kind,
token, seed, resolution), trains with :func:`deit_repro.engine.fit`, and writes a model directory
(see :mod:`deit_repro.runs`). Nothing here parses arguments or exits: the CLI does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_repro import atomic
from deit_repro.config import ModelCfg, Params, TrainCfg, config_hash, to_dict
from deit_repro.engine import Runtime, accuracy_table, base_criterion, fit, predict
from deit_repro.errors import CheckpointError, ConfigError
from deit_repro.losses import DistillationLoss
from deit_repro.models import (create_student, create_teacher, load_state_dict_checked,
                               set_training_outputs, student_heads)
from deit_repro.pos_embed import adapt_for_finetune
from deit_repro.runs import (Dataset, build_model, resolve_model_dir, eval_batches, fetch_weights, load_model,
                             load_weights_file, open_dataset, round_metrics, save_model,
                             student_kwargs, teacher_kwargs, train_batches, write_history,
                             write_run)

_logger = logging.getLogger(__name__)


def _code_hash() -> str:
    """sha256 over the package's source files (what produced a checkpoint)."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class ResizedInput(nn.Module):
    """Feeds a model its own resolution: the teacher of a student trained at another size
    (facebookresearch/deit#90: no 384 teacher exists, the teacher sees its own 224 input)."""

    def __init__(self, model: nn.Module, img_size: int):
        super().__init__()
        self.model, self.img_size = model, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic",
                              align_corners=False, antialias=True)
        return self.model(x)


def _heads_metrics(model: nn.Module, ds: Dataset, params: Params, img_size: int,
                   rt: Runtime) -> dict[str, Any]:
    """Top-1/top-5 of every head on the test split (flat keys for the history rows)."""
    was_training = model.training
    model.eval()
    table = accuracy_table(predict(lambda x: student_heads(model, x),
                                   eval_batches(ds, params.eval, img_size), rt))
    model.train(was_training)
    return {f"test_{k}_{m}": v for k, d in table.items() for m, v in d.items()}


def _final_metrics(history: list[dict[str, Any]], params: Params, img_size: int,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """Final-epoch metrics (never best-on-test) with the eval settings beside them.

    Only values that the params, data and seed determine: timings and resume information go to
    the run directory's run.json, so a rerun writes the same bytes (DESIGN.md, reproducibility).
    """
    last = history[-1]
    heads: dict[str, dict[str, float]] = {}
    for k, v in last.items():
        if k.startswith("test_"):
            head, metric = k[len("test_"):].rsplit("_", 1)
            heads.setdefault(head, {})[metric] = v
    return round_metrics({
        **extra, "epochs": last["epoch"], "heads": heads,
        "top1": heads.get("joint", heads["cls"])["top1"], "train_loss": last["train_loss"],
        "eval": {"img_size": img_size, "crop_pct": params.eval.crop_pct,
                 "interpolation": params.eval.interpolation, "weights": "raw (not EMA)",
                 "split": "test"}})


#: history columns that measure time, not the model: kept in the run directory only
_TIMING = ("train_images_per_s",)


def _write_outputs(out: Path, run_dir: Path | None, model: nn.Module, *, role: str,
                   kwargs: dict[str, Any], ds: Dataset, params: Params, img_size: int,
                   history: list[dict[str, Any]], metrics: dict[str, Any], seed: int,
                   extra: dict[str, Any], run_info: dict[str, Any]) -> None:
    """The model directory (deterministic files) and the run directory (provenance, timings).

    The model directory is written whole into a temporary sibling and renamed onto ``out``
    (issue #6): a crash leaves the previous complete directory or none, never new weights beside
    an old description.
    """
    if run_dir is not None:
        write_run(run_dir, params, seed=seed, **extra, **run_info)
    with atomic.atomic_dir(out) as tmp:
        save_model(tmp, model, role=role, kwargs=kwargs, ds=ds, img_size=img_size, extra=extra)
        write_history(tmp / "history.csv",
                      [{k: v for k, v in row.items() if k not in _TIMING} for row in history])
        if run_dir is None:
            write_run(tmp, params, seed=seed, **extra, **run_info)
        atomic.write_json(tmp / "metrics.json", metrics)


def _train_and_save(*, model: nn.Module, role: str, kwargs: dict[str, Any], loss_fn,
                    recipe: TrainCfg, ds: Dataset, params: Params, img_size: int, seed: int,
                    out: Path, run_dir: Path | None, fingerprint_of: dict[str, Any],
                    extra: dict[str, Any], rt: Runtime, desc: str) -> dict[str, Any]:
    model.to(rt.device)
    train_model = model
    if rt.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    batches = train_batches(ds, recipe, img_size=img_size, seed=seed, world_size=rt.world_size,
                            rank=rt.rank)
    ckpt = run_dir / "checkpoint.pth" if run_dir is not None else None
    res = fit(model=train_model, loss_fn=loss_fn, train_batches=batches, recipe=recipe,
              num_classes=ds.num_classes, seed=seed, rt=rt, checkpoint_path=ckpt,
              # The code too: a checkpoint written by other code is never resumed from.
              fingerprint=config_hash({**fingerprint_of, "code": _code_hash()}),
              evaluate=lambda m: _heads_metrics(m, ds, params, img_size, rt),
              on_epoch_end=(lambda h: write_history(run_dir / "history.csv", h))
              if run_dir is not None else None, desc=desc)
    if not rt.is_main:
        return {}  # rank 0 evaluates and writes; the others only trained their share
    metrics = _final_metrics(res.history, params, img_size, extra)
    _write_outputs(out, run_dir, model, role=role, kwargs=kwargs, ds=ds, params=params,
                   img_size=img_size, history=res.history, metrics=metrics, seed=seed,
                   extra=extra, run_info={
                       "effective_lr": recipe.effective_lr(), "train_seconds": res.seconds,
                       "resumed_from_epoch": res.resumed_from_epoch,
                       "world_size": rt.world_size, "device": str(rt.device)})
    return metrics


def _teacher_module(teacher_dir: Path, ds: Dataset, rt: Runtime) -> nn.Module:
    teacher, meta = load_model(teacher_dir)
    if meta["classes"] != ds.classes:
        raise CheckpointError(f"teacher {teacher_dir} was trained on classes {meta['classes'][:3]}"
                              f"... ({len(meta['classes'])}), the dataset has {len(ds.classes)}",
                              "use a teacher trained on this dataset")
    teacher.eval().requires_grad_(False)
    return ResizedInput(teacher, meta["img_size"]).to(rt.device).eval()


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def run_teacher(params: Params, *, data: Path, out: Path, run_dir: Path | None,
                seed: int, weights: Path | None = None, arch: str = "convnet",
                rt: Runtime | None = None) -> dict:
    """Train a teacher, or load released weights (pinned sha256); record its accuracy.

    ``arch="convnet"`` is the distillation teacher (``teacher.model``); ``arch="vit"`` the
    transformer teacher of paper Table 2 (``teacher.vit``), always trained here.
    """
    if arch not in ("convnet", "vit"):
        raise ConfigError(f"teacher arch {arch!r} is not convnet or vit", "pass --arch convnet|vit")
    cfg = params.teacher
    model_cfg, recipe = (cfg.model, cfg.train) if arch == "convnet" else (cfg.vit.model,
                                                                          cfg.vit.train)
    if arch == "vit" and not (model_cfg.name or model_cfg.arch == "vit"):
        raise ConfigError(f"teacher.vit.model is {model_cfg.name or model_cfg.arch}, not a "
                          "transformer", "set teacher.vit.model.arch: vit (or a timm ViT name)")
    rt = rt or Runtime.detect(recipe.amp)
    ds = open_dataset(data)
    img_size = model_cfg.img_size
    kwargs = teacher_kwargs(model_cfg, num_classes=ds.num_classes, in_chans=ds.in_chans,
                            drop_path=recipe.drop_path)
    if arch == "convnet" and (cfg.weights is not None or weights is not None):
        if cfg.weights is not None:
            # Not inside `out`: the model directory is replaced whole when it is written.
            downloads = (run_dir / "downloads" if run_dir is not None else
                         Path.home() / ".cache" / "deit-repro" / "downloads")
            path = fetch_weights(cfg.weights, weights, downloads)
        else:
            path = weights
        model = build_model("teacher", kwargs)
        load_state_dict_checked(model, load_weights_file(path), what=f"teacher weights {path}")
        model.to(rt.device).eval()
        metrics = _heads_metrics(model, ds, params, img_size, rt)
        extra = {"role": "teacher", "source": str(path)}
        history = [{"epoch": 0, "train_loss": None, **metrics}]
        final = _final_metrics(history, params, img_size, extra)
        _write_outputs(out, run_dir, model, role="teacher", kwargs=kwargs, ds=ds, params=params,
                       img_size=img_size, history=history, metrics=final, seed=seed,
                       extra=extra, run_info={"sha256": atomic.sha256_file(path)})
        return final
    torch.manual_seed(seed)
    model = create_teacher(**kwargs)
    loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
    return _train_and_save(
        model=model, role="teacher", kwargs=kwargs, loss_fn=loss, recipe=recipe, ds=ds,
        params=params, img_size=img_size, seed=seed, out=out, run_dir=run_dir,
        fingerprint_of={"stage": "teacher", "model": to_dict(model_cfg),
                        "train": to_dict(recipe), "seed": seed, "data": ds.content_hash},
        extra={"role": "teacher", "arch": model_cfg.name or model_cfg.arch}, rt=rt,
        desc=f"teacher {arch}")


def run_pretrain(params: Params, *, data: Path, teacher: Path | None, out: Path,
                 run_dir: Path | None, distill: str, dist_token: bool, seed: int,
                 rt: Runtime | None = None) -> dict:
    """Train a DeiT student: no distillation, soft or hard, with or without the distillation
    token (paper §4, Table 3)."""
    rt = rt or Runtime.detect(params.student.train.amp)
    cfg = params.student
    if distill not in ("none", "soft", "hard"):
        raise ConfigError(f"distill = {distill!r} is not one of none, soft, hard",
                          "pass --distill none|soft|hard")
    if distill == "none" and dist_token:
        raise ConfigError("a distillation token without distillation has no target",
                          "use --distill soft|hard with --dist-token yes, or --dist-token no")
    ds = open_dataset(data)
    teacher_mod = None
    if distill != "none":
        if teacher is None:
            raise ConfigError(f"--distill {distill} needs a teacher", "pass --teacher DIR")
        teacher = resolve_model_dir(teacher, seed)
        teacher_mod = _teacher_module(teacher, ds, rt)
    alpha, tau = params.distillation.weights(distill)  # type: ignore[arg-type]
    kwargs = student_kwargs(cfg.model, distilled=dist_token, num_classes=ds.num_classes,
                            in_chans=ds.in_chans, drop_path=cfg.train.drop_path)
    torch.manual_seed(seed)
    model = create_student(**kwargs)
    set_training_outputs(model, dist_token)
    loss = DistillationLoss(base_criterion(cfg.train), teacher_mod, distill=distill, alpha=alpha,
                            tau=tau)
    variant = {"distill": distill, "dist_token": dist_token, "alpha": alpha, "tau": tau}
    return _train_and_save(
        model=model, role="student", kwargs=kwargs, loss_fn=loss, recipe=cfg.train, ds=ds,
        params=params, img_size=cfg.model.img_size, seed=seed, out=out,
        run_dir=run_dir,
        fingerprint_of={"stage": "pretrain", "cfg": to_dict(cfg), "variant": variant,
                        "seed": seed, "data": ds.content_hash,
                        "teacher": _teacher_hash(teacher) if teacher_mod is not None else None},
        extra={"role": "student", **variant}, rt=rt, desc=f"pretrain {distill}")


def run_finetune(params: Params, *, data: Path, student: Path, teacher: Path | None, out: Path,
                 run_dir: Path | None, seed: int, img_size: int | None = None,
                 interpolation: str | None = None, rt: Runtime | None = None) -> dict:
    """Fine-tune a student at another resolution (paper §6: 224 -> 384), positional embeddings
    resampled bicubic (bilinear for the ablation), with the true label and the teacher's
    prediction (the student's own distillation kind)."""
    cfg = params.finetune
    rt = rt or Runtime.detect(cfg.train.amp)
    img_size = img_size or cfg.img_size
    interpolation = interpolation or cfg.interpolation
    ds = open_dataset(data)
    student = resolve_model_dir(student, seed)
    old, meta = load_model(student)
    _same_classes(meta, ds, student)
    distill = meta.get("distill", "none")
    dist_token = bool(meta.get("dist_token", False))
    kwargs = dict(meta["kwargs"], img_size=img_size, drop_path_rate=cfg.train.drop_path)
    torch.manual_seed(seed)
    model = create_student(**kwargs)
    adapt_for_finetune(model, old.state_dict(), interpolation=interpolation, drop_heads=False)
    set_training_outputs(model, dist_token)
    if distill != "none" and teacher:
        teacher = resolve_model_dir(teacher, seed)
    teacher_mod = _teacher_module(teacher, ds, rt) if distill != "none" and teacher else None
    if distill != "none" and teacher_mod is None:
        raise ConfigError(f"student {student} was distilled ({distill}); fine-tuning uses the "
                          "teacher's prediction too", "pass --teacher DIR")
    model.to(rt.device)
    # Accuracy right after resampling, before any fine-tuning step (Table 10's interpolation
    # ablation without training).
    before = _heads_metrics(model, ds, params, img_size, rt)
    alpha, tau = params.distillation.weights(distill)
    loss = DistillationLoss(base_criterion(cfg.train), teacher_mod, distill=distill, alpha=alpha,
                            tau=tau)
    variant = {"distill": distill, "dist_token": dist_token, "alpha": alpha, "tau": tau,
               "from_img_size": meta["img_size"], "interpolation": interpolation,
               "before_finetune": {k: v for k, v in before.items()}}
    return _train_and_save(
        model=model, role="student", kwargs=kwargs, loss_fn=loss, recipe=cfg.train, ds=ds,
        params=params, img_size=img_size, seed=seed, out=out, run_dir=run_dir,
        fingerprint_of={"stage": "finetune", "cfg": to_dict(cfg), "img_size": img_size,
                        "interpolation": interpolation, "seed": seed, "data": ds.content_hash,
                        "student": _teacher_hash(student),
                        "teacher": _teacher_hash(teacher) if teacher_mod is not None else None},
        extra={"role": "student", **variant}, rt=rt, desc=f"finetune {img_size}px")


def run_transfer(params: Params, *, data: Path, student: Path | None, out: Path,
                 run_dir: Path | None, seed: int, rt: Runtime | None = None) -> dict:
    """Fine-tune a pretrained student on a downstream dataset, or (``student=None``) train the
    same architecture from scratch for the comparison (paper §5.3, Table 7)."""
    cfg = params.transfer
    ds = open_dataset(data)
    if student is not None:
        recipe = cfg.train
        student = resolve_model_dir(student, seed)
        old, meta = load_model(student)
        if meta["in_chans"] != ds.in_chans:
            raise ConfigError(f"student {student} takes {meta['in_chans']} channels, dataset "
                              f"{data} has {ds.in_chans}", "prepare the dataset with matching "
                              "channels")
        kwargs = dict(meta["kwargs"], num_classes=ds.num_classes,
                      drop_path_rate=recipe.drop_path)
        img_size = int(meta["img_size"])
    else:
        recipe = cfg.scratch_train or cfg.train
        meta = None
        m = params.student.model
        kwargs = student_kwargs(m, distilled=False, num_classes=ds.num_classes,
                                in_chans=ds.in_chans, drop_path=recipe.drop_path)
        img_size = m.img_size
    rt = rt or Runtime.detect(recipe.amp)
    torch.manual_seed(seed)
    model = create_student(**kwargs)
    if student is not None:
        adapt_for_finetune(model, old.state_dict(), interpolation="bicubic", drop_heads=True)
    # No teacher downstream: a distilled student is trained through its joint output.
    set_training_outputs(model, False)
    loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
    extra = {"role": "student", "init": "pretrained" if student is not None else "scratch",
             "pretrained_from": str(student) if student is not None else None}
    return _train_and_save(
        model=model, role="student", kwargs=kwargs, loss_fn=loss, recipe=recipe, ds=ds,
        params=params, img_size=img_size, seed=seed, out=out, run_dir=run_dir,
        fingerprint_of={"stage": "transfer", "cfg": to_dict(recipe), "kwargs": kwargs,
                        "seed": seed, "data": ds.content_hash,
                        "student": _teacher_hash(student) if student is not None else None},
        extra=extra, rt=rt, desc=f"transfer {extra['init']}")


def _same_classes(meta: dict[str, Any], ds: Dataset, where: Path) -> None:
    if meta["classes"] != ds.classes:
        raise CheckpointError(f"model {where} has {len(meta['classes'])} classes, dataset "
                              f"{ds.path} has {ds.num_classes} (class count mismatch between "
                              "dataset and checkpoint)", "use the dataset the model was trained on")


def _teacher_hash(path: Path | None) -> str | None:
    if path is None:
        return None
    weights = Path(path) / "model.pt"
    return atomic.sha256_file(weights) if weights.is_file() else None
