"""What a run leaves behind and how the seeds of a stage are summarised.

Per run: its per-epoch history (CSV), its provenance (``run.json``) and its final metrics, rounded
so that a rerun writes the same bytes. Per stage: the seeds' aggregate (mean, sample std and
per-seed values of every measured number) and one CSV of every seed's history. The aggregate is a
number of ``metrics/`` and of the paper's tables: it is computing code, a dep of every stage that
writes one.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from deit_repro import atomic, provenance
from deit_repro.typed_yaml import to_dict

#: top-level keys whose numbers are measurements (aggregated over seeds); every other key
#: describes the run (alpha, tau, img_size, ...) and is kept as is when the seeds agree
METRIC_KEYS = ("heads", "top1", "train_loss", "before_finetune", "models", "disagreement")

#: run fields that measure time or resumption, not the model: never in a metrics file
TIMING_KEYS = ("train_seconds", "resumed_from_epoch")


def jsonable(obj: Any) -> Any:
    """A JSON-ready copy: string keys, lists for tuples, strings for paths, floats rounded to 6
    decimal places (so a rerun writes the same bytes whatever the last bits of a float)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def round_metrics(obj: Any) -> Any:
    """Metrics with every float rounded to 6 decimal places (not significant digits), so files
    are stable across reruns."""
    return jsonable(obj)


def _cell(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rows as CSV, atomically: the columns are the union of every row's keys in first-seen
    order, floats with 6 significant digits, a missing or None value an empty cell."""
    rows = list(rows)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in keys})
    atomic.write_text(path, buf.getvalue())


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Per-epoch metrics of one run as CSV."""
    write_csv(path, history)


def write_run(out: Path, params: Any, **extra: Any) -> None:
    """``out/run.json``: the run's provenance (resolved params, git commit, versions, hardware,
    command line) and ``extra`` (timings, world size, ...)."""
    atomic.write_json(out / "run.json", jsonable(provenance.record(to_dict(params), **extra)))


def combine_histories(path: Path, histories: Sequence[Path], seeds: Sequence[int]) -> None:
    """One CSV of every seed's per-epoch metrics, with a leading ``seed`` column (plots)."""
    rows = []
    for seed, hist in zip(seeds, histories):
        with open(hist, newline="") as fh:
            rows += [{"seed": seed, **row} for row in csv.DictReader(fh)]
    write_csv(path, rows)


def aggregate(runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean, sample std and per-seed values of every measured number over the seeds.

    ``{"top1": 80.1}`` from two runs becomes ``{"top1": {"mean": .., "std": .., "values": [..]}}``
    (also for one seed, so consumers see one schema); descriptive fields stay scalars.
    """

    def stat(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
            return {k: stat([v[k] for v in values]) for k in keys}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and all(
            v == first for v in values
        ):
            return first  # a count or a size (img_size, params): the same for every seed
        if all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            return {
                "mean": round(statistics.fmean(values), 6),
                "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
                "values": values,
            }
        return first if all(v == first for v in values) else values

    def keep(values: list[Any]) -> Any:
        first = values[0]
        return first if all(v == first for v in values) else values

    out: dict[str, Any] = {"seeds": list(seeds), "n": len(runs)}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        out[key] = stat(values) if key in METRIC_KEYS else keep(values)
    return out


def write_aggregate(path: Path, runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict:
    """Write the seeds' aggregate, without timing fields (metrics files must be reproducible)."""
    clean = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in runs]
    agg = aggregate(clean, seeds)
    atomic.write_json(path, agg)
    return agg
