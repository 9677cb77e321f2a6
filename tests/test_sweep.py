"""A queued DVC sweep on the smoke profile, as a user runs one: `dvc repro`, commit the baseline,
`dvc exp run --queue -S distillation.soft.tau=1.0,3.0`, `dvc queue start -j 2`, then
`dvc queue status` and `dvc exp show`. The sweep point equal to the baseline's tau changes nothing;
the other one changes the soft-distillation stage and nothing that does not read tau."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from workflow_helpers import DVC, env, ran_stages, run

TAU = "distillation.soft.tau"
#: `dvc exp show --csv` columns that describe the row, not what it computed
META = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
#: metrics of stages that read no tau (a sweep over tau must leave them byte for byte)
UNTOUCHED = ("metrics/pretrain/none", "metrics/pretrain/hard", "metrics/teacher")
UNTOUCHED_STAGES = {"pretrain@none", "pretrain@hard", "teacher@convnet", "teacher@vit"}
QUEUE_TIMEOUT_S = 480


def _dvc(repo: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DVC, *args], cwd=repo, env=env(), capture_output=True, text=True, timeout=timeout
    )


def _lock(repo: Path, rev: str) -> dict:
    """The stages of dvc.lock as committed in ``rev`` (an experiment's commit or a branch)."""
    return yaml.safe_load(run(["git", "show", f"{rev}:dvc.lock"], repo))["stages"]


def _queue_status(repo: Path, names: list[str]) -> tuple[dict[str, str], str]:
    """Each experiment's status in `dvc queue status` (Queued, Running, Success, Failed)."""
    out = run([DVC, "queue", "status"], repo)
    status = {}
    for line in out.splitlines():
        cols = line.split()  # Task  Name  Created  Status
        if len(cols) >= 3 and cols[1] in names:
            status[cols[1]] = cols[-1]
    return status, out


def _queue_logs(repo: Path, names: list[str]) -> str:
    return "\n".join(
        f"--- dvc queue logs {name}\n{_dvc(repo, 'queue', 'logs', name).stdout}" for name in names
    )


def _processes_in(repo: Path) -> list[int]:
    """Processes working inside the repository: queue workers, their `dvc exp exec-run`
    executors (in .dvc/tmp/exps/) and the stages those run."""
    root, pids = repo.resolve(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:  # gone, a zombie, or not ours to inspect
            continue
        if int(proc.name) != os.getpid() and cwd.is_relative_to(root):
            pids.append(int(proc.name))
    return pids


def _stop_queue(repo: Path, grace_s: float = 30) -> None:
    """`dvc queue stop --kill`, then wait for the workers to exit; whatever still works in the
    repository after `grace_s` is killed, so no detached worker outlives the test."""
    _dvc(repo, "queue", "stop", "--kill")
    deadline = time.monotonic() + grace_s
    while _processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _processes_in(repo):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def repo(dvc_reference, tmp_path):
    """A repository where `dvc repro` of the smoke DAG has run (the session's reference run)."""
    repo = dvc_reference["copy"](tmp_path / "repo")
    yield repo
    _stop_queue(repo)


@pytest.mark.slow
def test_queued_tau_sweep(repo):
    t0 = time.monotonic()
    # the session's reference run made the outputs: this repro only checks them (nothing runs)
    assert ran_stages(run([DVC, "repro"], repo)) == set()
    run(["git", "add", "dvc.lock", "metrics", "results"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    t_repro = time.monotonic() - t0

    queued = run([DVC, "exp", "run", "--queue", "-S", f"{TAU}=1.0,3.0"], repo)
    names = [line.split("'")[1] for line in queued.splitlines() if "Queued experiment" in line]
    assert len(names) == 2, queued
    status, out = _queue_status(repo, names)
    assert status == dict.fromkeys(names, "Queued"), out

    run([DVC, "queue", "start", "-j", "2"], repo)
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status, out = _queue_status(repo, names)
        if len(status) == 2 and not {"Queued", "Running"} & set(status.values()):
            break
        assert time.monotonic() < deadline, (
            f"the queue did not finish in {QUEUE_TIMEOUT_S} s:\n{out}\n{_queue_logs(repo, names)}"
        )
        time.sleep(2)
    assert status == dict.fromkeys(names, "Success"), f"{out}\n{_queue_logs(repo, names)}"
    t_queue = time.monotonic() - t0 - t_repro
    print(out)

    rows = list(csv.DictReader(io.StringIO(run([DVC, "exp", "show", "--csv"], repo))))
    (base,) = [r for r in rows if r["typ"] == "baseline" and r["rev"] == "main"]
    exps = {r["Experiment"]: r for r in rows if r["Experiment"] in names}
    assert set(exps) == set(names), [r["Experiment"] for r in rows]
    (tau,) = [c for c in base if c.split(":")[-1] == TAU]
    by_tau = {float(r[tau]): r for r in exps.values()}
    assert set(by_tau) == {1.0, 3.0} and float(base[tau]) == 3.0
    logs = {float(exps[n][tau]): _dvc(repo, "queue", "logs", n).stdout for n in names}
    metrics = [c for c in base if c.startswith("metrics/") and ":" in c]

    # tau 3.0 is the baseline's: nothing re-ran, every metric, param and dependency is the same.
    same = by_tau[3.0]
    assert ran_stages(logs[3.0]) == set(), logs[3.0]
    assert {c: same[c] for c in base if c not in META} == {
        c: base[c] for c in base if c not in META
    }

    # tau 1.0: the soft-distillation student re-trains into another model (its out in dvc.lock).
    # At smoke scale (one epoch, a near-chance teacher, alpha 0.1) tau moves its train loss by a
    # few 1e-6, below the precision its metrics are logged to: its columns are printed, not
    # compared ...
    other = by_tau[1.0]
    ran = ran_stages(logs[1.0])
    assert "pretrain@soft" in ran, logs[1.0]
    lock, base_lock = _lock(repo, other["rev"]), _lock(repo, "main")
    assert lock["pretrain@soft"]["outs"] != base_lock["pretrain@soft"]["outs"]
    soft = [c for c in metrics if c.startswith("metrics/pretrain/soft")]
    assert soft, metrics
    print("soft-distillation metrics, baseline / tau 1.0 / tau 3.0:")
    for c in soft:
        print(f"  {c}: {base[c]} / {other[c]} / {same[c]}")
    # ... and what reads no tau neither re-ran nor changed.
    assert not ran & UNTOUCHED_STAGES, ran
    for stage in UNTOUCHED_STAGES:
        assert lock[stage] == base_lock[stage], stage
    for prefix in UNTOUCHED:
        cols = [c for c in metrics if c.startswith(prefix)]
        assert cols, (prefix, metrics)
        assert {c: other[c] for c in cols} == {c: base[c] for c in cols}, prefix

    # Queued runs work in temporary copies: the workspace is as committed.
    assert run(["git", "status", "--porcelain"], repo) == ""
    print(f"dvc repro + commit {t_repro:.0f} s, queue of 2 {t_queue:.0f} s")
