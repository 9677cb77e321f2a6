"""Provenance of every number in results/: each cell's sources (:func:`trace`, from
``provenance.json``), the value a source points at (:func:`resolve`), and the files that changed
since the tables were written (:func:`stale`, by sha256)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from deit_repro import atomic
from deit_repro.config import Params
from deit_repro.reporting.inputs import REFERENCE, Reference


def trace(csv_path: Path) -> dict[tuple[int, str], tuple[str, ...]]:
    """The sources of every cell of a results CSV: ``{(data row index, column): sources}``.

    Reads ``provenance.json`` beside the CSV; cells without a number (labels, "–") have none.
    """
    csv_path = Path(csv_path)
    prov = json.loads((csv_path.parent / "provenance.json").read_text())
    cells = prov["tables"][csv_path.stem]["cells"]
    return {(int(r), col): tuple(srcs) for r, cols in cells.items() for col, srcs in cols.items()}


def resolve(
    source: str, *, metrics: Path, reference: Path = REFERENCE, params: Params | None = None
) -> Any:
    """The value a source points at: a JSON node, a reference CSV's cell (as printed), for a
    history CSV the list of every seed's value at that epoch, for ``params:a.b`` the param."""
    if source.startswith("params:"):
        if params is None:
            raise ValueError(f"{source} is a param: pass params=")
        node: Any = params
        for key in source[len("params:") :].split(" ")[0].split("=")[0].split("."):
            node = getattr(node, key)
        return node
    path, _, frag = source.partition("#")
    ref = Reference(reference)
    if path.startswith(ref.prefix + "/"):
        q = dict(kv.split("=", 1) for kv in frag.split("&"))
        df = pd.read_csv(
            Path(reference) / path[len(ref.prefix) + 1 :], dtype=str, keep_default_na=False
        )
        return df.at[int(q["row"]), q["column"]]
    file = Path(metrics) / path.split("/", 1)[1]
    if file.suffix == ".csv":
        q = dict(kv.split("=", 1) for kv in frag.split("&"))
        df = pd.read_csv(file)
        return df[df["epoch"] == int(q["epoch"])].sort_values("seed")[q["column"]].tolist()
    node = json.loads(file.read_text())
    for key in frag.split("/")[1:]:
        node = node[key.replace("~1", "/").replace("~0", "~")]
    return node


def stale(
    results: Path, *, metrics: Path, reference: Path = REFERENCE, models: Path | None = None
) -> list[str]:
    """Files named in ``results/provenance.json`` whose sha256 changed since the tables were
    written (or that are gone): the tables need regenerating. ``models`` is where the runs'
    ``predictions.npy`` files the claims read live (``models/...`` names; the DAG's ``models/``
    beside ``metrics`` by default)."""
    prov = json.loads((Path(results) / "provenance.json").read_text())
    ref_prefix = Reference(reference).prefix
    models = Path(models) if models is not None else Path(metrics).parent / "models"
    out = []
    for name, sha in sorted(prov["files"].items()):
        if name.startswith(ref_prefix + "/"):
            path = Path(reference) / name[len(ref_prefix) + 1 :]
        elif name.endswith(".npy"):  # a run's predictions, under the models directory
            path = models / name.split("/", 1)[1]
        else:
            path = Path(metrics) / name.split("/", 1)[1]
        if not path.is_file() or atomic.sha256_file(path) != sha:
            out.append(name)
    return out
