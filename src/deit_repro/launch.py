"""Running a training stage for every seed of the profile, and aggregating mean ± std.

A training stage command without ``--seed`` trains one run per seed of ``params.seeds`` into
``<out>/seed<k>/`` and writes the aggregate (mean, std and per-seed values of every metric) to
``--metrics``. Runs are independent processes (each with ``params.threads`` torch threads), up to
``--jobs`` at a time: results do not depend on how many run side by side, only on the thread count
of each (notes/small-scale.md: 1 thread per process, independent runs in parallel).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from deit_repro import atomic
from deit_repro.errors import DeitReproError, TrainingError

_logger = logging.getLogger(__name__)


def default_jobs(num_runs: int, threads: int) -> int:
    """As many runs at once as the CPU has room for at ``threads`` threads each."""
    return max(1, min(num_runs, (os.cpu_count() or 1) // max(threads, 1)))


def run_seeds(argv: Sequence[str], *, seeds: Sequence[int], out: Path,
              run_dir: Path | None, jobs: int) -> list[dict[str, Any]]:
    """Run ``deit-repro <argv> --seed k --out out/seed<k>`` for every seed, ``jobs`` at a time.

    Args:
        argv: the stage's command line without ``--seed``, ``--out`` and ``--run-dir``.
        seeds: the seeds to run.
        out: the stage's output directory; run k writes ``out/seed<k>/``.
        run_dir: run k checkpoints into ``run_dir/seed<k>/`` (resumable).
        jobs: runs at a time.

    Returns:
        Each run's ``metrics.json``, in seed order.
    """
    def one(seed: int) -> dict[str, Any]:
        run_out = out / f"seed{seed}"
        cmd = [sys.executable, "-m", "deit_repro", *argv, "--seed", str(seed),
               "--out", str(run_out)]
        if run_dir is not None:
            cmd += ["--run-dir", str(run_dir / f"seed{seed}")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.splitlines() if line.strip()]
            last = tail[-1] if tail else f"exit code {proc.returncode}"
            if "error:" in last:
                # The child's one-line error already names the thing and the fix.
                raise DeitReproError(f"seed {seed}: {last.split('error:', 1)[1].strip()}")
            sys.stderr.write(proc.stderr)
            raise TrainingError(f"seed {seed} failed with exit code {proc.returncode} "
                                f"(its log is above)", "fix the cause and re-run: finished "
                                "epochs resume from the checkpoint")
        _logger.info("seed %d finished in %.0f s: %s", seed, time.perf_counter() - t0,
                     proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")
        return json.loads((run_out / "metrics.json").read_text())

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, seeds))


def combine_histories(path: Path, histories: Sequence[Path], seeds: Sequence[int]) -> None:
    """One CSV of every seed's per-epoch metrics, with a leading ``seed`` column (plots)."""
    import csv
    import io

    rows, keys = [], ["seed"]
    for seed, hist in zip(seeds, histories):
        with open(hist, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({"seed": seed, **row})
                keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


#: top-level keys whose numbers are measurements (aggregated over seeds); every other key
#: describes the run (alpha, tau, img_size, ...) and is kept as is when the seeds agree
METRIC_KEYS = ("heads", "top1", "train_loss", "before_finetune", "models", "disagreement")


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
                v == first for v in values):
            return first  # a count or a size (img_size, params): the same for every seed
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
            return {"mean": round(statistics.fmean(values), 6),
                    "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
                    "values": values}
        return first if all(v == first for v in values) else values

    def keep(values: list[Any]) -> Any:
        first = values[0]
        return first if all(v == first for v in values) else values

    out: dict[str, Any] = {"seeds": list(seeds), "n": len(runs)}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        out[key] = stat(values) if key in METRIC_KEYS else keep(values)
    return out


def write_aggregate(path: Path, runs: Sequence[dict[str, Any]], seeds: Sequence[int],
                    drop: Sequence[str] = ("train_seconds", "resumed_from_epoch")) -> dict:
    """Write the seeds' aggregate, without timing fields (metrics files must be reproducible)."""
    clean = [{k: v for k, v in r.items() if k not in drop} for r in runs]
    agg = aggregate(clean, seeds)
    atomic.write_json(path, agg)
    return agg
