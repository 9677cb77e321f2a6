"""The real single-node SLURM cluster the SLURM tests run on (scripts/slurm/start-local-slurm.sh).

Started by the tests themselves when they run as root (CI), reused when one is already up, and
skipped with the command to run otherwise. Every wait has its own timeout: the failure modes of a
broken cluster hang rather than fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from conftest import ROOT

START = ROOT / "scripts" / "slurm" / "start-local-slurm.sh"
STOP = ROOT / "scripts" / "slurm" / "stop-local-slurm.sh"


def cluster_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        acct = subprocess.run(
            ["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return False
    return "UP" in ping.stdout and acct.returncode == 0


def start() -> bool:
    """Start the cluster (installing it when needed); True if this call started it."""
    if cluster_up():
        return False
    if os.geteuid() != 0:
        import pytest

        pytest.skip(f"no SLURM cluster running and not root: run `sudo {START}` first")
    # From /: nothing the daemons or a job write lands in the checkout.
    proc = subprocess.run(
        ["bash", str(START)], cwd="/", capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{START} failed:\n{proc.stdout}\n{proc.stderr}"
    return True


def stop() -> None:
    subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=300)


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=10
    ).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def sacct(
    job_id: str | None = None, since: str = "now-2hours", under: Path | None = None
) -> list[dict[str, str]]:
    """The cluster's jobs (allocations) since ``since``; with ``under``, only those submitted from
    that directory or below it (their WorkDir): the tests share the cluster, and another test's
    jobs may run meanwhile."""
    fields = "JobID,JobName%60,State,NNodes,NTasks,Comment%80,WorkDir%1000"
    cmd = ["sacct", "-n", "-P", "-X", "-S", since, f"--format={fields}"]
    if job_id:
        cmd += ["-j", str(job_id)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    keys = [f.split("%")[0] for f in fields.split(",")]
    rows = [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]
    if under is not None:
        rows = [r for r in rows if Path(r["WorkDir"]).is_relative_to(Path(under).resolve())]
    return rows


def wait_for(what: str, predicate, timeout: float, every: float = 0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
