"""The rehearsal of the paper's configuration (profiles/imagenet.yaml + profiles/rehearsal.yaml).

* the overlay overrides only what must shrink to fit a CPU: any other change would make the
  rehearsal test something else than what runs on the cluster;
* `deit-repro compose` writes the composed params, refuses a bad overlay, and an overlay of one
  section never leaks into another through a YAML alias;
* (slow, on the local SLURM cluster) the whole rehearsal DAG runs under `dvc repro` and under
  `snakemake --profile slurm`, every training stage as submitit jobs (the teacher's included),
  pretraining as 2 DDP tasks, and both engines give the same metrics (the second resuming the
  first's finished checkpoints instead of training every model again).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from deit_repro.config import compose_params, params_from_dict
from deit_repro.typed_yaml import overlay
from deit_repro.errors import ConfigError

PROFILES = ROOT / "profiles"

#: what the overlay may change (dotted paths, regular expressions): dataset roots (generated data;
#: CIFAR and Flowers as ImageFolder stand-ins, see the overlay), epochs, batch sizes, loader
#: workers and threads, Figure 3's budgets, evaluation/throughput sizes, the transformers' size
#: (same timm classes), the served weights, where jobs run, the profile's label
ALLOWED = [
    r"profile",
    r"threads",
    r"datasets\.\w+\.root",
    r"datasets\.(cifar10|cifar100|flowers102)\.source",
    r"(teacher|teacher\.vit|student|finetune|transfer)\.train\.(epochs|warmup_epochs|batch_size)",
    r"(teacher|teacher\.vit|student|finetune|transfer)\.train\.num_workers",
    r"transfer\.(recipes\.\w+|scratch_train)\.(epochs|warmup_epochs|batch_size|num_workers)",
    r"eval\.(batch_size|num_workers)",
    r"figure3\.budgets",
    r"throughput\.(batch_sizes|warmup|repeats)",
    r"(student|teacher\.vit)\.model\.name",
    r"teacher\.weights\.(url|sha256)",
    r"launch\.(teacher|pretrain|finetune|transfer)\.\w+",
]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def test_the_overlay_changes_only_what_must_shrink():
    base = _leaves(yaml.safe_load((PROFILES / "imagenet.yaml").read_text()))
    composed = _leaves(compose_params(PROFILES / "imagenet.yaml", PROFILES / "rehearsal.yaml"))
    assert set(composed) == set(base), set(composed) ^ set(base)  # no key added or dropped
    changed = sorted(k for k in base if base[k] != composed[k])
    bad = [k for k in changed if not any(re.fullmatch(p, k) for p in ALLOWED)]
    assert not bad, f"the rehearsal overlay changes {bad}"
    # ... and what stays is the paper's path: the `auto` pipeline (timm's with RandAugment and
    # workers on these CPUs, decode and augmentation on the device on a GPU; compiled there),
    # repeated augmentation, the RegNetY-16GF teacher, DeiT⚗ by hard distillation, 224 -> 384
    # with crop 0.875, the six transfer datasets with their recipes, SLURM.
    p = params_from_dict(compose_params(PROFILES / "imagenet.yaml", PROFILES / "rehearsal.yaml"))
    assert p.student.train.aug.pipeline == "auto" and p.student.train.compile == "auto"
    assert p.student.train.aug.rand_augment == "rand-m9-mstd0.5-inc1"
    assert p.student.train.repeated_aug == 3 and p.student.train.num_workers > 0
    assert p.teacher.model.name == "regnety_160" and p.teacher.model.img_size == 224
    assert len(p.teacher.weights.sha256) == 64  # the full digest, not a prefix
    assert p.distill == "hard" and p.student.model.img_size == 224
    assert p.finetune.img_size == 384 and p.eval.crop_pct == 0.875
    assert p.transfer.datasets == (
        "cifar10",
        "cifar100",
        "flowers102",
        "stanford_cars",
        "inat2018",
        "inat2019",
    )
    assert (
        p.transfer.recipe("inat2018").opt == "adamw" and p.transfer.recipe("cifar10").opt == "sgd"
    )
    assert p.transfer.scratch == ("cifar10",)
    assert p.launch.launcher == "slurm" and p.launch.pretrain.world_size == 2
    assert p.datasets["imagenet"].source == "imagefolder"
    assert p.datasets["stanford_cars"].source == "stanford_cars"
    assert p.datasets["inat2018"].source == "inat2018"


def test_an_overlay_never_leaks_through_a_yaml_alias():
    base = yaml.safe_load("a: &r {epochs: 300, lr: 1}\nb: *r\n")
    assert base["a"] is base["b"]
    out = overlay(base, {"a": {"epochs": 1}})
    assert out == {"a": {"epochs": 1, "lr": 1}, "b": {"epochs": 300, "lr": 1}}
    assert base["a"]["epochs"] == 300  # the input is not modified


def test_compose_writes_the_params_and_refuses_a_bad_overlay(tmp_path):
    deit = str(Path(sys.executable).parent / "deit-repro")
    out = tmp_path / "params.yaml"
    proc = subprocess.run(
        [deit, "compose", "profiles/imagenet.yaml", "profiles/rehearsal.yaml", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("# Composed by `deit-repro compose`")
    assert yaml.safe_load(text)["profile"] == "imagenet-rehearsal"

    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  train: {epocs: 1}\n")
    proc = subprocess.run(
        [deit, "compose", "profiles/imagenet.yaml", str(bad), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "student.train.epocs" in lines[0] and "bad.yaml" in lines[0]
    assert out.read_text() == text  # the earlier file is intact
    with pytest.raises(ConfigError, match="not a mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        compose_params(PROFILES / "imagenet.yaml", tmp_path / "list.yaml")


def _sacct_since(since: str, repo: Path) -> list[dict[str, str]]:
    import slurm_cluster as sc

    return sc.sacct(since=since, under=repo)  # this DAG's jobs, not another test's


@pytest.mark.slow
def test_the_rehearsal_runs_under_dvc_and_under_snakemake_on_slurm(
    slurm, rehearsal_data, tmp_path, capsys
):
    """The whole rehearsal DAG: `dvc repro`, then, in the same copy with every output deleted
    but the run directories, `snakemake --profile slurm`. Every training stage (the teachers
    included) runs as submitit jobs on the local SLURM cluster, pretraining as 2 DDP tasks over
    gloo; both engines write the same metrics and the tables regenerate.

    Under DVC every model trains; under Snakemake every job, submitted as before, finds its
    run's finished checkpoint (same prepared data, params and code: the fingerprint matches),
    trains no epoch and evaluates and writes anew. So the engines are compared on the paper's
    DAG without training every model twice; a checkpoint another engine could not resume from
    (another data hash, recipe or teacher) would train again, and its metrics would differ."""
    import time

    import slurm_cluster as sc

    script = [sys.executable, str(ROOT / "scripts" / "rehearsal.py"), str(tmp_path)]
    repo = tmp_path / "repo"
    (tmp_path / "data").symlink_to(rehearsal_data.out)  # read only: generated once per session

    def rehearse(*extra: str) -> str:
        proc = subprocess.run(script + list(extra), capture_output=True, text=True, timeout=3000)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        with capsys.disabled():  # each engine's wall time, in the CI log
            print("\n" + re.findall(r"rehearsal: .*", out)[-1], flush=True)
        return out

    rehearse("--engine", "dvc")
    metrics = {
        p.relative_to(repo).as_posix(): p.read_bytes()
        for p in sorted((repo / "metrics").rglob("*.json"))
        if not p.relative_to(repo).as_posix().startswith("metrics/throughput")
    }
    transfer = {f"metrics/transfer/{d}-pretrained.json" for d in SIX} | {
        "metrics/transfer/cifar10-scratch.json"
    }
    assert transfer <= set(metrics) and "metrics/finetune/bicubic.json" in metrics
    for variant in ("none", "deit"):  # Figure 3: a run of its own per budget, on SLURM
        budget = json.loads(metrics[f"metrics/figure3/{variant}-3.json"])
        assert budget["epochs"] == 3 and budget["seeds"] == [0]
    teacher = json.loads(metrics["metrics/teacher.json"])
    assert teacher["heads"]["cls"]["top1"]["mean"] >= 0  # RegNetY-16GF evaluated on the val tree
    ft = json.loads(metrics["metrics/finetune/bicubic.json"])
    assert ft["eval"]["img_size"] == 384 and ft["eval"]["crop_pct"] == 0.875
    deit = json.loads((repo / "models/pretrain/deit/seed0/metrics.json").read_text())
    assert deit["dist_token"] is True and set(deit["heads"]) == {"cls", "dist", "joint"}
    run_info = json.loads((repo / "runs/pretrain/deit/seed0/run.json").read_text())
    assert run_info["world_size"] == 2
    import csv

    with open(repo / "results" / "table7_transfer.csv", newline="") as fh:
        table7 = {row["dataset"]: row for row in csv.DictReader(fh)}
    assert list(table7) == list(SIX)
    assert table7["cifar10"]["from scratch"] != "–"  # the one from-scratch baseline (§5.4)
    assert all(table7[d]["from scratch"] == "–" for d in SIX[1:])

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    out = rehearse("--engine", "snakemake", "--again", "--keep-runs")
    assert "Nothing to be done" not in out
    jobs = sc.wait_for(
        "the rehearsal's jobs in sacct",
        lambda: [r for r in _sacct_since(since, repo) if r["State"] == "COMPLETED"],
        timeout=60,
    )
    names = [r["JobName"] for r in jobs]
    assert names.count("deit-repro-teacher-seed0") == 2, names  # RegNetY download + DeiT teacher
    # Table 3's four, Table 2's DeiT⚗ from the DeiT teacher, Figure 3's two 3-epoch budget runs
    assert names.count("deit-repro-pretrain-seed0") == 7, names
    assert names.count("deit-repro-finetune-seed0") == 3, names
    assert names.count("deit-repro-transfer-seed0") == 7, names  # 6 datasets + CIFAR-10 scratch
    # DDP: the job's step (srun) ran 2 tasks (an allocation's own row has no task count).
    for r in jobs:
        if r["JobName"] == "deit-repro-pretrain-seed0":
            step = subprocess.run(
                ["sacct", "-n", "-P", "-j", f"{r['JobID']}.0", "--format=NTasks"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()
            assert step == ["2"], (r, step)
    rules = {
        m.group(1)
        for r in jobs
        for m in [re.fullmatch(r"rule_(\w+?)(_wildcards_.*)?", r["Comment"])]
        if m
    }
    assert {f"prepare_{d}" for d in ("imagenet", *SIX)} | {
        "evaluate",
        "throughput",
        "tables",
    } <= rules
    again = {
        p.relative_to(repo).as_posix(): p.read_bytes()
        for p in sorted((repo / "metrics").rglob("*.json"))
        if not p.relative_to(repo).as_posix().startswith("metrics/throughput")
    }
    assert again == metrics  # the same numbers, whichever engine ran the jobs
    status = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


SIX = ("cifar10", "cifar100", "flowers102", "stanford_cars", "inat2018", "inat2019")
