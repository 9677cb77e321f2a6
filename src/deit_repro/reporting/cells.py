"""Table cells: a number's text and where it was read.

A :class:`Cell` is a cell's text with the sources of its number(s); a :class:`Stat` is a metric
over seeds (mean, sample std, per-seed values). Numbers are written with fixed decimals, sources
as ``file#JSON pointer`` (:func:`pointer`), and a difference of two Stats is taken per seed
(:func:`paired`), since every seed's model is trained on the same seed list.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

NOT_RUN = "not run"
DASH = "–"


def num(x: float, digits: int) -> str:
    """Fixed decimals, never "-0.00"."""
    text = f"{x:.{digits}f}"
    return text[1:] if re.fullmatch(r"-0\.?0*", text) else text


def signed(x: float, digits: int) -> str:
    text = num(x, digits)
    return text if text.startswith("-") else f"+{text}"


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, the sources of its number(s), and an optional Markdown text."""

    text: str
    sources: tuple[str, ...] = ()
    md: str | None = None


@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean, sample std, the per-seed values, and where it was read."""

    mean: float
    std: float
    values: tuple[float, ...]
    sources: tuple[str, ...] = ()
    printed: str | None = None  # a paper number: its text as printed

    @staticmethod
    def of(node: Any, source: str = "") -> "Stat":
        src = (source,) if source else ()
        if isinstance(node, dict) and "mean" in node:
            return Stat(
                float(node["mean"]),
                float(node["std"]),
                tuple(float(v) for v in node["values"]),
                src,
            )
        return Stat(float(node), 0.0, (float(node),), src)

    @staticmethod
    def over(values: Sequence[float], sources: Iterable[str] = ()) -> "Stat":
        """A Stat computed here (a derived per-seed quantity): mean and sample std."""
        vals = tuple(float(v) for v in values)
        return Stat(
            statistics.fmean(vals),
            statistics.stdev(vals) if len(vals) > 1 else 0.0,
            vals,
            tuple(dict.fromkeys(sources)),
        )

    @property
    def digits(self) -> int:
        """Decimals of a printed reference number (its source's text), else 2."""
        return 2 if self.printed is None else len(self.printed.partition(".")[2])

    def scaled(self, k: float) -> "Stat":
        return Stat(self.mean * k, self.std * k, tuple(v * k for v in self.values), self.sources)

    def fmt(self, digits: int = 2) -> str:
        if len(self.values) > 1:
            return f"{num(self.mean, digits)} ± {num(self.std, digits)}"
        return num(self.mean, digits)

    def cell(self, digits: int = 2) -> Cell:
        return Cell(self.fmt(digits), self.sources)

    def __str__(self) -> str:
        return self.fmt(2)


Value = Stat | Cell | str | int | float | None


def as_cell(v: Value, digits: int = 2) -> Cell:
    if isinstance(v, Cell):
        return v
    if isinstance(v, Stat):
        return v.cell(digits)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return Cell(DASH)
    if isinstance(v, float):
        return Cell(num(v, digits))
    return Cell(str(v))


def pointer(*keys: str) -> str:
    """An RFC 6901 JSON pointer ("deit/joint" -> "deit~1joint")."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


def difference(a: Stat | Cell, b: Stat | Cell) -> Cell:
    if not (isinstance(a, Stat) and isinstance(b, Stat)):
        return a if isinstance(a, Cell) else b  # type: ignore[return-value]
    d = Stat.over(paired(a, b), a.sources + b.sources)
    text = signed(d.mean, 2) + (f" ± {num(d.std, 2)}" if len(d.values) > 1 else "")
    return Cell(text, d.sources)


def paired(a: Stat, b: Stat) -> list[float]:
    """Per-seed a − b (seeds in the same order in every file; a single run serves every seed)."""
    if len(a.values) == len(b.values):
        return [x - y for x, y in zip(a.values, b.values)]
    if len(b.values) == 1:
        return [x - b.values[0] for x in a.values]
    if len(a.values) == 1:
        return [a.values[0] - y for y in b.values]
    return [a.mean - b.mean]


def first_stat(*cands: Stat | Cell) -> Stat | Cell:
    """The first candidate that was measured (a Stat), else the first one ("not run" / "–")."""
    for c in cands:
        if isinstance(c, Stat):
            return c
    return cands[0]
