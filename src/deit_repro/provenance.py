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
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


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
