"""The tables stage (DESIGN.md stage 7, issue #5): the paper's tables and figures regenerated from
the metrics of a run of the DAG.

Every measured number comes from a file under ``metrics/`` (never typed by hand); the paper's
numbers come from ``reference/paper/*.csv`` and keep its ``source`` column. Each table is written as
Markdown, CSV and (paper tables) a LaTeX ``tabular`` with the profile, seeds and eval settings in
its caption; ``results/README.md`` holds the claims table, the headline table and the figures, and
``results/provenance.json`` names, for every cell, the file (JSON pointer / CSV row) its number was
read from, with each file's sha256 (:func:`trace`, :func:`resolve`, :func:`stale`).

Output is deterministic: fixed decimals, fixed row order, sorted JSON, PNGs without metadata, so a
rerun on the same metrics is byte-identical.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from deit_repro import atomic, figures
from deit_repro.config import Params
from deit_repro.errors import DataError

_logger = logging.getLogger(__name__)

REFERENCE = Path(__file__).resolve().parents[2] / "reference" / "paper"

NOT_RUN = "not run"
DASH = "–"
#: the paper's model for the claims and the single-model tables (Tables 2, 4, 7, 10 are DeiT-B)
PAPER_MODEL = "DeiT-B"
#: dims of timm's DeiT family (timm/models/deit.py), for a profile that names a timm model
_TIMM_DEIT = {"tiny": ("DeiT-Ti", 192, 3, 12), "small": ("DeiT-S", 384, 6, 12),
              "base": ("DeiT-B", 768, 12, 12)}


# --------------------------------------------------------------------------------------------------
# Cells: a number's text and where it was read
# --------------------------------------------------------------------------------------------------


def _num(x: float, digits: int) -> str:
    """Fixed decimals, never "-0.00"."""
    text = f"{x:.{digits}f}"
    return text[1:] if re.fullmatch(r"-0\.?0*", text) else text


def _signed(x: float, digits: int) -> str:
    text = _num(x, digits)
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
            return Stat(float(node["mean"]), float(node["std"]),
                        tuple(float(v) for v in node["values"]), src)
        return Stat(float(node), 0.0, (float(node),), src)

    @staticmethod
    def over(values: Sequence[float], sources: Iterable[str] = ()) -> "Stat":
        """A Stat computed here (a derived per-seed quantity): mean and sample std."""
        vals = tuple(float(v) for v in values)
        return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    vals, tuple(dict.fromkeys(sources)))

    @property
    def digits(self) -> int:
        """Decimals of a printed reference number (its source's text), else 2."""
        return 2 if self.printed is None else len(self.printed.partition(".")[2])

    def scaled(self, k: float) -> "Stat":
        return Stat(self.mean * k, self.std * k, tuple(v * k for v in self.values), self.sources)

    def fmt(self, digits: int = 2) -> str:
        if len(self.values) > 1:
            return f"{_num(self.mean, digits)} ± {_num(self.std, digits)}"
        return _num(self.mean, digits)

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
        return Cell(_num(v, digits))
    return Cell(str(v))


def _pointer(*keys: str) -> str:
    """An RFC 6901 JSON pointer ("deit/joint" -> "deit~1joint")."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


# --------------------------------------------------------------------------------------------------
# Reading metrics and the paper's numbers (every read is logged, for provenance.json)
# --------------------------------------------------------------------------------------------------


class Metrics:
    """The metrics directory of a run of the DAG, read once.

    Sources are written ``<dir name>/<file>#<JSON pointer>`` ("metrics/pretrain/deit.json#/heads/
    joint/top1"); history CSVs ``<dir name>/<file>#column=<c>&epoch=<e>`` (every seed's row).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"metrics directory {root} does not exist",
                            "run the training and evaluate stages first (dvc repro)")
        self.prefix = self.root.resolve().name
        self.files = {p.relative_to(self.root).with_suffix("").as_posix(): p
                      for p in sorted(self.root.rglob("*.json"))}
        self._cache: dict[str, Any] = {}
        self.read: set[Path] = set()

    def path(self, name: str, suffix: str = ".json") -> str:
        return f"{self.prefix}/{name}{suffix}"

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> dict:
        if name not in self.files:
            raise DataError(f"metrics file {self.root / name}.json is missing",
                            "run the stage that writes it (see dvc.yaml)")
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
        return Stat.of(node, self.path(name) + "#" + _pointer(*keys))

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


# --------------------------------------------------------------------------------------------------
# Tables and their writers (Markdown, CSV, LaTeX)
# --------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A results table: its cells and the caption parts that say what was measured and how."""

    name: str                      # file stem under results/
    title: str                     # "Table 3 analogue: distillation methods"
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latex: bool = True             # a paper table: also written as a LaTeX tabular
    figure: str | None = None      # a PNG that plots this table

    def add_row(self, values: dict[str, Value], digits: int = 2) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.name}: unknown columns {sorted(unknown)}")
        self.rows.append([as_cell(values.get(c), digits) for c in self.columns])

    def caption(self, context: str) -> str:
        return " ".join([f"{self.title} — {context}", *self.notes])


def to_markdown(table: Table, context: str) -> str:
    """A GitHub-Markdown table with the caption above it (no dependency on tabulate)."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    buf = io.StringIO()
    buf.write(f"**{table.title}** — {context}\n\n")
    for note in table.notes:
        buf.write(f"{note}\n")
    if table.notes:
        buf.write("\n")
    if table.figure:
        buf.write(f"![{table.title}]({table.figure})\n\n")
    buf.write("| " + " | ".join(esc(c) for c in table.columns) + " |\n")
    buf.write("|" + "|".join("---" for _ in table.columns) + "|\n")
    for row in table.rows:
        buf.write("| " + " | ".join(esc(c.md if c.md is not None else c.text) for c in row)
                  + " |\n")
    return buf.getvalue()


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.columns)
    for row in table.rows:
        w.writerow([c.text for c in row])
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "↑": r"$\uparrow$", "→": r"$\rightarrow$", "≥": r"$\geq$",
                  "−": "$-$", "–": "--", "—": "---", "×": r"$\times$", "⚗": r"\alembic{}",
                  "·": r"$\cdot$", "≈": r"$\approx$"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    out = re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", out)
    out = re.sub(r"`(.+?)`", r"\\texttt{\1}", out)
    return "".join(_LATEX_UNICODE.get(ch, ch) for ch in out)


def to_latex(table: Table, context: str) -> str:
    """A booktabs ``table`` environment (pandas' to_latex needs jinja2, not a dependency here)."""
    def numeric(col: int) -> bool:
        cells = [r[col].text for r in table.rows if r[col].text not in (DASH, NOT_RUN)]
        return bool(cells) and all(re.match(r"^[+\-−]?\d", c) for c in cells)

    align = "".join("r" if i and numeric(i) else "l" for i in range(len(table.columns)))
    lines = [
        f"% {table.name}: generated by `deit-repro tables` from the metrics; do not edit.",
        "% Needs \\usepackage{booktabs}; \\alembic is the paper's distillation symbol.",
        r"\providecommand{\alembic}{\textsuperscript{\ensuremath{\dagger}}}",
        r"\begin{table}[t]", r"\centering", r"\small",
        r"\caption{" + latex_escape(table.caption(context)) + "}",
        r"\label{tab:" + table.name.replace("_", "-") + "}",
        r"\resizebox{\linewidth}{!}{%",
        r"\begin{tabular}{" + align + "}", r"\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c.text) for c in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Context: the settings every caption states
# --------------------------------------------------------------------------------------------------


class Context:
    """Params, metrics and paper numbers a table is built from, and the caption context."""

    def __init__(self, params: Params, metrics: Metrics, ref: Reference):
        self.params, self.m, self.ref = params, metrics, ref
        self.pre_px = params.student.model.img_size
        self.ft_px = params.finetune.img_size

    def caption(self) -> str:
        """Profile, seeds and eval settings: the params', and the weights the metrics files read
        for this table were evaluated with."""
        p = self.params
        weights = ", ".join(self.m.eval_weights()) or None
        teacher = ""
        if self.m.has("teacher") and self.m.files["teacher"] in self.m.read:
            seeds = self.m.peek("teacher").get("seeds", [])
            if len(seeds) == 1 and len(p.seeds) > 1:
                teacher = f"; the teacher is trained once (seed {seeds[0]}) and serves every seed"
        return (f"profile `{p.profile}`, seeds {list(p.seeds)} (mean ± sample std over "
                f"{len(p.seeds)} run{'s' if len(p.seeds) > 1 else ''} per model{teacher}); "
                f"test split, final epoch (never best-on-test)"
                f"{', weights ' + weights if weights else ''}, eval resize + centre crop "
                f"crop_pct={p.eval.crop_pct}, {p.eval.interpolation}; top-1 in %.")

    def paper_note(self, *files: str, what: str = "") -> str:
        names = ", ".join(f"`reference/paper/{f}.csv`" for f in files)
        return (f"Paper columns: {names}{' (' + what + ')' if what else ''}, ImageNet, as printed; "
                "`paper source` names the transcription (reference/paper/SOURCES.md).")


def _first_stat(*cands: Stat | Cell) -> Stat | Cell:
    for c in cands:
        if isinstance(c, Stat):
            return c
    return cands[0]


def _params_m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _paper_variant(params: Params) -> str:
    """The paper's DeiT variant matching the profile's student: its timm name, or the closest
    embedding dimension for a small custom one."""
    m = params.student.model
    if m.name:
        for size, (variant, *_dims) in _TIMM_DEIT.items():
            if f"deit_{size}_" in m.name:
                return variant
    return min(_TIMM_DEIT.values(), key=lambda v: abs(v[1] - m.embed_dim))[0]


def _student_dims(params: Params) -> tuple[Cell, Cell, Cell]:
    """Embedding dim, heads, layers of the profile's student, with their source: the params keys
    (a custom size), or for a timm name that name's definition in timm/models/deit.py."""
    m = params.student.model
    if m.name:
        for size, (_variant, *dims) in _TIMM_DEIT.items():
            if f"deit_{size}_" in m.name:
                src = (f"params:student.model.name={m.name} (timm/models/deit.py)",)
                return tuple(Cell(str(d), src) for d in dims)  # type: ignore[return-value]
        return Cell(DASH), Cell(DASH), Cell(DASH)
    return tuple(Cell(str(getattr(m, k)), (f"params:student.model.{k}",))  # type: ignore
                 for k in ("embed_dim", "num_heads", "depth"))


# --------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------


def _throughput(c: Context, key: str) -> tuple[Cell, Cell, Any]:
    """(images/s cell, params cell, raw entry) of one architecture of metrics/throughput.json."""
    if not c.m.has("throughput"):
        return Cell(NOT_RUN), Cell(NOT_RUN), None
    entry = c.m.get("throughput")["models"].get(key)
    if entry is None:
        return Cell(DASH), Cell(DASH), None
    base = c.m.path("throughput") + "#" + _pointer("models", key)
    return (Cell(_num(entry["images_per_s"], 0), (base + "/images_per_s",)),
            Cell(_params_m(entry["params"]), (base + "/params",)), entry)


def _throughput_note(c: Context) -> str:
    if not c.m.has("throughput"):
        return "Throughput: not run."
    t = c.m.get("throughput")
    any_entry = next(iter(t["models"].values()))
    hw = ", ".join(f"{k}={v}" for k, v in sorted(t.get("hardware", {}).items())
                   if v not in (None, False, ""))
    return (f"Throughput measured by the `throughput` stage on {any_entry.get('device')}"
            f"{' (' + hw + ')' if hw else ''}, "
            f"{any_entry.get('dtype')}, batch {any_entry.get('batch_size')}, "
            f"{any_entry.get('threads')} thread(s), mean of {any_entry.get('repeats')} timed "
            "passes on synthetic input; params counted from the built models. The paper's: one "
            "V100-16GB, largest batch that fits, AMP.")


def table1(c: Context) -> Table:
    """DeiT variants (paper Table 1): dims from params, params and throughput measured."""
    variant = _paper_variant(c.params)
    dim, heads, depth = _student_dims(c.params)
    ref = "table1_deit_variants"
    prow = c.ref.row(ref, model=variant)
    t = Table("table1_variants", "Table 1 analogue: the profile's DeiT variants", [
        "model", "embedding dim", "heads", "layers", "params", "resolution", "images/s",
        "paper model", "paper embedding dim", "paper heads", "paper layers", "paper params",
        "paper resolution", "paper images/s", "paper source"])
    t.notes = [_throughput_note(c),
               f"Dims from params `student.model`; the paper's row is {variant}, the variant "
               "closest to the profile's student.", c.paper_note(ref)]
    name = c.params.student.model.name or "custom ViT"
    for label, key in ((f"DeiT ({name})", "deit"), (f"DeiT⚗ ({name})", "deit_distilled"),
                       (f"DeiT⚗↑{c.ft_px} ({name})", f"deit_distilled_{c.ft_px}")):
        ips, npar, entry = _throughput(c, key)
        res = Cell(str(entry["img_size"]), (c.m.path("throughput") + "#" + _pointer(
            "models", key, "img_size"),)) if entry else Cell(DASH)
        t.add_row({"model": label, "embedding dim": dim, "heads": heads, "layers": depth,
                   "params": npar, "resolution": res, "images/s": ips,
                   "paper model": variant,
                   "paper embedding dim": c.ref.cell(ref, prow, "embedding_dim"),
                   "paper heads": c.ref.cell(ref, prow, "heads"),
                   "paper layers": c.ref.cell(ref, prow, "layers"),
                   "paper params": c.ref.cell(ref, prow, "params"),
                   "paper resolution": c.ref.cell(ref, prow, "training_resolution"),
                   "paper images/s": c.ref.cell(ref, prow, "throughput_im_per_s"),
                   "paper source": c.ref.source(ref, prow)})
    return t


def table2(c: Context) -> Table:
    """Teacher comparison (paper Table 2): a convnet and a transformer teacher of the profile."""
    ref = "table2_teacher_comparison"
    t = Table("table2_teacher", "Table 2 analogue: convnet vs transformer teacher", [
        "teacher", "teacher top-1", f"student top-1 @{c.pre_px}px",
        "paper teacher", "paper teacher top-1", "paper student top-1 @224",
        "paper student top-1 ↑384", "paper source"])
    t.notes = ["Student: the headline DeiT⚗ (class+distillation), distilled from each teacher "
               "(metrics/pretrain/deit.json, metrics/pretrain/deit_vit_teacher.json).",
               c.paper_note(ref, what="arXiv v2 rows; ICML differs for RegNetY-12/16GF, "
                            "see SOURCES.md")]
    rows = (("convnet", "teacher", "pretrain/deit", "RegNetY-16GF"),
            ("transformer", "teacher_vit", "pretrain/deit_vit_teacher", "DeiT-B"))
    for kind, teacher, student, paper_teacher in rows:
        arch = c.m.field(teacher, "arch", NOT_RUN if not c.m.has(teacher) else "?")
        prow = c.ref.row(ref, paper_version="arXiv_v2", teacher_model=paper_teacher)
        t.add_row({"teacher": f"{kind} ({arch})", "teacher top-1": c.m.top1(teacher),
                   f"student top-1 @{c.pre_px}px": c.m.top1(student),
                   "paper teacher": paper_teacher,
                   "paper teacher top-1": c.ref.cell(ref, prow, "teacher_imagenet_top1"),
                   "paper student top-1 @224": c.ref.cell(ref, prow, "student_top1_pretrain_224"),
                   "paper student top-1 ↑384": c.ref.cell(ref, prow,
                                                          "student_top1_finetuned_384"),
                   "paper source": c.ref.source(ref, prow)})
    return t


TABLE3_ROWS = (  # (paper method, metrics file, head); DeiT⚗ rows share the headline model
    ("DeiT - no distillation", "pretrain/none", "cls"),
    ("DeiT - usual distillation", "pretrain/soft", "cls"),
    ("DeiT - hard distillation", "pretrain/hard", "cls"),
    ("DeiT-alembic: class embedding", "pretrain/deit", "cls"),
    ("DeiT-alembic: distil. embedding", "pretrain/deit", "dist"),
    ("DeiT-alembic: class+distillation", "pretrain/deit", "joint"),
)


def _method_label(method: str) -> str:
    return method.replace("DeiT-alembic", "DeiT⚗")


def _per_seed(s: Stat | Cell) -> Cell:
    if isinstance(s, Cell):
        return s
    return Cell(" / ".join(_num(v, 2) for v in s.values), s.sources)


def table3(c: Context) -> Table:
    """Distillation methods (paper Table 3), at the pretraining and the fine-tuned resolution."""
    ref = "table3_distillation_methods"
    v = _paper_variant(c.params)
    paper_cols = ([f"paper {v}"] if v != "DeiT-B" else []) + ["paper DeiT-B", "paper DeiT-B↑384"]
    t = Table("table3_distillation", "Table 3 analogue: distillation methods", [
        "method", "teacher supervision", "dist. token", f"top-1 @{c.pre_px}px",
        f"top-1 ↑{c.ft_px}px (fine-tuned)", "per seed", *paper_cols, "paper source"])
    t.notes = [f"Headline model fine-tuned at {c.ft_px} px: metrics/finetune/bicubic.json.",
               c.paper_note(ref)]
    paper_col = {f"paper {v}": f"top1_{v}_224", "paper DeiT-B": "top1_DeiT-B_224",
                 "paper DeiT-B↑384": "top1_DeiT-B_384"}
    for method, name, head in TABLE3_ROWS:
        s = c.m.top1(name, head)
        kind = c.m.field(name, "distill", NOT_RUN)
        token = c.m.field(name, "dist_token")
        fine: Value = c.m.top1("finetune/bicubic", head) if name == "pretrain/deit" else DASH
        prow = c.ref.row(ref, method=method)
        t.add_row({"method": _method_label(method), "teacher supervision": kind,
                   "dist. token": DASH if token is None else ("yes" if token else "no"),
                   f"top-1 @{c.pre_px}px": s, f"top-1 ↑{c.ft_px}px (fine-tuned)": fine,
                   "per seed": _per_seed(s),
                   **{col: c.ref.cell(ref, prow, paper_col[col]) for col in paper_cols},
                   "paper source": c.ref.source(ref, prow)})
    return t


#: Table 4's classifiers: (label, evaluate.json names to try, paper row / column)
TABLE4 = (
    ("ground truth", ("ground_truth",), "groundtruth", "groundtruth"),
    ("teacher", ("teacher",), "convnet (RegNetY)", "convnet_RegNetY"),
    ("DeiT (no distillation)", ("none", "none/cls"), "DeiT (no distillation)", "DeiT_no_distill"),
    ("DeiT⚗ class only", ("deit/cls",), "DeiT-alembic - class only", "DeiT-alembic_class_only"),
    ("DeiT⚗ distil. only", ("deit/dist",), "DeiT-alembic - distil. only",
     "DeiT-alembic_distil_only"),
    ("DeiT⚗ class+distil.", ("deit/joint", "deit"), "DeiT-alembic - class+distil.",
     "DeiT-alembic_class+distil"),
)


def _classifier(c: Context, names: Sequence[str]) -> str | None:
    if not c.m.has("evaluate"):
        return None
    have = c.m.get("evaluate")["disagreement"]
    return next((n for n in names if n in have), None)


def disagreement(c: Context, a: str | None, b: str | None) -> Stat | Cell:
    """Fraction of test images on which two classifiers disagree (evaluate.json stores %)."""
    if not c.m.has("evaluate"):
        return Cell(NOT_RUN)
    if a is None or b is None:
        return Cell(DASH)
    s = c.m.stat("evaluate", "disagreement", a, b)
    return s.scaled(0.01) if isinstance(s, Stat) else s


def table4(c: Context) -> Table:
    """Disagreement between classifiers (paper Table 4), mean ± std over seeds, as a fraction."""
    ref = "table4_disagreement"
    ours = [label for label, *_ in TABLE4]
    paper = [f"paper: {label}" for label in ours]
    t = Table("table4_disagreement", "Table 4 analogue: disagreement between classifiers",
              ["classifier", *ours, *paper, "paper source"])
    t.notes = ["Fraction (0-1, as the paper) of test images on which the row and column "
               "classifiers predict different classes, per seed from metrics/evaluate.json "
               "(stored there in %), mean ± std over seeds.", c.paper_note(ref)]
    names = [_classifier(c, n) for _, n, _, _ in TABLE4]
    for (label, _, paper_row, _), a in zip(TABLE4, names):
        prow = c.ref.row(ref, row_classifier=paper_row)
        row: dict[str, Value] = {"classifier": label}
        for (other, _, _, paper_col), b in zip(TABLE4, names):
            row[other] = disagreement(c, a, b)
            row[f"paper: {other}"] = c.ref.cell(ref, prow, paper_col)
        row["paper source"] = c.ref.source(ref, prow)
        t.add_row(row, digits=3)
    return t


def _table5_models(c: Context) -> list[tuple[str, str, str, str, Stat | Cell, str, str]]:
    """(label, family, throughput key, metrics file, top-1, paper network, series)."""
    v = _paper_variant(c.params)
    arch = c.m.field("teacher", "arch", "teacher")
    return [
        (f"teacher ({arch})", "convnet", "teacher", "teacher", c.m.top1("teacher"),
         "RegNetY-16GF (DeiT-trained teacher, star)", ""),
        ("DeiT", "transformer", "deit", "pretrain/none", c.m.top1("pretrain/none"), v, "deit"),
        ("DeiT⚗", "transformer", "deit_distilled", "pretrain/deit", c.m.top1("pretrain/deit"),
         f"{v} alembic", "deit_distilled"),
        (f"DeiT⚗↑{c.ft_px}", "transformer", f"deit_distilled_{c.ft_px}", "finetune/bicubic",
         c.m.top1("finetune/bicubic"), f"{v} alembic up384", "deit_distilled"),
    ]


def _table5_row(c: Context, network: str) -> int | None:
    """The paper's 300-epoch row of a network (Table 5 also lists 1000-epoch DeiT⚗ rows)."""
    df = c.ref.table("table5_throughput_accuracy")
    hit = df.index[(df["network"] == network) & df["train_epochs"].isin(["", "300"])]
    return int(hit[0]) if len(hit) else None


def table5(c: Context) -> tuple[Table, list[figures.Point]]:
    """Top-1 vs measured throughput (paper Table 5 / Figure 1)."""
    ref = "table5_throughput_accuracy"
    t = Table("table5_throughput_accuracy", "Table 5 / Figure 1 analogue: accuracy vs throughput",
              ["network", "family", "params", "resolution", "images/s", "top-1",
               "paper network", "paper params", "paper resolution", "paper images/s (V100)",
               "paper top-1", "paper source"], figure="figure1_throughput_accuracy.png")
    t.notes = [_throughput_note(c), "DeiT⚗ top-1: class+distillation head.",
               c.paper_note(ref, what="300-epoch rows")]
    points = []
    for label, family, key, _name, top1, paper_net, series in _table5_models(c):
        ips, npar, entry = _throughput(c, key)
        res = Cell(str(entry["img_size"]), (c.m.path("throughput") + "#" + _pointer(
            "models", key, "img_size"),)) if entry else Cell(DASH)
        prow = _table5_row(c, paper_net)
        if prow is None and "up384" in paper_net:  # only DeiT-B was fine-tuned at 384
            paper_net = "DeiT-B alembic up384"
            prow = _table5_row(c, paper_net)
        t.add_row({"network": label, "family": family, "params": npar, "resolution": res,
                   "images/s": ips, "top-1": top1, "paper network": paper_net if prow is not None
                   else DASH, "paper params": c.ref.cell(ref, prow, "params"),
                   "paper resolution": c.ref.cell(ref, prow, "image_size"),
                   "paper images/s (V100)": c.ref.cell(ref, prow, "throughput_im_per_s_V100_16GB"),
                   "paper top-1": c.ref.cell(ref, prow, "imagenet_top1"),
                   "paper source": c.ref.source(ref, prow)})
        if entry and isinstance(top1, Stat):
            points.append(figures.Point(label, family, float(entry["images_per_s"]), top1.mean,
                                        top1.std, series))
    return t, points


#: downstream datasets of the paper's Table 7 (profile dataset name -> paper column)
_TABLE7_COLUMNS = {"cifar10": "cifar10", "cifar100": "cifar100", "flowers102": "flowers102",
                   "stanford_cars": "stanford_cars", "inat2018": "inat18", "inat2019": "inat19"}


def table7(c: Context) -> Table:
    """Transfer learning (paper Table 7): pretrained vs from scratch per downstream dataset."""
    ref, scratch_ref = "table7_transfer_learning", "sec5_4_cifar10_from_scratch"
    t = Table("table7_transfer", "Table 7 analogue: transfer learning", [
        "dataset", "pretrained (DeiT⚗)", "from scratch", "gain", "paper dataset",
        "paper DeiT-B", "paper DeiT-B⚗", "paper DeiT-B from scratch", "paper source"])
    t.notes = ["Pretrained: the headline DeiT⚗ fine-tuned on the dataset (its class+distillation "
               "output); from scratch: the same architecture trained there only. Gain: mean of "
               "the per-seed differences ± their std.",
               "A dataset the paper does not have is compared with CIFAR-10, the paper's one "
               "transfer set with a from-scratch number (§5.4).",
               c.paper_note(ref, scratch_ref, what="DeiT-B rows; from scratch: §5.4")]
    for ds in c.params.transfer.datasets:
        pre = c.m.top1(f"transfer/{ds}-pretrained")
        scr = c.m.top1(f"transfer/{ds}-scratch")
        gain = _difference(pre, scr)
        col = _TABLE7_COLUMNS.get(ds)
        paper_ds = col or "cifar10"
        rb = c.ref.row(ref, model="DeiT-B")
        rd = c.ref.row(ref, model="DeiT-B alembic")
        rs = c.ref.row(scratch_ref, model="DeiT-B") if paper_ds == "cifar10" else None
        sources = sorted({c.ref.source(ref, rb).text, c.ref.source(scratch_ref, rs).text} -
                         {DASH})
        t.add_row({"dataset": ds, "pretrained (DeiT⚗)": pre, "from scratch": scr, "gain": gain,
                   "paper dataset": paper_ds if col else f"{paper_ds} (analogue)",
                   "paper DeiT-B": c.ref.cell(ref, rb, paper_ds),
                   "paper DeiT-B⚗": c.ref.cell(ref, rd, paper_ds),
                   "paper DeiT-B from scratch": c.ref.cell(scratch_ref, rs,
                                                           "cifar10_top1_trained_from_scratch"),
                   "paper source": "; ".join(sources)})
    return t


def _difference(a: Stat | Cell, b: Stat | Cell) -> Cell:
    if not (isinstance(a, Stat) and isinstance(b, Stat)):
        return a if isinstance(a, Cell) else b  # type: ignore[return-value]
    d = Stat.over(_paired(a, b), a.sources + b.sources)
    text = _signed(d.mean, 2) + (f" ± {_num(d.std, 2)}" if len(d.values) > 1 else "")
    return Cell(text, d.sources)


def _paired(a: Stat, b: Stat) -> list[float]:
    """Per-seed a − b (seeds in the same order in every file; a single run serves every seed)."""
    if len(a.values) == len(b.values):
        return [x - y for x, y in zip(a.values, b.values)]
    if len(b.values) == 1:
        return [x - b.values[0] for x in a.values]
    if len(a.values) == 1:
        return [a.values[0] - y for y in b.values]
    return [a.mean - b.mean]


TABLE10_RUNS = (  # (run, what, paper fine-tuning resolution)
    ("control", "same extra epochs at the pretraining resolution", "224"),
    ("bicubic", "higher resolution, bicubic pos. embedding (paper)", "384"),
    ("bilinear", "higher resolution, bilinear pos. embedding (ablation)", None),
)


def table10(c: Context) -> Table:
    """Fine-tuning resolution and positional-embedding interpolation (paper §6, Table 10)."""
    ref = "table10_finetune_resolution"
    t = Table("table10_finetune_resolution",
              "Table 10 analogue: fine-tuning resolution and pos.-embedding interpolation", [
                  "run", "what", "from px", "to px", "pos. embedding", "epochs",
                  "top-1 right after resampling", "top-1 after fine-tuning", "images/s",
                  "paper fine-tuning px", "paper top-1", "paper images/s", "paper source"])
    t.notes = ["The headline DeiT⚗ (class+distillation head) resampled to the target resolution, "
               "evaluated before any step (`before_finetune`), then fine-tuned; `control` spends "
               "the same epochs at the pretraining resolution.",
               c.paper_note(ref, what="DeiT-B trained at 224, no distillation; the paper "
                            "prints no bilinear number (§6 text)")]
    for run, what, paper_px in TABLE10_RUNS:
        name = f"finetune/{run}"
        if not c.m.has(name):
            t.add_row({"run": run, "what": what, "top-1 after fine-tuning": NOT_RUN})
            continue
        to_px = c.m.get(name)["eval"]["img_size"]
        before = _first_stat(c.m.stat(name, "before_finetune", "test_joint_top1"),
                             c.m.stat(name, "before_finetune", "test_cls_top1"))
        after = c.m.top1(name)
        ips, _, _ = _throughput(c, "deit_distilled" if to_px == c.pre_px
                                else f"deit_distilled_{to_px}")
        prow = c.ref.row(ref, finetune_image_size=paper_px) if paper_px else None
        src = c.m.path(name) + "#"
        t.add_row({"run": run, "what": what,
                   "from px": Cell(str(c.m.field(name, "from_img_size")),
                                   (src + _pointer("from_img_size"),)),
                   "to px": Cell(str(to_px), (src + _pointer("eval", "img_size"),)),
                   "pos. embedding": c.m.field(name, "interpolation", DASH),
                   "epochs": Cell(str(c.m.field(name, "epochs")), (src + _pointer("epochs"),)),
                   "top-1 right after resampling": before, "top-1 after fine-tuning": after,
                   "images/s": ips,
                   "paper fine-tuning px": c.ref.cell(ref, prow, "finetune_image_size"),
                   "paper top-1": c.ref.cell(ref, prow, "imagenet_top1"),
                   "paper images/s": c.ref.cell(ref, prow, "throughput_im_per_s"),
                   "paper source": c.ref.source(ref, prow)})
    return t


def _curve(c: Context, name: str, label: str) -> tuple[figures.Curve, dict[int, Stat]] | None:
    """Per evaluated epoch, top-1 over seeds of a pretraining history (joint head if present)."""
    h = c.m.history(name)
    if h is None:
        return None
    col = next((f"test_{hd}_top1" for hd in ("joint", "cls") if f"test_{hd}_top1" in h), None)
    if col is None:
        return None
    h = h[h[col].notna()]
    by_epoch: dict[int, Stat] = {}
    for epoch, g in sorted(h.groupby("epoch"), key=lambda kv: kv[0]):
        g = g.sort_values("seed")
        by_epoch[int(epoch)] = Stat.over(
            g[col].tolist(), [c.m.path(name, ".csv") + f"#column={col}&epoch={int(epoch)}"])
    epochs = tuple(by_epoch)
    return (figures.Curve(label, epochs, tuple(by_epoch[e].mean for e in epochs),
                          tuple(min(by_epoch[e].values) for e in epochs),
                          tuple(max(by_epoch[e].values) for e in epochs)), by_epoch)


def _range(s: Stat) -> Cell:
    return Cell(f"{_num(min(s.values), 2)}–{_num(max(s.values), 2)}", s.sources)


def figure3(c: Context) -> tuple[Table, list[figures.Curve], dict[str, dict[int, Stat]]]:
    """Top-1 vs epochs with and without distillation (paper Figure 3) as a table and curves."""
    ref = "figure3_epochs_anchors_from_tables_and_text"
    t = Table("figure3_epochs", "Figure 3 analogue: top-1 vs training epochs", [
        "epoch", "DeiT (no distillation)", "DeiT min–max", "DeiT⚗ (class+distil.)",
        "DeiT⚗ min–max", "gap DeiT⚗ − DeiT"], latex=False, figure="figure3_epochs.png")
    found = {key: _curve(c, f"pretrain/{key}_history", label) for key, label in
             (("none", "DeiT (no distillation)"), ("deit", "DeiT⚗ (class+distillation)"))}
    curves = [v[0] for v in found.values() if v is not None]
    by = {k: v[1] for k, v in found.items() if v is not None}
    anchors = c.ref.table(ref)
    said = "; ".join(
        f"{r.series}: {f'{r.imagenet_top1} at {r.epochs} epochs' if r.imagenet_top1 else r.epochs}"
        f" ({r.source})" for r in anchors.itertuples()
        if r.series.startswith(("DeiT-B (no", "DeiT-B alembic (distillation token)")))
    t.notes = ["Mean over seeds on the epochs where the test split was evaluated "
               "(metrics/pretrain/{none,deit}_history.csv), min–max across seeds as the band. "
               "Gap: mean of the per-seed differences.",
               f"The paper's curve values are not printed; its anchors (DeiT-B, ImageNet, "
               f"`reference/paper/{ref}.csv`): {said}. A different scale (hundreds of epochs), "
               "so they are cited, not plotted."]
    for e in sorted(set(by.get("none", {})) | set(by.get("deit", {}))):
        a, b = by.get("deit", {}).get(e), by.get("none", {}).get(e)
        srcs = tuple(c.m.path(f"pretrain/{k}_history", ".csv") + f"#column=epoch&epoch={e}"
                     for k in ("none", "deit") if e in by.get(k, {}))
        t.add_row({"epoch": Cell(str(e), srcs), "DeiT (no distillation)": b or DASH,
                   "DeiT min–max": _range(b) if b else DASH,
                   "DeiT⚗ (class+distil.)": a or DASH,
                   "DeiT⚗ min–max": _range(a) if a else DASH,
                   "gap DeiT⚗ − DeiT": _difference(a, b) if a and b else DASH})
    return t, curves, by


# --------------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    text: str
    a: Stat | Cell            # the side the paper says is larger
    b: Stat | Cell
    table: tuple[str, str]    # (label, file)
    op: str = ">"             # ">" or "≥"
    unit: str = "top-1 pts"
    digits: int = 2
    paper: tuple[Stat | None, Stat | None] = (None, None)
    paper_note: str = ""


def verdict(margin: float, spread: float, n: int, op: str = ">") -> str:
    """Whether a claim "a op b" holds at this scale, given the mean per-seed margin a − b.

    It holds when the margin is positive and larger than the spread across seeds (the larger of
    the two sample stds); it is weak when positive (for ≥, non-negative) but within the spread.
    With one seed there is no spread to compare with, and the verdict says so.
    """
    positive = margin > 0 or (op == "≥" and margin == 0)
    if not positive:
        return "does not hold here"
    if n < 2:
        return "holds (1 seed: no spread)"
    return "holds" if margin > spread else "weak (within seed spread)"


def _claim_row(cl: Claim) -> dict[str, Value]:
    link = Cell(cl.table[1], (), f"[{cl.table[0]}]({cl.table[1]})")
    a, b = cl.a, cl.b
    paper = _paper_margin(cl)
    if not (isinstance(a, Stat) and isinstance(b, Stat)):
        missing = a if isinstance(a, Cell) else b
        state = NOT_RUN if NOT_RUN in (getattr(a, "text", ""), getattr(b, "text", "")) else DASH
        return {"claim": cl.text, "verdict": state, "margin": missing, "seed spread": DASH,
                "per seed": DASH, "unit": cl.unit, "measured": DASH, **paper, "table": link}
    diffs = _paired(a, b)
    margin, spread = statistics.fmean(diffs), max(a.std, b.std)
    n = max(len(a.values), len(b.values))
    src = a.sources + b.sources
    d = cl.digits
    return {
        "claim": cl.text, "verdict": Cell(verdict(margin, spread, n, cl.op), src),
        "margin": Cell(_signed(margin, d), src), "seed spread": Cell(_num(spread, d), src),
        "per seed": Cell(" / ".join(_signed(x, d) for x in diffs), src), "unit": cl.unit,
        "measured": Cell(f"{a.fmt(d)} vs {b.fmt(d)}", src), **paper, "table": link}


def _paper_margin(cl: Claim) -> dict[str, Value]:
    pa, pb = cl.paper
    if pa is None or pb is None:
        return {"paper": cl.paper_note or DASH}
    src = pa.sources + pb.sources
    d = max(pa.digits, pb.digits)  # as printed: no precision the paper does not have
    text = f"{_signed(pa.mean - pb.mean, d)} ({_num(pa.mean, d)} vs {_num(pb.mean, d)})"
    return {"paper": Cell(text + (f"; {cl.paper_note}" if cl.paper_note else ""), src)}


def _max_stat(*stats: Stat | Cell) -> Stat | Cell:
    """Per seed, the larger of several Stats (e.g. the better of two heads)."""
    for s in stats:
        if not isinstance(s, Stat):
            return s
    vals = [max(vs) for vs in zip(*(s.values for s in stats))]  # type: ignore[union-attr]
    return Stat.over(vals, [x for s in stats for x in s.sources])  # type: ignore[union-attr]


def _gap_at(by: dict[str, dict[int, Stat]], pick: Callable[[list[int]], int]) -> Stat | Cell:
    if "none" not in by or "deit" not in by:
        return Cell(NOT_RUN)
    epochs = sorted(set(by["none"]) & set(by["deit"]))
    if not epochs:
        return Cell(DASH)
    e = pick(epochs)
    a, b = by["deit"][e], by["none"][e]
    return Stat.over(_paired(a, b), a.sources + b.sources)


def claim_list(c: Context, by_epoch: dict[str, dict[int, Stat]]) -> list[Claim]:
    m, ref = c.m, c.ref
    t3 = "table3_distillation_methods"

    def p3(method: str, col: str = "top1_DeiT-B_224") -> Stat | None:
        return ref.number(t3, ref.row(t3, method=method), col)

    T2 = ("Table 2", "table2_teacher.md")
    T3 = ("Table 3", "table3_distillation.md")
    T4 = ("Table 4", "table4_disagreement.md")
    T7 = ("Table 7", "table7_transfer.md")
    T10 = ("Table 10", "table10_finetune_resolution.md")
    F3 = ("Figure 3", "figure3_epochs.md")
    t2 = "table2_teacher_comparison"
    t4 = "table4_disagreement"
    conv, deit_b = (ref.row(t2, paper_version="arXiv_v2", teacher_model=x)
                    for x in ("RegNetY-16GF", "DeiT-B"))
    cls, dist, joint = (m.top1("pretrain/deit", h) for h in ("cls", "dist", "joint"))
    eval_names = {label: _classifier(c, names) for label, names, _, _ in TABLE4}
    p4 = ref.row(t4, row_classifier="convnet (RegNetY)")
    out = [
        Claim("a convnet teacher gives a better student than a transformer teacher",
              m.top1("pretrain/deit"), m.top1("pretrain/deit_vit_teacher"), T2,
              paper=(ref.number(t2, conv, "student_top1_pretrain_224"),
                     ref.number(t2, deit_b, "student_top1_pretrain_224"))),
        Claim("DeiT⚗ (distillation token, class+distil.) beats no distillation", joint,
              m.top1("pretrain/none", "cls"), T3,
              paper=(p3("DeiT-alembic: class+distillation"), p3("DeiT - no distillation"))),
        Claim("hard distillation beats usual (soft) distillation", m.top1("pretrain/hard", "cls"),
              m.top1("pretrain/soft", "cls"), T3,
              paper=(p3("DeiT - hard distillation"), p3("DeiT - usual distillation"))),
        Claim("usual (soft) distillation is at least as good as none", m.top1("pretrain/soft",
                                                                                 "cls"),
              m.top1("pretrain/none", "cls"), T3, op="≥",
              paper=(p3("DeiT - usual distillation"), p3("DeiT - no distillation"))),
        Claim("the distillation token beats hard distillation on the class token alone", joint,
              m.top1("pretrain/hard", "cls"), T3,
              paper=(p3("DeiT-alembic: class+distillation"), p3("DeiT - hard distillation"))),
        Claim("the distillation head is at least as good as the class head", dist, cls, T3,
              op="≥", paper=(p3("DeiT-alembic: distil. embedding"),
                             p3("DeiT-alembic: class embedding"))),
        Claim("the joint classifier is at least as good as either head (per seed, the better "
              "one)", joint, _max_stat(cls, dist), T3, op="≥",
              paper=(p3("DeiT-alembic: class+distillation"),
                     p3("DeiT-alembic: distil. embedding"))),
        Claim("the distilled student agrees more with the convnet teacher than the scratch "
              "student does: disagreement(teacher, DeiT) − disagreement(teacher, DeiT⚗ joint)",
              disagreement(c, eval_names["teacher"], eval_names["DeiT (no distillation)"]),
              disagreement(c, eval_names["teacher"], eval_names["DeiT⚗ class+distil."]), T4,
              unit="disagreement (fraction)", digits=3,
              paper=(ref.number(t4, p4, "DeiT_no_distill"),
                     ref.number(t4, p4, "DeiT-alembic_class+distil"))),
        Claim("fine-tuning at a higher resolution beats the pretraining resolution (vs the "
              "same epochs at the pretraining resolution)", m.top1("finetune/bicubic"),
              m.top1("finetune/control"), T10,
              paper=(p3("DeiT-alembic: class+distillation", "top1_DeiT-B_384"),
                     p3("DeiT-alembic: class+distillation"))),
        Claim("bicubic positional-embedding resampling beats bilinear, after fine-tuning",
              m.top1("finetune/bicubic"), m.top1("finetune/bilinear"), T10,
              paper_note="no number printed (§6 text)"),
        Claim("bicubic positional-embedding resampling beats bilinear, right after resampling",
              _first_stat(m.stat("finetune/bicubic", "before_finetune", "test_joint_top1"),
                          m.stat("finetune/bicubic", "before_finetune", "test_cls_top1")),
              _first_stat(m.stat("finetune/bilinear", "before_finetune", "test_joint_top1"),
                          m.stat("finetune/bilinear", "before_finetune", "test_cls_top1")),
              T10, paper_note="no number printed (§6 text)"),
    ]
    for ds in c.params.transfer.datasets:
        t7, s54 = "table7_transfer_learning", "sec5_4_cifar10_from_scratch"
        col = _TABLE7_COLUMNS.get(ds, "cifar10")
        out.append(Claim(
            f"pretraining beats training from scratch for transfer to {ds}",
            m.top1(f"transfer/{ds}-pretrained"), m.top1(f"transfer/{ds}-scratch"), T7,
            paper=(ref.number(t7, ref.row(t7, model="DeiT-B"), col),
                   ref.number(s54, ref.row(s54, model="DeiT-B"),
                              "cifar10_top1_trained_from_scratch") if col == "cifar10" else None),
            paper_note="" if ds in _TABLE7_COLUMNS else "CIFAR-10 (analogue)"))
    out.append(Claim(
        "distillation keeps gaining with more epochs: the gap DeiT⚗ − DeiT at the last "
        "evaluated epoch vs at the first", _gap_at(by_epoch, max), _gap_at(by_epoch, min), F3,
        op="≥",
        paper_note="Fig. 3: no distillation saturates after 400 epochs, DeiT⚗ still gains at "
                   "1000 (anchors in figure3_epochs.md)"))
    return out


def claims(c: Context, by_epoch: dict[str, dict[int, Stat]]) -> Table:
    """The paper's qualitative claims, checked at this profile's scale."""
    t = Table("claims", "The paper's claims at this scale", [
        "claim", "verdict", "margin", "seed spread", "per seed", "unit", "measured", "paper",
        "table"], latex=False)
    t.notes = ["Claim \"a > b\": margin = mean over seeds of the per-seed a − b (a single "
               "teacher run serves every seed); it **holds** when the margin is positive and "
               "larger than the seed spread (the larger of the two sample stds), is **weak** when "
               "positive but within the spread, and **does not hold here** otherwise (for ≥ "
               "claims a zero margin is weak). Paper: the same margin on ImageNet, DeiT-B."]
    for cl in claim_list(c, by_epoch):
        t.add_row(_claim_row(cl), digits=cl.digits)
    return t


# --------------------------------------------------------------------------------------------------
# Provenance: every cell's sources, every file's sha256
# --------------------------------------------------------------------------------------------------


def trace(csv_path: Path) -> dict[tuple[int, str], tuple[str, ...]]:
    """The sources of every cell of a results CSV: ``{(data row index, column): sources}``.

    Reads ``provenance.json`` beside the CSV; cells without a number (labels, "–") have none.
    """
    csv_path = Path(csv_path)
    prov = json.loads((csv_path.parent / "provenance.json").read_text())
    cells = prov["tables"][csv_path.stem]["cells"]
    return {(int(r), col): tuple(srcs) for r, cols in cells.items() for col, srcs in cols.items()}


def resolve(source: str, *, metrics: Path, reference: Path = REFERENCE,
            params: Params | None = None) -> Any:
    """The value a source points at: a JSON node, a reference CSV's cell (as printed), for a
    history CSV the list of every seed's value at that epoch, for ``params:a.b`` the param."""
    if source.startswith("params:"):
        if params is None:
            raise ValueError(f"{source} is a param: pass params=")
        node: Any = params
        for key in source[len("params:"):].split(" ")[0].split("=")[0].split("."):
            node = getattr(node, key)
        return node
    path, _, frag = source.partition("#")
    ref = Reference(reference)
    if path.startswith(ref.prefix + "/"):
        q = dict(kv.split("=", 1) for kv in frag.split("&"))
        df = pd.read_csv(Path(reference) / path[len(ref.prefix) + 1:], dtype=str,
                         keep_default_na=False)
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


def stale(results: Path, *, metrics: Path, reference: Path = REFERENCE) -> list[str]:
    """Files named in ``results/provenance.json`` whose sha256 changed since the tables were
    written (or that are gone): the tables need regenerating."""
    prov = json.loads((Path(results) / "provenance.json").read_text())
    ref_prefix = Reference(reference).prefix
    out = []
    for name, sha in sorted(prov["files"].items()):
        if name.startswith(ref_prefix + "/"):
            path = Path(reference) / name[len(ref_prefix) + 1:]
        else:
            path = Path(metrics) / name.split("/", 1)[1]
        if not path.is_file() or atomic.sha256_file(path) != sha:
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _readme(c: Context, context: str, claims_t: Table, headline: Table,
            written: list[Table]) -> str:
    p = c.params
    lines = [
        f"# Results — profile `{p.profile}`", "",
        "Generated by `deit-repro tables` (the `tables` stage of dvc.yaml) from the metrics files "
        "of the run; do not edit by hand. Every number's source is in "
        "[provenance.json](provenance.json) (`deit_repro.tables.trace` / `resolve`).", "",
        f"Settings: {context}", "",
        "## The paper's claims at this scale", "", to_markdown(claims_t, context).split(
            "\n\n", 1)[1].rstrip("\n"), "",
        "## Headline: Table 3 analogue", "", to_markdown(headline, context).rstrip("\n"), "",
        "## Figures", "",
        "![Figure 3 analogue: top-1 vs epochs](figure3_epochs.png)", "",
        "![Figure 1 analogue: top-1 vs throughput](figure1_throughput_accuracy.png)", "",
        "## All tables", ""]
    for t in written:
        links = [f"[md]({t.name}.md)", f"[csv]({t.name}.csv)"]
        if t.latex:
            links.append(f"[tex]({t.name}.tex)")
        if t.figure:
            links.append(f"[png]({t.figure})")
        lines.append(f"- {t.title}: " + ", ".join(links))
    return "\n".join(lines) + "\n"


def run_tables(params: Params, *, metrics: Path, out: Path,
               reference: Path = REFERENCE) -> list[Path]:
    """Write every table and figure of this profile into ``out`` from ``metrics``.

    Args:
        params: the parsed params (profile, seeds, eval, student.model, finetune.img_size,
            transfer.datasets are read).
        metrics: the metrics directory of the DAG (metrics/).
        out: the results directory.
        reference: the paper's numbers (reference/paper/).

    Returns:
        The files written, in order.
    """
    m, ref = Metrics(metrics), Reference(reference)
    c = Context(params, m, ref)
    out = Path(out)
    written: list[Path] = []
    tables: list[Table] = []
    provenance: dict[str, Any] = {}
    files: set[Path] = set()

    def label(p: Path) -> str:
        if p.is_relative_to(ref.root):
            return f"{ref.prefix}/{p.relative_to(ref.root).as_posix()}"
        return f"{m.prefix}/{p.relative_to(m.root).as_posix()}"

    def emit(t: Table, png: bytes | None = None) -> None:
        context = c.caption()
        paths = {out / f"{t.name}.md": to_markdown(t, context), out / f"{t.name}.csv": to_csv(t)}
        if t.latex:
            paths[out / f"{t.name}.tex"] = to_latex(t, context)
        for path, text in paths.items():
            atomic.write_text(path, text)
            written.append(path)
        if png is not None and t.figure:
            atomic.write_bytes(out / t.figure, png)
            written.append(out / t.figure)
        provenance[t.name] = {
            "outputs": sorted(p.name for p in paths) + ([t.figure] if png and t.figure else []),
            "files": sorted({label(p) for p in m.read | ref.read} | {
                s.split("#", 1)[0] for row in t.rows for cell in row for s in cell.sources
                if not s.startswith("params:")}),
            "cells": {str(i): {col: list(cell.sources) for col, cell in zip(t.columns, row)
                               if cell.sources} for i, row in enumerate(t.rows)}}
        files.update(m.read | ref.read)
        m.read.clear()
        ref.read.clear()
        tables.append(t)

    emit(table1(c))
    emit(table2(c))
    headline = table3(c)
    emit(headline)
    emit(table4(c))
    t5, points = table5(c)
    emit(t5, figures.figure1(points, title=f"Top-1 vs throughput — profile {params.profile}"))
    emit(table7(c))
    emit(table10(c))
    f3, curves, by_epoch = figure3(c)
    emit(f3, figures.figure3(curves, title=f"Top-1 vs epochs — profile {params.profile}, "
                                           f"seeds {list(params.seeds)}"))
    claims_t = claims(c, by_epoch)
    emit(claims_t)

    context = c.caption()
    readme = out / "README.md"
    atomic.write_text(readme, _readme(c, context, claims_t, headline, tables[:-1]))
    written.append(readme)

    prov = {"about": "Sources of every number in results/: per table, each cell's (data row "
                     "index, column) -> files#location (JSON pointer; CSV row/column; history "
                     "column/epoch); `files`: sha256 of every file the tables stage read.",
            "files": {label(p): atomic.sha256_file(p) for p in sorted(files, key=label)},
            "tables": provenance}
    prov_path = out / "provenance.json"
    atomic.write_json(prov_path, prov)
    written.append(prov_path)
    _logger.info("wrote %d files to %s", len(written), out)
    return written
