"""One DAG, two engines: Snakemake (Snakefile, derived from dvc.yaml through DVC's API) plans the
same stages, edges and commands as DVC (DESIGN.md "One DAG, two engines")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from dvc.repo import Repo

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def _rule(addressing: str) -> str:
    return re.sub(r"\W", "_", addressing)


def _dvc_graph() -> tuple[dict[str, str], set[tuple[str, str]]]:
    with Repo(str(ROOT)) as repo:
        stages = {_rule(s.addressing): s.cmd for s in repo.index.stages}
        edges = {(_rule(b.addressing), _rule(a.addressing))  # networkx: a depends on b
                 for a, b in repo.index.graph.edges}
    return stages, edges


def test_snakemake_plans_the_dvc_stages_edges_and_commands():
    stages, edges = _dvc_graph()
    dag = subprocess.run([SNAKEMAKE, "-n", "--forceall", "--dag", "--cores", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    nodes = dict(re.findall(r"^\s*(\d+)\[label = \"([^\"]+)\"", dag, re.M))
    sm_edges = {(nodes[a], nodes[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)$", dag, re.M)
                if nodes[b] != "all"}
    assert set(nodes.values()) - {"all"} == set(stages)
    assert sm_edges == edges
    plan = subprocess.run([SNAKEMAKE, "-n", "--forceall", "-p", "--cores", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True).stdout
    for rule, cmd in stages.items():
        assert cmd in plan, f"{rule}: {cmd!r} is not what Snakemake would run"
