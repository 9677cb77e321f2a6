"""The package's layout keeps its promises (docs/architecture.md):

* no import circle, and no import from a lower floor up to a higher one;
* each DVC stage's code deps cover everything its computation imports, and no stage depends on
  orchestration (CLI, launchers, fork server);
* a training checkpoint's fingerprint hashes the computing code only;
* one style: ``ruff check`` and ``ruff format --check`` pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from deit_repro import code_deps

SRC = ROOT / "src" / "deit_repro"
VENV_BIN = Path(sys.executable).parent


def _cycles(graph: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, tuple[str, ...]]:
    return {m: code_deps.imports_of(m) for m in code_deps.all_modules()}


def test_the_import_graph_is_read_from_the_source():
    # Function-level imports count: the CLI imports the stages inside its command functions.
    assert "deit_repro.stages.pretrain" in code_deps.imports_of("deit_repro.run.cli")
    assert "deit_repro.core.records" in code_deps.imports_of("deit_repro.stages.evaluate")
    closure = code_deps.closure("deit_repro.stages.evaluate")
    assert "deit_repro.core.batches" in closure  # the eval crop, through core.datasets
    assert "deit_repro.data.store" in closure  # the reader of the prepared data
    assert not [m for m in closure if m.startswith(("deit_repro.run", "deit_repro.reporting"))]


def test_no_import_circle():
    graph = _graph()
    assert len(graph) > 30
    assert _cycles(graph) == []
    # the check itself finds one
    assert _cycles({**graph, "deit_repro.errors": ("deit_repro.run.cli",)})


def test_no_import_from_a_lower_floor_to_a_higher_one():
    upward = []
    for module, imported in _graph().items():
        floor, unit = code_deps.unit_of(module)
        for dep in imported:
            dep_floor, dep_unit = code_deps.unit_of(dep)
            if dep_unit != unit and dep_floor >= floor:
                upward.append(f"{module} (floor {floor}) imports {dep} (floor {dep_floor})")
    assert upward == []


def _dvc_stages(root: Path) -> list[tuple[str, list[str]]]:
    """Every resolved stage of dvc.yaml with its dependency paths relative to ``root``."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [
            (st.name, [Path(d.fs_path).relative_to(root).as_posix() for d in st.deps])
            for st in repo.index.stages
            if st.cmd
        ]


def uncovered_code_deps(root: Path) -> list[str]:
    """Each stage's computing files that its dvc.yaml deps miss, and each orchestration dep."""
    problems = []
    for stage, deps in _dvc_stages(root):
        family = stage.split("@")[0]
        if family not in code_deps.COMPUTED_BY:
            problems.append(f"{stage}: no module in deit_repro.code_deps.COMPUTED_BY")
            continue
        module = code_deps.COMPUTED_BY[family]
        for path in code_deps.closure_files(module):
            rel = "src/deit_repro/" + path.relative_to(code_deps.ROOT).as_posix()
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                problems.append(
                    f"{stage}: {rel} is imported by its computation ({module}) but "
                    "is not among its deps in dvc.yaml"
                )
        problems += [
            f"{stage}: depends on orchestration code {d}"
            for d in deps
            if d == "src/deit_repro/run"
            or d.startswith("src/deit_repro/run/")
            or d == "src/deit_repro"
        ]
    return problems


def test_each_stage_depends_on_the_code_it_computes_with_and_on_no_orchestration():
    problems = uncovered_code_deps(ROOT)
    assert not problems, "code deps missing from dvc.yaml:\n" + "\n".join(problems)
    stages = {s.split("@")[0] for s, _ in _dvc_stages(ROOT)}
    assert stages == set(code_deps.COMPUTED_BY)  # every stage is mapped, and only stages


def test_the_deps_check_names_the_stage_and_the_missing_file(tmp_path):
    """A dvc.yaml with one real dep removed fails the check above, naming stage and file."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "src").symlink_to(ROOT / "src")
    (tmp_path / "reference").symlink_to(ROOT / "reference")
    text = (tmp_path / "dvc.yaml").read_text()
    evaluate = text.index("\n  evaluate:")
    line = "      - src/deit_repro/core\n"
    cut = text.index(line, evaluate)
    (tmp_path / "dvc.yaml").write_text(text[:cut] + text[cut + len(line) :])
    problems = [p for p in uncovered_code_deps(tmp_path) if p.startswith("evaluate:")]
    assert (
        "evaluate: src/deit_repro/core/batches.py is imported by its computation "
        "(deit_repro.stages.evaluate) but is not among its deps in dvc.yaml" in problems
    )
    assert not [p for p in uncovered_code_deps(tmp_path) if not p.startswith("evaluate:")]


#: each training stage's module (code_deps.COMPUTED_BY): its checkpoints' fingerprint
TRAINING = ("teacher", "pretrain", "finetune", "transfer")


def _hashes_in_copy(tmp_path: Path, edit: str | None) -> dict[str, str]:
    """``code_hash`` of each training stage's module in a copy of the package, after appending a
    comment to the file ``edit`` (relative to the package)."""
    copy = tmp_path / (edit or "none").replace("/", "_") / "deit_repro"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        with open(copy / edit, "a") as fh:
            fh.write("# an edit\n")
    code = (
        "from deit_repro.code_deps import code_hash; "
        f"print(*(code_hash('deit_repro.stages.' + s) for s in {TRAINING!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=copy.parent,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(copy.parent)},
        check=True,
    )
    return dict(zip(TRAINING, out.stdout.split()))


def test_the_checkpoint_fingerprint_hashes_the_computing_code_only(tmp_path):
    base = _hashes_in_copy(tmp_path, None)
    assert all(len(h) == 16 for h in base.values()) and len(set(base.values())) == 4, base
    for orchestration_or_report in (
        "run/launch.py",
        "run/forkserver.py",
        "run/cli.py",
        "reporting/claims.py",
        "stages/evaluate.py",
    ):
        assert _hashes_in_copy(tmp_path, orchestration_or_report) == base, orchestration_or_report
    for computing in (
        "core/engine.py",
        "core/batches.py",
        "data/store.py",
        "config.py",
        "stages/trainer.py",
    ):
        changed = _hashes_in_copy(tmp_path, computing)
        assert all(changed[s] != base[s] for s in TRAINING), computing


@pytest.mark.parametrize("stage", TRAINING)
def test_an_edit_to_one_training_stage_leaves_the_others_fingerprints_alone(tmp_path, stage):
    """Editing stages/<stage>.py changes that stage's checkpoint fingerprint only: an unfinished
    pretrain job keeps resuming while the transfer stage's code changes."""
    base = _hashes_in_copy(tmp_path, None)
    changed = _hashes_in_copy(tmp_path, f"stages/{stage}.py")
    assert {s for s in TRAINING if changed[s] != base[s]} == {stage}


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_one_style_ruff(command):
    ruff = VENV_BIN / "ruff"
    if not ruff.exists():
        ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: run scripts/setup.sh (it installs the test extras)"
    out = subprocess.run(
        [str(ruff), *command, "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _python312() -> str | None:
    """A Python 3.12 on this machine (PATH, or pyenv's), or None."""
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    if pyenv:
        return str(pyenv[-1])
    found = shutil.which("python3.12")
    return found if found and "/shims/" not in found else None  # a shim may select no 3.12


@pytest.mark.skipif(
    _python312() is None,
    reason="no Python 3.12 here (Debian 12 ships 3.11 only; setup.sh installs on 3.11)",
)
def test_the_package_compiles_and_loads_every_profile_on_python_3_12(tmp_path):
    """pyproject allows 3.12 (the GPU image's Python): every module of the package compiles
    under it, and its config (the part that needs no torch) loads every profile there."""
    py = _python312()
    code = (
        "import pathlib, sys\n"
        "for f in sorted(pathlib.Path('src').rglob('*.py')):\n"
        "    compile(f.read_text(), str(f), 'exec')\n"
        "sys.path.insert(0, 'src')\n"
        "from deit_repro.config import load_params\n"
        "for p in ('smoke', 'fashion', 'imagenet'):\n"
        "    load_params(pathlib.Path('profiles', p + '.yaml'))\n"
        "print(sys.version_info[:2])\n"
    )
    venv = tmp_path / "v312"
    subprocess.run([py, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "pyyaml"],
        check=True,
        timeout=300,
        capture_output=True,
    )
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(3, 12)"


def test_the_params_gate_reads_every_param_but_where_runs_happen():
    """dvc.yaml's check_params stage tracks every top-level key of params.yaml except `launch`
    (a change of launcher or partition re-runs nothing, the gate included)."""
    import dataclasses

    import yaml

    from deit_repro.config import Params

    gate = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["check_params"]
    want = {f.name for f in dataclasses.fields(Params)} - {"launch"}
    assert set(gate["params"]) == want
