"""The paper's qualitative claims ("a beats b"), each tested at this profile's scale on the
two numbers the paper compares, beside the paper's own margin.

Seeds are paired across the variants compared (seed k of one is trained from the same seed as seed
k of the other): the verdict comes from a 95 % t-interval on the per-seed differences and, where
both sides were evaluated on the same test images, a paired test over those images that separates
test-set noise from seed noise (:mod:`deit_repro.reporting.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from deit_repro.errors import DataError
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
from deit_repro.reporting import stats
from deit_repro.reporting.context import Context
from deit_repro.reporting.table_distillation import (
    TABLE4,
    budget_run,
    classifier,
    disagreement,
)
from deit_repro.reporting.table_transfer import TABLE7_COLUMNS
from deit_repro.reporting.writers import Table


#: per seed and test image, in the claim's unit: (values [seeds, images], the test labels
#: [images]), or None where a run has no per-image predictions (tables without --models)
Side = Callable[[], "tuple[np.ndarray, np.ndarray] | None"]


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
    images: Side | None = None  # a − b per seed and test image
    #: the per-image mean must equal the metrics' (both come from the same final evaluation); the
    #: disagreement of Table 4 is re-evaluated by the evaluate stage, with its own thread count
    exact: bool = True


COLUMNS = [
    "claim",
    "verdict",
    "mean a − b",
    "95 % CI (seeds)",
    "p (seeds)",
    "n seeds",
    "per seed",
    "95 % CI (test images)",
    "p (images)",
    "MDE (80 % power)",
    "unit",
    "measured",
    "paper",
    "table",
]


def _interval(lo: float, hi: float, d: int) -> str:
    if lo != lo or hi != hi:  # nan: fewer than 2 seeds
        return DASH
    return f"[{signed(lo, d)}, {signed(hi, d)}]"


def _claim_row(cl: Claim) -> dict[str, Value]:
    link = Cell(cl.table[1], (), f"[{cl.table[0]}]({cl.table[1]})")
    a, b = cl.a, cl.b
    paper = _paper_margin(cl)
    if not (isinstance(a, Stat) and isinstance(b, Stat)):
        missing = a if isinstance(a, Cell) else b
        state = NOT_RUN if NOT_RUN in (getattr(a, "text", ""), getattr(b, "text", "")) else DASH
        row: dict[str, Value] = {col: DASH for col in COLUMNS}
        return row | {
            "claim": cl.text,
            "verdict": state,
            "mean a − b": missing,
            "unit": cl.unit,
            **paper,
            "table": link,
        }
    diffs = paired(a, b)
    seed = stats.seed_test(diffs)
    side = cl.images() if cl.images is not None else None
    image = stats.image_test(side[0]) if side is not None else None
    if cl.exact and image is not None and abs(image.mean - seed.mean) > 1e-5:
        # The predictions and the metrics files come from the same final evaluation: a gap
        # means one of them is stale.
        raise DataError(
            f"claim {cl.text!r}: per-image predictions give {image.mean:.6f}, the metrics "
            f"files {seed.mean:.6f}",
            "re-run the training stages whose predictions.npy is older (dvc repro)",
        )
    src = a.sources + b.sources
    d = cl.digits
    return {
        "claim": cl.text,
        "verdict": Cell(stats.verdict(seed, image), src),
        "mean a − b": Cell(signed(seed.mean, d), src),
        "95 % CI (seeds)": Cell(_interval(seed.lo, seed.hi, d), src),
        "p (seeds)": Cell(stats.fmt_p(seed.p), src),
        "n seeds": Cell(str(seed.n), src),
        "per seed": Cell(" / ".join(signed(x, d) for x in diffs), src),
        "95 % CI (test images)": Cell(_interval(image.lo, image.hi, d), src) if image else DASH,
        "p (images)": Cell(stats.fmt_p(image.p, floor=image.p_floor), src) if image else DASH,
        "MDE (80 % power)": Cell(DASH if seed.mde != seed.mde else num(seed.mde, d), src),
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


class _Images:
    """Per-image a − b builders over the runs' predictions (``Predictions``), seeds in params
    order, in the claim's unit. Each side is ``(values [seeds, images], labels [images])``; a
    difference of two sides refuses two different test sets."""

    def __init__(self, c: Context):
        self.pred, self.seeds = c.pred, list(c.params.seeds)

    def hits(self, name: str, head: str | None = None) -> Side:
        def side():
            got = self.pred.hits(name, head, self.seeds)
            return None if got is None else (got, self.pred.labels(name, self.seeds))

        return side

    def minus(self, a: Side, b: Side) -> Side:
        def side():
            x, y = a(), b()
            if x is None or y is None:
                return None
            if not np.array_equal(x[1], y[1]):
                raise DataError(
                    "a claim compares predictions on two different test sets (their labels differ)",
                    "evaluate both models on the same prepared dataset",
                )
            return x[0] - y[0], x[1]

        return side

    def disagrees(self, name: str, head: str | None, other: str) -> Side:
        """1 where ``name``'s head and ``other``'s reported head predict different classes."""

        def side():
            x = self.pred.classes(name, head, self.seeds)
            y = self.pred.classes(other, None, self.seeds)
            labels = self.pred.labels(name, self.seeds)
            if x is None or y is None or labels is None:
                return None
            if not np.array_equal(labels, self.pred.labels(other, self.seeds)):
                raise DataError(
                    f"{name} and {other} were evaluated on different test sets",
                    "evaluate both models on the same prepared dataset",
                )
            return (x != y).astype(np.float64), labels

        return side


#: where each claim's numbers are shown: (the paper's table, the results file)
T2 = ("Table 2", "table2_teacher.md")
T3 = ("Table 3", "table3_distillation.md")
T4 = ("Table 4", "table4_disagreement.md")
T7 = ("Table 7", "table7_transfer.md")
T10 = ("Table 10", "table10_finetune_resolution.md")
F3 = ("Figure 3", "figure3_epochs.md")


def claim_list(c: Context) -> list[Claim]:
    """Every claim the DAG's metrics can test, in the order of the claims table: distillation
    (Tables 2-4), fine-tuning at a higher resolution (Table 10), transfer (Table 7), Figure 3."""
    img = _Images(c)
    return [
        *_distillation_claims(c, img),
        *_finetune_claims(c, img),
        *_transfer_claims(c, img),
        *_figure3_claims(c, img),
    ]


def _p3(c: Context, method: str, col: str = "top1_DeiT-B_224") -> Stat | None:
    t3 = "table3_distillation_methods"
    return c.ref.number(t3, c.ref.row(t3, method=method), col)


def _distillation_claims(c: Context, img: _Images) -> list[Claim]:
    """Tables 2, 3 and 4: the teacher, the distillation methods, the heads, the agreement."""
    m, ref = c.m, c.ref

    def p3(method: str) -> Stat | None:
        return _p3(c, method)

    t2 = "table2_teacher_comparison"
    t4 = "table4_disagreement"
    conv, deit_b = (
        ref.row(t2, paper_version="arXiv_v2", teacher_model=x) for x in ("RegNetY-16GF", "DeiT-B")
    )
    cls, dist, joint = (m.top1("pretrain/deit", h) for h in ("cls", "dist", "joint"))
    eval_names = {label: classifier(c, names) for label, names, _, _ in TABLE4}
    p4 = ref.row(t4, row_classifier="convnet (RegNetY)")
    return [
        Claim(
            "a convnet teacher gives a better student than a transformer teacher",
            m.top1("pretrain/deit"),
            m.top1("pretrain/deit_vit_teacher"),
            T2,
            paper=(
                ref.number(t2, conv, "student_top1_pretrain_224"),
                ref.number(t2, deit_b, "student_top1_pretrain_224"),
            ),
            images=img.minus(img.hits("pretrain/deit"), img.hits("pretrain/deit_vit_teacher")),
        ),
        Claim(
            "DeiT⚗ (distillation token, class+distil.) beats no distillation",
            joint,
            m.top1("pretrain/none", "cls"),
            T3,
            paper=(p3("DeiT-alembic: class+distillation"), p3("DeiT - no distillation")),
            images=img.minus(img.hits("pretrain/deit", "joint"), img.hits("pretrain/none", "cls")),
        ),
        Claim(
            "hard distillation beats usual (soft) distillation",
            m.top1("pretrain/hard", "cls"),
            m.top1("pretrain/soft", "cls"),
            T3,
            paper=(p3("DeiT - hard distillation"), p3("DeiT - usual distillation")),
            images=img.minus(img.hits("pretrain/hard", "cls"), img.hits("pretrain/soft", "cls")),
        ),
        Claim(
            "usual (soft) distillation is at least as good as none",
            m.top1("pretrain/soft", "cls"),
            m.top1("pretrain/none", "cls"),
            T3,
            op="≥",
            paper=(p3("DeiT - usual distillation"), p3("DeiT - no distillation")),
            images=img.minus(img.hits("pretrain/soft", "cls"), img.hits("pretrain/none", "cls")),
        ),
        Claim(
            "the distillation token beats hard distillation on the class token alone",
            joint,
            m.top1("pretrain/hard", "cls"),
            T3,
            paper=(p3("DeiT-alembic: class+distillation"), p3("DeiT - hard distillation")),
            images=img.minus(img.hits("pretrain/deit", "joint"), img.hits("pretrain/hard", "cls")),
        ),
        Claim(
            "the distillation head is at least as good as the class head",
            dist,
            cls,
            T3,
            op="≥",
            paper=(p3("DeiT-alembic: distil. embedding"), p3("DeiT-alembic: class embedding")),
            images=img.minus(img.hits("pretrain/deit", "dist"), img.hits("pretrain/deit", "cls")),
        ),
        # Against each head, not against the better one per seed: choosing the better head on
        # the test set the paired tests then use would bias the comparison against the joint.
        *(
            Claim(
                f"the joint classifier is at least as good as the {label} head",
                joint,
                side,
                T3,
                op="≥",
                paper=(p3("DeiT-alembic: class+distillation"), p3(f"DeiT-alembic: {row}")),
                images=img.minus(
                    img.hits("pretrain/deit", "joint"), img.hits("pretrain/deit", head)
                ),
            )
            for label, side, head, row in (
                ("class", cls, "cls", "class embedding"),
                ("distillation", dist, "dist", "distil. embedding"),
            )
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
            images=img.minus(
                img.disagrees("pretrain/none", "cls", "teacher"),
                img.disagrees("pretrain/deit", "joint", "teacher"),
            ),
            exact=False,
        ),
    ]


def _finetune_claims(c: Context, img: _Images) -> list[Claim]:
    """Table 10: the higher resolution, and the positional embeddings' interpolation (after
    fine-tuning, and right after resampling)."""
    m = c.m
    out = [
        Claim(
            "fine-tuning at a higher resolution beats the pretraining resolution (vs the "
            "same epochs at the pretraining resolution)",
            m.top1("finetune/bicubic"),
            m.top1("finetune/control"),
            T10,
            paper=(
                _p3(c, "DeiT-alembic: class+distillation", "top1_DeiT-B_384"),
                _p3(c, "DeiT-alembic: class+distillation"),
            ),
            images=img.minus(img.hits("finetune/bicubic"), img.hits("finetune/control")),
        ),
        Claim(
            "bicubic positional-embedding resampling beats bilinear, after fine-tuning",
            m.top1("finetune/bicubic"),
            m.top1("finetune/bilinear"),
            T10,
            paper_note="no number printed (§6 text)",
            images=img.minus(img.hits("finetune/bicubic"), img.hits("finetune/bilinear")),
        ),
    ]
    before = [
        first_stat(
            m.stat(f"finetune/{k}", "before_finetune", "test_joint_top1"),
            m.stat(f"finetune/{k}", "before_finetune", "test_cls_top1"),
        )
        for k in ("bicubic", "bilinear")
    ]
    before_head = (
        "before_finetune/joint"
        if any("test_joint_top1" in src for src in getattr(before[0], "sources", ()))
        else "before_finetune/cls"
    )
    out.append(
        Claim(
            "bicubic positional-embedding resampling beats bilinear, right after resampling",
            before[0],
            before[1],
            T10,
            paper_note="no number printed (§6 text)",
            images=img.minus(
                img.hits("finetune/bicubic", before_head),
                img.hits("finetune/bilinear", before_head),
            ),
        )
    )
    return out


def _transfer_claims(c: Context, img: _Images) -> list[Claim]:
    """Table 7: pretrained against from scratch where the profile trains the baseline
    (``transfer.scratch``)."""
    m, ref, out = c.m, c.ref, []
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
                images=img.minus(
                    img.hits(f"transfer/{ds}-pretrained"), img.hits(f"transfer/{ds}-scratch")
                ),
            )
        )
    return out


def _figure3_claims(c: Context, img: _Images) -> list[Claim]:
    """Figure 3: the budgets are separate runs, seeds paired across budgets."""
    budgets = c.params.budget_epochs()
    lo, hi = budgets[0], budgets[-1]
    run = {(k, e): budget_run(c, k, e) for k in ("none", "deit") for e in (lo, hi)}
    top1 = {key: c.m.top1(name) for key, name in run.items()}
    note = (
        "Fig. 3: no distillation saturates after 400 epochs, DeiT⚗ still gains at 1000 "
        "(anchors in figure3_epochs.md)"
    )

    def gap(e: int) -> Stat | Cell:
        a, b = top1[("deit", e)], top1[("none", e)]
        if not (isinstance(a, Stat) and isinstance(b, Stat)):
            return a if isinstance(a, Cell) else b
        return Stat.over(paired(a, b), a.sources + b.sources)

    out = []
    if len(budgets) < 2:
        return out
    out.append(
        Claim(
            f"distillation gains more with a longer schedule: the gap DeiT⚗ − DeiT at {hi} "
            f"epochs vs at {lo} (a run per budget)",
            gap(hi),
            gap(lo),
            F3,
            paper_note=note,
            images=img.minus(
                img.minus(img.hits(run[("deit", hi)]), img.hits(run[("none", hi)])),
                img.minus(img.hits(run[("deit", lo)]), img.hits(run[("none", lo)])),
            ),
        )
    )
    # The paper's "DeiT⚗ still gains": 1000 epochs against its 300-epoch schedule; here the
    # longest budget against the pretrain stage's schedule, or the budget before it when the
    # pretrain schedule is the longest.
    main = c.params.student.train.epochs
    prev = main if hi != main else budgets[-2]
    out.append(
        Claim(
            f"DeiT⚗ keeps gaining with more epochs: {hi} epochs beats {prev} (a run per budget)",
            c.m.top1(budget_run(c, "deit", hi)),
            c.m.top1(budget_run(c, "deit", prev)),
            F3,
            paper=(_anchor(c, 1000), _anchor(c, 300)),
            paper_note="DeiT-B⚗ 1000 vs 300 epochs",
            images=img.minus(
                img.hits(budget_run(c, "deit", hi)), img.hits(budget_run(c, "deit", prev))
            ),
        )
    )
    return out


def _anchor(c: Context, epochs: int) -> Stat | None:
    ref = "figure3_epochs_anchors_from_tables_and_text"
    row = c.ref.row(ref, series="DeiT-B alembic (distillation token)", epochs=str(epochs))
    return c.ref.number(ref, row, "imagenet_top1")


def claims(c: Context) -> Table:
    """The paper's claims, each tested at this profile's scale."""
    t = Table("claims", "The paper's claims at this scale", COLUMNS, latex=False)
    t.notes = [
        'Claim "a > b" (or "a ≥ b"): a − b per seed, seeds paired across the two sides ('
        + c.teacher_note()
        + "). "
        + stats.RULE
        + " Paper: the same margin on "
        "ImageNet, DeiT-B. For a ≥ claim, an interval spanning 0 is what the claim predicts "
        "(no loss), reported as not resolved."
    ]
    for cl in claim_list(c):
        t.add_row(_claim_row(cl), digits=cl.digits)
    return t
