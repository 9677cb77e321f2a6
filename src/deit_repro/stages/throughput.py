"""The throughput stage: inference throughput measured the paper's way (Tables 1 and 5: the largest
batch that fits, mean of repeated timed runs after warm-up) for the profile's architectures."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deit_repro import atomic, provenance
from deit_repro.config import Params, ThroughputCfg
from deit_repro.core.engine import Runtime
from deit_repro.core.model_dirs import build_model, student_kwargs, teacher_kwargs
from deit_repro.core.models import count_params
from deit_repro.core.records import round_metrics
from deit_repro.data.store import read_manifest

_logger = logging.getLogger(__name__)


@torch.no_grad()
def measure_throughput(
    model: nn.Module, *, img_size: int, in_chans: int, cfg: ThroughputCfg, rt: Runtime
) -> dict[str, Any]:
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
        return {
            "images_per_s": statistics.fmean(rates),
            "images_per_s_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "batch_size": bs,
            "repeats": cfg.repeats,
            "device": str(rt.device),
            "dtype": str(rt.amp_dtype or torch.float32).replace("torch.", ""),
            "threads": torch.get_num_threads(),
        }
    raise RuntimeError("no batch size fits in memory")


def run_throughput(params: Params, *, data: Path, out: Path, rt: Runtime | None = None) -> dict:
    """Inference throughput of the profile's architectures (paper Table 1 / 5 column) -> ``out``.

    Throughput depends on the architecture, the resolution and the machine, not on trained
    weights: the models are built from params (random weights), so this stage re-runs only when
    an architecture changes, and its committed measurement stays valid across retraining.
    """
    torch.set_num_threads(params.threads)
    rt = rt or Runtime.detect()
    manifest = read_manifest(data)  # classes and channels of the students' dataset
    num_classes = manifest["num_classes"]
    in_chans = (manifest["image_shape"] or [3])[0]
    m = params.student.model
    archs = {
        "teacher": (
            "teacher",
            teacher_kwargs(params.teacher.model, num_classes=num_classes, in_chans=in_chans),
            params.teacher.model.img_size,
        ),
        "deit": (
            "student",
            student_kwargs(m, distilled=False, num_classes=num_classes, in_chans=in_chans),
            m.img_size,
        ),
        "deit_distilled": (
            "student",
            student_kwargs(m, distilled=True, num_classes=num_classes, in_chans=in_chans),
            m.img_size,
        ),
        f"deit_distilled_{params.finetune.img_size}": (
            "student",
            student_kwargs(
                m,
                distilled=True,
                num_classes=num_classes,
                in_chans=in_chans,
                img_size=params.finetune.img_size,
            ),
            params.finetune.img_size,
        ),
    }
    result: dict[str, Any] = {
        "models": {},
        "hardware": provenance.hardware(),
        "versions": provenance.versions(),
    }
    for name, (role, kwargs, img_size) in archs.items():
        model = build_model(role, kwargs).to(rt.device)
        result["models"][name] = {
            "img_size": img_size,
            "params": count_params(model),
            **measure_throughput(
                model, img_size=img_size, in_chans=in_chans, cfg=params.throughput, rt=rt
            ),
        }
        _logger.info("%s: %.0f images/s", name, result["models"][name]["images_per_s"])
    result = round_metrics(result)
    atomic.write_json(out, result)
    return result
