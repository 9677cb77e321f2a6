"""On a real SLURM cluster (scripts/slurm/start-local-slurm.sh):

* a pretrain stage launched through submitit with 2 tasks trains with DDP (gloo) and ends where
  the 1-process run with the same global batch ends;
* a job preempted (USR2, as SLURM sends before a timeout) or requeued by `scontrol requeue`
  mid-training resumes from its checkpoint and ends with exactly the uninterrupted run's weights;
* `snakemake --profile slurm` runs the smoke DAG end to end, every stage visible in `sacct`, with
  the metrics of `dvc repro`;
* nothing of all this writes into the checkout the tests run from (a job's default
  `slurm-<id>.out` lands in the submitter's working directory).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

import slurm_cluster as sc
from conftest import ROOT, smoke_dict
from workflow_helpers import (
    DEIT,
    SNAKEMAKE,
    TIMED_STAGES,
    env,
    lock_stages,
    make_repo,
    metric_files,
    run,
)

pytestmark = pytest.mark.slow


def _params(
    tmp: Path, name: str, *, epochs: int, tasks: int = 1, augment: bool = True, wide: bool = False
) -> Path:
    data = smoke_dict()
    if wide:
        # ~0.4 s per epoch: a run outlives SLURM's kill grace (KillWait 5 s + srun's 7 s), in
        # which submitit lets a SIGTERMed job go on; a smaller one could finish in it.
        data["student"]["model"].update(embed_dim=64, depth=4)
    train = data["student"]["train"]
    train.update(epochs=epochs, eval_every=1)
    if not augment:
        # Every random draw off: then DDP over 2 processes computes the 1-process gradient up to
        # float summation order (per-rank augmentation draws would differ otherwise).
        train.update(mixup=0.0, cutmix=0.0, drop_path=0.0, repeated_aug=1)
        train["aug"].update(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, reprob=0.0)
    data["launch"]["pretrain"].update(
        tasks_per_node=tasks, cpus_per_task=1, mem_gb=2, timeout_min=30
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _checkout_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def checkout_before():
    """The checkout's `git status` before the first SLURM test of this module."""
    return _checkout_status()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, slurm, checkout_before):
    """Smoke data and a teacher, made by the CLI."""
    from conftest import _need_fashion

    _need_fashion()
    root = tmp_path_factory.mktemp("slurm")
    params = _params(root, "base", epochs=1)
    run(
        [DEIT, "prepare", "--params", str(params), "--dataset", "fashion_mnist", "--out", "data"],
        root,
    )
    run(
        [
            DEIT,
            "teacher",
            "--params",
            str(params),
            "--data",
            "data",
            "--out",
            "teacher",
            "--run-dir",
            "runs/teacher",
        ],
        root,
    )
    return root


def _pretrain(root: Path, params: Path, name: str, launcher: str, **popen) -> list[str]:
    return [
        DEIT,
        "pretrain",
        "--params",
        str(params),
        "--data",
        "data",
        "--teacher",
        "teacher",
        "--distill",
        "hard",
        "--seed",
        "0",
        "--out",
        f"models/{name}",
        "--run-dir",
        f"runs/{name}",
        "--launcher",
        launcher,
    ]


def _history(root: Path, name: str) -> list[dict[str, float]]:
    import csv

    with open(root / "models" / name / "history.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _job_id(root: Path, name: str) -> str:
    return json.loads((root / "runs" / name / "submitit-job.json").read_text())["job_id"]


def test_ddp_two_tasks_on_slurm_matches_one_process(prepared):
    root = prepared
    params = _params(root, "ddp", epochs=3, tasks=2, augment=False)
    run(_pretrain(root, params, "single", "in-process"), root)
    t0 = time.time()
    out = run(_pretrain(root, params, "ddp", "slurm"), root, timeout=600)
    job = _job_id(root, "ddp")
    assert f"slurm job {job} (1 node(s) x 2 task(s)" in out
    run_info = json.loads((root / "runs" / "ddp" / "run.json").read_text())
    assert run_info["world_size"] == 2 and run_info["device"] == "cpu"
    acct = sc.wait_for(
        "the job in sacct",
        lambda: [r for r in sc.sacct(job) if r["State"] == "COMPLETED"],
        timeout=60,
    )
    assert acct[0]["JobName"] == "deit-repro-pretrain-seed0"
    assert sc.scontrol_job(job)["NumTasks"] == "2"

    # Same global batch (64 = 2 x 32), same images per step: the same run up to float rounding.
    one, two = _history(root, "single"), _history(root, "ddp")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * abs(a["train_loss"]), (a, b)
        for k in ("test_cls_top1", "test_dist_top1", "test_joint_top1"):
            assert abs(a[k] - b[k]) <= 1.0, (k, a[k], b[k])  # 1 point = 2 of 200 test images
    w1 = torch.load(root / "models/single/model.pt", weights_only=True)
    w2 = torch.load(root / "models/ddp/model.pt", weights_only=True)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff < 1e-3, diff
    print(
        f"DDP (2 gloo tasks) vs 1 process: max |dw| = {diff:.2e}, {time.time() - t0:.0f} s on SLURM"
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("interrupt", ["usr2", "scontrol-requeue"])
def test_interrupted_job_requeues_and_resumes_to_the_same_weights(prepared, interrupt):
    root = prepared
    epochs = 50
    params = _params(root, "long", epochs=epochs, wide=True)
    name = f"requeue-{interrupt}"
    if not (root / "models" / "uninterrupted" / "model.pt").exists():
        run(_pretrain(root, params, "uninterrupted", "in-process"), root)

    proc = subprocess.Popen(
        _pretrain(root, params, name, "slurm"),
        cwd=root,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        job = sc.wait_for(
            "the submitted job",
            lambda: (root / "runs" / name / "submitit-job.json").exists() and _job_id(root, name),
            timeout=120,
        )
        ckpt = root / "runs" / name / "checkpoint.pth"
        sc.wait_for("a first checkpoint", ckpt.exists, timeout=180, every=0.05)
        if interrupt == "usr2":  # what SLURM sends signal_delay_s before a timeout/preemption
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        else:
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        sc.wait_for(
            "the requeue", lambda: int(sc.scontrol_job(job).get("Restarts", "0")) >= 1, timeout=120
        )
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", job], timeout=30)
    assert proc.returncode == 0, out
    info = json.loads((root / "runs" / name / "run.json").read_text())
    # It resumed from a checkpoint (not from scratch) and finished every epoch...
    assert info["resumed_from_epoch"] is not None, info
    assert 0 <= info["resumed_from_epoch"] < epochs - 1, info
    assert len(_history(root, name)) == epochs
    # ...to exactly the weights and metrics of the run nobody interrupted.
    assert _md5(root / "models" / name / "model.pt") == _md5(
        root / "models" / "uninterrupted" / "model.pt"
    )
    assert (root / "models" / name / "metrics.json").read_bytes() == (
        root / "models" / "uninterrupted" / "metrics.json"
    ).read_bytes()
    assert re.search(r"finished \(world size 1, [1-9]\d* restart", out), out


def test_snakemake_slurm_profile_runs_the_smoke_dag(
    slurm, dvc_reference, tmp_path, checkout_before
):
    repo = make_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # The training stages submit their own submitit jobs (local rules); the rest are Snakemake's
    # SLURM jobs: both kinds must show up in sacct, and nothing is nested.
    params["launch"]["launcher"] = "slurm"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    out = run([SNAKEMAKE, "--profile", "slurm"], repo, timeout=1500)
    assert "Nothing to be done" not in out
    jobs = sc.wait_for(
        "finished jobs in sacct",
        lambda: [r for r in sc.sacct(since=since, under=repo) if r["State"] == "COMPLETED"],
        timeout=60,
    )
    rules = {
        m.group(1)
        for r in jobs
        for m in [re.fullmatch(r"rule_(\w+?)(_wildcards_.*)?", r["Comment"])]
        if m
    }
    assert {
        "prepare_fashion_mnist",
        "prepare_digits",
        "evaluate",
        "throughput",
        "tables",
    } <= rules, rules
    assert not rules & {"pretrain_deit", "finetune_bicubic", "transfer_digits", "teacher_convnet"}
    names = {r["JobName"] for r in jobs}
    assert {
        "deit-repro-teacher-seed0",
        "deit-repro-pretrain-seed0",
        "deit-repro-finetune-seed0",
        "deit-repro-transfer-seed0",
    } <= names, names
    # Same results as `dvc repro`, and dvc.lock up to date.
    assert metric_files(repo) == dvc_reference["metrics"]
    lock, ref = lock_stages(repo), dvc_reference["lock"]
    assert {k for k in ref if lock[k] != ref[k]} <= set(TIMED_STAGES)
    assert "Data and pipelines are up to date" in run(
        [str(Path(SNAKEMAKE).parent / "dvc"), "status"], repo
    )


def test_a_killed_stage_waits_for_its_job_instead_of_submitting_another(prepared):
    """kill -9 of the stage while its SLURM job trains, then the same command again: it attaches
    to the running job (one job in sacct), which finishes the run."""
    root = prepared
    params = _params(root, "reattach", epochs=30, wide=True)
    cmd = _pretrain(root, params, "reattach", "slurm")
    first = subprocess.Popen(
        cmd, cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        job = sc.wait_for(
            "the submitted job",
            lambda: (
                (root / "runs/reattach/submitit-job.json").exists() and _job_id(root, "reattach")
            ),
            timeout=120,
        )
        sc.wait_for(
            "the job running",
            lambda: sc.scontrol_job(job).get("JobState") == "RUNNING",
            timeout=120,
        )
        first.kill()  # SIGKILL: no chance to cancel its job
        first.wait(timeout=30)
        out = run(cmd, root, timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert f"waiting again for slurm job {job}" in out
    assert _job_id(root, "reattach") == job
    assert (root / "models" / "reattach" / "metrics.json").exists()
    assert len(_history(root, "reattach")) == 30
    since = sc.scontrol_job(job)["SubmitTime"]
    names = [r["JobName"] for r in sc.sacct(since=since, under=root)]
    assert names.count("deit-repro-pretrain-seed0") == 1, names


def test_the_slurm_tests_write_nothing_into_the_checkout(slurm, checkout_before):
    """Runs last in this module (and in the cluster's xdist group, after its other tests): every
    job, log and Snakemake file stayed in the tests' own directories (a stray `slurm-<id>.out`
    once landed in the repository root)."""
    assert _checkout_status() == checkout_before
