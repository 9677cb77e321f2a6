"""The finetune stage: a pretrained student fine-tuned at another resolution (paper §6: 224 ->
384, Table 10), its positional embeddings resampled bicubic (bilinear for the ablation), with
the true label and the teacher's prediction (the student's own distillation kind)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from deit_repro.core.datasets import open_dataset
from deit_repro.core.engine import Runtime, base_criterion
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.model_dirs import load_model, resolve_model_dir, weights_hash
from deit_repro.core.models import create_student, set_training_outputs
from deit_repro.core.pos_embed import adapt_for_finetune
from deit_repro.errors import ConfigError
from deit_repro.typed_yaml import to_dict
from deit_repro.stages.trainer import (
    RunSpec,
    Place,
    StageRun,
    Trainee,
    evaluation,
    flat,
    same_classes,
    teacher_module,
    teacher_record,
    train_and_save,
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

    def train(self, spec: RunSpec, rt: Runtime | None = None) -> dict[str, Any]:
        """Fine-tune a student at another resolution (paper §6: 224 -> 384), positional embeddings
        resampled bicubic (bilinear for the ablation), with the true label and the teacher's
        prediction (the student's own distillation kind)."""
        params, data, student, teacher = self.params, self.data, self.student, self.teacher
        img_size, interpolation, restart = self.img_size, self.interpolation, self.restart
        seed, out, run_dir = spec.seed, spec.out, spec.run_dir
        cfg = params.finetune
        rt = rt or Runtime.detect(cfg.train.amp)
        img_size = img_size or cfg.img_size
        interpolation = interpolation or cfg.interpolation
        ds = open_dataset(data)
        at = Place(params, ds, seed, out, run_dir, rt)
        student = resolve_model_dir(student, seed)
        old, meta = load_model(student)
        same_classes(meta, ds, student)
        distill = meta.get("distill", "none")
        dist_token = bool(meta.get("dist_token", False))
        kwargs = dict(meta["kwargs"], img_size=img_size, drop_path_rate=cfg.train.drop_path)
        torch.manual_seed(seed)
        model = create_student(**kwargs)
        adapt_for_finetune(model, old.state_dict(), interpolation=interpolation, drop_heads=False)
        set_training_outputs(model, dist_token)
        if distill != "none" and teacher:
            teacher = resolve_model_dir(teacher, seed)
        teacher_mod = teacher_module(teacher, ds, rt) if distill != "none" and teacher else None
        if distill != "none" and teacher_mod is None:
            raise ConfigError(
                f"student {student} was distilled ({distill}); fine-tuning uses the "
                "teacher's prediction too",
                "pass --teacher DIR",
            )
        model.to(rt.device)
        # Accuracy right after resampling, before any fine-tuning step (Table 10's interpolation
        # ablation without training).
        before_eval = evaluation(model, at, img_size)
        before = flat(before_eval.table)
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
        t = Trainee(
            model,
            "student",
            kwargs,
            img_size,
            {"role": "student", **variant},
            classes={f"before_finetune/{h}": v for h, v in before_eval.classes.items()},
        )
        return train_and_save(
            t,
            at,
            loss_fn=loss,
            recipe=cfg.train,
            code=__name__,
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
