"""The finetune stage: a pretrained student fine-tuned at another resolution (paper §6: 224 ->
384, Table 10), its positional embeddings resampled bicubic (bilinear for the ablation), with
the true label and the teacher's prediction (the student's own distillation kind)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from deit_repro.config import TrainCfg
from deit_repro.core.model_dirs import load_model, resolve_model_dir, weights_hash
from deit_repro.core.models import create_student, set_training_outputs
from deit_repro.core.pos_embed import adapt_for_finetune
from deit_repro.errors import ConfigError
from deit_repro.typed_yaml import to_dict
from deit_repro.stages.trainer import (
    Place,
    StageRun,
    Trainee,
    Training,
    evaluation,
    flat,
    same_classes,
)


@dataclass(frozen=True, kw_only=True)
class FinetuneRun(StageRun):
    """One fine-tune run of ``student`` (seed k fine-tunes student seed k) at ``img_size``
    with ``interpolation`` of the positional embeddings (None: ``finetune.img_size`` /
    ``finetune.interpolation``), distilled from ``teacher`` if the student was."""

    stage: ClassVar[str] = "finetune"
    student: Path
    teacher: Path | None = None
    img_size: int | None = None
    interpolation: str | None = None

    @property
    def recipe(self) -> TrainCfg:
        return self.params.finetune.train

    def plan(self, at: Place) -> Training:
        """A student fine-tuned at another resolution (paper §6: 224 -> 384), positional
        embeddings resampled bicubic (bilinear for the ablation), with the true label and the
        teacher's prediction (the student's own distillation kind)."""
        cfg = self.params.finetune
        img_size = self.img_size or cfg.img_size
        interpolation = self.interpolation or cfg.interpolation
        student = resolve_model_dir(self.student, at.seed)
        old, meta = load_model(student)
        same_classes(meta, at.ds, student)
        distill = meta.get("distill", "none")
        dist_token = bool(meta.get("dist_token", False))
        if distill != "none" and self.teacher is None:
            raise ConfigError(
                f"student {student} was distilled ({distill}); fine-tuning uses the "
                "teacher's prediction too",
                "pass --teacher DIR",
            )
        kwargs = dict(meta["kwargs"], img_size=img_size, drop_path_rate=cfg.train.drop_path)
        torch.manual_seed(at.seed)
        model = create_student(**kwargs)
        adapt_for_finetune(model, old.state_dict(), interpolation=interpolation, drop_heads=False)
        set_training_outputs(model, dist_token)
        model.to(at.rt.device)
        # Accuracy right after resampling, before any fine-tuning step (Table 10's interpolation
        # ablation without training).
        before = evaluation(model, at, img_size)
        alpha, tau = self.params.distillation.weights(distill)
        variant = {
            "distill": distill,
            "dist_token": dist_token,
            "alpha": alpha,
            "tau": tau,
            "from_img_size": meta["img_size"],
            "interpolation": interpolation,
            "before_finetune": flat(before.table),
        }
        return Training(
            Trainee(
                model,
                "student",
                kwargs,
                img_size,
                {"role": "student", **variant},
                classes={f"before_finetune/{h}": v for h, v in before.classes.items()},
            ),
            cfg.train,
            identity={
                "cfg": to_dict(cfg),
                "img_size": img_size,
                "interpolation": interpolation,
                "student": weights_hash(student),
            },
            desc=f"finetune {img_size}px",
            distill=distill,
            alpha=alpha,
            tau=tau,
            teacher=self.teacher,
        )
