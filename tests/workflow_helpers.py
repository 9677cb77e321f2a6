"""Helpers for the tests that run the real engines (DVC, Snakemake, SLURM) in a fresh repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
SNAKEMAKE = str(BIN / "snakemake")
DEIT = str(BIN / "deit-repro")


def env() -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        DEIT_REPRO_LOG="WARNING",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def spawn(cmd: list[str], cwd: Path, **streams) -> subprocess.Popen:
    """``cmd`` started in a process group of its own, so that a test can SIGKILL it with all it
    started (``os.killpg``); its output discarded unless ``streams`` say otherwise."""
    kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **streams}
    return subprocess.Popen(cmd, cwd=cwd, env=env(), start_new_session=True, **kwargs)


def result(
    cmd: list[str], cwd: Path, timeout: int = 300, **extra_env
) -> subprocess.CompletedProcess:
    """``cmd``'s exit status and output, whatever the status."""
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**env(), **extra_env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def copy_project(dst: Path, outputs: bool = False) -> None:
    """The project's files as a clone would have them (tracked + new, minus ignored), without
    the DAG's committed outputs unless ``outputs`` (metrics/, results/, dvc.lock: a full
    clone, whose DVC-cached outputs are not pulled)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not outputs and (
            rel.startswith(("data/", "models/", "metrics/", "results/", "runs/"))
            or rel == "dvc.lock"
        ):
            continue
        if src.is_symlink():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst / rel)
        elif src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def make_repo(dst: Path, params: Path | str = "profiles/smoke.yaml", outputs: bool = False) -> Path:
    """A fresh git repository of the project with ``params`` as params.yaml, committed
    (``outputs``: with the committed outputs, see copy_project)."""
    dst.mkdir(parents=True, exist_ok=True)
    copy_project(dst, outputs)
    if Path(params) != Path("params.yaml"):
        shutil.copy(dst / params if not Path(params).is_absolute() else params, dst / "params.yaml")
    run(["git", "init", "-q", "-b", "main"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "fresh clone"], dst)
    return dst


def lock_stages(repo: Path) -> dict:
    import yaml

    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


#: outputs that measure time, not the models: they differ between any two runs
TIMED = ("metrics/throughput.json", "metrics/throughput/metrics.json")
TIMED_STAGES = ("throughput", "tables")


def metric_files(repo: Path) -> dict[str, bytes]:
    return {
        p.relative_to(repo).as_posix(): p.read_bytes()
        for p in sorted((repo / "metrics").rglob("*"))
        if p.is_file()
        and p.relative_to(repo).as_posix() not in TIMED
        # Snakemake's stamp in a directory output (the live logs' plots/): git and DVC ignore it
        and p.name != ".snakemake_timestamp"
    }
