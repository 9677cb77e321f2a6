"""The pretrain stage: a DeiT student on the main dataset, without distillation, with soft or hard
distillation, with or without the distillation token (paper §4, Table 3), and Figure 3's budgets
(the same student trained for another number of epochs, each its own whole schedule)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from deit_repro.config import DISTILL_MODES, DistillKind, TrainCfg
from deit_repro.core.model_dirs import student_kwargs
from deit_repro.core.models import create_student, set_training_outputs
from deit_repro.errors import ConfigError
from deit_repro.typed_yaml import to_dict
from deit_repro.stages.trainer import Place, StageRun, Trainee, Training


def dist_token_of(distill: str, choice: str) -> bool:
    """``--dist-token auto``: the distillation token (DeiT⚗) whenever there is a teacher."""
    return distill != "none" if choice == "auto" else choice == "yes"


@dataclass(frozen=True, kw_only=True)
class PretrainRun(StageRun):
    """One pretrain run: ``distill`` (none | soft | hard) from ``teacher``, ``dist_token``
    (DeiT⚗), and ``epochs``, a Figure 3 budget (None: ``student.train.epochs``).

    A budget is the student's recipe with its own whole schedule of that many epochs; the
    params the run holds are the profile's with that budget in ``student.train.epochs``. The
    teacher is kept only when there is something to distil: the headline stage passes its
    teacher whatever ``distill`` is."""

    stage: ClassVar[str] = "pretrain"
    distill: DistillKind
    dist_token: bool
    teacher: Path | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.distill not in DISTILL_MODES:
            raise ConfigError(
                f"distill = {self.distill!r} is not one of {', '.join(DISTILL_MODES)}",
                "pass --distill " + "|".join(DISTILL_MODES),
            )
        if self.distill == "none" and self.dist_token:
            raise ConfigError(
                "a distillation token without distillation has no target",
                "use --distill soft|hard with --dist-token yes, or --dist-token no",
            )
        if self.distill == "none" and self.teacher is not None:
            object.__setattr__(self, "teacher", None)
        if self.distill != "none" and self.teacher is None:
            raise ConfigError(f"--distill {self.distill} needs a teacher", "pass --teacher DIR")
        train = self.params.student.train
        if self.epochs is not None and self.epochs != train.epochs:
            if self.epochs <= train.warmup_epochs:
                raise ConfigError(
                    f"--epochs {self.epochs} leaves no epoch after the {train.warmup_epochs} "
                    "warmup epochs",
                    "pass a budget longer than student.train.warmup_epochs",
                )
            p = self.params
            student = dataclasses.replace(
                p.student, train=dataclasses.replace(train, epochs=self.epochs)
            )
            # Figure 3's budgets stay the same set: the profile's own schedule becomes one.
            others = tuple(b for b in p.budget_epochs() if b != self.epochs)
            figure3 = dataclasses.replace(p.figure3, budgets=others)
            object.__setattr__(
                self, "params", dataclasses.replace(p, student=student, figure3=figure3)
            )

    @property
    def recipe(self) -> TrainCfg:
        return self.params.student.train

    def plan(self, at: Place) -> Training:
        """A DeiT student: no distillation, soft or hard, with or without the distillation token
        (paper §4, Table 3); student seed k distils from teacher seed k."""
        cfg, distill = self.params.student, self.distill
        alpha, tau = self.params.distillation.weights(distill)
        kwargs = student_kwargs(
            cfg.model,
            distilled=self.dist_token,
            num_classes=at.ds.num_classes,
            in_chans=at.ds.in_chans,
            drop_path=cfg.train.drop_path,
        )
        torch.manual_seed(at.seed)
        model = create_student(**kwargs)
        set_training_outputs(model, self.dist_token)
        variant = {"distill": distill, "dist_token": self.dist_token, "alpha": alpha, "tau": tau}
        return Training(
            Trainee(model, "student", kwargs, cfg.model.img_size, {"role": "student", **variant}),
            cfg.train,
            identity={"cfg": to_dict(cfg), "variant": variant},
            desc=f"pretrain {distill}",
            distill=distill,
            alpha=alpha,
            tau=tau,
            teacher=self.teacher,
        )
