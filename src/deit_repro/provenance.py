"""Provenance recorded with every result (the reproducibility contract, docs/architecture.md):
resolved params, git commit, library versions, hardware and the command line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

_PACKAGES = ("torch", "torchvision", "timm", "numpy", "dvc", "snakemake", "submitit", "pandas")


def git_commit(cwd: str | None = None) -> dict[str, Any]:
    """The HEAD commit and whether the work tree had changes (None outside a git repository)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            != ""
        )
        return {"commit": head, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "float_path": float_path(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


#: environment variables that choose which kernels run (so which float path): torch's CPU
#: capability, MKL's code path, oneDNN's instruction set. Not the thread variables: every run
#: sets its torch threads itself (``threads`` below), and Snakemake sets OMP_NUM_THREADS where
#: DVC does not, for the same bytes.
DISPATCH_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
)

#: the CPU flags that decide which SIMD kernels torch, MKL and oneDNN pick
_SIMD_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "avx_vnni", "amx")


def _cpu() -> tuple[str | None, list[str]]:
    """The CPU's model name and SIMD flags (Linux ``/proc/cpuinfo``; None elsewhere)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return platform.processor() or None, []
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = sorted(f for f in value.split() if f.startswith(_SIMD_FLAGS))
        if model is not None and flags:
            break
    return model, flags


def float_path(threads: int | None = None) -> dict[str, Any]:
    """What decides a result's floating-point path on this machine, so its last bits: the CPU
    (model and SIMD flags), the kernels torch dispatches to (its CPU capability), the torch, BLAS
    and oneDNN versions, the thread count and the variables that override the dispatch; on a GPU
    its name and CUDA/cuDNN versions. With the pinned libraries (``versions``), the params and
    the world size (``run.json``), runs that agree on these write the same bytes; runs that
    differ in one compute the same thing with other rounding (docs/architecture.md, "The
    contract")."""
    import re

    import torch

    config = torch.__config__.show()

    def version(pattern: str) -> str | None:
        found = re.search(pattern, config)
        return found.group(1) if found else None

    model, flags = _cpu()
    out: dict[str, Any] = {
        "cpu": model,
        "cpu_simd": flags,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": version(r"Math Kernel Library Version (\S+)"),
        "onednn": version(r"MKL-DNN v(\S+)") or version(r"oneDNN v(\S+)"),
        "threads": torch.get_num_threads() if threads is None else threads,
        "dispatch_env": {k: os.environ[k] for k in DISPATCH_ENV if k in os.environ},
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def record(params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The provenance block of a run directory's ``run.json``."""
    return {
        "params": params,
        "git": git_commit(),
        "versions": versions(),
        "hardware": hardware(),
        "command": sys.argv,
        **extra,
    }
