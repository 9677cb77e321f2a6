"""One DAG, two engines: Snakemake (Snakefile, derived from dvc.yaml through DVC's API) plans the
same stages, edges and commands as DVC."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dvc.repo import Repo

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def _rule(addressing: str) -> str:
    return re.sub(r"\W", "_", addressing)


def _dvc_graph() -> tuple[dict[str, str], set[tuple[str, str]]]:
    with Repo(str(ROOT)) as repo:
        stages = {_rule(s.name): s.cmd for s in repo.index.stages}
        edges = {
            (_rule(b.name), _rule(a.name))  # networkx: a depends on b
            for a, b in repo.index.graph.edges
        }
    return stages, edges


def test_snakemake_plans_the_dvc_stages_edges_and_commands():
    stages, edges = _dvc_graph()
    dag = subprocess.run(
        [SNAKEMAKE, "-n", "--forceall", "--dag", "--cores", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    nodes = dict(re.findall(r"^\s*(\d+)\[label = \"([^\"]+)\"", dag, re.M))
    sm_edges = {
        (nodes[a], nodes[b])
        for a, b in re.findall(r"^\s*(\d+) -> (\d+)$", dag, re.M)
        if nodes[b] != "all"
    }
    assert set(nodes.values()) - {"all"} == set(stages)
    assert sm_edges == edges
    plan = subprocess.run(
        [SNAKEMAKE, "-n", "--forceall", "-p", "--cores", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for rule, cmd in stages.items():
        assert cmd in plan, f"{rule}: {cmd!r} is not what Snakemake would run"


# ------------------------------------------------------------------------- the paper's profile


@pytest.fixture(scope="module")
def imagenet_repo(tmp_path_factory):
    from workflow_helpers import make_repo

    return make_repo(tmp_path_factory.mktemp("imagenet") / "repo", "profiles/imagenet.yaml")


def test_snakemake_plans_the_full_paper_dag_on_the_imagenet_profile(imagenet_repo):
    """It cannot run here (ImageNet, 2 x 8 GPUs): it must plan."""
    import time

    with Repo(str(imagenet_repo)) as repo:
        stages = {_rule(s.name): s.cmd for s in repo.index.stages}
    t0 = time.perf_counter()
    plan = subprocess.run(
        [SNAKEMAKE, "-n", "-p", "--cores", "1"],
        cwd=imagenet_repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert plan.returncode == 0, plan.stderr
    out = plan.stdout + plan.stderr
    executor_jobs = set(re.findall(r"^(?:local)?rule (\w+):", out, re.M)) - {"all"}
    # a local rule prints its message instead (the Snakefile's _message)
    local = dict(re.findall(r"^Job \d+: (\w+) \(local rule\): (.*)$", out, re.M))
    planned = executor_jobs | set(local)
    assert planned == set(stages) and not executor_jobs & set(local)
    # The paper's DAG: ImageNet + the five transfer sets prepared, the released teacher fetched,
    # Table 3's students, the 384 fine-tunes, transfer pretrained vs scratch on every set.
    assert {
        "prepare_imagenet",
        "prepare_cifar10",
        "prepare_cifar100",
        "prepare_flowers102",
        "prepare_stanford_cars",
        "prepare_inat2018",
        "prepare_inat2019",
        "teacher_convnet",
        "pretrain_none",
        "pretrain_soft",
        "pretrain_hard",
        "pretrain_deit",
        "finetune_bicubic",
        "finetune_bilinear",
        "evaluate",
        "throughput",
        "tables",
    } <= planned
    six = ("cifar10", "cifar100", "flowers102", "stanford_cars", "inat2018", "inat2019")
    transfer = {r for r in planned if r.startswith("transfer")}
    # Every dataset fine-tuned; from scratch only CIFAR-10, as the paper (§5.4).
    assert transfer == {f"transfer_{d}" for d in six} | {"transfer_scratch_cifar10"}
    for rule, cmd in stages.items():
        assert cmd in out, f"{rule}: {cmd!r} is not what Snakemake would run"
    # Every training rule is marked as the local rule it is, with the jobs it submits itself
    # (params launch.*); the rest are the executor's jobs. (That they run so is shown for real
    # by tests/test_slurm.py::test_snakemake_slurm_profile_runs_the_smoke_dag.)
    training = {r for r in planned if r.split("_")[0] in ("teacher", "pretrain", "figure3")}
    training |= {r for r in planned if r.startswith(("finetune", "transfer"))}
    assert set(local) == training | {"check_params"}, sorted(local)
    assert "no job submitted" in local["check_params"]
    assert local["pretrain_deit"].startswith(
        "runs on this host and waits on the slurm jobs it submits itself through submitit, one "
        "job per seed of 2 node(s) x 8 GPU(s), 8 task(s) x 10 CPU(s) per node"
    ), local["pretrain_deit"]
    # the released RegNetY-16GF is only evaluated: one job on one GPU
    assert "one job of 1 node(s) x 1 GPU(s), 1 task(s)" in local["teacher_convnet"]
    assert "one job per seed of 2 node(s) x 8 GPU(s)" in local["teacher_vit"]
    print(f"snakemake -n on the imagenet profile: {len(planned)} jobs in {seconds:.1f} s")


def test_launch_plan_shows_the_papers_sbatch_parameters(imagenet_repo):
    """Official run_with_submitit.py defaults: 2 nodes x 8 GPUs, one task per GPU, 10 CPUs and
    40 GB per GPU, 2800 min, USR2 120 s before the end (reference/official-deit.md)."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "deit-repro"), "launch-plan", "--stage", "pretrain"],
        cwd=imagenet_repo,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", out, re.M))
    assert {
        k: directives.get(k)
        for k in (
            "nodes",
            "ntasks-per-node",
            "gpus-per-node",
            "cpus-per-task",
            "mem",
            "time",
            "signal",
        )
    } == {
        "nodes": "2",
        "ntasks-per-node": "8",
        "gpus-per-node": "8",
        "cpus-per-task": "10",
        "mem": "320GB",
        "time": "2800",
        "signal": "USR2@120",
    }
    assert "partition" not in directives  # no site is hard-coded: launch.slurm.partition is null
    assert "world size 16" in out and "global batch 1024 = 64 per task" in out
    assert re.search(r"^srun .* -m submitit\.core\._submit ", out, re.M)


def test_launch_plan_carries_the_users_site_settings(tmp_path):
    import yaml

    data = yaml.safe_load((ROOT / "profiles" / "imagenet.yaml").read_text())
    data["launch"]["slurm"].update(
        partition="gpu",
        account="vision",
        constraint="volta32gb",
        additional={"exclude": "node[1-2]"},
    )
    data["launch"]["pretrain"].update(nodes=1, timeout_min=600)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "deit-repro"),
            "launch-plan",
            "--params",
            str(params),
            "--folder",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", out, re.M))
    assert directives["partition"] == "gpu" and directives["account"] == "vision"
    assert (
        directives["constraint"] == "volta32gb" and directives["exclude"].strip("'") == "node[1-2]"
    )
    assert directives["nodes"] == "1" and directives["time"] == "600"


def test_slurm_profile_has_resources_for_every_rule_of_every_profile(tmp_path):
    """A rule missing from set-resources would silently get the defaults on a real cluster."""
    import yaml

    from workflow_helpers import make_repo

    prof = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert prof["executor"] == "slurm"
    assert (ROOT / "slurm").resolve() == ROOT / "workflow" / "profiles" / "slurm"
    for profile in ("smoke", "fashion", "imagenet"):
        repo = (
            make_repo(tmp_path / profile, f"profiles/{profile}.yaml")
            if profile == "imagenet"
            else None
        )
        with Repo(str(repo or ROOT)) as dvc_repo:
            rules = {_rule(s.name) for s in dvc_repo.index.stages}
        launched = {
            r
            for r in rules
            if r.split("_")[0] in ("teacher", "pretrain", "figure3", "finetune", "transfer")
        }
        missing = (
            rules
            - set(prof["set-resources"])
            - (launched if profile == "imagenet" else set())
            - {"check_params"}  # a local rule (the Snakefile): it runs on the submit host
        )
        assert not missing, f"{profile}: no SLURM resources for {sorted(missing)}"


def test_snakemake_refuses_params_that_break_the_schema(tmp_path):
    from workflow_helpers import make_repo

    repo = make_repo(tmp_path / "repo")
    text = (repo / "params.yaml").read_text().replace("seeds: [0]", "seeds: []")
    (repo / "params.yaml").write_text(text)
    proc = subprocess.run(
        [SNAKEMAKE, "-n", "--cores", "1"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert (
        "seeds" in proc.stdout + proc.stderr and "should be non-empty" in proc.stdout + proc.stderr
    )


def test_on_the_imagenet_profile_evaluate_and_throughput_get_a_gpu(tmp_path):
    """The GPU profile's one-process rules ask SLURM for a GPU; a CPU profile's never do."""
    from workflow_helpers import make_repo

    def resources(profile: str) -> dict[str, str]:
        repo = make_repo(tmp_path / profile, f"profiles/{profile}.yaml")
        out = subprocess.run(
            [SNAKEMAKE, "-n", "--cores", "1", "--forceall", "evaluate", "throughput"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        found = {}
        for block in re.split(r"\n(?=(?:local)?rule )", out.stdout + out.stderr):
            head = re.match(r"(?:local)?rule (\w+):", block)
            res = re.search(r"resources: (.*)", block)
            if head and res and head.group(1) in ("evaluate", "throughput"):
                found[head.group(1)] = res.group(1)
        return found

    gpu = resources("imagenet")
    assert set(gpu) == {"evaluate", "throughput"} and all("gpu=1" in r for r in gpu.values()), gpu
    cpu = resources("smoke")
    assert cpu and not any("gpu" in r for r in cpu.values()), cpu
