"""The package's own import graph, read from the source with :mod:`ast` (nothing is imported).

What a stage computes with is the import closure of the module that computes it: every
``deit_repro`` module it imports, at the top or inside a function, and theirs in turn. That
closure is what ``dvc.yaml`` must list as the stage's code deps (``tests/test_layout.py`` checks
it), and what a training checkpoint's fingerprint hashes, so that a checkpoint written by other
computing code is never resumed from while an edit to orchestration (``deit_repro.run``) or to
the reports does not restart a long cluster job.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "deit_repro"
ROOT = Path(__file__).resolve().parent

#: orchestration: how and where stages run (CLI, launchers, fork server), never what they compute
ORCHESTRATION = f"{PACKAGE}.run"

#: the module that computes each DVC stage (= Snakemake rule = CLI subcommand); the stage's code
#: deps in dvc.yaml must cover its import closure
COMPUTED_BY = {
    "check_params": f"{PACKAGE}.config",
    "prepare": f"{PACKAGE}.stages.prepare",
    "teacher": f"{PACKAGE}.stages.teacher",
    "pretrain": f"{PACKAGE}.stages.pretrain",
    "figure3_none": f"{PACKAGE}.stages.pretrain",
    "figure3_deit": f"{PACKAGE}.stages.pretrain",
    "finetune": f"{PACKAGE}.stages.finetune",
    "transfer": f"{PACKAGE}.stages.transfer",
    "transfer_scratch": f"{PACKAGE}.stages.transfer",
    "evaluate": f"{PACKAGE}.stages.evaluate",
    "throughput": f"{PACKAGE}.stages.throughput",
    "tables": f"{PACKAGE}.reporting.report",
}

#: the layers of the package, lowest first: a module imports only from its own unit or from a
#: unit on a lower floor (docs/architecture.md)
FLOORS: tuple[tuple[str, ...], ...] = (
    # foundation: no deit_repro imports but each other's
    (
        PACKAGE,
        f"{PACKAGE}.errors",
        f"{PACKAGE}.atomic",
        f"{PACKAGE}.provenance",
        f"{PACKAGE}.code_deps",
    ),
    (f"{PACKAGE}.typed_yaml",),  # frozen dataclasses from YAML, their JSON schema
    (f"{PACKAGE}.config",),  # the typed params.yaml
    (f"{PACKAGE}.data",),  # dataset sources and the prepared on-disk format
    (f"{PACKAGE}.core", f"{PACKAGE}.reporting"),  # what computes: models, engine, ...; tables
    (f"{PACKAGE}.stages",),  # one module per DAG stage
    (ORCHESTRATION,),  # CLI, launchers, fork server
    (f"{PACKAGE}.__main__",),  # python -m deit_repro
)


def unit_of(module: str) -> tuple[int, str]:
    """The floor and unit (the longest FLOORS entry that contains it) of a module."""
    best = None
    for floor, units in enumerate(FLOORS):
        for unit in units:
            inside = module == unit or (unit != PACKAGE and module.startswith(unit + "."))
            if inside and (best is None or len(unit) > len(best[1])):
                best = (floor, unit)
    if best is None:
        raise KeyError(f"{module} is on no floor of deit_repro.code_deps.FLOORS")
    return best


def all_modules() -> list[str]:
    """Every module and package of deit_repro, from the files on disk."""
    return sorted(module_name(p) for p in ROOT.rglob("*.py"))


def module_file(module: str) -> Path | None:
    """The source file of a ``deit_repro`` module or package, None if there is none."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    rel = Path(path).resolve().relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a/b/c``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[str, ...]:
    """The ``deit_repro`` modules that ``module`` imports anywhere in its source (function-level
    imports included), with the packages a dotted import runs."""
    path = module_file(module)
    if path is None:
        return ()
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != PACKAGE:
                continue
            found.append(base)
            # `from pkg import name`: name may be a submodule (the filter below keeps it if so)
            found += [f"{base}.{a.name}" for a in node.names]
    out = [m for name in found for m in _with_parents(name) if module_file(m) is not None]
    return tuple(dict.fromkeys(m for m in out if m != module))


def closure(module: str, *, exclude: str | None = ORCHESTRATION) -> list[str]:
    """``module`` and every ``deit_repro`` module it imports, transitively, without the
    ``exclude`` package (orchestration by default), sorted."""
    seen: set[str] = set()
    todo = [m for m in _with_parents(module) if module_file(m) is not None]
    while todo:
        m = todo.pop()
        if m in seen or (exclude and (m == exclude or m.startswith(exclude + "."))):
            continue
        seen.add(m)
        todo += imports_of(m)
    return sorted(seen)


def closure_files(module: str) -> list[Path]:
    return [module_file(m) for m in closure(module)]  # type: ignore[misc]


def code_hash(module: str) -> str:
    """sha256 over the source of ``module``'s closure: the computing code behind its results."""
    h = hashlib.sha256()
    for path in sorted(closure_files(module)):
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
