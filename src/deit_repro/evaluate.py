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


def run_evaluate(params: Params, *, data: Path, models: dict[str, Path], teacher: Path | None,
                 out: Path, throughput: bool = True, rt: Runtime | None = None) -> dict:
    """Evaluate trained models on a prepared dataset's test split and write ``out`` (JSON).

    Args:
        params: the parsed params (eval and throughput settings).
        data: the prepared dataset.
        models: display name -> model directory (students; any of them may be distilled).
        teacher: the teacher's model directory (its predictions enter the disagreement matrix).
        out: the JSON file to write.
        throughput: measure inference throughput too.
    """
    rt = rt or Runtime.detect()
    ds = open_dataset(data)
    labels = ds.test.labels
    predictions: dict[str, torch.Tensor] = {"ground_truth": labels}
    result: dict[str, Any] = {"dataset": {"path": str(data), "content_hash": ds.content_hash,
                                          "test_images": len(labels)},
                              "eval": {"crop_pct": params.eval.crop_pct,
                                       "interpolation": params.eval.interpolation,
                                       "weights": "raw (not EMA)"},
                              "models": {}}
    entries = dict(models)
    if teacher is not None:
        entries = {"teacher": teacher, **entries}
    for name, path in entries.items():
        model, meta = load_model(path)
        model.to(rt.device).eval()
        pred = predict(lambda x: student_heads(model, x),
                       eval_batches(ds, params.eval, meta["img_size"]), rt)
        heads = accuracy_table(pred)
        entry: dict[str, Any] = {"path": str(path), "img_size": meta["img_size"],
                                 "params": count_params(model), "heads": heads,
                                 "top1": heads.get("joint", heads["cls"])["top1"]}
        for head, logits in pred.items():
            if head == "labels":
                continue
            key = name if head == "cls" and len(pred) == 2 else f"{name}/{head}"
            predictions[key] = logits.argmax(dim=1)
        if throughput:
            entry["throughput"] = measure_throughput(model, img_size=meta["img_size"],
                                                     in_chans=meta["in_chans"],
                                                     cfg=params.throughput, rt=rt)
        result["models"][name] = entry
        _logger.info("%s: %s", name, {h: round(v["top1"], 2) for h, v in heads.items()})
    names = list(predictions)
    result["disagreement"] = {
        "classifiers": names,
        "matrix": [[disagreement(predictions[a], predictions[b]) for b in names] for a in names]}
    result = round_metrics(result)
    atomic.write_json(out, result)
    return result
