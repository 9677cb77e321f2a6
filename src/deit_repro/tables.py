"""The tables stage (DESIGN.md stage 7): the paper's tables regenerated from metrics files.

Every number comes from an evaluate JSON given on the command line; nothing is typed by hand.
Output is deterministic (sorted, fixed decimals) so a rerun on the same metrics is byte-identical.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pandas as pd

from deit_repro import atomic
from deit_repro.config import Params

_logger = logging.getLogger(__name__)


def heads_table(evaluations: list[dict]) -> pd.DataFrame:
    """One row per (evaluation, model): top-1 of the class, distillation and joint heads
    (paper Table 3 columns), throughput and parameter count."""
    rows = []
    for ev in evaluations:
        for name, m in ev["models"].items():
            heads = m["heads"]
            rows.append({
                "model": name, "img_size": m["img_size"], "params": m["params"],
                "cls_top1": heads["cls"]["top1"],
                "dist_top1": heads.get("dist", {}).get("top1"),
                "joint_top1": heads.get("joint", {}).get("top1"),
                "top1": m["top1"], "top5": heads.get("joint", heads["cls"])["top5"],
                "images_per_s": m.get("throughput", {}).get("images_per_s"),
            })
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, caption: str) -> str:
    """A GitHub-Markdown table with fixed decimals (no optional dependency on tabulate)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    buf = io.StringIO()
    buf.write(f"{caption}\n\n| " + " | ".join(df.columns) + " |\n")
    buf.write("|" + "|".join("---" for _ in df.columns) + "|\n")
    for row in df.itertuples(index=False):
        buf.write("| " + " | ".join(cell(v) for v in row) + " |\n")
    return buf.getvalue()


def run_tables(params: Params, *, evaluations: list[Path], out: Path) -> list[Path]:
    """Write the distillation-methods table (Table 3 analogue) as Markdown and CSV into ``out``."""
    evs = [json.loads(Path(p).read_text()) for p in evaluations]
    df = heads_table(evs)
    caption = (f"Table 3 analogue — profile `{params.profile}`, test split, top-1 (%), final "
               f"epoch, eval crop {params.eval.crop_pct} {params.eval.interpolation}, raw weights")
    md, csv = out / "table3_distillation.md", out / "table3_distillation.csv"
    atomic.write_text(md, to_markdown(df, caption))
    atomic.write_text(csv, df.to_csv(index=False, float_format="%.2f", lineterminator="\n"))
    return [md, csv]
