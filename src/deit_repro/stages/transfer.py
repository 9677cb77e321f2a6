"""The transfer stage: a pretrained student fine-tuned on a downstream dataset, or the same
architecture trained there from scratch for the comparison (paper §5.3, Table 7), with the
dataset's recipe (``transfer.recipes``, else ``transfer.train``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from deit_repro.core.datasets import open_dataset
from deit_repro.core.engine import Runtime, base_criterion
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.model_dirs import load_model, resolve_model_dir, student_kwargs, weights_hash
from deit_repro.core.models import create_student, set_training_outputs
from deit_repro.core.pos_embed import adapt_for_finetune
from deit_repro.errors import ConfigError
from deit_repro.typed_yaml import to_dict
from deit_repro.stages.trainer import Place, RunSpec, StageRun, Trainee, train_and_save

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

    def train(self, spec: RunSpec, rt: Runtime | None = None) -> dict[str, Any]:
        """Fine-tune a pretrained student on a downstream dataset, or (``student=None``) train the
        same architecture from scratch for the comparison (paper §5.3, Table 7), with the dataset's
        recipe (``transfer.recipes``, else ``transfer.train``)."""
        params, data, student, restart = self.params, self.data, self.student, self.restart
        dataset = self.dataset
        seed, out, run_dir = spec.seed, spec.out, spec.run_dir
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
            kwargs = dict(
                meta["kwargs"], num_classes=ds.num_classes, drop_path_rate=recipe.drop_path
            )
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
        at = Place(params, ds, seed, out, run_dir, rt)
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
        t = Trainee(model, "student", kwargs, img_size, extra)
        return train_and_save(
            t,
            at,
            loss_fn=loss,
            recipe=recipe,
            code=__name__,
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
