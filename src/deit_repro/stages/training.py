"""The training stages: teacher, pretrain, finetune, transfer (paper §4–§6, Tables 2, 3, 7, 10).

Each ``run_*`` function takes the parsed params, explicit paths and the variant (distillation kind,
token, seed, resolution), trains with :func:`deit_repro.core.engine.fit`, and writes a model
directory (see :mod:`deit_repro.core.model_dirs`). :class:`TrainingRun` is one run of a stage with
everything fixed but the seed and its directories: the same object runs in this process, in a
forked child per seed, or in every task of a submitit job, and holds the stage's rules that change
results (the distillation token's ``auto``, which teacher is read, the thread count, how many runs
the stage trains). Nothing here parses arguments, launches jobs or exits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_repro import atomic, provenance
from deit_repro.code_deps import code_hash
from deit_repro.config import Params, TrainCfg, config_hash, to_dict
from deit_repro.core.datasets import Dataset, eval_batches, open_dataset, train_batches
from deit_repro.core.engine import Runtime, ShardEval, base_criterion, fit, shard_evaluate
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.model_dirs import (
    PREDICTIONS,
    build_model,
    fetch_weights,
    load_model,
    load_weights_file,
    resolve_model_dir,
    save_model,
    save_predictions,
    student_kwargs,
    teacher_kwargs,
    weights_hash,
)
from deit_repro.core.models import (
    create_student,
    create_teacher,
    load_state_dict_checked,
    reported_head,
    set_training_outputs,
    student_heads,
)
from deit_repro.core.pos_embed import adapt_for_finetune
from deit_repro.core.live_metrics import StageLive
from deit_repro.core.records import (
    aggregate,
    combine_histories,
    round_metrics,
    write_aggregate,
    write_history,
    write_run,
)
from deit_repro.errors import CheckpointError, ConfigError

_logger = logging.getLogger(__name__)


class ResizedInput(nn.Module):
    """Feeds a model its own resolution: the teacher of a student trained at another size
    (facebookresearch/deit#90: no 384 teacher exists, the teacher sees its own 224 input)."""

    def __init__(self, model: nn.Module, img_size: int):
        super().__init__()
        self.model, self.img_size = model, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(
                x,
                size=(self.img_size, self.img_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        return self.model(x)


@dataclass
class _Trainee:
    """A model to train or record, with how it is rebuilt and described."""

    model: nn.Module
    role: str  # student | teacher
    kwargs: dict[str, Any]  # its factory's keyword arguments (model.json)
    img_size: int
    extra: dict[str, Any]  # descriptive fields of metrics.json and model.json
    classes: dict[str, torch.Tensor] = field(default_factory=dict)  # more per-image classes
    seed: int | None = None  # the seed it was trained with (None: released weights)


@dataclass(frozen=True)
class _Where:
    """One run's place: params, data, seed, output directories and device."""

    params: Params
    ds: Dataset
    seed: int
    out: Path
    run_dir: Path | None
    rt: Runtime


def _evaluation(model: nn.Module, at: _Where, img_size: int) -> ShardEval:
    """Every head on the test split. In a DDP job every rank evaluates its shard and every rank
    gets the totals and the per-image classes (a collective)."""
    was_training = model.training
    model.eval()
    batches = eval_batches(
        at.ds, at.params.eval, img_size, world_size=at.rt.world_size, rank=at.rt.rank
    )
    res = shard_evaluate(lambda x: student_heads(model, x), batches, at.rt)
    model.train(was_training)
    return res


def _flat(table: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Flat keys for the history rows: ``test_<head>_<metric>``."""
    return {f"test_{k}_{m}": v for k, d in table.items() for m, v in d.items()}


def _final_metrics(
    history: list[dict[str, Any]], params: Params, img_size: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """Final-epoch metrics (never best-on-test) with the eval settings beside them.

    Only values that the params, data and seed determine: timings and resume information go to
    the run directory's run.json, so a rerun writes the same bytes.
    """
    last = history[-1]
    heads: dict[str, dict[str, float]] = {}
    for k, v in last.items():
        if k.startswith("test_"):
            head, metric = k[len("test_") :].rsplit("_", 1)
            heads.setdefault(head, {})[metric] = v
    return round_metrics(
        {
            **extra,
            "epochs": last["epoch"],
            "heads": heads,
            "top1": reported_head(heads)["top1"],
            "train_loss": last["train_loss"],
            "eval": {
                "img_size": img_size,
                "crop_pct": params.eval.crop_pct,
                "interpolation": params.eval.interpolation,
                "weights": "raw (not EMA)",
                "split": "test",
            },
            # what decides the last bits (the same on every seed of one machine): the tables
            # put it in results/provenance.json
            "float_path": provenance.float_path(),
        }
    )


#: history columns that measure time, not the model: kept in the run directory only
_TIMING = ("train_images_per_s",)


def _write_outputs(
    t: _Trainee,
    at: _Where,
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    run_info: dict[str, Any],
    classes: dict[str, torch.Tensor],
) -> None:
    """The model directory (deterministic files) and the run directory (provenance, timings).

    The model directory is written whole into a temporary sibling and renamed onto ``at.out``:
    a crash leaves the previous complete directory or none, never new weights beside an old
    description.
    """
    if at.run_dir is not None:
        write_run(at.run_dir, at.params, seed=at.seed, **t.extra, **run_info)
    with atomic.atomic_dir(at.out) as tmp:
        save_model(
            tmp,
            t.model,
            role=t.role,
            kwargs=t.kwargs,
            ds=at.ds,
            img_size=t.img_size,
            extra={**t.extra, "seed": t.seed},
        )
        write_history(
            tmp / "history.csv",
            [{k: v for k, v in row.items() if k not in _TIMING} for row in history],
        )
        if at.run_dir is None:
            write_run(tmp, at.params, seed=at.seed, **t.extra, **run_info)
        atomic.write_json(tmp / "metrics.json", metrics)
        save_predictions(
            tmp / PREDICTIONS, at.ds.test.labels, classes, num_classes=at.ds.num_classes
        )


def _train_and_save(
    t: _Trainee,
    at: _Where,
    *,
    loss_fn,
    recipe: TrainCfg,
    identity: dict[str, Any],
    desc: str,
    restart: bool = False,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``t.model`` with ``recipe`` (resuming from the run directory's checkpoint when its
    fingerprint, ``identity`` and the computing code, matches) and write the outputs;
    ``provenance`` goes to its ``run.json`` (which teacher it read)."""
    rt = at.rt
    t.seed = at.seed
    model = t.model.to(rt.device)
    train_model = model
    if rt.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    batches = train_batches(
        at.ds, recipe, img_size=t.img_size, seed=at.seed, world_size=rt.world_size, rank=rt.rank
    )
    run_dir = at.run_dir
    final: list[ShardEval] = []  # the raw model's latest evaluation (not the EMA's)

    def evaluate(m: nn.Module) -> dict[str, Any]:
        res = _evaluation(m, at, t.img_size)
        if m is model:
            final[:] = [res]
        return _flat(res.table)

    res = fit(
        model=train_model,
        loss_fn=loss_fn,
        train_batches=batches,
        recipe=recipe,
        num_classes=at.ds.num_classes,
        seed=at.seed,
        rt=rt,
        checkpoint_path=run_dir / "checkpoint.pth" if run_dir is not None else None,
        # The computing code too: a checkpoint written by other code is never resumed
        # from, while an edit to a launcher or a report is no reason to start over.
        fingerprint=config_hash({**identity, "code": code_hash(__name__)}),
        evaluate=evaluate,
        on_epoch_end=(lambda h: write_history(run_dir / "history.csv", h))
        if run_dir is not None
        else None,
        desc=desc,
        restart=restart,
    )
    if not final:
        # A finished checkpoint resumes without an epoch to run (its fingerprint leaves out the
        # eval settings and the thread count, which change no weight): its final weights are
        # evaluated again, and that one evaluation gives both the metrics and the per-image
        # classes, so they can never disagree.
        final[:] = [_evaluation(model, at, t.img_size)]
        res.history[-1] = {**res.history[-1], **_flat(final[0].table)}
    if not rt.is_main:
        return {}  # rank 0 evaluates and writes; the others only trained their share
    metrics = _final_metrics(res.history, at.params, t.img_size, t.extra)
    _write_outputs(
        t,
        at,
        res.history,
        metrics,
        run_info={
            "effective_lr": recipe.effective_lr(),
            "train_seconds": res.seconds,
            "resumed_from_epoch": res.resumed_from_epoch,
            "world_size": rt.world_size,
            "device": str(rt.device),
            **(provenance or {}),
        },
        classes={**t.classes, **final[0].classes},
    )
    return metrics


def teacher_record(teacher_dir: Path | None) -> dict[str, Any] | None:
    """Which teacher run a student read (its ``run.json``): the model directory, the seed that
    teacher was trained with (None for released weights, which serve every seed) and its
    weights' hash."""
    if teacher_dir is None:
        return None
    meta = json.loads((Path(teacher_dir) / "model.json").read_text())
    return {"dir": str(teacher_dir), "seed": meta.get("seed"), "weights": weights_hash(teacher_dir)}


def _teacher_module(teacher_dir: Path, ds: Dataset, rt: Runtime) -> nn.Module:
    teacher, meta = load_model(teacher_dir)
    if meta["classes"] != ds.classes:
        raise CheckpointError(
            f"teacher {teacher_dir} was trained on classes {meta['classes'][:3]}"
            f"... ({len(meta['classes'])}), the dataset has {len(ds.classes)}",
            "use a teacher trained on this dataset",
        )
    teacher.eval().requires_grad_(False)
    wrapped = ResizedInput(teacher, meta["img_size"]).to(rt.device).eval()
    if rt.device.type == "cuda":
        # The convnet teacher runs a forward per student step: channels_last is the layout its
        # cuDNN convolutions are fastest in under autocast.
        wrapped = wrapped.to(memory_format=torch.channels_last)
    return wrapped


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def run_teacher(
    params: Params,
    *,
    data: Path,
    out: Path,
    run_dir: Path | None,
    seed: int,
    weights: Path | None = None,
    arch: str = "convnet",
    rt: Runtime | None = None,
    restart: bool = False,
) -> dict:
    """Train a teacher, or load released weights (pinned sha256); record its accuracy.

    ``arch="convnet"`` is the distillation teacher (``teacher.model``); ``arch="vit"`` the
    transformer teacher of paper Table 2 (``teacher.vit``), always trained here.
    """
    if arch not in ("convnet", "vit"):
        raise ConfigError(f"teacher arch {arch!r} is not convnet or vit", "pass --arch convnet|vit")
    cfg = params.teacher
    model_cfg, recipe = (
        (cfg.model, cfg.train) if arch == "convnet" else (cfg.vit.model, cfg.vit.train)
    )
    if arch == "vit" and not (model_cfg.name or model_cfg.arch == "vit"):
        raise ConfigError(
            f"teacher.vit.model is {model_cfg.name or model_cfg.arch}, not a transformer",
            "set teacher.vit.model.arch: vit (or a timm ViT name)",
        )
    rt = rt or Runtime.detect(recipe.amp)
    ds = open_dataset(data)
    at = _Where(params, ds, seed, out, run_dir, rt)
    img_size = model_cfg.img_size
    kwargs = teacher_kwargs(
        model_cfg, num_classes=ds.num_classes, in_chans=ds.in_chans, drop_path=recipe.drop_path
    )
    if arch == "convnet" and (cfg.weights is not None or weights is not None):
        if cfg.weights is not None:
            # Not inside `out`: the model directory is replaced whole when it is written.
            downloads = (
                run_dir / "downloads"
                if run_dir is not None
                else Path.home() / ".cache" / "deit-repro" / "downloads"
            )
            # In a DDP job rank 0 downloads; the others read its verified file (one download, no
            # two ranks writing the same path), or raise its error with it (no internet on the
            # compute node: every rank says so at once, none waits in a barrier).
            rt.main_first(lambda: fetch_weights(cfg.weights, weights, downloads))
            path = fetch_weights(cfg.weights, weights, downloads)
        else:
            path = weights
        model = build_model("teacher", kwargs)
        load_state_dict_checked(model, load_weights_file(path), what=f"teacher weights {path}")
        model.to(rt.device).eval()
        evaluation = _evaluation(model, at, img_size)  # every rank: its shard of the test split
        metrics = _flat(evaluation.table)
        if not rt.is_main:
            return {}  # rank 0 writes the model directory
        t = _Trainee(model, "teacher", kwargs, img_size, {"role": "teacher", "source": str(path)})
        history = [{"epoch": 0, "train_loss": None, **metrics}]
        final = _final_metrics(history, params, img_size, t.extra)
        _write_outputs(
            t,
            at,
            history,
            final,
            run_info={"sha256": atomic.sha256_file(path)},
            classes=evaluation.classes,
        )
        return final
    torch.manual_seed(seed)
    model = create_teacher(**kwargs)
    loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
    t = _Trainee(
        model,
        "teacher",
        kwargs,
        img_size,
        {"role": "teacher", "arch": model_cfg.name or model_cfg.arch},
    )
    return _train_and_save(
        t,
        at,
        loss_fn=loss,
        recipe=recipe,
        desc=f"teacher {arch}",
        restart=restart,
        identity={
            "stage": "teacher",
            "model": to_dict(model_cfg),
            "train": to_dict(recipe),
            "seed": seed,
            "data": ds.content_hash,
        },
    )


def run_pretrain(
    params: Params,
    *,
    data: Path,
    teacher: Path | None,
    out: Path,
    run_dir: Path | None,
    distill: str,
    dist_token: bool,
    seed: int,
    rt: Runtime | None = None,
    restart: bool = False,
) -> dict:
    """Train a DeiT student: no distillation, soft or hard, with or without the distillation
    token (paper §4, Table 3)."""
    rt = rt or Runtime.detect(params.student.train.amp)
    cfg = params.student
    if distill not in ("none", "soft", "hard"):
        raise ConfigError(
            f"distill = {distill!r} is not one of none, soft, hard", "pass --distill none|soft|hard"
        )
    if distill == "none" and dist_token:
        raise ConfigError(
            "a distillation token without distillation has no target",
            "use --distill soft|hard with --dist-token yes, or --dist-token no",
        )
    ds = open_dataset(data)
    at = _Where(params, ds, seed, out, run_dir, rt)
    teacher_mod = None
    if distill != "none":
        if teacher is None:
            raise ConfigError(f"--distill {distill} needs a teacher", "pass --teacher DIR")
        teacher = resolve_model_dir(teacher, seed)
        teacher_mod = _teacher_module(teacher, ds, rt)
    alpha, tau = params.distillation.weights(distill)  # type: ignore[arg-type]
    kwargs = student_kwargs(
        cfg.model,
        distilled=dist_token,
        num_classes=ds.num_classes,
        in_chans=ds.in_chans,
        drop_path=cfg.train.drop_path,
    )
    torch.manual_seed(seed)
    model = create_student(**kwargs)
    set_training_outputs(model, dist_token)
    loss = DistillationLoss(
        base_criterion(cfg.train), teacher_mod, distill=distill, alpha=alpha, tau=tau
    )
    variant = {"distill": distill, "dist_token": dist_token, "alpha": alpha, "tau": tau}
    t = _Trainee(model, "student", kwargs, cfg.model.img_size, {"role": "student", **variant})
    return _train_and_save(
        t,
        at,
        loss_fn=loss,
        recipe=cfg.train,
        desc=f"pretrain {distill}",
        restart=restart,
        identity={
            "stage": "pretrain",
            "cfg": to_dict(cfg),
            "variant": variant,
            "seed": seed,
            "data": ds.content_hash,
            "teacher": weights_hash(teacher) if teacher_mod is not None else None,
        },
        provenance={"teacher": teacher_record(teacher if teacher_mod is not None else None)},
    )


def run_finetune(
    params: Params,
    *,
    data: Path,
    student: Path,
    teacher: Path | None,
    out: Path,
    run_dir: Path | None,
    seed: int,
    img_size: int | None = None,
    interpolation: str | None = None,
    rt: Runtime | None = None,
    restart: bool = False,
) -> dict:
    """Fine-tune a student at another resolution (paper §6: 224 -> 384), positional embeddings
    resampled bicubic (bilinear for the ablation), with the true label and the teacher's
    prediction (the student's own distillation kind)."""
    cfg = params.finetune
    rt = rt or Runtime.detect(cfg.train.amp)
    img_size = img_size or cfg.img_size
    interpolation = interpolation or cfg.interpolation
    ds = open_dataset(data)
    at = _Where(params, ds, seed, out, run_dir, rt)
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
        raise ConfigError(
            f"student {student} was distilled ({distill}); fine-tuning uses the "
            "teacher's prediction too",
            "pass --teacher DIR",
        )
    model.to(rt.device)
    # Accuracy right after resampling, before any fine-tuning step (Table 10's interpolation
    # ablation without training).
    before_eval = _evaluation(model, at, img_size)
    before = _flat(before_eval.table)
    alpha, tau = params.distillation.weights(distill)
    loss = DistillationLoss(
        base_criterion(cfg.train), teacher_mod, distill=distill, alpha=alpha, tau=tau
    )
    variant = {
        "distill": distill,
        "dist_token": dist_token,
        "alpha": alpha,
        "tau": tau,
        "from_img_size": meta["img_size"],
        "interpolation": interpolation,
        "before_finetune": {k: v for k, v in before.items()},
    }
    t = _Trainee(
        model,
        "student",
        kwargs,
        img_size,
        {"role": "student", **variant},
        classes={f"before_finetune/{h}": v for h, v in before_eval.classes.items()},
    )
    return _train_and_save(
        t,
        at,
        loss_fn=loss,
        recipe=cfg.train,
        desc=f"finetune {img_size}px",
        restart=restart,
        identity={
            "stage": "finetune",
            "cfg": to_dict(cfg),
            "img_size": img_size,
            "interpolation": interpolation,
            "seed": seed,
            "data": ds.content_hash,
            "student": weights_hash(student),
            "teacher": weights_hash(teacher) if teacher_mod is not None else None,
        },
        provenance={"teacher": teacher_record(teacher if teacher_mod is not None else None)},
    )


def run_transfer(
    params: Params,
    *,
    data: Path,
    dataset: str,
    student: Path | None,
    out: Path,
    run_dir: Path | None,
    seed: int,
    rt: Runtime | None = None,
    restart: bool = False,
) -> dict:
    """Fine-tune a pretrained student on a downstream dataset, or (``student=None``) train the
    same architecture from scratch for the comparison (paper §5.3, Table 7), with the dataset's
    recipe (``transfer.recipes``, else ``transfer.train``)."""
    cfg = params.transfer
    ds = open_dataset(data)
    if student is not None:
        recipe = cfg.recipe(dataset)
        student = resolve_model_dir(student, seed)
        old, meta = load_model(student)
        if meta["in_chans"] != ds.in_chans:
            raise ConfigError(
                f"student {student} takes {meta['in_chans']} channels, dataset "
                f"{data} has {ds.in_chans}",
                "prepare the dataset with matching channels",
            )
        kwargs = dict(meta["kwargs"], num_classes=ds.num_classes, drop_path_rate=recipe.drop_path)
        img_size = int(meta["img_size"])
    else:
        recipe = cfg.recipe(dataset, "scratch")
        meta = None
        m = params.student.model
        kwargs = student_kwargs(
            m,
            distilled=False,
            num_classes=ds.num_classes,
            in_chans=ds.in_chans,
            drop_path=recipe.drop_path,
        )
        img_size = m.img_size
    rt = rt or Runtime.detect(recipe.amp)
    at = _Where(params, ds, seed, out, run_dir, rt)
    torch.manual_seed(seed)
    model = create_student(**kwargs)
    if student is not None:
        adapt_for_finetune(model, old.state_dict(), interpolation="bicubic", drop_heads=True)
    # No teacher downstream: a distilled student is trained through its joint output.
    set_training_outputs(model, False)
    loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
    extra = {
        "role": "student",
        "init": "pretrained" if student is not None else "scratch",
        "pretrained_from": str(student) if student is not None else None,
    }
    t = _Trainee(model, "student", kwargs, img_size, extra)
    return _train_and_save(
        t,
        at,
        loss_fn=loss,
        recipe=recipe,
        desc=f"transfer {extra['init']}",
        restart=restart,
        identity={
            "stage": "transfer",
            "cfg": to_dict(recipe),
            "kwargs": kwargs,
            "seed": seed,
            "data": ds.content_hash,
            "student": weights_hash(student) if student is not None else None,
        },
    )


def _same_classes(meta: dict[str, Any], ds: Dataset, where: Path) -> None:
    if meta["classes"] != ds.classes:
        raise CheckpointError(
            f"model {where} has {len(meta['classes'])} classes, dataset "
            f"{ds.path} has {ds.num_classes} (class count mismatch between "
            "dataset and checkpoint)",
            "use the dataset the model was trained on",
        )


# --------------------------------------------------------------------------------------------------
# One run of a stage, whatever launches it
# --------------------------------------------------------------------------------------------------

_RUN: dict[str, Callable[..., dict]] = {
    "teacher": run_teacher,
    "pretrain": run_pretrain,
    "finetune": run_finetune,
    "transfer": run_transfer,
}


@dataclass(frozen=True)
class RunSpec:
    """Where one seed's run goes: its model directory and its run directory."""

    seed: int
    out: Path
    run_dir: Path | None


@dataclass(frozen=True)
class TrainingRun:
    """One run of a training stage with everything fixed but the seed and its directories.

    Picklable (submitit sends it to its jobs), and the same object trains in this process, in a
    forked child per seed, or in every task of a DDP job. Build it with :func:`teacher_run`,
    :func:`pretrain_run`, :func:`finetune_run` or :func:`transfer_run`, which apply the stage's
    rules to the command line's choices.
    """

    stage: str
    params: Params
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_seed(self) -> bool:
        """One run per seed of ``params.seeds``. A trained teacher too: student seed k distils
        from teacher seed k (:func:`resolve_model_dir`), so the teacher's run-to-run variance is
        inside every paired interval instead of fixed by one teacher run. Released teacher
        weights are one fixed teacher (as the paper's RegNetY-16GF): one run serves every seed."""
        return not (self.stage == "teacher" and self.released_teacher)

    @property
    def released_teacher(self) -> bool:
        return self.options.get("arch", "convnet") == "convnet" and (
            self.params.teacher.weights is not None or self.options.get("weights") is not None
        )

    @property
    def resources(self):
        """What one submitit job of this run asks for (:meth:`LaunchCfg.resources`): released
        teacher weights are only evaluated; every other run trains on the stage's allocation
        (``released_teacher`` alone is true for any stage of a profile with teacher.weights)."""
        evaluate_only = self.stage == "teacher" and self.released_teacher
        return self.params.launch.resources(self.stage, evaluate_only=evaluate_only)

    @property
    def threads(self) -> int:
        """torch threads of one run (results on CPU depend on it). The seeds of a stage train
        side by side at ``params.threads`` each; a single run (released teacher weights) gets
        the stage's whole budget."""
        return self.params.threads if self.multi_seed else self.params.one_process_threads

    def specs(self, out: Path, run_dir: Path | None, seed: int | None = None) -> list[RunSpec]:
        """The runs of the stage: ``seed`` alone (or released teacher weights) into ``out``, else
        one per seed of the profile into ``out/seed<k>/`` (what :func:`resolve_model_dir`
        finds downstream)."""
        if seed is not None or not self.multi_seed:
            return [RunSpec(self.params.seeds[0] if seed is None else seed, out, run_dir)]
        return [
            RunSpec(k, out / f"seed{k}", run_dir / f"seed{k}" if run_dir else None)
            for k in self.params.seeds
        ]

    def use_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        """Train one run; its final metrics (empty on DDP ranks other than 0)."""
        self.use_threads()
        return _RUN[self.stage](
            self.params, seed=spec.seed, out=spec.out, run_dir=spec.run_dir, **self.options
        )

    def summarise(
        self,
        runs: list[dict[str, Any]],
        specs: list[RunSpec],
        *,
        metrics: Path | None,
        history: Path | None,
        live: StageLive | None = None,
    ) -> None:
        """The stage's outputs across its runs: the seeds' aggregate (mean, std, per-seed values)
        to ``metrics``, every seed's history to ``history``, and the last epochs and the final
        numbers to the stage's live log."""
        seeds = [s.seed for s in specs]
        agg = write_aggregate(metrics, runs, seeds) if metrics is not None else None
        histories = [s.out / "history.csv" for s in specs]
        if history is not None:
            combine_histories(history, histories, seeds)
        if live is not None:
            live.finish(histories, agg if agg is not None else aggregate(runs, seeds))


def teacher_run(
    params: Params, *, data: Path, weights: Path | None = None, arch: str = "convnet"
) -> TrainingRun:
    return TrainingRun("teacher", params, dict(data=data, weights=weights, arch=arch))


def dist_token_of(distill: str, choice: str) -> bool:
    """``--dist-token auto``: the distillation token (DeiT⚗) whenever there is a teacher."""
    return distill != "none" if choice == "auto" else choice == "yes"


def pretrain_run(
    params: Params,
    *,
    data: Path,
    teacher: Path | None,
    distill: str,
    dist_token: str = "auto",
    epochs: int | None = None,
) -> TrainingRun:
    """``epochs``: a Figure 3 budget, the student's recipe with its own whole schedule of that
    many epochs (``student.train.epochs`` otherwise)."""
    if epochs is not None and epochs != params.student.train.epochs:
        train = params.student.train
        if epochs <= train.warmup_epochs:
            raise ConfigError(
                f"--epochs {epochs} leaves no epoch after the {train.warmup_epochs} warmup epochs",
                "pass a budget longer than student.train.warmup_epochs",
            )
        student = dataclasses.replace(
            params.student, train=dataclasses.replace(train, epochs=epochs)
        )
        # Figure 3's budgets stay the same set: the profile's own schedule becomes one of them.
        others = tuple(b for b in params.budget_epochs() if b != epochs)
        params = dataclasses.replace(
            params, student=student, figure3=dataclasses.replace(params.figure3, budgets=others)
        )
    # The teacher is read only when there is something to distil: the headline stage gets
    # --teacher whatever `distill` is, and ignores it for `distill: none`.
    return TrainingRun(
        "pretrain",
        params,
        dict(
            data=data,
            teacher=teacher if distill != "none" else None,
            distill=distill,
            dist_token=dist_token_of(distill, dist_token),
        ),
    )


def finetune_run(
    params: Params,
    *,
    data: Path,
    student: Path,
    teacher: Path | None,
    img_size: int | None = None,
    interpolation: str | None = None,
) -> TrainingRun:
    return TrainingRun(
        "finetune",
        params,
        dict(
            data=data,
            student=student,
            teacher=teacher,
            img_size=img_size,
            interpolation=interpolation,
        ),
    )


def transfer_run(
    params: Params, *, data: Path, init: str, student: Path | None, dataset: str | None = None
) -> TrainingRun:
    """``init: pretrained`` fine-tunes ``student``; ``scratch`` trains the same architecture
    from random weights (paper Table 7's comparison) and reads no student. ``dataset``, the key
    of ``transfer.datasets`` whose recipe applies, defaults to the data directory's name
    (``data/<name>`` in dvc.yaml)."""
    dataset = dataset or Path(data).name
    if dataset not in params.transfer.datasets:
        raise ConfigError(
            f"dataset {dataset!r} is not in transfer.datasets {list(params.transfer.datasets)}",
            "pass --dataset NAME (a key of transfer.datasets) or add it there",
        )
    if init not in ("pretrained", "scratch"):
        raise ConfigError(
            f"--init {init!r} is not pretrained or scratch", "pass --init pretrained|scratch"
        )
    if init == "pretrained" and student is None:
        raise ConfigError("--init pretrained needs --student DIR", "pass the pretrained student")
    return TrainingRun(
        "transfer",
        params,
        dict(data=data, dataset=dataset, student=student if init == "pretrained" else None),
    )
