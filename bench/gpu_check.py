"""The paper's path on one CUDA GPU, and the training benchmark measured on ``engine.fit`` itself.

    bash bench/gpu_check.sh OUT_DIR              # on a CUDA machine, < 8 minutes on one H200
    python bench/gpu_check.py --out OUT --smoke  # on a CPU: tiny sizes, the code runs

1. **Check** (the rehearsal's code on CUDA): an NCCL process group (all-reduce and barrier on the
   runtime's device), ``amp: auto`` resolving to bf16 on a GPU that has it, the rehearsal data
   (``scripts/rehearsal_data.py``) prepared as an image tree, the RegNetY-16GF teacher loaded from
   its pinned state dict and evaluated on the GPU through the sharded evaluation, DeiT-Ti⚗
   pretrained with hard distillation through the timm pipeline with workers, interrupted after its
   first epoch and resumed from the checkpoint.
2. **Benchmark**: training images/s of DeiT-S and DeiT-B⚗ (RegNetY-16GF hard distillation, the
   paper's configuration) at 224 through :func:`deit_repro.core.engine.fit`, the engine the stages
   run, on synthetic in-memory images (so the loader does not limit it); the mean of the timed
   epochs after a warm-up epoch.

Writes ``OUT/gpu_check.json``; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def bench_fit(device: torch.device, smoke: bool) -> dict:
    """Training images/s through ``engine.fit`` (bf16 autocast on CUDA)."""
    from deit_repro.config import AugCfg, TrainCfg
    from deit_repro.core.batches import TensorAugment, TrainBatches
    from deit_repro.core.engine import Runtime, base_criterion, fit
    from deit_repro.core.losses import DistillationLoss
    from deit_repro.core.models import create_student, create_teacher, set_training_outputs

    rt = Runtime.detect("auto")
    cases = (
        [("deit_tiny_patch16_224", None, 4, 64)]
        if smoke
        else [
            ("deit_small_patch16_224", None, 256, 224),
            ("deit_base_distilled_patch16_224", "regnety_160", 128, 224),
        ]
    )
    steps = 2 if smoke else 30
    out = {}
    for name, teacher_name, batch, size in cases:
        torch.manual_seed(0)
        distilled = teacher_name is not None
        model = create_student(
            name=name, distilled=distilled, num_classes=1000, img_size=size, in_chans=3
        ).to(rt.device)
        set_training_outputs(model, distilled)
        teacher = None
        if distilled:
            teacher = create_teacher(name=teacher_name, num_classes=1000, in_chans=3).to(rt.device)
            teacher = teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        aug = AugCfg(pipeline="tensor", rand_augment=None, color_jitter=0.0, reprob=0.0)
        recipe = TrainCfg(epochs=3, batch_size=batch, warmup_epochs=0, eval_every=0, aug=aug)
        n = batch * steps
        # Images, labels and the batched crop/flip on the device: the engine is what is timed,
        # not a CPU loader (Mixup/CutMix and the teacher's forward are in the step, as in the
        # paper's recipe).
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=rt.device)
        labels = torch.randint(0, 1000, (n,), device=rt.device)
        augment = TensorAugment(aug, size, 3)
        augment.mean, augment.std = augment.mean.to(rt.device), augment.std.to(rt.device)
        batches = TrainBatches(images, labels, batch, augment, seed=0, repeats=1)
        loss = DistillationLoss(
            base_criterion(recipe),
            teacher,
            distill="hard" if distilled else "none",
            alpha=0.5,
            tau=1.0,
        )
        res = fit(
            model=model,
            loss_fn=loss,
            train_batches=batches,
            recipe=recipe,
            num_classes=1000,
            seed=0,
            rt=rt,
            checkpoint_path=None,
            fingerprint="bench",
        )
        timed = [row["train_images_per_s"] for row in res.history[1:]]
        out[name + (f"+{teacher_name}" if teacher_name else "")] = {
            "batch": batch,
            "img_size": size,
            "images_per_s": round(sum(timed) / len(timed), 1),
            "per_epoch": [round(v, 1) for v in timed],
            "amp": str(rt.amp_dtype),
        }
        del model, teacher
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


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
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "smoke": args.smoke,
    }
    t0 = time.perf_counter()
    for key, fn in (
        ("nccl", lambda: check_nccl(device)),
        ("rehearsal", lambda: check_rehearsal(args.out / "work", args.smoke)),
        ("fit_benchmark", lambda: bench_fit(device, args.smoke)),
    ):
        t = time.perf_counter()
        result[key] = fn()
        result[key + "_seconds"] = round(time.perf_counter() - t, 1)
        print(f"gpu_check {key}: {json.dumps(result[key])}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_check: all checks passed in {result['seconds']} s -> {args.out}/gpu_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
