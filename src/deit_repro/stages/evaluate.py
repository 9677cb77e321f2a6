"""The evaluate stage: top-1/top-5 per head (class, distillation, joint) and the disagreement
between classifiers (paper Table 4), for every seed, with their mean ± std."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from deit_repro import atomic, provenance
from deit_repro.config import Params
from deit_repro.core.datasets import eval_batches, open_dataset
from deit_repro.core.engine import Runtime, accuracy_table, disagreement, predict
from deit_repro.core.model_dirs import load_model, resolve_model_dir
from deit_repro.core.models import count_params, reported_head, student_heads
from deit_repro.core.records import aggregate, round_metrics

_logger = logging.getLogger(__name__)


def _evaluate_one(
    params: Params, ds, path: Path, rt: Runtime
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Accuracy of every head of one model, and each head's predicted classes."""
    model, meta = load_model(path)
    model.to(rt.device).eval()
    pred = predict(
        lambda x: student_heads(model, x), eval_batches(ds, params.eval, meta["img_size"]), rt
    )
    heads = accuracy_table(pred)
    entry = {
        "img_size": meta["img_size"],
        "params": count_params(model),
        "heads": heads,
        "top1": reported_head(heads)["top1"],
    }
    classes = {h: v.argmax(dim=1) for h, v in pred.items() if h != "labels"}
    return entry, classes


def run_evaluate(
    params: Params,
    *,
    data: Path,
    models: dict[str, Path],
    teacher: Path | None,
    out: Path,
    summary: Path | None = None,
    rt: Runtime | None = None,
) -> dict:
    """Evaluate trained models on a prepared dataset's test split and write ``out`` (JSON).

    Every model is evaluated for every seed of the profile (a multi-seed stage output holds one
    run per seed; a single run, such as released teacher weights, serves every seed). The result
    holds each seed's accuracies and disagreement matrix, and their mean ± std.

    Args:
        params: the parsed params (eval settings, seeds).
        data: the prepared dataset.
        models: display name -> model directory (students; any of them may be distilled).
        teacher: the teacher's model directory (its predictions enter the disagreement matrix).
        out: the JSON file to write.
    """
    torch.set_num_threads(params.one_process_threads)  # one process evaluates every seed
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
            _logger.info(
                "seed %d %s: %s",
                seed,
                name,
                {h: round(v["top1"], 2) for h, v in entry["heads"].items()},
            )
        names = list(predictions)
        per_seed.append(
            {
                "models": seed_models,
                "disagreement": {
                    name: {
                        other: disagreement(predictions[name], predictions[other])
                        for other in names
                    }
                    for name in names
                },
            }
        )
    result = round_metrics(
        {
            "dataset": {
                "path": str(data),
                "content_hash": ds.content_hash,
                "test_images": len(labels),
            },
            "eval": {
                "crop_pct": params.eval.crop_pct,
                "interpolation": params.eval.interpolation,
                "weights": "raw (not EMA)",
                "split": "test",
            },
            "classifiers": names,
            **aggregate(per_seed, params.seeds),
            "float_path": provenance.float_path(),
        }
    )
    atomic.write_json(out, result)
    if summary is not None:
        atomic.write_json(summary, headline(result))
    return result


def headline(result: dict) -> dict[str, float]:
    """The few numbers of paper Table 4 that ``dvc metrics show`` lists (mean % over the seeds):
    each pretrained student's disagreement with the teacher, and between DeiT⚗'s two heads. The
    whole matrix, per seed, stays in the evaluate JSON that the tables read."""
    matrix = result["disagreement"]
    out = {}
    for other in ("none", "soft", "hard", "deit/cls", "deit/dist", "deit/joint"):
        if other in matrix.get("teacher", {}):
            out[f"teacher_vs_{other.replace('/', '_')}"] = matrix["teacher"][other]["mean"]
    if "deit/dist" in matrix.get("deit/cls", {}):
        out["deit_cls_vs_dist"] = matrix["deit/cls"]["deit/dist"]["mean"]
    return out
