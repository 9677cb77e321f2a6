"""Every number in the committed results/ traces to a metrics file that dvc.lock records:
each cell's sources (results/provenance.json) resolve, and each source file is an output of a DVC
stage whose recorded md5 is the file's md5 (so the table is what the pipeline made)."""

from __future__ import annotations

import csv
import hashlib
import json

import yaml

from conftest import ROOT
from deit_repro.config import load_params
from deit_repro.reporting.trace import resolve, stale, trace

RESULTS = ROOT / "results"


def _locked_outputs() -> dict[str, str]:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def test_every_result_cell_traces_to_a_locked_metrics_file():
    prov = json.loads((RESULTS / "provenance.json").read_text())
    locked = _locked_outputs()
    params = load_params(ROOT / "params.yaml")
    checked = 0
    for name in prov["tables"]:
        path = RESULTS / f"{name}.csv"
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for (row, col), sources in trace(path).items():
            assert rows[row][col] not in ("", "–"), (name, row, col)
            for src in sources:
                value = resolve(
                    src,
                    metrics=ROOT / "metrics",
                    reference=ROOT / "reference" / "paper",
                    params=params,
                )
                assert value is not None, src
                file = src.split("#", 1)[0]
                if file.startswith("metrics/"):
                    assert file in locked, f"{file} is not an output recorded in dvc.lock"
                    md5 = hashlib.md5((ROOT / file).read_bytes()).hexdigest()
                    assert md5 == locked[file], f"{file} differs from dvc.lock"
                checked += 1
    assert checked > 100
    # The claims' per-image tests read the runs' predictions.npy: each lies in a model directory
    # that dvc.lock records (a clean clone has them only after `dvc pull` or `dvc repro`).
    npy = [f for f in prov["files"] if f.endswith(".npy")]
    assert npy and all(any(f.startswith(out + "/") for out in locked) for f in npy)
    # Nothing a table read has changed since the tables were written (predictions: where present).
    changed = stale(RESULTS, metrics=ROOT / "metrics", reference=ROOT / "reference" / "paper")
    assert [f for f in changed if not f.endswith(".npy") or (ROOT / f).exists()] == []
