"""The whole DAG on the smoke profile with the real engines, each in a fresh repository:
`dvc repro`, then `dvc exp run -S distill=soft` re-runs exactly what depends on `distill`;
`snakemake --cores 2` gives the same outputs and metrics and leaves dvc.lock up to date."""

from __future__ import annotations

import json
import re

import pytest

from workflow_helpers import (
    DVC,
    SNAKEMAKE,
    TIMED_STAGES,
    lock_stages,
    make_repo,
    metric_files,
    ran_stages,
    run,
)

STAGES = {
    "prepare@fashion_mnist",
    "prepare@digits",
    "teacher@convnet",
    "teacher@vit",
    "pretrain@none",
    "pretrain@soft",
    "pretrain@hard",
    "pretrain@deit",
    "pretrain@deit_vit_teacher",
    "figure3_none@2",
    "figure3_deit@2",
    "finetune@bicubic",
    "finetune@bilinear",
    "finetune@control",
    "transfer@digits",
    "transfer_scratch@digits",
    "evaluate",
    "throughput",
    "tables",
}


@pytest.mark.slow
def test_dvc_repro_then_exp_run_distill_soft(dvc_reference):
    repo = dvc_reference["repo"]
    assert ran_stages(dvc_reference["output"]) == STAGES
    lock = (repo / "dvc.lock").read_text()
    for stage in STAGES:
        assert f"\n  {stage}:\n" in lock
    # The results are the metrics, traced: Table 3's DeiT-alembic joint cell is the metrics file's.
    deit = json.loads((repo / "metrics" / "pretrain" / "deit.json").read_text())
    assert deit["distill"] == "hard" and deit["dist_token"] is True
    table = (repo / "results" / "table3_distillation.csv").read_text()
    assert f"{deit['heads']['joint']['top1']['mean']:.2f}" in table

    # A no-op repro runs nothing, and Snakemake finds everything up to date.
    assert ran_stages(run([DVC, "repro"], repo)) == set()
    assert "Nothing to be done" in run([SNAKEMAKE, "-n", "--cores", "1"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)

    out = run([DVC, "exp", "run", "-S", "distill=soft"], repo)
    # Exactly the stages downstream of the headline model re-run (the Table 3 variants and the
    # from-scratch transfer baseline, which reads no pretrained model, do not).
    assert ran_stages(out) == {
        "pretrain@deit",
        "pretrain@deit_vit_teacher",
        "figure3_deit@2",
        "finetune@bicubic",
        "finetune@bilinear",
        "finetune@control",
        "transfer@digits",
        "evaluate",
        "tables",
    }
    soft = json.loads((repo / "metrics" / "pretrain" / "deit.json").read_text())
    assert soft["distill"] == "soft" and soft["alpha"] == 0.1 and soft["tau"] == 3.0
    assert soft["heads"] != deit["heads"] or soft["train_loss"] != deit["train_loss"]
    status = run([DVC, "status"], repo)
    assert "Data and pipelines are up to date" in status, status
    show = run([DVC, "exp", "show", "--csv"], repo)
    rows = [r for r in show.splitlines()[1:] if r.strip()]
    assert len(rows) >= 2 and any("soft" in r for r in rows) and any(",hard," in r for r in rows)


@pytest.mark.slow
def test_snakemake_runs_the_same_dag_with_the_same_results(dvc_reference, tmp_path):
    """`snakemake --cores 2` in a fresh clone: same stages, same outputs and metrics as `dvc
    repro`, dvc.lock brought up to date, and then neither engine wants to run anything."""
    repo = make_repo(tmp_path / "repo")
    out = run([SNAKEMAKE, "--cores", "2"], repo)
    rules = set(re.findall(r"^rule (\w+):", out, re.M)) | set(
        re.findall(r"^localrule (\w+):", out, re.M)
    )
    assert rules == {re.sub(r"\W", "_", s) for s in STAGES} | {"all"}
    assert metric_files(repo) == dvc_reference["metrics"]  # byte for byte
    lock, ref = lock_stages(repo), dvc_reference["lock"]
    assert set(lock) == set(ref)
    same = {k for k in ref if lock[k] == ref[k]}
    assert same == set(ref) - set(TIMED_STAGES), set(ref) - same  # only timings differ
    assert "Data and pipelines are up to date" in run([DVC, "status"], repo)
    assert ran_stages(run([DVC, "repro"], repo)) == set()
    assert "Nothing to be done" in run([SNAKEMAKE, "-n", "--cores", "1"], repo)
