"""The whole DAG on the smoke profile with the real engines, each in a fresh repository:
`dvc repro`, then `dvc exp run -S distill=soft` re-runs exactly what depends on `distill`;
`snakemake --cores 2` gives the same outputs and metrics and leaves dvc.lock up to date."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from workflow_helpers import (
    DVC,
    SNAKEMAKE,
    TIMED_STAGES,
    env,
    lock_stages,
    make_repo,
    metric_files,
    ran_stages,
    run,
)

STAGES = {
    "check_params",
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


def _json(cmd: list[str], repo) -> dict:
    """A DVC command's --json output (stdout alone: warnings go to stderr)."""
    proc = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


#: dvc.yaml's top-level plots
PLOT_IDS = [
    "teacher training loss",
    "pretrain training loss",
    "finetune training loss",
    "Figure 3, top-1 vs training epochs",
    "Figure 1, top-1 vs throughput",
]


@pytest.mark.slow
def test_metrics_show_and_exp_show_hold_a_few_headline_numbers_per_stage(
    dvc_reference, tmp_path, capsys
):
    """`dvc metrics show` / `dvc exp show` list each stage's headline numbers (numbers only, no
    per-seed lists, matrices, versions or hardware: those are in the records the tables read)
    and `dvc plots show` renders the declared plots."""
    repo = dvc_reference["repo"]
    files = _json([DVC, "metrics", "show", "--json"], repo)[""]["data"]
    # one file per training stage variant, plus evaluate's and throughput's
    assert len(files) == len(STAGES) - 4, sorted(files)  # not check_params, 2 prepares, tables
    keys = set()
    for path, entry in files.items():
        data = entry["data"]
        assert 1 <= len(data) <= 16, (path, data)
        assert all(isinstance(v, (int, float)) for v in data.values()), (path, data)
        keys |= set(data)
    # the union of the names is what `dvc metrics show` prints as columns
    assert len(keys) <= 30, sorted(keys)
    head = json.loads((repo / "metrics/pretrain/deit/metrics.json").read_text())
    record = json.loads((repo / "metrics/pretrain/deit.json").read_text())
    for h in ("cls", "dist", "joint"):
        assert head[f"{h}_top1"] == record["heads"][h]["top1"]["mean"]
        assert head[f"{h}_top5_std"] == record["heads"][h]["top5"]["std"]

    header = run([DVC, "exp", "show", "--csv"], repo).splitlines()[0].split(",")
    metric_columns = [c for c in header if ".json:" in c]
    with capsys.disabled():
        print(
            f"\ndvc exp show --csv on smoke: {len(header)} columns, "
            f"{len(metric_columns)} of them metrics",
            flush=True,
        )
    # (with the per-seed records declared as metrics: 960 columns on the fashion profile)
    assert len(metric_columns) <= 150 and len(header) <= 340, len(header)

    plots = _json([DVC, "plots", "show", "--json"], repo)
    assert not plots.get("errors"), plots["errors"]
    assert list(plots["data"]) == PLOT_IDS
    html = run([DVC, "plots", "show", "-o", str(tmp_path / "plots")], repo)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "file://" in html and all(json.dumps(i)[1:-1] in page for i in PLOT_IDS[:3])


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
    # from-scratch transfer baseline, which reads no pretrained model, do not); the params gate
    # runs on any params change, and its unchanged output re-runs nothing.
    assert ran_stages(out) == {
        "check_params",
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
    # `dvc plots diff main <experiment>`: every plot, with both revisions
    name = run([DVC, "exp", "list", "--name-only"], repo).split()[0]
    diff = _json([DVC, "plots", "diff", "main", name, "--json"], repo)
    assert not diff.get("errors"), diff["errors"]
    assert list(diff["data"]) == PLOT_IDS
    for plot in diff["data"].values():
        assert set(plot[0]["revisions"]) == {"main", name}, plot[0]["revisions"]


@pytest.mark.slow
def test_snakemake_runs_the_same_dag_with_the_same_results(dvc_reference, tmp_path):
    """`snakemake --cores 2` in a fresh clone: same stages, same outputs and metrics as `dvc
    repro`, dvc.lock brought up to date, and then neither engine wants to run anything."""
    repo = make_repo(tmp_path / "repo")
    out = run([SNAKEMAKE, "--cores", "2"], repo)
    rules = set(re.findall(r"^(?:local)?rule (\w+):", out, re.M)) | set(
        re.findall(r"^Job \d+: (\w+) \(local rule\)", out, re.M)  # the Snakefile's _message
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


@pytest.mark.slow
def test_a_full_clone_switched_to_the_smoke_profile_runs_and_reports_only_its_own_dag(tmp_path):
    """README's `cp profiles/smoke.yaml params.yaml && dvc repro` in a clone that holds the
    committed fashion metrics: the tables read only what the smoke DAG wrote (not the fashion
    Figure 3 budgets left in metrics/), and the run leaves git nothing unaccounted for."""
    from deit_repro.config import load_params
    from deit_repro.reporting.inputs import dag_metrics

    repo = make_repo(tmp_path / "clone", "params.yaml", outputs=True)
    stale = sorted(p.name for p in (repo / "metrics" / "figure3").glob("*.json"))
    smoke = load_params(repo / "profiles" / "smoke.yaml")
    assert {f"figure3/{p[:-5]}" for p in stale}.isdisjoint(dag_metrics(smoke)), stale
    (repo / "params.yaml").write_text((repo / "profiles" / "smoke.yaml").read_text())
    run([DVC, "repro"], repo)

    assert "profile `smoke`" in (repo / "results" / "table3_distillation.md").read_text()
    prov = json.loads((repo / "results" / "provenance.json").read_text())
    read_metrics = {
        f[len("metrics/") : -len(".json")]
        for f in prov["files"]
        if f.startswith("metrics/") and f.endswith(".json")
    }
    assert read_metrics <= dag_metrics(smoke), read_metrics - dag_metrics(smoke)
    assert {"figure3/none-2", "figure3/deit-2"} <= read_metrics
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], repo)
    # new: the smoke DAG's own Figure 3 results (committed like every metrics file); its models
    # are DVC-cached and git-ignored
    untracked = {
        line[3:].split("/")[2].removesuffix(".json")
        for line in status.splitlines()
        if line.startswith("??") and line.startswith("?? metrics/figure3/")
    }
    others = [
        line
        for line in status.splitlines()
        if line.startswith("??") and not line.startswith("?? metrics/figure3/")
    ]
    assert not others, others
    assert untracked == {"none-2", "deit-2"}, untracked


@pytest.mark.slow
def test_a_bad_param_stops_the_dag_before_any_stage_loses_its_outputs(dvc_reference, tmp_path):
    """DVC removes a stage's outputs before it runs it: `dvc exp run -S distill=sotf` must stop
    at the check_params stage, with the loader's one-line error, before pretrain@deit runs."""
    from workflow_helpers import result

    repo = dvc_reference["copy"](tmp_path / "repo")
    outs = [repo / "models" / "pretrain" / "deit", repo / "metrics" / "pretrain" / "deit.json"]

    def files() -> dict[str, bytes]:
        found = {}
        for out in outs:
            for p in [out] if out.is_file() else sorted(out.rglob("*")):
                if p.is_file():
                    found[p.relative_to(repo).as_posix()] = p.read_bytes()
        return found

    before = files()
    assert any(k.endswith("model.pt") for k in before), sorted(before)
    proc = result([DVC, "exp", "run", "-S", "distill=sotf"], repo, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "params key 'distill' = 'sotf' is not one of 'none', 'soft', 'hard'" in text, text
    assert ran_stages(text) == {"check_params"}, text
    assert files() == before
