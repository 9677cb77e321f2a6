"""Reading the metrics of a run of the DAG, its runs' per-image predictions and the paper's
numbers (reference/paper/*.csv).

Every read is logged (``Metrics.read``, ``Predictions.read``, ``Reference.read``), so that
``results/provenance.json`` names, per table, the files that table read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pandas as pd

from deit_repro.errors import DataError
from deit_repro.reporting.cells import DASH, NOT_RUN, Cell, Stat, pointer

if TYPE_CHECKING:
    from deit_repro.config import Params

#: the paper's numbers in this repository: <repository root>/reference/paper
REFERENCE = Path(__file__).resolve().parents[3] / "reference" / "paper"


def dag_metrics(params: Params) -> frozenset[str]:
    """The metrics files (names relative to metrics/, no suffix) that the stages of dvc.yaml
    write under ``params``: the tables read these and no other. A file another profile's DAG
    left in metrics/ (a committed fashion Figure 3 budget under the smoke profile) is not this
    DAG's result. tests/test_tables.py checks this list against DVC's own reading of dvc.yaml
    for every profile."""
    names = {"teacher", "teacher_vit", "evaluate", "throughput"}
    names |= {f"pretrain/{v}" for v in ("none", "soft", "hard", "deit", "deit_vit_teacher")}
    names |= {f"finetune/{v}" for v in ("bicubic", "bilinear", "control")}
    names |= {f"figure3/{v}-{e}" for v in ("none", "deit") for e in params.figure3.budgets}
    names |= {f"transfer/{ds}-pretrained" for ds in params.transfer.datasets}
    names |= {f"transfer/{ds}-scratch" for ds in params.transfer.scratch}
    return frozenset(names)


class Metrics:
    """The metrics files of a run of the DAG, read once.

    Sources are written ``<dir name>/<file>#<JSON pointer>`` ("metrics/pretrain/deit.json#/heads/
    joint/top1"); history CSVs ``<dir name>/<file>#column=<c>&epoch=<e>`` (every seed's row).

    Args:
        root: the metrics directory (metrics/).
        names: the files to read (``dag_metrics``); None: every ``*.json`` under ``root``.
        extra: files outside the DAG that the user names (``tables --released``), by name.
    """

    def __init__(
        self, root: Path, names: Iterable[str] | None = None, extra: dict[str, Path] | None = None
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                f"metrics directory {root} does not exist",
                "run the training and evaluate stages first (dvc repro)",
            )
        self.prefix = self.root.resolve().name
        if names is None:
            found = sorted(self.root.rglob("*.json"))
        else:
            found = sorted(p for n in names if (p := self.root / f"{n}.json").is_file())
        self.files = {p.relative_to(self.root).with_suffix("").as_posix(): p for p in found}
        for name, path in (extra or {}).items():
            if not Path(path).is_file():
                raise DataError(
                    f"metrics file {path} does not exist", "run the command that writes it"
                )
            self.files[name] = Path(path)
        self._cache: dict[str, Any] = {}
        self.read: set[Path] = set()

    def path(self, name: str, suffix: str = ".json") -> str:
        file = self.files.get(name)
        if file is not None and suffix == ".json" and not file.is_relative_to(self.root):
            return self.label(file)
        return f"{self.prefix}/{name}{suffix}"

    def label(self, path: Path) -> str:
        """How sources name a file: ``metrics/<name>`` inside the metrics directory, else the
        path as the user gave it."""
        if path.is_relative_to(self.root):
            return f"{self.prefix}/{path.relative_to(self.root).as_posix()}"
        return path.as_posix()

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> dict:
        if name not in self.files:
            raise DataError(
                f"metrics file {self.root / name}.json is missing",
                "run the stage that writes it (see dvc.yaml)",
            )
        self.read.add(self.files[name])
        return self.peek(name)

    def peek(self, name: str) -> dict:
        """A file's content without logging the read (for what a caption says about a file that
        a table reads anyway)."""
        if name not in self._cache:
            self._cache[name] = json.loads(self.files[name].read_text())
        return self._cache[name]

    def stat(self, name: str, *keys: str) -> Stat | Cell:
        """The Stat at ``keys`` of a file; "not run" if the file is missing, "–" if the key is."""
        if not self.has(name):
            return Cell(NOT_RUN)
        node: Any = self.get(name)
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return Cell(DASH)
            node = node[k]
        return Stat.of(node, self.path(name) + "#" + pointer(*keys))

    def top1(self, name: str, head: str | None = None) -> Stat | Cell:
        """Top-1 of a head, or (head None) the model's own top-1: joint if it has it, else cls."""
        return self.stat(name, "heads", head, "top1") if head else self.stat(name, "top1")

    def eval_weights(self) -> list[str]:
        """The eval weights ("raw (not EMA)") of the JSON files read since ``read`` was cleared."""
        out = set()
        for name, path in self.files.items():
            # a history CSV was evaluated as its stage's metrics file says
            if path in self.read or self.root / f"{name}_history.csv" in self.read:
                ev = self.peek(name).get("eval")
                if isinstance(ev, dict) and ev.get("weights"):
                    out.add(str(ev["weights"]))
        return sorted(out)

    def field(self, name: str, key: str, default: Any = None) -> Any:
        return self.get(name).get(key, default) if self.has(name) else default

    def history(self, name: str) -> pd.DataFrame | None:
        path = self.root / f"{name}.csv"
        if not path.is_file():
            return None
        self.read.add(path)
        if name not in self._cache:
            self._cache[name] = pd.read_csv(path)
        return self._cache[name]


class Reference:
    """The paper's numbers (reference/paper/*.csv, see its SOURCES.md)."""

    def __init__(self, root: Path = REFERENCE):
        self.root = Path(root)
        resolved = self.root.resolve()
        self.prefix = f"{resolved.parent.name}/{resolved.name}"
        self._cache: dict[str, pd.DataFrame] = {}
        self.read: set[Path] = set()

    def table(self, name: str) -> pd.DataFrame:
        path = self.root / f"{name}.csv"
        if not path.is_file():
            raise DataError(f"reference table {path} is missing", "restore reference/paper/")
        self.read.add(path)
        if name not in self._cache:
            self._cache[name] = pd.read_csv(path, dtype=str, keep_default_na=False)
        return self._cache[name]

    def row(self, name: str, **match: str) -> int | None:
        """Index of the first row whose columns equal ``match`` (None if there is none)."""
        df = self.table(name)
        hit = df.index[(df[list(match)] == pd.Series(match)).all(axis=1)]
        return int(hit[0]) if len(hit) else None

    def cell(self, name: str, row: int | None, column: str) -> Cell:
        """The printed value (as printed, e.g. "83.1" or "86M") with its source; "–" if empty."""
        if row is None:
            return Cell(DASH)
        value = self.table(name).at[row, column]
        if value == "":
            return Cell(DASH)
        return Cell(value, (f"{self.prefix}/{name}.csv#row={row}&column={column}",))

    def number(self, name: str, row: int | None, column: str) -> Stat | None:
        c = self.cell(name, row, column)
        try:
            return Stat(float(c.text), 0.0, (float(c.text),), c.sources, c.text)
        except ValueError:
            return None

    def source(self, name: str, row: int | None) -> Cell:
        """The row's ``source`` column (the transcription it comes from), kept with the numbers."""
        return Cell(DASH) if row is None else Cell(self.table(name).at[row, "source"])


#: a run's per-image predictions in its model directory (deit_repro.core.model_dirs)
PREDICTIONS = "predictions.npy"


class Predictions:
    """Every run's final evaluation per test image, ``<models>/<name>[/seed<k>]/predictions.npy``:
    a structured array with the true ``label`` and one field per head holding its top-1 class.
    ``<name>`` is the run's metrics name (``pretrain/deit``, ``finetune/bicubic``, ``teacher``).
    """

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.prefix = self.root.resolve().name if self.root is not None else "models"
        self._cache: dict[Path, np.ndarray] = {}
        self.read: set[Path] = set()

    def _file(self, name: str, seed: int) -> Path | None:
        if self.root is None:
            return None
        for p in (self.root / name / f"seed{seed}" / PREDICTIONS, self.root / name / PREDICTIONS):
            if p.is_file():
                return p
        return None

    def classes(self, name: str, head: str | None, seeds: Sequence[int]) -> np.ndarray | None:
        """``[len(seeds), N]`` top-1 classes of ``head`` (None: the model's reported head, joint
        if it has one, else cls); a single run (released teacher weights) serves every seed. None
        without a models directory (the claims then have their seed tests alone); with one, a
        missing file or head is a DataError: a claim would otherwise lose its per-image test
        unnoticed."""
        rows = []
        for seed in seeds:
            table = self._table(name, seed)
            if table is None:
                return None
            field = head or ("joint" if "joint" in table.dtype.names else "cls")
            if field not in table.dtype.names:
                raise DataError(
                    f"predictions of {self.root / name} (seed {seed}) have no head {field!r} "
                    f"(heads: {', '.join(table.dtype.names[1:])})",
                    "re-run the stage that trains it (dvc repro)",
                )
            if not np.array_equal(table["label"], self._table(name, seeds[0])["label"]):
                raise DataError(
                    f"the runs of {self.root / name} were evaluated on different test sets",
                    "re-run the stage that trains it (dvc repro)",
                )
            rows.append(table[field].astype(np.int64))
        return np.stack(rows)

    def labels(self, name: str, seeds: Sequence[int]) -> np.ndarray | None:
        table = self._table(name, seeds[0])
        return None if table is None else table["label"].astype(np.int64)

    def hits(self, name: str, head: str | None, seeds: Sequence[int]) -> np.ndarray | None:
        """``[len(seeds), N]`` 100 where the head's top-1 is right, else 0 (accuracy points)."""
        cls, labels = self.classes(name, head, seeds), self.labels(name, seeds)
        if cls is None or labels is None:
            return None
        return 100.0 * (cls == labels[None, :])

    def _table(self, name: str, seed: int) -> np.ndarray | None:
        if self.root is None:
            return None
        path = self._file(name, seed)
        if path is None:
            raise DataError(
                f"{self.root / name} has no {PREDICTIONS} for seed {seed} (nor one run's)",
                "re-run the stage that trains it (dvc repro)",
            )
        self.read.add(path)
        if path not in self._cache:
            try:
                self._cache[path] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(
                    f"predictions file {path} is unreadable ({err})",
                    "re-run the stage that wrote it (dvc repro --force <stage>)",
                ) from err
        return self._cache[path]
