"""A training stage's live log through DVCLive: what ``dvc exp show``, ``dvc metrics show`` and
``dvc plots`` read while the stage runs and after it.

One DVCLive directory per stage variant (``metrics/pretrain/deit/``), not per seed: the seeds run
as separate processes or SLURM jobs, and one directory keeps ``dvc exp show`` to a handful of
columns per stage. The stage's own process writes it (never a DDP rank) from the per-epoch history
that each seed's rank 0 writes after its checkpoint (``<run dir>/history.csv``): an epoch is logged
once every seed has finished it, as the seeds' mean, at step = epoch. Per-seed rows stay in the
stage's history CSV.

At the end of the stage the summary (``metrics.json``) gets the final numbers the tables read:
every head's top-1 and top-5, mean and std over the seeds (the aggregate's, to the same decimals).

Resuming: ``Live(resume=True)`` continues from the step its summary records. A history row is
written only after its epoch's checkpoint, so a logged epoch is never trained again; rows after
the summary's step (a kill between DVCLive's append to a ``.tsv`` and its summary) are cut before
logging goes on. DVC deletes a stage's outputs before it runs it again: the directory is then
rebuilt from the seeds' histories, which live in the run directory and survive. What is logged is
a pure function of those histories, so a rerun writes the same bytes (no timestamps).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

_logger = logging.getLogger(__name__)

#: history columns logged per epoch: the training loss and every head's test top-1 (raw and EMA)
_TOP1 = re.compile(r"^(ema_)?test_(\w+)_top1$")


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def _number(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def epoch_values(rows: Sequence[dict[str, str]]) -> dict[str, float]:
    """One epoch's logged values, the mean over the seeds' rows of that epoch: ``train_loss`` and
    ``<head>_top1`` (``ema_<head>_top1``) on the epochs that were evaluated."""
    out: dict[str, float] = {}
    for column in rows[0]:
        if column == "train_loss":
            name = column
        elif m := _TOP1.match(column):
            name = f"{m.group(1) or ''}{m.group(2)}_top1"
        else:
            continue
        values = [_number(r.get(column)) for r in rows]
        if all(v is not None for v in values):
            out[name] = round(statistics.fmean(values), 6)
    return out


def final_values(aggregate: dict[str, Any]) -> dict[str, float]:
    """The stage's final numbers from its seeds' aggregate (``metrics/<stage>/<variant>.json``):
    ``<head>_top1``, ``<head>_top1_std``, ``<head>_top5``, ``<head>_top5_std``."""
    out: dict[str, float] = {}
    for head, metrics in aggregate.get("heads", {}).items():
        for metric in ("top1", "top5"):
            stat = metrics.get(metric)
            if isinstance(stat, dict):
                out[f"{head}_{metric}"] = stat["mean"]
                out[f"{head}_{metric}_std"] = stat["std"]
    return out


class StageLive:
    """The DVCLive directory of one stage variant, fed from its seeds' history CSVs.

    Args:
        directory: the DVCLive directory (``metrics.json`` and ``plots/metrics/*.tsv``).
        histories: each seed's per-epoch history CSV while it trains, in seed order.
    """

    def __init__(self, directory: Path, histories: Sequence[Path]):
        self.directory = Path(directory)
        self.histories = list(histories)
        self.live = self._open(resume=True)
        # the last epoch logged (-1: none; released weights log their evaluation at epoch 0)
        self.logged = int(self.live.summary["step"]) if "step" in self.live.summary else -1
        self._cut_after(self.logged)

    def _open(self, *, resume: bool):
        from dvclive import Live

        # dvcyaml None: dvc.yaml declares these files; save_dvc_exp False: DVC's own `exp run`
        # (or none) records the experiment, never DVCLive.
        return Live(
            str(self.directory), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None
        )

    def _cut_after(self, step: int) -> None:
        """Drop every ``.tsv`` row past ``step`` (rows of an epoch whose summary was never
        written)."""
        root = Path(self.live.plots_dir) / "metrics"
        for tsv in sorted(root.rglob("*.tsv")) if root.is_dir() else ():
            with open(tsv, newline="") as fh:
                reader = csv.DictReader(fh, delimiter="\t")
                fields = reader.fieldnames or []
                rows = [r for r in reader if int(r["step"]) <= step]
            with open(tsv, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fields, delimiter="\t", lineterminator=os.linesep)
                writer.writeheader()
                writer.writerows(rows)

    def _epochs(self, histories: Sequence[Path]) -> list[tuple[int, dict[str, float]]]:
        """Every epoch that every seed has finished: its number and its logged values. Epoch 0
        is the evaluation of weights that were not trained here (released ones)."""
        runs = [_read_rows(p) for p in histories]
        done = min(len(rows) for rows in runs) if runs else 0
        epochs = []
        for i in range(done):
            rows = [r[i] for r in runs]
            epoch = int(rows[0]["epoch"])
            if any(int(r["epoch"]) != epoch for r in rows):
                raise ValueError(f"history rows out of order at row {i + 1}: {histories}")
            epochs.append((epoch, epoch_values(rows)))
        return epochs

    def _logged_rows(self) -> dict[str, list[tuple[int, float]]]:
        root = Path(self.live.plots_dir) / "metrics"
        out = {}
        for tsv in sorted(root.rglob("*.tsv")) if root.is_dir() else ():
            with open(tsv, newline="") as fh:
                out[tsv.stem] = [
                    (int(r["step"]), float(r[tsv.stem])) for r in csv.DictReader(fh, delimiter="\t")
                ]
        return out

    def sync(self, histories: Sequence[Path] | None = None) -> int:
        """Log every epoch that every seed has finished and that is not logged yet; the last
        epoch logged (-1: none)."""
        for epoch, values in self._epochs(histories or self.histories):
            if epoch <= self.logged:
                continue
            self.live.step = epoch
            for name, value in values.items():
                self.live.log_metric(name, value)
            self.live.next_step()  # writes the summary (step = epoch)
            self.logged = epoch
        return self.logged

    def finish(self, histories: Sequence[Path], aggregate: dict[str, Any]) -> None:
        """Log the epochs not logged yet from the runs' final histories, then the final numbers
        into the summary (not plotted: they are one value per stage).

        The directory ends as a function of the final histories alone: if what was logged
        differs (a run started over after ``--restart`` moved a stale checkpoint aside), it is
        written again from them."""
        self.sync(histories)
        want: dict[str, list[tuple[int, float]]] = {}
        for epoch, values in self._epochs(histories):
            for name, value in values.items():
                want.setdefault(name, []).append((epoch, value))
        if self._logged_rows() != want:
            _logger.info(
                "%s: rewriting the live log from the runs' final histories", self.directory
            )
            self.live = self._open(resume=False)
            self.logged = -1
            self.sync(histories)
        self.live.step = max(self.logged, 0)
        for name, value in final_values(aggregate).items():
            self.live.log_metric(name, value, plot=False)
        self.live.make_summary()
