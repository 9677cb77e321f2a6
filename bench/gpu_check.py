"""The paper's path on one CUDA GPU, and the training rate a user gets: from JPEG files on disk
through the configured input pipeline into :func:`deit_repro.core.engine.fit`.

    bash bench/gpu_check.sh OUT_DIR              # on a CUDA machine, < 8 minutes on one H200
    python bench/gpu_check.py --out OUT --smoke  # on a CPU: tiny sizes, every path runs

1. **Check** (the rehearsal's code on CUDA): an NCCL process group (all-reduce and barrier on the
   runtime's device), ``amp: auto`` resolving to bf16 on a GPU that has it, the rehearsal data
   (``scripts/rehearsal_data.py``) prepared as an image tree, the RegNetY-16GF teacher loaded from
   its pinned state dict and evaluated on the GPU through the sharded evaluation, DeiT-Ti⚗
   pretrained with hard distillation, interrupted after its first epoch and resumed.
2. **Benchmark**, per model (DeiT-S at batch 256; DeiT-B⚗ + RegNetY-16GF hard distillation at
   128, the paper's configuration), all in this process:

   * ``ceiling``: a bf16 matmul (8192^3) on this GPU, TFLOP/s: what MFU is measured against;
   * ``official``: an official-style loop (facebookresearch/deit engine.py: fp16 autocast +
     GradScaler, eager, ``loss.item()`` and a device synchronize every step) on the same models
     and batches, synthetic on-GPU images;
   * ``synthetic``: ``engine.fit`` with the imagenet profile's recipe (bf16, ``compile: auto``,
     fused AdamW, Mixup/CutMix) on synthetic uint8 images already on the GPU (the engine alone);
   * ``files``: ``engine.fit`` fed from ImageNet-sized JPEG files (``rehearsal_data.
     write_photo_tree``) through the profile's pipeline (``pipeline: auto``: decode and
     augmentation on the GPU) with its loader workers: what a user's run gets;
   * ``loader``: that input pipeline alone, batches/s → images/s, no training;

   each as images/s (the mean of the epochs after the first, which holds the compilation), its
   MFU (FLOPs per training image from torch's FlopCounterMode: student forward + backward,
   teacher forward), its ratio to ``official``, and ``files / synthetic`` (how fully the
   pipeline feeds the GPU).

Writes ``OUT/gpu_check.json`` after every measurement (a timeout keeps what was measured); exits
non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# The checkout's own package, installed or not: a GPU image runs this from a copy of the
# repository with its own torch (README "GPU check").
sys.path.insert(0, str(ROOT / "src"))


def _params():
    from deit_repro.config import compose_params, params_from_dict

    return params_from_dict(
        compose_params(ROOT / "profiles" / "imagenet.yaml", ROOT / "profiles" / "rehearsal.yaml")
    )


def check_nccl(device: torch.device) -> dict:
    """A one-rank NCCL group: the collectives the engine uses, on the runtime's device."""
    from deit_repro.core.engine import Runtime

    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    torch.distributed.init_process_group(
        "nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1
    )
    try:
        rt = Runtime.detect("auto")
        total = torch.tensor([1.5, 64.0], dtype=torch.float64, device=rt.device)
        torch.distributed.all_reduce(total)
        torch.distributed.barrier(device_ids=[rt.device.index])
        return {
            "backend": torch.distributed.get_backend(),
            "all_reduce": total.tolist(),
            "amp_auto": str(rt.amp_dtype),
        }
    finally:
        torch.distributed.destroy_process_group()


def check_rehearsal(work: Path, smoke: bool) -> dict:
    """Teacher on the device, sharded evaluation, DeiT-Ti⚗ distilled, interrupted and resumed."""
    from deit_repro.core.engine import Runtime
    from deit_repro.stages.prepare import run_prepare
    import deit_repro.stages.trainer as trainer
    from deit_repro.stages.pretrain import PretrainRun
    from deit_repro.stages.teacher import TeacherRun
    from deit_repro.stages.trainer import RunSpec

    data = work / "data"
    if not data.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "rehearsal_data.py"), str(data)], check=True
        )
    p = _params()
    p = dataclasses.replace(
        p,
        student=dataclasses.replace(
            p.student, train=dataclasses.replace(p.student.train, epochs=2)
        ),
    )
    prepared = work / "imagenet"
    if not prepared.exists():
        cfg = dataclasses.replace(p.datasets["imagenet"], root=str(data / "imagenet"))
        run_prepare(cfg, out=prepared)
    rt = Runtime.detect(p.student.train.amp)
    (weights,) = (data / "weights").glob("regnety_160-*.pth")
    t0 = time.perf_counter()
    teacher = TeacherRun(params=p, data=prepared, weights=weights).train(
        RunSpec(0, work / "teacher", None), rt=rt
    )
    teacher_s = time.perf_counter() - t0

    class Interrupt(Exception):
        pass

    import deit_repro.core.engine as engine

    real_fit = engine.fit

    def fit_once_then_stop(**kwargs):
        def stop(history):
            raise Interrupt

        return real_fit(**{**kwargs, "on_epoch_end": stop})

    run_dir = work / "runs" / "deit"
    deit = PretrainRun(
        params=p, data=prepared, teacher=work / "teacher", distill="hard", dist_token=True
    )
    spec = RunSpec(0, work / "deit", run_dir)
    trainer.fit = fit_once_then_stop
    try:
        deit.train(spec, rt=rt)
        raise AssertionError("the interrupted run finished")
    except Interrupt:
        pass
    finally:
        trainer.fit = real_fit
    metrics = deit.train(spec, rt=rt)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["resumed_from_epoch"] == 0, run  # epoch 1 of 2 came from the checkpoint
    return {
        "device": str(rt.device),
        "amp": str(rt.amp_dtype),
        "teacher_top1": teacher["top1"],
        "teacher_seconds": round(teacher_s, 2),
        "student_heads": metrics["heads"],
        "resumed_from_epoch": run["resumed_from_epoch"],
    }


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    teacher: str | None
    batch: int
    img_size: int

    @property
    def key(self) -> str:
        return self.name + (f"+{self.teacher}" if self.teacher else "")


CASES = [
    Case("deit_small_patch16_224", None, 256, 224),
    Case("deit_base_distilled_patch16_224", "regnety_160", 128, 224),
]
SMOKE_CASES = [
    Case("deit_tiny_patch16_224", None, 4, 32),
    Case("deit_tiny_distilled_patch16_224", "regnety_002", 4, 32),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, smoke: bool) -> float:
    """TFLOP/s of one large matmul in bf16 (fp32 on a CPU): the roof MFU is measured against."""
    n = 512 if smoke else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 3 if smoke else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def _models(case: Case, device: torch.device, num_classes: int):
    from deit_repro.core.models import create_student, create_teacher, set_training_outputs

    torch.manual_seed(0)
    distilled = case.teacher is not None
    model = create_student(
        name=case.name,
        distilled=distilled,
        num_classes=num_classes,
        img_size=case.img_size,
        in_chans=3,
        drop_path_rate=0.1,
    ).to(device)
    set_training_outputs(model, distilled)
    teacher = None
    if distilled:
        teacher = create_teacher(name=case.teacher, num_classes=num_classes, in_chans=3)
        teacher = teacher.to(device).eval().requires_grad_(False)
        teacher = teacher.to(memory_format=torch.channels_last)
    return model, teacher


def train_gflop(case: Case, device: torch.device, num_classes: int) -> float:
    """GFLOP per training image: student forward + backward, teacher forward (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, teacher = _models(case, device, num_classes)
    x = torch.randn(2, 3, case.img_size, case.img_size, device=device)
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        out = torch.stack(out) if isinstance(out, tuple) else out
        out.float().sum().backward()
        if teacher is not None:
            with torch.no_grad():
                teacher(x)
    return fc.get_total_flops() / 2 / 1e9


def official_loop(case: Case, device: torch.device, steps: int, num_classes: int) -> float:
    """images/s of the official engine.py's habits on the same models and synthetic batches:
    fp16 autocast + GradScaler, eager, timm AdamW (no decay on norms and biases), Mixup/CutMix,
    soft-target CE (+ hard distillation), ``loss.item()`` and a synchronize every step."""
    import math

    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    model, teacher = _models(case, device, num_classes)
    model.train()
    opt = create_optimizer_v2(model, "adamw", lr=5e-4 * case.batch / 512, weight_decay=0.05)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
    crit = SoftTargetCrossEntropy()
    b, s = case.batch, case.img_size
    images = torch.randint(0, 256, (2 * b, 3, s, s), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (2 * b,), device=device)
    warm = 2 if not cuda else 5
    for step in range(warm + steps):
        if step == warm:
            _sync(device)
            t0 = time.perf_counter()
        i = step % 2
        x = images[i * b : (i + 1) * b].float().div_(255).sub_(0.45).div_(0.226)
        x, t = mix(x, labels[i * b : (i + 1) * b])
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            out = model(x)
            if teacher is not None:
                cls, dist = out
                with torch.no_grad():
                    hard = teacher(x).argmax(dim=1)
                loss = 0.5 * crit(cls, t) + 0.5 * torch.nn.functional.cross_entropy(dist, hard)
            else:
                loss = crit(out, t)
        if not math.isfinite(loss.item()):
            raise RuntimeError("loss is not finite")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
    _sync(device)
    return b * steps / (time.perf_counter() - t0)


def _recipe(case: Case, smoke: bool):
    """The imagenet profile's pretraining recipe at the case's batch, 3 epochs, no warmup."""
    import os

    train = _params().student.train
    # On a CPU the profile's `auto` is the timm pipeline; the smoke run takes the device one, the
    # pipeline a GPU node runs, so that its code runs in the tests.
    aug = dataclasses.replace(train.aug, pipeline="device") if smoke else train.aug
    return dataclasses.replace(
        train,
        aug=aug,
        epochs=3,
        batch_size=case.batch,
        warmup_epochs=0,
        eval_every=0,
        num_workers=1 if smoke else min(train.num_workers, max((os.cpu_count() or 2) - 2, 1)),
    )


def fit_rate(case: Case, batches, recipe, rt, num_classes: int) -> dict:
    """``engine.fit`` over ``batches``: images/s of the epochs after the first."""
    from deit_repro.core.engine import base_criterion, fit
    from deit_repro.core.losses import DistillationLoss

    model, teacher = _models(case, rt.device, num_classes)
    loss = DistillationLoss(
        base_criterion(recipe),
        teacher,
        distill="hard" if teacher is not None else "none",
        alpha=0.5,
        tau=1.0,
    )
    res = fit(
        model=model,
        loss_fn=loss,
        train_batches=batches,
        recipe=recipe,
        num_classes=num_classes,
        seed=0,
        rt=rt,
        checkpoint_path=None,
        fingerprint="bench",
    )
    timed = [row["train_images_per_s"] for row in res.history[1:]]
    return {
        "images_per_s": round(sum(timed) / len(timed), 1),
        "per_epoch": [round(row["train_images_per_s"], 1) for row in res.history],
        "steps_per_epoch": len(batches),
        "compiled": rt.compiles(recipe),
        "amp": str(rt.amp_dtype),
    }


def synthetic_batches(case: Case, recipe, rt, steps: int, num_classes: int):
    """uint8 images and labels already on the device, crop + flip batched there (the tensor
    pipeline): the engine is what is timed."""
    from deit_repro.core.batches import TensorAugment, TrainBatches

    n, s = case.batch * steps, case.img_size
    images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, device=rt.device)
    labels = torch.randint(0, num_classes, (n,), device=rt.device)
    aug = dataclasses.replace(recipe.aug, rand_augment=None, color_jitter=0.0, reprob=0.0)
    augment = TensorAugment(aug, s, 3)
    augment.mean, augment.std = augment.mean.to(rt.device), augment.std.to(rt.device)
    return TrainBatches(images, labels, case.batch, augment, seed=0, repeats=1)


def loader_rate(batches, device: torch.device, epochs: int = 2) -> dict:
    """The input pipeline alone: images/s over ``epochs`` epochs after a first one."""
    from deit_repro.core.batches import epoch_seed, seed_everything

    rates = []
    for epoch in range(epochs + 1):
        seed_everything(epoch_seed(0, epoch))
        batches.set_epoch(epoch)
        _sync(device)
        t0, n = time.perf_counter(), 0
        for x, _ in batches:
            n += len(x)
        _sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return {
        "images_per_s": round(sum(rates[1:]) / epochs, 1),
        "per_epoch": [round(r, 1) for r in rates],
    }


def photo_dataset(work: Path, smoke: bool, images: int):
    """ImageNet-sized JPEGs in an image tree, prepared as the imagenet profile prepares ImageNet."""
    import os

    from deit_repro.core.datasets import open_dataset
    from deit_repro.stages.prepare import run_prepare

    sys.path.insert(0, str(ROOT / "scripts"))
    from rehearsal_data import write_photo_tree

    tree, prepared = work / "photos", work / "photos_prepared"
    classes = 2 if smoke else 100
    if not prepared.exists():
        if tree.exists():
            import shutil

            shutil.rmtree(tree)
        n = write_photo_tree(
            tree,
            classes=classes,
            per_class=max(images // classes, 2),
            unique=min(images, 8 if smoke else 512),
            processes=min(os.cpu_count() or 1, 16),
        )
        cfg = dataclasses.replace(_params().datasets["imagenet"], root=str(tree))
        run_prepare(cfg, out=prepared, verify_images=False)
        print(f"gpu_check: {n} training JPEGs in {tree}", flush=True)
    return open_dataset(prepared)


def bench_pipeline(out: dict, save, device: torch.device, work: Path, smoke: bool) -> None:
    """Every measurement of the benchmark, each saved as soon as it is made."""
    from deit_repro.core.datasets import train_batches
    from deit_repro.core.engine import Runtime

    rt = Runtime.detect("auto")
    steps = 2 if smoke else 30
    out["ceiling_tflops"] = float(f"{matmul_ceiling(device, smoke):.4g}")
    save()
    cases = SMOKE_CASES if smoke else CASES
    ds = photo_dataset(work, smoke, max(c.batch for c in cases) * steps)
    out["photos"] = {
        "train_images": len(ds.train.labels),
        "mean_kb": round(
            sum(Path(f).stat().st_size for f in ds.train.files[:64])
            / min(64, len(ds.train.files))
            / 1024,
            1,
        ),
    }
    k = ds.num_classes
    for case in cases:
        row: dict = {"batch": case.batch, "img_size": case.img_size}
        out.setdefault("models", {})[case.key] = row
        row["train_gflop_per_image"] = round(train_gflop(case, device, k), 2)
        row["official"] = {"images_per_s": round(official_loop(case, device, steps, k), 1)}
        save()
        recipe = _recipe(case, smoke)
        row["synthetic"] = fit_rate(
            case, synthetic_batches(case, recipe, rt, steps, k), recipe, rt, k
        )
        save()
        row["pipeline"] = recipe.aug.pipeline_on(gpu=device.type == "cuda")
        row["loader_workers"] = recipe.num_workers

        def from_files():
            return train_batches(ds, recipe, img_size=case.img_size, seed=0, device=device)

        row["files"] = fit_rate(case, from_files(), recipe, rt, k)
        save()
        row["loader"] = loader_rate(from_files(), device)
        flop = row["train_gflop_per_image"] * 1e9
        for kind in ("official", "synthetic", "files", "loader"):
            r = row[kind]
            if kind != "loader":
                r["mfu"] = round(r["images_per_s"] * flop / (out["ceiling_tflops"] * 1e12), 4)
            r["vs_official"] = round(r["images_per_s"] / row["official"]["images_per_s"], 3)
        row["files_vs_synthetic"] = round(
            row["files"]["images_per_s"] / row["synthetic"]["images_per_s"], 3
        )
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the code runs on a CPU")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --smoke on a CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "smoke": args.smoke,
    }
    path = args.out / "gpu_check.json"

    def save() -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, path)

    t0 = time.perf_counter()
    for key, fn in (
        ("nccl", lambda: check_nccl(device)),
        ("rehearsal", lambda: check_rehearsal(args.out / "work", args.smoke)),
    ):
        t = time.perf_counter()
        result[key] = fn()
        result[key + "_seconds"] = round(time.perf_counter() - t, 1)
        print(f"gpu_check {key}: {json.dumps(result[key])}", flush=True)
        save()
    t = time.perf_counter()
    result["benchmark"] = {}
    bench_pipeline(result["benchmark"], save, device, args.out / "work", args.smoke)
    result["benchmark_seconds"] = round(time.perf_counter() - t, 1)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(table(result["benchmark"]))
    print(f"gpu_check: all checks passed in {result['seconds']} s -> {path}")
    return 0


def table(bench: dict) -> str:
    """The benchmark as a Markdown table (bench/README.md's)."""
    lines = [
        f"matmul ceiling (bf16; fp32 on a CPU): {bench['ceiling_tflops']} TFLOP/s",
        "| model | input | images/s | MFU | × official |",
        "|---|---|---|---|---|",
    ]
    for key, row in bench.get("models", {}).items():
        for kind in ("official", "synthetic", "files", "loader"):
            r = row.get(kind)
            if r is None:
                continue
            mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "–"
            lines.append(
                f"| {key} | {kind} | {r['images_per_s']:,.0f} | {mfu} | "
                f"{r.get('vs_official', 1.0):.2f} |"
            )
        if "files_vs_synthetic" in row:
            lines.append(
                f"| {key} | files / synthetic | {100 * row['files_vs_synthetic']:.0f} % | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
