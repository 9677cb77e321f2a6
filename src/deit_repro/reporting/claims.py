"""The paper's qualitative claims ("a beats b"), each checked at this profile's scale on the
per-seed margin of the two numbers the paper compares, beside the paper's own margin."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

from deit_repro.reporting.cells import (
    DASH,
    NOT_RUN,
    Cell,
    Stat,
    Value,
    first_stat,
    num,
    paired,
    signed,
)
from deit_repro.reporting.context import Context
from deit_repro.reporting.table_distillation import TABLE4, classifier, disagreement
from deit_repro.reporting.table_transfer import TABLE7_COLUMNS
from deit_repro.reporting.writers import Table


@dataclass(frozen=True)
class Claim:
    text: str
    a: Stat | Cell  # the side the paper says is larger
    b: Stat | Cell
    table: tuple[str, str]  # (label, file)
    op: str = ">"  # ">" or "≥"
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
        return {
            "claim": cl.text,
            "verdict": state,
            "margin": missing,
            "seed spread": DASH,
            "per seed": DASH,
            "unit": cl.unit,
            "measured": DASH,
            **paper,
            "table": link,
        }
    diffs = paired(a, b)
    margin, spread = statistics.fmean(diffs), max(a.std, b.std)
    n = max(len(a.values), len(b.values))
    src = a.sources + b.sources
    d = cl.digits
    return {
        "claim": cl.text,
        "verdict": Cell(verdict(margin, spread, n, cl.op), src),
        "margin": Cell(signed(margin, d), src),
        "seed spread": Cell(num(spread, d), src),
        "per seed": Cell(" / ".join(signed(x, d) for x in diffs), src),
        "unit": cl.unit,
        "measured": Cell(f"{a.fmt(d)} vs {b.fmt(d)}", src),
        **paper,
        "table": link,
    }


def _paper_margin(cl: Claim) -> dict[str, Value]:
    pa, pb = cl.paper
    if pa is None or pb is None:
        return {"paper": cl.paper_note or DASH}
    src = pa.sources + pb.sources
    d = max(pa.digits, pb.digits)  # as printed: no precision the paper does not have
    text = f"{signed(pa.mean - pb.mean, d)} ({num(pa.mean, d)} vs {num(pb.mean, d)})"
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
    return Stat.over(paired(a, b), a.sources + b.sources)


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
    conv, deit_b = (
        ref.row(t2, paper_version="arXiv_v2", teacher_model=x) for x in ("RegNetY-16GF", "DeiT-B")
    )
    cls, dist, joint = (m.top1("pretrain/deit", h) for h in ("cls", "dist", "joint"))
    eval_names = {label: classifier(c, names) for label, names, _, _ in TABLE4}
    p4 = ref.row(t4, row_classifier="convnet (RegNetY)")
    out = [
        Claim(
            "a convnet teacher gives a better student than a transformer teacher",
            m.top1("pretrain/deit"),
            m.top1("pretrain/deit_vit_teacher"),
            T2,
            paper=(
                ref.number(t2, conv, "student_top1_pretrain_224"),
                ref.number(t2, deit_b, "student_top1_pretrain_224"),
            ),
        ),
        Claim(
            "DeiT⚗ (distillation token, class+distil.) beats no distillation",
            joint,
            m.top1("pretrain/none", "cls"),
            T3,
            paper=(p3("DeiT-alembic: class+distillation"), p3("DeiT - no distillation")),
        ),
        Claim(
            "hard distillation beats usual (soft) distillation",
            m.top1("pretrain/hard", "cls"),
            m.top1("pretrain/soft", "cls"),
            T3,
            paper=(p3("DeiT - hard distillation"), p3("DeiT - usual distillation")),
        ),
        Claim(
            "usual (soft) distillation is at least as good as none",
            m.top1("pretrain/soft", "cls"),
            m.top1("pretrain/none", "cls"),
            T3,
            op="≥",
            paper=(p3("DeiT - usual distillation"), p3("DeiT - no distillation")),
        ),
        Claim(
            "the distillation token beats hard distillation on the class token alone",
            joint,
            m.top1("pretrain/hard", "cls"),
            T3,
            paper=(p3("DeiT-alembic: class+distillation"), p3("DeiT - hard distillation")),
        ),
        Claim(
            "the distillation head is at least as good as the class head",
            dist,
            cls,
            T3,
            op="≥",
            paper=(p3("DeiT-alembic: distil. embedding"), p3("DeiT-alembic: class embedding")),
        ),
        Claim(
            "the joint classifier is at least as good as either head (per seed, the better one)",
            joint,
            _max_stat(cls, dist),
            T3,
            op="≥",
            paper=(p3("DeiT-alembic: class+distillation"), p3("DeiT-alembic: distil. embedding")),
        ),
        Claim(
            "the distilled student agrees more with the convnet teacher than the scratch "
            "student does: disagreement(teacher, DeiT) − disagreement(teacher, DeiT⚗ joint)",
            disagreement(c, eval_names["teacher"], eval_names["DeiT (no distillation)"]),
            disagreement(c, eval_names["teacher"], eval_names["DeiT⚗ class+distil."]),
            T4,
            unit="disagreement (fraction)",
            digits=3,
            paper=(
                ref.number(t4, p4, "DeiT_no_distill"),
                ref.number(t4, p4, "DeiT-alembic_class+distil"),
            ),
        ),
        Claim(
            "fine-tuning at a higher resolution beats the pretraining resolution (vs the "
            "same epochs at the pretraining resolution)",
            m.top1("finetune/bicubic"),
            m.top1("finetune/control"),
            T10,
            paper=(
                p3("DeiT-alembic: class+distillation", "top1_DeiT-B_384"),
                p3("DeiT-alembic: class+distillation"),
            ),
        ),
        Claim(
            "bicubic positional-embedding resampling beats bilinear, after fine-tuning",
            m.top1("finetune/bicubic"),
            m.top1("finetune/bilinear"),
            T10,
            paper_note="no number printed (§6 text)",
        ),
        Claim(
            "bicubic positional-embedding resampling beats bilinear, right after resampling",
            first_stat(
                m.stat("finetune/bicubic", "before_finetune", "test_joint_top1"),
                m.stat("finetune/bicubic", "before_finetune", "test_cls_top1"),
            ),
            first_stat(
                m.stat("finetune/bilinear", "before_finetune", "test_joint_top1"),
                m.stat("finetune/bilinear", "before_finetune", "test_cls_top1"),
            ),
            T10,
            paper_note="no number printed (§6 text)",
        ),
    ]
    # Pretrained vs from scratch where the profile trains the baseline (transfer.scratch).
    for ds in c.params.transfer.scratch:
        t7, s54 = "table7_transfer_learning", "sec5_4_cifar10_from_scratch"
        col = TABLE7_COLUMNS.get(ds, "cifar10")
        out.append(
            Claim(
                f"pretraining beats training from scratch for transfer to {ds}",
                m.top1(f"transfer/{ds}-pretrained"),
                m.top1(f"transfer/{ds}-scratch"),
                T7,
                paper=(
                    ref.number(t7, ref.row(t7, model="DeiT-B"), col),
                    ref.number(
                        s54, ref.row(s54, model="DeiT-B"), "cifar10_top1_trained_from_scratch"
                    )
                    if col == "cifar10"
                    else None,
                ),
                paper_note="" if ds in TABLE7_COLUMNS else "CIFAR-10 (analogue)",
            )
        )
    out.append(
        Claim(
            "distillation keeps gaining with more epochs: the gap DeiT⚗ − DeiT at the last "
            "evaluated epoch vs at the first",
            _gap_at(by_epoch, max),
            _gap_at(by_epoch, min),
            F3,
            op="≥",
            paper_note="Fig. 3: no distillation saturates after 400 epochs, DeiT⚗ still gains at "
            "1000 (anchors in figure3_epochs.md)",
        )
    )
    return out


def claims(c: Context, by_epoch: dict[str, dict[int, Stat]]) -> Table:
    """The paper's qualitative claims, checked at this profile's scale."""
    t = Table(
        "claims",
        "The paper's claims at this scale",
        [
            "claim",
            "verdict",
            "margin",
            "seed spread",
            "per seed",
            "unit",
            "measured",
            "paper",
            "table",
        ],
        latex=False,
    )
    t.notes = [
        'Claim "a > b": margin = mean over seeds of the per-seed a − b (a single '
        "teacher run serves every seed); it **holds** when the margin is positive and "
        "larger than the seed spread (the larger of the two sample stds), is **weak** when "
        "positive but within the spread, and **does not hold here** otherwise (for ≥ "
        "claims a zero margin is weak). Paper: the same margin on ImageNet, DeiT-B."
    ]
    for cl in claim_list(c, by_epoch):
        t.add_row(_claim_row(cl), digits=cl.digits)
    return t
