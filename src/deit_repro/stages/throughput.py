"""The throughput stage: inference throughput measured the paper's way (Tables 1 and 5: float32 on
one GPU, facebookresearch/deit#38; the largest batch that fits, mean of repeated timed runs after
warm-up) for the profile's architectures; on CUDA, the training precision's (AMP) figure beside
it."""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deit_repro import atomic, provenance
from deit_repro.config import Params, ThroughputCfg
from deit_repro.errors import ConfigError
from deit_repro.core.engine import Runtime
from deit_repro.core.model_dirs import build_model, student_kwargs, teacher_kwargs
from deit_repro.core.models import count_params
from deit_repro.core.records import round_metrics
from deit_repro.data.store import read_manifest

_logger = logging.getLogger(__name__)


_PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    *,
    img_size: int,
    in_chans: int,
    cfg: ThroughputCfg,
    rt: Runtime,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Images/s of ``model`` in eval mode at the largest batch of ``cfg.batch_sizes`` that fits.

    fp32 (no autocast, whatever ``rt.amp_dtype``) unless ``amp_dtype`` is given, then under
    autocast to it. Synthetic input (throughput does not depend on pixel values);
    ``cfg.warmup`` untimed passes, then ``cfg.repeats`` timed passes; CUDA is synchronised
    around each timed pass.
    """
    model.eval()
    for bs in sorted(cfg.batch_sizes, reverse=True):
        try:
            with _cpu_memory_bound(rt):
                x = torch.randn(bs, in_chans, img_size, img_size, device=rt.device)
                times = []
                with (
                    torch.autocast(rt.device.type, dtype=amp_dtype)
                    if amp_dtype is not None
                    else contextlib.nullcontext()
                ):
                    for i in range(cfg.warmup + cfg.repeats):
                        if rt.device.type == "cuda":
                            torch.cuda.synchronize(rt.device)
                        t0 = time.perf_counter()
                        model(x)
                        if rt.device.type == "cuda":
                            torch.cuda.synchronize(rt.device)
                        if i >= cfg.warmup:
                            times.append(time.perf_counter() - t0)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not isinstance(err, torch.OutOfMemoryError) and not _cpu_oom(err):
                raise
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
            "precision": _PRECISION[amp_dtype],
            "dtype": str(amp_dtype or torch.float32).replace("torch.", ""),
            "threads": torch.get_num_threads(),
        }
    raise ConfigError(
        f"no batch size of throughput.batch_sizes {list(cfg.batch_sizes)} fits in the memory of "
        f"{rt.device} for this {img_size}-px model",
        "measure throughput on the GPU the profile is for, or add a smaller batch size",
    )


def _cpu_oom(err: RuntimeError) -> bool:
    """Whether ``err`` is torch's CPU allocator refusing (under :func:`_cpu_memory_bound`)."""
    text = str(err)
    return "not enough memory" in text or "can't allocate memory" in text


@contextlib.contextmanager
def _cpu_memory_bound(rt: Runtime):
    """On a CPU, the process's address space bounded to what it holds now plus the memory the
    machine has available: a batch that does not fit is refused by the allocator (an error the
    caller handles, trying a smaller batch) rather than the kernel's OOM killer ending the
    stage (the imagenet profile's batch 1024 of DeiT-B at 384 px asks for tens of GB)."""
    import resource

    if rt.device.type != "cpu":
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    bound = _address_space() + _available_memory()
    if hard != resource.RLIM_INFINITY:
        bound = min(bound, hard)
    resource.setrlimit(resource.RLIMIT_AS, (bound, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _meminfo(key: str, path: str) -> int:
    with open(path) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise ConfigError(f"{path} has no {key}", "throughput on CPU needs Linux's /proc")


def _address_space() -> int:
    return _meminfo("VmSize", "/proc/self/status")


def _available_memory() -> int:
    return _meminfo("MemAvailable", "/proc/meminfo")


def run_throughput(
    params: Params,
    *,
    data: Path,
    out: Path,
    summary: Path | None = None,
    rt: Runtime | None = None,
) -> dict:
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
    if rt.device.type == "cuda":
        # As the official main.py: cuDNN times its convolution algorithms per input shape and
        # keeps the fastest (the warm-up passes pay for the search).
        torch.backends.cudnn.benchmark = True
    for name, (role, kwargs, img_size) in archs.items():
        model = build_model(role, kwargs).to(rt.device)
        measure = functools.partial(
            measure_throughput, model, img_size=img_size, in_chans=in_chans, cfg=params.throughput
        )
        entry = result["models"][name] = {
            "img_size": img_size,
            "params": count_params(model),
            **measure(rt=rt),
        }
        if rt.device.type == "cuda" and rt.amp_dtype is not None:
            # Beside the paper's fp32 figure, what the training precision gives (not on CPU,
            # where autocast only slows inference down).
            amp = measure(rt=rt, amp_dtype=rt.amp_dtype)
            keep = ("precision", "images_per_s", "images_per_s_std", "batch_size")
            entry["amp"] = {k: amp[k] for k in keep}
        _logger.info(
            "%s: %.0f images/s fp32%s",
            name,
            entry["images_per_s"],
            f", {entry['amp']['images_per_s']:.0f} {entry['amp']['precision']}"
            if "amp" in entry
            else "",
        )
    result = round_metrics(result)
    atomic.write_json(out, result)
    if summary is not None:  # what `dvc metrics show` lists; the settings stay in ``out``
        atomic.write_json(
            summary,
            {f"{name}_images_per_s": m["images_per_s"] for name, m in result["models"].items()},
        )
    return result
