"""The bill before the run: `deit-repro launch-plan --cost`.

Every training job the DAG of the current params submits (the teachers, the five pretrain
variants, Figure 3's budgets, the fine-tunes, the transfers; one job per seed), with its epochs,
the images it trains on, and the GPU-hours and wall time it takes on the configured nodes.

The rates come from measured training throughput (``bench/results/gpu_rates.json``: images/s per
GPU of ``engine.fit`` for two models, where and how they were measured). A job's model is priced
by its training FLOPs per image (forward + backward of the student, forward of the teacher,
counted by ``torch.utils.flop_counter`` on the meta device, so nothing is computed): images/s =
the measured model-FLOP utilisation of the nearest measured model x the GPU's peak / FLOPs per
image. A user with their own measurement passes ``--rates FILE`` in the same format.

Orchestration, not computation: no stage depends on this module.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deit_repro.config import JobResources, ModelCfg, Params
from deit_repro.errors import ConfigError

#: the measured rates this repository ships (bench/README.md, "Measured on one H200")
RATES = Path(__file__).resolve().parents[3] / "bench" / "results" / "gpu_rates.json"

#: published training / test split sizes and class counts of the sources whose data is not
#: prepared yet (a prepared dataset's manifest is read instead): ImageNet-1k, torchvision's
#: CIFAR, Flowers-102 (train + val, as the transfer trains on), Stanford Cars, iNat 2018/2019
_SPLITS = {
    "imagefolder": (1_281_167, 50_000, 1000),
    "cifar10": (50_000, 10_000, 10),
    "cifar100": (50_000, 10_000, 100),
    "flowers102": (2_040, 6_149, 102),
    "stanford_cars": (8_144, 8_041, 196),
    "inat2018": (437_513, 24_426, 8_142),
    "inat2019": (265_213, 3_030, 1_010),
    "fashion_mnist": (60_000, 10_000, 10),
    "digits": (1_437, 360, 10),
}


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


@dataclass(frozen=True)
class Job:
    """One submitted training job (one seed of a stage's variant)."""

    stage: str  # the DVC stage, e.g. pretrain@deit
    epochs: int
    train_images: int  # per epoch
    test_images: int
    gflop_per_image: float  # training: student forward + backward, teacher forward
    res: JobResources
    seeds: int  # jobs of this kind (one per seed; released teacher weights: one)
    evaluate_only: bool = False
    published: str | None = None  # its dataset, when sized from the source's published split
    #: the input pipeline it runs on its nodes (``auto``: ``device`` on GPUs, ``timm`` on CPUs)
    pipeline: str = "timm"


def dataset_size(params: Params, name: str, data_root: Path) -> tuple[int, int, int]:
    """(train images, test images, classes) of a dataset of the profile: its manifest if it is
    prepared, else a listing of its ImageFolder tree or iNaturalist JSON, else the source's
    published sizes, cut to ``*_per_class``."""
    return _sized(params, name, data_root)[:3]


def _sized(params: Params, name: str, data_root: Path) -> tuple[int, int, int, bool]:
    """:func:`dataset_size`, and whether the sizes are the published ones."""
    manifest = data_root / name / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        splits = m["splits"]
        return splits["train"]["count"], splits["test"]["count"], m["num_classes"], False
    cfg = params.datasets[name]
    train, test, classes = _SPLITS[cfg.source]
    root = Path(cfg.root) if cfg.root else None
    published = False
    if cfg.source == "imagefolder" and root and (root / "train").is_dir():
        train, classes = _tree_size(root / "train")
        test, _ = _tree_size(root / "val")
    elif (
        cfg.source.startswith("inat") and root and (root / f"train{cfg.source[4:]}.json").is_file()
    ):
        year = cfg.source[4:]
        listed = {s: json.loads((root / f"{s}{year}.json").read_text()) for s in ("train", "val")}
        train, test = len(listed["train"]["images"]), len(listed["val"]["images"])
        classes = len({a["category_id"] for a in listed["train"]["annotations"]})
    else:
        published = True
    if cfg.train_per_class:
        train = min(train, cfg.train_per_class * classes)
    if cfg.test_per_class:
        test = min(test, cfg.test_per_class * classes)
    return train, test, classes, published


def _tree_size(split: Path) -> tuple[int, int]:
    """(images, classes) of an ImageFolder split not prepared yet (a listing, no decoding)."""
    from deit_repro.data.sources import IMG_EXTENSIONS

    if not split.is_dir():
        return 0, 0
    classes = [d for d in os.scandir(split) if d.is_dir()]
    images = sum(
        1 for d in classes for f in os.scandir(d.path) if f.name.lower().endswith(IMG_EXTENSIONS)
    )
    return images, len(classes)


@functools.lru_cache(maxsize=None)
def train_gflops(
    student: ModelCfg | None,
    *,
    distilled: bool,
    img_size: int,
    classes: int,
    teacher: ModelCfg | None,
    role: str = "student",
) -> float:
    """GFLOPs of one training image: the model's forward and backward, the teacher's forward
    (FlopCounterMode on the meta device: shapes only, no arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deit_repro.core.model_dirs import build_model, student_kwargs, teacher_kwargs

    def build(cfg: ModelCfg, as_role: str, size: int, dist: bool):
        if as_role == "student":
            kw = student_kwargs(cfg, distilled=dist, num_classes=classes, in_chans=3, img_size=size)
        else:
            kw = teacher_kwargs(cfg, num_classes=classes, in_chans=3)
        return build_model(as_role, kw)

    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        model = build(student, role, img_size, distilled) if student is not None else None
        teach = build(teacher, "teacher", img_size, False) if teacher is not None else None
        x = torch.randn(2, 3, img_size, img_size)
        with counter:
            if model is not None:
                out = model(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                out.float().sum().backward()
            if teach is not None:
                with torch.no_grad():
                    teach(x)
    return counter.get_total_flops() / 2 / 1e9


def training_jobs(params: Params, data_root: Path = Path("data")) -> list[Job]:
    """Every training job the DAG of ``params`` submits."""
    p, seeds, launch = params, len(params.seeds), params.launch
    jobs: list[Job] = []
    sized = {name: _sized(p, name, data_root) for name in p.datasets}
    s_tr, s_te, s_cls, _ = sized[p.student.dataset]
    t_tr, t_te, t_cls, _ = sized[p.teacher.dataset]
    convnet, vit = p.teacher.model, p.teacher.vit.model
    released = p.teacher.weights is not None

    def add(
        stage, epochs, sizes, gflop, res_stage, recipe, *, n=seeds, evaluate_only=False, data=None
    ):
        data = data or (p.teacher.dataset if res_stage == "teacher" else p.student.dataset)
        res = launch.resources(res_stage, evaluate_only=evaluate_only)
        published = data if sized[data][3] else None
        pipeline = recipe.aug.pipeline_on(gpu=res.gpus_per_node > 0)
        jobs.append(
            Job(
                stage, epochs, sizes[0], sizes[1], gflop, res, n, evaluate_only, published, pipeline
            )
        )

    if released:
        gf = train_gflops(None, distilled=False, img_size=convnet.img_size, classes=t_cls,
                          teacher=convnet)  # fmt: skip
        add("teacher@convnet", 0, (0, t_te), gf, "teacher", p.teacher.train, n=1,
            evaluate_only=True)  # fmt: skip
    else:
        gf = train_gflops(convnet, distilled=False, img_size=convnet.img_size, classes=t_cls,
                          teacher=None, role="teacher")  # fmt: skip
        add("teacher@convnet", p.teacher.train.epochs, (t_tr, t_te), gf, "teacher", p.teacher.train)
    gf = train_gflops(vit, distilled=False, img_size=vit.img_size, classes=t_cls, teacher=None,
                      role="teacher")  # fmt: skip
    add("teacher@vit", p.teacher.vit.train.epochs, (t_tr, t_te), gf, "teacher", p.teacher.vit.train)

    m, px, sizes = p.student.model, p.student.model.img_size, (s_tr, s_te)
    plain = train_gflops(m, distilled=False, img_size=px, classes=s_cls, teacher=None)
    by_convnet = train_gflops(m, distilled=False, img_size=px, classes=s_cls, teacher=convnet)
    headline_teacher = None if p.distill == "none" else convnet
    deit = train_gflops(m, distilled=True, img_size=px, classes=s_cls, teacher=headline_teacher)
    by_vit = train_gflops(
        m, distilled=True, img_size=px, classes=s_cls, teacher=None if p.distill == "none" else vit
    )
    e = p.student.train.epochs
    for variant, gf in (("none", plain), ("soft", by_convnet), ("hard", by_convnet),
                        ("deit", deit), ("deit_vit_teacher", by_vit)):  # fmt: skip
        add(f"pretrain@{variant}", e, sizes, gf, "pretrain", p.student.train)
    for budget in p.figure3.budgets:
        add(f"figure3_none@{budget}", budget, sizes, plain, "pretrain", p.student.train)
        add(f"figure3_deit@{budget}", budget, sizes, deit, "pretrain", p.student.train)

    ft = p.finetune.img_size
    ft_gf = train_gflops(m, distilled=True, img_size=ft, classes=s_cls, teacher=headline_teacher)
    for variant, gf in (("bicubic", ft_gf), ("bilinear", ft_gf), ("control", deit)):
        add(f"finetune@{variant}", p.finetune.train.epochs, sizes, gf, "finetune", p.finetune.train)

    for ds in p.transfer.datasets:
        tr, te, cls, _ = sized[ds]
        gf = train_gflops(m, distilled=True, img_size=px, classes=cls, teacher=None)
        recipe = p.transfer.recipe(ds)
        add(f"transfer@{ds}", recipe.epochs, (tr, te), gf, "transfer", recipe, data=ds)
        if ds in p.transfer.scratch:
            gf = train_gflops(m, distilled=False, img_size=px, classes=cls, teacher=None)
            recipe = p.transfer.recipe(ds, "scratch")
            add(f"transfer_scratch@{ds}", recipe.epochs, (tr, te), gf, "transfer", recipe, data=ds)
    return jobs


def load_rates(path: Path = RATES) -> dict[str, Any]:
    try:
        rates = json.loads(Path(path).read_text())
        runs = rates["runs"]
        assert runs and all(r["images_per_s"] > 0 and r["train_gflop_per_image"] > 0 for r in runs)
        assert rates["peak_tflops"] > 0
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise ConfigError(
            f"rates file {path} is unreadable or incomplete ({type(err).__name__}: {err})",
            f"give --rates a file in the format of {RATES.name}: peak_tflops, runs[] with "
            "images_per_s and train_gflop_per_image",
        ) from None
    return rates


def images_per_s(gflop: float, rates: dict[str, Any]) -> tuple[float, float]:
    """(images/s per GPU, the model-FLOP utilisation it assumes): the MFU of the measured run
    nearest in FLOPs per image (a log scale), at the rates' GPU peak."""
    peak = rates["peak_tflops"] * 1e12
    nearest = min(rates["runs"], key=lambda r: abs(math.log(r["train_gflop_per_image"] / gflop)))
    mfu = nearest["images_per_s"] * nearest["train_gflop_per_image"] * 1e9 / peak
    return mfu * peak / (gflop * 1e9), mfu


def loader_cores(pipeline: str, rate: float, rates: dict[str, Any]) -> float:
    """CPU cores per GPU that feed ``rate`` images/s through ``pipeline``: timm's per-image
    transform at the measured per-core rate; the device pipeline's workers read bytes (at the
    measured rate) and one process drives the GPU's decode and augmentation; the tensor
    pipeline's batches are in memory."""
    pipeline = _priced_as(pipeline, rates)
    if pipeline == "tensor":
        return 0.0
    if pipeline == "device":
        return rate / rates["loader_read_images_per_s_per_core"] + 1.0
    return rate / rates["loader_images_per_s_per_core"]


def _priced_as(pipeline: str, rates: dict[str, Any]) -> str:
    """The pipeline a job's loader is priced as: a rates file without the device pipeline's
    read rate (measured before it existed) prices it as timm's."""
    if pipeline == "device" and not rates.get("loader_read_images_per_s_per_core"):
        return "timm"
    return pipeline


def _loader_note(jobs: list[Job], rates: dict[str, Any]) -> str:
    kinds = {_priced_as(j.pipeline, rates) for j in jobs if not j.evaluate_only}
    read = rates.get("loader_read_images_per_s_per_core")
    notes = []
    if "timm" in kinds:
        notes.append(
            f"timm pipeline: {rates['loader_images_per_s_per_core']:g} images/s per core, PIL "
            "decode + the paper's augmentation, measured on a CPU"
        )
    if "device" in kinds:
        notes.append(
            f"device pipeline: bytes read at {read:g} "
            "images/s per core + one core driving the GPU's decode and augmentation"
        )
    if "tensor" in kinds:
        notes.append("tensor pipeline: in memory, no loader")
    return "; ".join(notes)


def cost_table(params: Params, rates: dict[str, Any], data_root: Path = Path("data")) -> str:
    """The bill, as text: a row per stage, the total, and the total without Figure 3."""
    jobs = training_jobs(params, data_root)
    lines = [
        f"# The bill of profile `{params.profile}`: seeds {list(params.seeds)}, one job per seed "
        f"(released teacher weights: one). Rates: {rates['source']}",
        f"# images/s per GPU = MFU of the nearest measured model x {rates['peak_tflops']:g} "
        "TFLOP/s / training GFLOP per image; GPU-h over all seeds; wall = one job on its nodes "
        "(jobs of different seeds run side by side if the cluster has room).",
        "",
        f"{'stage':<26}{'jobs':>5}{'epochs':>7}{'images':>10}{'GFLOP/img':>10}{'img/s/GPU':>10}"
        f"{'MFU':>6}{'GPU-h':>9}{'job':>14}{'wall h':>8}{'cores/GPU':>10}",
    ]
    total = fig3 = 0.0
    worst_cores = 0.0
    for j in jobs:
        rate, mfu = images_per_s(j.gflop_per_image, rates)
        if j.evaluate_only:  # one forward pass over the test split (a third of a training step)
            images, seconds = j.test_images, j.test_images / (3 * rate)
        else:
            images = j.epochs * j.train_images
            # + a final evaluation (forward only) of the test split
            seconds = images / rate + j.test_images / (3 * rate)
        gpu_h = seconds / 3600 * j.seeds
        gpus = max(j.res.nodes * j.res.gpus_per_node, 1)
        wall = seconds / 3600 / gpus
        cores = loader_cores(j.pipeline, rate, rates)
        worst_cores = max(worst_cores, 0.0 if j.evaluate_only else cores)
        total += gpu_h
        fig3 += gpu_h if j.stage.startswith("figure3") else 0.0
        kind = f"{j.res.nodes}x{j.res.gpus_per_node}GPU" if j.res.gpus_per_node else "CPU job"
        lines.append(
            f"{j.stage:<26}{j.seeds:>5}{j.epochs:>7}{_count(images):>10}{j.gflop_per_image:>10.1f}"
            f"{rate:>10,.0f}{mfu:>6.0%}{gpu_h:>9,.1f}{kind:>14}{wall:>8,.1f}"
            + (f"{'-':>10}" if j.evaluate_only else f"{cores:>10.1f}")
        )
    lines += [
        "",
        f"total: {total:,.1f} GPU-hours ({total / 24:,.1f} GPU-days) on {rates['device']}",
        f"without Figure 3's runs: {total - fig3:,.1f} GPU-hours",
        f"loader: up to {worst_cores:.1f} CPU cores per GPU to feed the fastest job "
        f"({_loader_note(jobs, rates)}; a GPU job with fewer cores waits on its input)",
    ]
    published = sorted({j.published for j in jobs if j.published})
    if published:
        lines.append(
            f"sizes of {', '.join(published)}: the sources' published splits (not "
            "prepared here: data/<name>/manifest.json gives the real ones)"
        )
    if any(j.res.gpus_per_node == 0 for j in jobs):
        lines.append(
            "CPU jobs (launch.<stage>.gpus_per_node 0): the GPU figures price the same work on "
            "the rates' GPU; on CPUs it takes far longer."
        )
    return "\n".join(lines)
