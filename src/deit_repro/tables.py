"""The tables stage (DESIGN.md stage 7): the paper's tables regenerated from the metrics files.

Every number comes from a metrics file of the DAG (``metrics/``); the paper's numbers come from
``reference/paper/*.csv`` (with their ``source`` column). Output is deterministic (fixed decimals,
fixed row order) so a rerun on the same metrics is byte-identical.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from deit_repro import atomic
from deit_repro.config import Params
from deit_repro.errors import DataError

_logger = logging.getLogger(__name__)

REFERENCE = Path(__file__).resolve().parents[2] / "reference" / "paper"


# --------------------------------------------------------------------------------------------------
# Reading metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean, sample std and the per-seed values."""

    mean: float
    std: float
    values: tuple[float, ...]

    @staticmethod
    def of(node: Any) -> "Stat":
        if isinstance(node, dict) and "mean" in node:
            return Stat(node["mean"], node["std"], tuple(node["values"]))
        return Stat(float(node), 0.0, (float(node),))

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if len(self.values) > 1 else f"{self.mean:.2f}"


class Metrics:
    """The metrics directory of a run of the DAG, read once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"metrics directory {root} does not exist",
                            "run the training and evaluate stages first (dvc repro)")
        self.files = {str(p.relative_to(self.root).with_suffix("")): p
                      for p in sorted(self.root.rglob("*.json"))}
        self._cache: dict[str, dict] = {}

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> dict:
        if name not in self.files:
            raise DataError(f"metrics file {self.root / name}.json is missing",
                            "run the stage that writes it (see dvc.yaml)")
        if name not in self._cache:
            self._cache[name] = json.loads(self.files[name].read_text())
        return self._cache[name]

    def top1(self, name: str, head: str = "cls") -> Stat:
        return Stat.of(self.get(name)["heads"][head]["top1"])


def paper(name: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE / f"{name}.csv")


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def to_markdown(df: pd.DataFrame, caption: str) -> str:
    """A GitHub-Markdown table with the caption above it (no dependency on tabulate)."""
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    buf = io.StringIO()
    buf.write(f"{caption}\n\n| " + " | ".join(map(str, df.columns)) + " |\n")
    buf.write("|" + "|".join("---" for _ in df.columns) + "|\n")
    for row in df.itertuples(index=False):
        buf.write("| " + " | ".join(cell(v) for v in row) + " |\n")
    return buf.getvalue()


def _write(out: Path, name: str, df: pd.DataFrame, caption: str) -> list[Path]:
    md, csv = out / f"{name}.md", out / f"{name}.csv"
    atomic.write_text(md, to_markdown(df, caption))
    atomic.write_text(csv, df.to_csv(index=False, float_format="%.2f", lineterminator="\n"))
    return [md, csv]


def _caption(params: Params, what: str, m: Metrics) -> str:
    ev = m.get("evaluate")["eval"] if m.has("evaluate") else {}
    return (f"**{what}** — profile `{params.profile}`, seeds {list(params.seeds)} (mean ± std), "
            f"test split, top-1 %, final epoch, {ev.get('weights', 'raw weights')}, eval crop "
            f"{params.eval.crop_pct} {params.eval.interpolation}. Paper columns: "
            "reference/paper/ (ImageNet).")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def table3(params: Params, m: Metrics) -> pd.DataFrame:
    """Distillation methods (paper Table 3), at the pretraining and the fine-tuned resolution."""
    ref = paper("table3_distillation_methods")
    deit_kind = m.get("pretrain/deit")["distill"] if m.has("pretrain/deit") else params.distill
    rows = [
        ("DeiT - no distillation", "pretrain/none", "cls", "none", "no"),
        ("DeiT - usual distillation", "pretrain/soft", "cls", "soft", "no"),
        ("DeiT - hard distillation", "pretrain/hard", "cls", "hard", "no"),
        ("DeiT-alembic: class embedding", "pretrain/deit", "cls", deit_kind, "yes"),
        ("DeiT-alembic: distil. embedding", "pretrain/deit", "dist", deit_kind, "yes"),
        ("DeiT-alembic: class+distillation", "pretrain/deit", "joint", deit_kind, "yes"),
    ]
    out = []
    ft = "finetune/bicubic"
    for method, name, head, kind, token in rows:
        s = m.top1(name, head)
        fine = m.top1(ft, head) if m.has(ft) and head in m.get(ft)["heads"] and name == \
            "pretrain/deit" else None
        p = ref[ref["method"] == method].iloc[0]
        out.append({
            "method": method, "teacher": kind, "dist. token": token,
            f"top-1 @{params.student.model.img_size}px": str(s),
            f"top-1 @{params.finetune.img_size}px (fine-tuned)": str(fine) if fine else "–",
            "per seed": " / ".join(f"{v:.2f}" for v in s.values),
            "paper DeiT-Ti": p["top1_DeiT-Ti_224"], "paper DeiT-B": p["top1_DeiT-B_224"],
            "paper DeiT-B↑384": p["top1_DeiT-B_384"]})
    return pd.DataFrame(out)


def teacher_table(params: Params, m: Metrics) -> pd.DataFrame:
    t = m.get("teacher")
    return pd.DataFrame([{
        "teacher": t.get("arch", "teacher"), "top-1": str(m.top1("teacher")),
        "student (DeiT-alembic joint)": str(m.top1("pretrain/deit", "joint")),
        "student without distillation": str(m.top1("pretrain/none"))}])


def finetune_table(params: Params, m: Metrics) -> pd.DataFrame:
    """Fine-tuning resolution and positional-embedding interpolation (paper §6, Table 10)."""
    rows = []
    for name, what in (("control", "same epochs at the pretraining resolution"),
                       ("bicubic", "higher resolution, bicubic pos. embedding (paper)"),
                       ("bilinear", "higher resolution, bilinear pos. embedding (ablation)")):
        key = f"finetune/{name}"
        if not m.has(key):
            continue
        f = m.get(key)
        before = f.get("before_finetune", {})
        rows.append({
            "run": name, "what": what, "from px": _scalar(f.get("from_img_size")),
            "to px": _scalar(f["eval"]["img_size"]),
            "top-1 before fine-tuning": str(Stat.of(before["test_joint_top1"]))
            if "test_joint_top1" in before else "–",
            "top-1 after": str(m.top1(key, "joint" if "joint" in f["heads"] else "cls"))})
    return pd.DataFrame(rows)


def transfer_table(params: Params, m: Metrics) -> pd.DataFrame:
    """Transfer learning (paper Table 7): pretrained vs from scratch per downstream dataset."""
    rows = []
    for ds in params.transfer.datasets:
        pre, scr = f"transfer/{ds}-pretrained", f"transfer/{ds}-scratch"
        if m.has(pre) and m.has(scr):
            a, b = m.top1(pre, "joint" if "joint" in m.get(pre)["heads"] else "cls"), m.top1(scr)
            rows.append({"dataset": ds, "pretrained (DeiT-alembic)": str(a),
                         "from scratch": str(b), "gain": round(a.mean - b.mean, 2)})
    return pd.DataFrame(rows)


def _scalar(v: Any) -> Any:
    return v["mean"] if isinstance(v, dict) and "mean" in v else v


# --------------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------------


def _margin(a: Stat, b: Stat) -> tuple[float, float]:
    """Mean of a − b over paired seeds, and the larger of the two spreads."""
    diffs = [x - y for x, y in zip(a.values, b.values)] if len(a.values) == len(b.values) else \
        [a.mean - b.mean]
    return sum(diffs) / len(diffs), max(a.std, b.std)


def claims(params: Params, m: Metrics) -> pd.DataFrame:
    """The paper's qualitative claims, checked at this profile's scale.

    A claim holds when the mean margin is positive *and* larger than the spread across seeds
    (the larger of the two sample stds); "weak" when positive but within the spread.
    """
    rows = []

    def claim(text: str, a: Stat, b: Stat, table: str) -> None:
        margin, spread = _margin(a, b)
        verdict = "holds" if margin > spread and margin > 0 else (
            "weak (within seed spread)" if margin > 0 else "does not hold here")
        rows.append({"claim": text, "verdict": verdict, "margin": f"{margin:+.2f}",
                     "seed spread": f"{spread:.2f}", "evidence": f"{a} vs {b}",
                     "table": table})

    claim("a convnet teacher beats the transformer trained from scratch on little data",
          m.top1("teacher"), m.top1("pretrain/none"), "table3_distillation.md")
    claim("DeiT-alembic (distillation token, joint) beats no distillation",
          m.top1("pretrain/deit", "joint"), m.top1("pretrain/none"), "table3_distillation.md")
    claim("hard distillation beats usual (soft) distillation", m.top1("pretrain/hard"),
          m.top1("pretrain/soft"), "table3_distillation.md")
    claim("soft distillation beats no distillation", m.top1("pretrain/soft"),
          m.top1("pretrain/none"), "table3_distillation.md")
    claim("the distillation token beats hard distillation on the class token",
          m.top1("pretrain/deit", "joint"), m.top1("pretrain/hard"), "table3_distillation.md")
    if m.has("finetune/bicubic") and m.has("finetune/control"):
        claim("fine-tuning at a higher resolution beats the pretraining resolution",
              m.top1("finetune/bicubic", "joint"), m.top1("finetune/control", "joint"),
              "finetune_resolution.md")
    if m.has("finetune/bicubic") and m.has("finetune/bilinear"):
        claim("bicubic positional-embedding resampling beats bilinear",
              m.top1("finetune/bicubic", "joint"), m.top1("finetune/bilinear", "joint"),
              "finetune_resolution.md")
    for ds in params.transfer.datasets:
        pre, scr = f"transfer/{ds}-pretrained", f"transfer/{ds}-scratch"
        if m.has(pre) and m.has(scr):
            claim(f"pretraining beats training from scratch for transfer to {ds}",
                  m.top1(pre, "joint" if "joint" in m.get(pre)["heads"] else "cls"),
                  m.top1(scr), "transfer.md")
    return pd.DataFrame(rows)


def run_tables(params: Params, *, metrics: Path, out: Path) -> list[Path]:
    """Write every table of this profile into ``out`` (Markdown + CSV) from ``metrics``."""
    m = Metrics(metrics)
    written = []
    written += _write(out, "table3_distillation", table3(params, m),
                      _caption(params, "Table 3 analogue: distillation methods", m))
    written += _write(out, "teacher", teacher_table(params, m),
                      _caption(params, "Teacher vs students", m))
    written += _write(out, "finetune_resolution", finetune_table(params, m),
                      _caption(params, "Fine-tuning at a higher resolution (§6, Table 10)", m))
    written += _write(out, "transfer", transfer_table(params, m),
                      _caption(params, "Transfer learning (Table 7 analogue)", m))
    written += _write(out, "claims", claims(params, m),
                      _caption(params, "The paper's claims at this scale", m))
    return written
