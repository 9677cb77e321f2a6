"""The evaluate stage (DESIGN.md stage 6): top-1/top-5 per head (class, distillation, joint),
disagreement between classifiers (paper Table 4), and inference throughput measured the paper's way
(Table 1 / 5: the largest batch that fits, mean of repeated timed runs after warm-up)."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deit_repro import atomic
from deit_repro.config import Params, ThroughputCfg
from deit_repro.engine import Runtime, accuracy_table, disagreement, predict
from deit_repro.models import count_params, student_heads
from deit_repro.runs import eval_batches, load_model, open_dataset, round_metrics

_logger = logging.getLogger(__name__)


@torch.no_grad()
def measure_throughput(model: nn.Module, *, img_size: int, in_chans: int, cfg: ThroughputCfg,
                       rt: Runtime) -> dict[str, Any]:
    """Images/s of ``model`` in eval mode at the largest batch of ``cfg.batch_sizes`` that fits.

    Synthetic input (throughput does not depend on pixel values); ``cfg.warmup`` untimed passes,
    then ``cfg.repeats`` timed passes; CUDA is synchronised around each timed pass.
    """
    model.eval()
    for bs in sorted(cfg.batch_sizes, reverse=True):
        try:
            x = torch.randn(bs, in_chans, img_size, img_size, device=rt.device)
            times = []
            for i in range(cfg.warmup + cfg.repeats):
                if rt.device.type == "cuda":
                    torch.cuda.synchronize(rt.device)
                t0 = time.perf_counter()
                with rt.autocast():
                    model(x)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize(rt.device)
                if i >= cfg.warmup:
                    times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            _logger.info("batch %d does not fit, trying a smaller one", bs)
            if rt.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rates = [bs / t for t in times]
        return {"images_per_s": statistics.fmean(rates),
                "images_per_s_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                "batch_size": bs, "repeats": cfg.repeats, "device": str(rt.device),
                "dtype": str(rt.amp_dtype or torch.float32).replace("torch.", ""),
                "threads": torch.get_num_threads()}
    raise RuntimeError("no batch size fits in memory")


def _evaluate_one(params: Params, ds, path: Path, rt: Runtime
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Accuracy of every head of one model, and each head's predicted classes."""
    model, meta = load_model(path)
    model.to(rt.device).eval()
    pred = predict(lambda x: student_heads(model, x),
                   eval_batches(ds, params.eval, meta["img_size"]), rt)
    heads = accuracy_table(pred)
    entry = {"img_size": meta["img_size"], "params": count_params(model), "heads": heads,
             "top1": heads.get("joint", heads["cls"])["top1"]}
    classes = {h: v.argmax(dim=1) for h, v in pred.items() if h != "labels"}
    return entry, classes


def run_evaluate(params: Params, *, data: Path, models: dict[str, Path], teacher: Path | None,
                 out: Path, rt: Runtime | None = None) -> dict:
    """Evaluate trained models on a prepared dataset's test split and write ``out`` (JSON).

    Every model is evaluated for every seed of the profile (a multi-seed stage output holds one
    run per seed; a single run, such as the teacher, serves every seed). The result holds each
    seed's accuracies and disagreement matrix, and their mean ± std.

    Args:
        params: the parsed params (eval settings, seeds).
        data: the prepared dataset.
        models: display name -> model directory (students; any of them may be distilled).
        teacher: the teacher's model directory (its predictions enter the disagreement matrix).
        out: the JSON file to write.
    """
    from deit_repro.launch import aggregate
    from deit_repro.runs import resolve_model_dir

    rt = rt or Runtime.detect()
    ds = open_dataset(data)
    labels = ds.test.labels
    entries = ({"teacher": teacher} if teacher is not None else {}) | dict(models)
    cache: dict[Path, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    per_seed = []
    for seed in params.seeds:
        predictions: dict[str, torch.Tensor] = {"ground_truth": labels}
        seed_models: dict[str, Any] = {}
        for name, path in entries.items():
            run = resolve_model_dir(path, seed)
            if run not in cache:
                cache[run] = _evaluate_one(params, ds, run, rt)
            entry, classes = cache[run]
            seed_models[name] = entry
            for head, cls in classes.items():
                predictions[name if len(classes) == 1 else f"{name}/{head}"] = cls
            _logger.info("seed %d %s: %s", seed, name,
                         {h: round(v["top1"], 2) for h, v in entry["heads"].items()})
        names = list(predictions)
        per_seed.append({"models": seed_models, "disagreement": {
            name: {other: disagreement(predictions[name], predictions[other]) for other in names}
            for name in names}})
    result = round_metrics({
        "dataset": {"path": str(data), "content_hash": ds.content_hash,
                    "test_images": len(labels)},
        "eval": {"crop_pct": params.eval.crop_pct, "interpolation": params.eval.interpolation,
                 "weights": "raw (not EMA)", "split": "test"},
        "classifiers": names, **aggregate(per_seed, params.seeds)})
    atomic.write_json(out, result)
    return result


def run_throughput(params: Params, *, data: Path, out: Path, rt: Runtime | None = None) -> dict:
    """Inference throughput of the profile's architectures (paper Table 1 / 5 column) -> ``out``.

    Throughput depends on the architecture, the resolution and the machine, not on trained
    weights: the models are built from params (random weights), so this stage re-runs only when
    an architecture changes, and its committed measurement stays valid across retraining.
    """
    from deit_repro import provenance
    from deit_repro.data.store import read_manifest
    from deit_repro.runs import build_model, student_kwargs, teacher_kwargs

    rt = rt or Runtime.detect()
    manifest = read_manifest(data)  # classes and channels of the students' dataset
    num_classes = manifest["num_classes"]
    in_chans = (manifest["image_shape"] or [3])[0]
    m = params.student.model
    archs = {
        "teacher": ("teacher", teacher_kwargs(params.teacher.model, num_classes=num_classes,
                                              in_chans=in_chans), params.teacher.model.img_size),
        "deit": ("student", student_kwargs(m, distilled=False, num_classes=num_classes,
                                           in_chans=in_chans), m.img_size),
        "deit_distilled": ("student", student_kwargs(m, distilled=True, num_classes=num_classes,
                                                     in_chans=in_chans), m.img_size),
        f"deit_distilled_{params.finetune.img_size}": (
            "student", student_kwargs(m, distilled=True, num_classes=num_classes,
                                      in_chans=in_chans, img_size=params.finetune.img_size),
            params.finetune.img_size),
    }
    result: dict[str, Any] = {"models": {}, "hardware": provenance.hardware(),
                              "versions": provenance.versions()}
    for name, (role, kwargs, img_size) in archs.items():
        model = build_model(role, kwargs).to(rt.device)
        result["models"][name] = {
            "img_size": img_size, "params": count_params(model),
            **measure_throughput(model, img_size=img_size, in_chans=in_chans,
                                 cfg=params.throughput, rt=rt)}
        _logger.info("%s: %.0f images/s", name, result["models"][name]["images_per_s"])
    result = round_metrics(result)
    atomic.write_json(out, result)
    return result
