"""What every training stage shares: one run's place (params, data, seed, directories, device),
its model to train (:class:`Trainee`), training it with :func:`deit_repro.core.engine.fit` and
writing its model directory (:func:`train_and_save`), the teacher a student reads, and the run
object's base (:class:`StageRun`: one run of a stage with everything fixed but the seed, whatever
launches it).

Each stage is a module of its own (``teacher``, ``pretrain``, ``finetune``, ``transfer``) with its
run object and its train function; a checkpoint's fingerprint hashes the code of the stage's own
module (and this one's), so an edit to one stage never invalidates another's checkpoints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_repro import atomic, provenance
from deit_repro.code_deps import code_hash
from deit_repro.config import DistillKind, JobResources, Params, TrainCfg
from deit_repro.core.datasets import Dataset, eval_batches, open_dataset, train_batches
from deit_repro.core.engine import Runtime, ShardEval, base_criterion, fit, shard_evaluate
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.live_metrics import StageLive
from deit_repro.core.model_dirs import (
    PREDICTIONS,
    load_model,
    resolve_model_dir,
    save_model,
    save_predictions,
    weights_hash,
)
from deit_repro.core.models import reported_head, student_heads
from deit_repro.core.records import (
    aggregate,
    combine_histories,
    round_metrics,
    write_aggregate,
    write_history,
    write_run,
)
from deit_repro.errors import CheckpointError
from deit_repro.typed_yaml import config_hash

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
class Trainee:
    """A model to train or record, with how it is rebuilt and described."""

    model: nn.Module
    role: str  # student | teacher
    kwargs: dict[str, Any]  # its factory's keyword arguments (model.json)
    img_size: int
    extra: dict[str, Any]  # descriptive fields of metrics.json and model.json
    classes: dict[str, torch.Tensor] = field(default_factory=dict)  # more per-image classes
    seed: int | None = None  # the seed it was trained with (None: released weights)


@dataclass(frozen=True)
class Place:
    """One run's place: params, data, seed, output directories and device."""

    params: Params
    ds: Dataset
    seed: int
    out: Path
    run_dir: Path | None
    rt: Runtime


def evaluation(model: nn.Module, at: Place, img_size: int) -> ShardEval:
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


def flat(table: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Flat keys for the history rows: ``test_<head>_<metric>``."""
    return {f"test_{k}_{m}": v for k, d in table.items() for m, v in d.items()}


def final_metrics(
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


def write_outputs(
    t: Trainee,
    at: Place,
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


@dataclass
class Training:
    """What one run of a stage trains: built by the stage's :meth:`StageRun.plan`, trained and
    written by :func:`train_and_save`."""

    trainee: Trainee
    recipe: TrainCfg
    #: the stage's choices that decide the weights, besides the stage, seed, data and teacher
    #: (what a checkpoint must match to be resumed from)
    identity: dict[str, Any]
    desc: str  # the progress log's label
    distill: DistillKind = "none"
    #: the distillation term's weight and temperature (``params.distillation.weights``)
    alpha: float = 0.0
    tau: float = 1.0
    #: the teacher as the stage was given it (a model directory, or its seeds' parent: this
    #: run's seed is picked by :func:`resolve_model_dir`); read when ``distill`` is not none
    teacher: Path | None = None


def train_and_save(
    plan: Training, at: Place, *, stage: str, code: str, restart: bool = False
) -> dict[str, Any]:
    """Train ``plan.trainee`` with its recipe and loss (resuming from the run directory's
    checkpoint when its fingerprint matches: the run's identity and the computing code of the
    stage's module ``code``) and write the outputs; the teacher it read goes to ``run.json``."""
    rt, t, recipe = at.rt, plan.trainee, plan.recipe
    t.seed = at.seed
    model = t.model.to(rt.device)
    teacher = (
        resolve_model_dir(plan.teacher, at.seed)
        if plan.distill != "none" and plan.teacher is not None
        else None
    )
    loss_fn = DistillationLoss(
        base_criterion(recipe),
        teacher_module(teacher, at.ds, rt) if teacher is not None else None,
        distill=plan.distill,
        alpha=plan.alpha,
        tau=plan.tau,
    )
    identity = {
        "stage": stage,
        **plan.identity,
        "seed": at.seed,
        "data": at.ds.content_hash,
        "teacher": weights_hash(teacher) if teacher is not None else None,
        # The stage's computing code too (its module's import closure): a checkpoint written by
        # other code is never resumed from, while an edit to another stage, a launcher or a
        # report is no reason to start over.
        "code": code_hash(code),
    }
    train_model = model
    if rt.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    batches = train_batches(
        at.ds,
        recipe,
        img_size=t.img_size,
        seed=at.seed,
        world_size=rt.world_size,
        rank=rt.rank,
        device=rt.device,
    )
    run_dir = at.run_dir
    final: list[ShardEval] = []  # the raw model's latest evaluation (not the EMA's)

    def evaluate(m: nn.Module) -> dict[str, Any]:
        res = evaluation(m, at, t.img_size)
        if m is model:
            final[:] = [res]
        return flat(res.table)

    res = fit(
        model=train_model,
        loss_fn=loss_fn,
        train_batches=batches,
        recipe=recipe,
        num_classes=at.ds.num_classes,
        seed=at.seed,
        rt=rt,
        checkpoint_path=run_dir / "checkpoint.pth" if run_dir is not None else None,
        fingerprint=config_hash(identity),
        evaluate=evaluate,
        on_epoch_end=(lambda h: write_history(run_dir / "history.csv", h))
        if run_dir is not None
        else None,
        desc=plan.desc,
        restart=restart,
    )
    if not final:
        # A finished checkpoint resumes without an epoch to run (its fingerprint leaves out the
        # eval settings and the thread count, which change no weight): its final weights are
        # evaluated again, and that one evaluation gives both the metrics and the per-image
        # classes, so they can never disagree.
        final[:] = [evaluation(model, at, t.img_size)]
        res.history[-1] = {**res.history[-1], **flat(final[0].table)}
    if not rt.is_main:
        return {}  # rank 0 evaluates and writes; the others only trained their share
    metrics = final_metrics(res.history, at.params, t.img_size, t.extra)
    write_outputs(
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
            "teacher": teacher_record(teacher),
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


def teacher_module(teacher_dir: Path, ds: Dataset, rt: Runtime) -> nn.Module:
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


def same_classes(meta: dict[str, Any], ds: Dataset, where: Path) -> None:
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


@dataclass(frozen=True)
class RunSpec:
    """Where one seed's run goes: its model directory and its run directory."""

    seed: int
    out: Path
    run_dir: Path | None


@dataclass(frozen=True, kw_only=True)
class StageRun:
    """One run of a training stage with everything fixed but the seed and its directories.

    A stage's run object (``TeacherRun``, ``PretrainRun``, ``FinetuneRun``, ``TransferRun``)
    holds the stage's choices as typed fields, checked when it is built. It is picklable
    (submitit sends it to its jobs), and the same object trains in this process, in a forked
    child per seed, or in every task of a DDP job: ``run(spec)`` trains one seed.
    """

    #: the stage's name (``params.launch.<stage>`` sizes its jobs)
    stage: ClassVar[str]
    params: Params
    #: the prepared dataset it trains on
    data: Path
    #: start over from epoch 0 even if a checkpoint of another configuration is there
    restart: bool = False

    @property
    def multi_seed(self) -> bool:
        """One run per seed of ``params.seeds`` (all but released teacher weights)."""
        return True

    @property
    def resources(self) -> JobResources:
        """What one submitit job of this run asks for (:meth:`LaunchCfg.resources`)."""
        return self.params.launch.resources(self.stage)

    @property
    def threads(self) -> int:
        """torch threads of one run (results on CPU depend on it). The seeds of a stage train
        side by side at ``params.threads`` each; a single run (released teacher weights) gets
        the stage's whole budget."""
        return self.params.threads if self.multi_seed else self.params.one_process_threads

    def specs(self, out: Path, run_dir: Path | None, seed: int | None = None) -> list[RunSpec]:
        """The runs of the stage: ``seed`` alone (or released teacher weights) into ``out``, else
        one per seed of the profile into ``out/seed<k>/`` (what
        :func:`~deit_repro.core.model_dirs.resolve_model_dir` finds downstream)."""
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
        return self.train(spec)

    @property
    def recipe(self) -> TrainCfg:
        """The recipe the run trains with (its ``amp`` picks the precision)."""
        raise NotImplementedError

    def place(self, spec: RunSpec, rt: Runtime | None = None) -> Place:
        """Where ``spec``'s run trains: the dataset opened, on ``rt`` (default: the device and
        precision this process finds for the recipe)."""
        rt = rt or Runtime.detect(self.recipe.amp)
        return Place(self.params, open_dataset(self.data), spec.seed, spec.out, spec.run_dir, rt)

    def plan(self, at: Place) -> Training:
        """The stage's computation for one seed: the model to train, its recipe, its teacher
        and what identifies the run."""
        raise NotImplementedError

    def train(self, spec: RunSpec, rt: Runtime | None = None) -> dict[str, Any]:
        """Train one seed's run into ``spec.out``; its final metrics (empty on DDP ranks other
        than 0). The fingerprint of its checkpoint covers the code of the stage's own module."""
        at = self.place(spec, rt)
        return train_and_save(
            self.plan(at), at, stage=self.stage, code=type(self).__module__, restart=self.restart
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
