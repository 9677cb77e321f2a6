"""The transfer stage: a pretrained student fine-tuned on a downstream dataset, or the same
architecture trained there from scratch for the comparison (paper §5.3, Table 7), with the
dataset's recipe (``transfer.recipes``, else ``transfer.train``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from deit_repro.config import TrainCfg
from deit_repro.core.model_dirs import load_model, resolve_model_dir, student_kwargs, weights_hash
from deit_repro.core.models import create_student, set_training_outputs
from deit_repro.core.pos_embed import adapt_for_finetune
from deit_repro.errors import ConfigError
from deit_repro.typed_yaml import to_dict
from deit_repro.stages.trainer import Place, StageRun, Trainee, Training

INITS = ("pretrained", "scratch")


@dataclass(frozen=True, kw_only=True)
class TransferRun(StageRun):
    """One transfer run on ``dataset`` (a key of ``transfer.datasets``, whose recipe applies;
    None: the data directory's name, ``data/<name>`` in dvc.yaml): ``init`` pretrained
    fine-tunes ``student``; scratch trains the same architecture from random weights (paper
    Table 7's comparison) and reads no student."""

    stage: ClassVar[str] = "transfer"
    init: Literal["pretrained", "scratch"]
    student: Path | None = None
    dataset: str | None = None

    def __post_init__(self) -> None:
        if self.dataset is None:
            object.__setattr__(self, "dataset", Path(self.data).name)
        if self.dataset not in self.params.transfer.datasets:
            raise ConfigError(
                f"dataset {self.dataset!r} is not in transfer.datasets "
                f"{list(self.params.transfer.datasets)}",
                "pass --dataset NAME (a key of transfer.datasets) or add it there",
            )
        if self.init not in INITS:
            raise ConfigError(
                f"--init {self.init!r} is not pretrained or scratch",
                "pass --init pretrained|scratch",
            )
        if self.init == "pretrained" and self.student is None:
            raise ConfigError(
                "--init pretrained needs --student DIR", "pass the pretrained student"
            )
        if self.init == "scratch":
            object.__setattr__(self, "student", None)

    @property
    def recipe(self) -> TrainCfg:
        """The dataset's recipe (``transfer.recipes``, else ``transfer.train``; from scratch:
        ``transfer.scratch_train``)."""
        assert self.dataset is not None  # __post_init__
        return self.params.transfer.recipe(self.dataset, self.init)

    def plan(self, at: Place) -> Training:
        """A pretrained student fine-tuned on a downstream dataset, or (``init`` scratch) the
        same architecture trained there from scratch for the comparison (paper §5.3, Table 7)."""
        recipe, ds = self.recipe, at.ds
        student = resolve_model_dir(self.student, at.seed) if self.student else None
        if student is not None:
            old, meta = load_model(student)
            if meta["in_chans"] != ds.in_chans:
                raise ConfigError(
                    f"student {student} takes {meta['in_chans']} channels, dataset "
                    f"{self.data} has {ds.in_chans}",
                    "prepare the dataset with matching channels",
                )
            kwargs = dict(
                meta["kwargs"], num_classes=ds.num_classes, drop_path_rate=recipe.drop_path
            )
            img_size = int(meta["img_size"])
        else:
            m = self.params.student.model
            kwargs = student_kwargs(
                m,
                distilled=False,
                num_classes=ds.num_classes,
                in_chans=ds.in_chans,
                drop_path=recipe.drop_path,
            )
            img_size = m.img_size
        torch.manual_seed(at.seed)
        model = create_student(**kwargs)
        if student is not None:
            adapt_for_finetune(model, old.state_dict(), interpolation="bicubic", drop_heads=True)
        # No teacher downstream: a distilled student is trained through its joint output.
        set_training_outputs(model, False)
        extra = {
            "role": "student",
            "init": self.init,
            "pretrained_from": str(student) if student is not None else None,
        }
        return Training(
            Trainee(model, "student", kwargs, img_size, extra),
            recipe,
            identity={
                "cfg": to_dict(recipe),
                "kwargs": kwargs,
                "student": weights_hash(student) if student is not None else None,
            },
            desc=f"transfer {self.init}",
        )
