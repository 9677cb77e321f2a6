"""The teacher stage: the convnet that distils the students (paper §5.2), trained here or loaded
from released weights, and paper Table 2's transformer teacher (``teacher.vit``), always trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from deit_repro import atomic
from deit_repro.config import JobResources
from deit_repro.typed_yaml import to_dict
from deit_repro.core.datasets import open_dataset
from deit_repro.core.engine import Runtime, base_criterion
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.model_dirs import teacher_kwargs
from deit_repro.core.models import create_teacher
from deit_repro.errors import ConfigError
from deit_repro.stages import released
from deit_repro.stages.trainer import (
    RunSpec,
    Place,
    StageRun,
    Trainee,
    evaluation,
    final_metrics,
    flat,
    train_and_save,
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

    def train(self, spec: RunSpec, rt: Runtime | None = None) -> dict[str, Any]:
        """Train a teacher, or load released weights (pinned sha256); record its accuracy.

        ``arch="convnet"`` is the distillation teacher (``teacher.model``); ``arch="vit"`` the
        transformer teacher of paper Table 2 (``teacher.vit``), always trained here.
        """
        params, data, weights, arch = self.params, self.data, self.weights, self.arch
        restart = self.restart
        seed, out, run_dir = spec.seed, spec.out, spec.run_dir
        cfg = params.teacher
        model_cfg, recipe = (
            (cfg.model, cfg.train) if arch == "convnet" else (cfg.vit.model, cfg.vit.train)
        )
        rt = rt or Runtime.detect(recipe.amp)
        ds = open_dataset(data)
        at = Place(params, ds, seed, out, run_dir, rt)
        img_size = model_cfg.img_size
        kwargs = teacher_kwargs(
            model_cfg, num_classes=ds.num_classes, in_chans=ds.in_chans, drop_path=recipe.drop_path
        )
        if self.released:
            if cfg.weights is not None:
                pin = cfg.weights
                # In a DDP job rank 0 downloads; the others read its verified file (one
                # download, no two ranks writing the same path), or raise its error with it (no
                # internet on the compute node: every rank says so at once, none waits in a
                # barrier).
                rt.main_first(lambda: released.fetch(pin, "teacher weights", local=weights))
                path = released.fetch(pin, "teacher weights", local=weights)
            else:
                assert weights is not None  # self.released
                path = weights
            model = released.load("teacher", kwargs, path, what="teacher weights")
            model.to(rt.device).eval()
            result = evaluation(model, at, img_size)  # every rank: its shard of the test split
            metrics = flat(result.table)
            if not rt.is_main:
                return {}  # rank 0 writes the model directory
            t = Trainee(
                model, "teacher", kwargs, img_size, {"role": "teacher", "source": str(path)}
            )
            history = [{"epoch": 0, "train_loss": None, **metrics}]
            final = final_metrics(history, params, img_size, t.extra)
            write_outputs(
                t,
                at,
                history,
                final,
                run_info={"sha256": atomic.sha256_file(path)},
                classes=result.classes,
            )
            return final
        torch.manual_seed(seed)
        model = create_teacher(**kwargs)
        loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
        t = Trainee(
            model,
            "teacher",
            kwargs,
            img_size,
            {"role": "teacher", "arch": model_cfg.name or model_cfg.arch},
        )
        return train_and_save(
            t,
            at,
            loss_fn=loss,
            recipe=recipe,
            code=__name__,
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
