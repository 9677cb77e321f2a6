"""The evaluate stage: top-1/top-5 per head (class, distillation, joint) and the disagreement
between classifiers (paper Table 4), for every seed, with their mean ± std.

Released checkpoints (``deit-repro import-weights``) are evaluated the same way, and each also
gets what the tables' released rows need besides accuracy: its timm name, source and digest, its
ViT dims (Table 1) and its inference throughput measured as the throughput stage measures the
profile's architectures (Tables 1 and 5). README, "Evaluate-only (released checkpoints)".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from deit_repro import atomic, provenance
from deit_repro.config import Params
from deit_repro.core.datasets import Dataset, eval_batches, open_dataset
from deit_repro.core.engine import Runtime, accuracy_table, disagreement, predict
from deit_repro.core.model_dirs import load_model, resolve_model_dir
from deit_repro.core.models import count_params, reported_head, student_heads
from deit_repro.core.records import aggregate, round_metrics
from deit_repro.stages.throughput import measure_throughput

_logger = logging.getLogger(__name__)


def _evaluate_one(
    params: Params, ds: Dataset, path: Path, rt: Runtime
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """Accuracy of every head of one model, each head's predicted classes, and for released
    weights what the tables' released rows need (``_released``)."""
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
    return entry, classes, _released(params, model, meta, ds, rt)


def _released(
    params: Params, model: torch.nn.Module, meta: dict[str, Any], ds: Dataset, rt: Runtime
) -> dict[str, Any] | None:
    """A released checkpoint's timm name, source, digest, dims and measured throughput (fp32,
    the largest batch of ``throughput.batch_sizes`` that fits, as the throughput stage); None
    for a model the DAG trained."""
    if not meta.get("released"):
        return None
    info: dict[str, Any] = {
        "model": meta["kwargs"]["name"],
        "role": meta["role"],
        "distilled": bool(meta.get("dist_token", False)),
        "source": meta.get("source"),
        "sha256": meta.get("sha256"),
    }
    if hasattr(model, "blocks") and hasattr(model, "embed_dim"):  # a ViT: Table 1's dims
        info.update(
            embed_dim=int(model.embed_dim),
            num_heads=int(model.blocks[0].attn.num_heads),
            depth=len(model.blocks),
        )
    info["throughput"] = measure_throughput(
        model, img_size=meta["img_size"], in_chans=ds.in_chans, cfg=params.throughput, rt=rt
    )
    return info


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
            Released checkpoints go by ``released/<timm name>`` (README), though the tables
            find them by the ``released`` block whatever the name.
        teacher: the teacher's model directory (its predictions enter the disagreement matrix).
        out: the JSON file to write.
    """
    torch.set_num_threads(params.one_process_threads)  # one process evaluates every seed
    rt = rt or Runtime.detect()
    ds = open_dataset(data, need_train=False)  # or ImageNet's val/ alone (prepare --splits test)
    labels = ds.test.labels
    entries = ({"teacher": teacher} if teacher is not None else {}) | dict(models)
    cache: dict[Path, tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]] = {}
    released: dict[str, dict[str, Any]] = {}
    per_seed = []
    for seed in params.seeds:
        predictions: dict[str, torch.Tensor] = {"ground_truth": labels}
        seed_models: dict[str, Any] = {}
        for name, path in entries.items():
            run = resolve_model_dir(path, seed)
            if run not in cache:
                cache[run] = _evaluate_one(params, ds, run, rt)
            entry, classes, info = cache[run]
            seed_models[name] = entry
            if info is not None:
                released[name] = info
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
            # only when released weights were evaluated: the DAG's file keeps its bytes
            **({"released": released} if released else {}),
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
