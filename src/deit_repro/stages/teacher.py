"""The teacher stage: the convnet that distils the students (paper §5.2), trained here or loaded
from released weights, and paper Table 2's transformer teacher (``teacher.vit``), always trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from deit_repro import atomic
from deit_repro.config import JobResources, ModelCfg, TrainCfg
from deit_repro.typed_yaml import to_dict
from deit_repro.core.engine import Runtime
from deit_repro.core.model_dirs import teacher_kwargs
from deit_repro.core.models import create_teacher
from deit_repro.errors import ConfigError
from deit_repro.stages import released
from deit_repro.stages.trainer import (
    Place,
    RunSpec,
    StageRun,
    Trainee,
    Training,
    evaluation,
    final_metrics,
    flat,
    write_outputs,
)

ARCHS = ("convnet", "vit")


@dataclass(frozen=True, kw_only=True)
class TeacherRun(StageRun):
    """One teacher run: ``arch`` convnet (the distillation teacher, ``teacher.model``) or vit
    (paper Table 2's transformer teacher, ``teacher.vit``); ``weights``, a local file of released
    weights (else ``teacher.weights`` of the params, if any, is downloaded)."""

    stage: ClassVar[str] = "teacher"
    arch: Literal["convnet", "vit"] = "convnet"
    weights: Path | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(
                f"teacher arch {self.arch!r} is not convnet or vit", "pass --arch convnet|vit"
            )
        m = self.params.teacher.vit.model
        if self.arch == "vit" and not (m.name or m.arch == "vit"):
            raise ConfigError(
                f"teacher.vit.model is {m.name or m.arch}, not a transformer",
                "set teacher.vit.model.arch: vit (or a timm ViT name)",
            )

    @property
    def released(self) -> bool:
        """Released weights, only evaluated: the convnet with ``teacher.weights`` or ``weights``."""
        return self.arch == "convnet" and (
            self.params.teacher.weights is not None or self.weights is not None
        )

    @property
    def multi_seed(self) -> bool:
        """A trained teacher is one run per seed: student seed k distils from teacher seed k
        (:func:`~deit_repro.core.model_dirs.resolve_model_dir`), so the teacher's run-to-run
        variance is inside every paired interval. Released weights are one fixed teacher (as
        the paper's RegNetY-16GF): one run serves every seed."""
        return not self.released

    @property
    def resources(self) -> JobResources:
        """Released weights are only evaluated: one GPU for at most an hour, not the 2 x 8 GPUs a
        300-epoch teacher training needs (:meth:`LaunchCfg.resources`)."""
        return self.params.launch.resources(self.stage, evaluate_only=self.released)

    @property
    def model_cfg(self) -> ModelCfg:
        t = self.params.teacher
        return t.model if self.arch == "convnet" else t.vit.model

    @property
    def recipe(self) -> TrainCfg:
        t = self.params.teacher
        return t.train if self.arch == "convnet" else t.vit.train

    def train(self, spec: RunSpec, rt: Runtime | None = None) -> dict[str, Any]:
        """Train a teacher, or load released weights (pinned sha256) and record their accuracy."""
        if not self.released:
            return super().train(spec, rt)
        return self.record_released(self.place(spec, rt))

    def kwargs(self, at: Place) -> dict[str, Any]:
        return teacher_kwargs(
            self.model_cfg,
            num_classes=at.ds.num_classes,
            in_chans=at.ds.in_chans,
            drop_path=self.recipe.drop_path,
        )

    def plan(self, at: Place) -> Training:
        """A teacher trained here: the distillation convnet (``teacher.model``) or paper Table
        2's transformer (``teacher.vit``)."""
        model_cfg, kwargs = self.model_cfg, self.kwargs(at)
        torch.manual_seed(at.seed)
        model = create_teacher(**kwargs)
        extra = {"role": "teacher", "arch": model_cfg.name or model_cfg.arch}
        return Training(
            Trainee(model, "teacher", kwargs, model_cfg.img_size, extra),
            self.recipe,
            identity={"model": to_dict(model_cfg), "train": to_dict(self.recipe)},
            desc=f"teacher {self.arch}",
        )

    def record_released(self, at: Place) -> dict[str, Any]:
        """Released weights (``teacher.weights`` downloaded and pinned, or the local file
        ``weights``), evaluated on the test split and written as a model directory."""
        pin, rt, img_size = self.params.teacher.weights, at.rt, self.model_cfg.img_size
        if pin is not None:
            # In a DDP job rank 0 downloads; the others read its verified file (one download, no
            # two ranks writing the same path), or raise its error with it (no internet on the
            # compute node: every rank says so at once, none waits in a barrier).
            rt.main_first(lambda: released.fetch(pin, "teacher weights", local=self.weights))
            path = released.fetch(pin, "teacher weights", local=self.weights)
        else:
            assert self.weights is not None  # self.released
            path = self.weights
        kwargs = self.kwargs(at)
        model = released.load("teacher", kwargs, path, what="teacher weights")
        model.to(rt.device).eval()
        result = evaluation(model, at, img_size)  # every rank: its shard of the test split
        if not rt.is_main:
            return {}  # rank 0 writes the model directory
        t = Trainee(model, "teacher", kwargs, img_size, {"role": "teacher", "source": str(path)})
        history = [{"epoch": 0, "train_loss": None, **flat(result.table)}]
        final = final_metrics(history, self.params, img_size, t.extra)
        write_outputs(
            t,
            at,
            history,
            final,
            run_info={"sha256": atomic.sha256_file(path)},
            classes=result.classes,
        )
        return final
