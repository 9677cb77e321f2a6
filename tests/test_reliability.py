"""Faults a long run meets: `kill -9` of a training stage at a random step under
`dvc repro` and under Snakemake, then the same command again, resumes from the last complete
checkpoint and ends with exactly the weights and metrics of an uninterrupted run; the same params,
seed and thread count give the same bytes twice, another seed does not."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import yaml

from conftest import SMOKE, smoke_dict
from workflow_helpers import DEIT, DVC, SNAKEMAKE, make_repo, run, spawn

pytestmark = pytest.mark.slow

EPOCHS = 10
TARGET = "pretrain@deit"
MODEL = Path("models/pretrain/deit/seed0/model.pt")
CKPT = Path("runs/pretrain/deit/seed0/checkpoint.pth")
RUN_JSON = Path("runs/pretrain/deit/seed0/run.json")
METRICS = Path("metrics/pretrain/deit.json")


def _params(tmp: Path) -> Path:
    data = smoke_dict()
    # ~0.4 s an epoch here; the kill is placed by checkpoint writes, whatever the speed
    data["student"]["model"].update(embed_dim=64, depth=4)
    data["student"]["train"].update(epochs=EPOCHS, eval_every=1)
    path = tmp / "params-kill.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the same stage in another fresh clone."""
    tmp = tmp_path_factory.mktemp("kill-ref")
    repo = make_repo(tmp / "repo", _params(tmp))
    run([DVC, "repro", TARGET], repo)
    return {
        "model": _md5(repo / MODEL),
        "metrics": (repo / METRICS).read_bytes(),
        "params": repo / "params.yaml",
    }


def _kill_mid_training(cmd: list[str], repo: Path, seed: int) -> float:
    """Start ``cmd``; SIGKILL its whole process group (the engine and the training process) at a
    random point of a random epoch, located by the events the run emits: after the k-th
    checkpoint write (k drawn in [2, EPOCHS - 3]), a random fraction of the last epoch's measured
    duration later. No wall-clock budget: on any machine the kill lands mid-run, after a
    checkpoint and before the last one. Returns the fraction."""
    rng = random.Random(seed)
    writes, fraction = rng.randint(2, EPOCHS - 3), rng.uniform(0.0, 0.9)
    proc = spawn(cmd, repo)
    try:
        seen, times = None, []
        t0 = time.monotonic()
        while len(times) < writes:
            assert proc.poll() is None, f"{cmd} ended after {len(times)} checkpoints"
            assert time.monotonic() - t0 < 600, f"{len(times)} checkpoints after 600 s"
            try:
                st = os.stat(repo / CKPT)  # each epoch's checkpoint is a new file (a rename)
                key = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                key = None
            if key is not None and key != seen:
                seen = key
                times.append(time.monotonic())
            time.sleep(0.005)
        time.sleep(fraction * (times[-1] - times[-2]))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return fraction


def _assert_resumed_to_the_reference(repo: Path, ref: dict) -> None:
    info = json.loads((repo / RUN_JSON).read_text())
    assert info["resumed_from_epoch"] is not None, "started from scratch, not from the checkpoint"
    assert 0 <= info["resumed_from_epoch"] < EPOCHS - 1, info["resumed_from_epoch"]
    assert _md5(repo / MODEL) == ref["model"]
    assert (repo / METRICS).read_bytes() == ref["metrics"]


def test_kill_9_under_dvc_repro_resumes_to_the_same_result(reference, tmp_path):
    repo = make_repo(tmp_path / "repo", reference["params"])
    _kill_mid_training([DVC, "repro", TARGET], repo, seed=1)
    assert not (repo / METRICS).exists(), "the killed stage must not look finished"
    status = run([DVC, "status", TARGET], repo)
    assert TARGET in status  # DVC knows the stage is not done
    out = run([DVC, "repro", TARGET], repo)
    assert f"Running stage '{TARGET}'" in out
    _assert_resumed_to_the_reference(repo, reference)
    assert "Data and pipelines are up to date" in run([DVC, "status", TARGET], repo)


def test_kill_9_under_snakemake_resumes_to_the_same_result(reference, tmp_path):
    repo = make_repo(tmp_path / "repo", reference["params"])
    target = str(MODEL.parent.parent)
    _kill_mid_training([SNAKEMAKE, "--cores", "2", target], repo, seed=2)
    # A SIGKILLed Snakemake leaves its lock; its outputs are marked incomplete (never taken for
    # finished ones): --unlock, then --rerun-incomplete (set in workflow/profiles/default).
    run([SNAKEMAKE, "--unlock", "--cores", "1"], repo)
    out = run([SNAKEMAKE, "--cores", "2", "--rerun-incomplete", target], repo)
    assert "pretrain_deit" in out
    _assert_resumed_to_the_reference(repo, reference)
    assert "Data and pipelines are up to date" in run([DVC, "status", TARGET], repo)


def test_same_params_seed_and_threads_give_the_same_bytes_and_another_seed_does_not(
    fashion_small, tmp_path
):
    def train(name: str, seed: int) -> Path:
        out = tmp_path / name
        run(
            [
                DEIT,
                "pretrain",
                "--params",
                str(SMOKE),
                "--data",
                str(fashion_small),
                "--distill",
                "none",
                "--seed",
                str(seed),
                "--out",
                str(out),
            ],
            tmp_path,
        )
        return out

    a, b, c = train("a", 0), train("b", 0), train("c", 1)
    for name in ("model.pt", "metrics.json", "history.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _md5(a / "model.pt") != _md5(c / "model.pt")
    assert (a / "metrics.json").read_bytes() != (c / "metrics.json").read_bytes()
