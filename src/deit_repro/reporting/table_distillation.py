"""The distillation tables: convnet vs transformer teacher (paper Table 2), the distillation
methods (Table 3), the disagreement between classifiers (Table 4) and top-1 against training
epochs with and without distillation (Figure 3)."""

from __future__ import annotations

from typing import Sequence

from deit_repro.reporting import figures, released
from deit_repro.reporting.cells import DASH, NOT_RUN, Cell, Stat, Value, difference, num
from deit_repro.reporting.context import Context, paper_variant
from deit_repro.reporting.writers import Table


def table2(c: Context) -> Table:
    """Teacher comparison (paper Table 2): a convnet and a transformer teacher of the profile."""
    ref = "table2_teacher_comparison"
    t = Table(
        "table2_teacher",
        "Table 2 analogue: convnet vs transformer teacher",
        [
            "teacher",
            "teacher top-1",
            f"student top-1 @{c.pre_px}px",
            "paper teacher",
            "paper teacher top-1",
            "paper student top-1 @224",
            "paper student top-1 ↑384",
            "paper source",
        ],
    )
    t.notes = [
        "Student: the headline DeiT⚗ (class+distillation), distilled from each teacher "
        "(metrics/pretrain/deit.json, metrics/pretrain/deit_vit_teacher.json).",
        c.paper_note(ref, what="arXiv v2 rows; ICML differs for RegNetY-12/16GF, see SOURCES.md"),
    ]
    rows = (
        ("convnet", "teacher", "pretrain/deit", "RegNetY-16GF"),
        ("transformer", "teacher_vit", "pretrain/deit_vit_teacher", "DeiT-B"),
    )
    for kind, teacher, student, paper_teacher in rows:
        arch = c.m.field(teacher, "arch", NOT_RUN if not c.m.has(teacher) else "?")
        prow = c.ref.row(ref, paper_version="arXiv_v2", teacher_model=paper_teacher)
        t.add_row(
            {
                "teacher": f"{kind} ({arch})",
                "teacher top-1": c.m.top1(teacher),
                f"student top-1 @{c.pre_px}px": c.m.top1(student),
                "paper teacher": paper_teacher,
                "paper teacher top-1": c.ref.cell(ref, prow, "teacher_imagenet_top1"),
                "paper student top-1 @224": c.ref.cell(ref, prow, "student_top1_pretrain_224"),
                "paper student top-1 ↑384": c.ref.cell(ref, prow, "student_top1_finetuned_384"),
                "paper source": c.ref.source(ref, prow),
            }
        )
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
    return Cell(" / ".join(num(v, 2) for v in s.values), s.sources)


def table3(c: Context) -> Table:
    """Distillation methods (paper Table 3), at the pretraining and the fine-tuned resolution."""
    ref = "table3_distillation_methods"
    v = paper_variant(c.params)
    paper_cols = ([f"paper {v}"] if v != "DeiT-B" else []) + ["paper DeiT-B", "paper DeiT-B↑384"]
    shipped = released.released_models(c)
    # a released column per DeiT variant evaluated (and its ↑384 one when a 384 model was)
    released_cols = {
        f"released {rv}{'↑384' if px == 384 else ''}": (rv, px)
        for rv in released.variants(shipped)
        for px in (224, 384)
        if px == 224 or any(r.variant == rv and r.img_size == 384 for r in shipped)
    }
    t = Table(
        "table3_distillation",
        "Table 3 analogue: distillation methods",
        [
            "method",
            "teacher supervision",
            "dist. token",
            f"top-1 @{c.pre_px}px",
            f"top-1 ↑{c.ft_px}px (fine-tuned)",
            "per seed",
            *released_cols,
            *paper_cols,
            "paper source",
        ],
    )
    t.notes = [
        f"Headline model fine-tuned at {c.ft_px} px: metrics/finetune/bicubic.json.",
        c.paper_note(ref),
        *filter(None, [released.note(c)]),
    ]
    if released_cols:
        t.notes.append(
            "Released columns: `deit_<size>_patch16_<px>` in the no-distillation row, "
            "`deit_<size>_distilled_patch16_<px>`'s heads in the DeiT⚗ rows; no released "
            "checkpoint was trained with usual or hard distillation on a class token alone."
        )
    paper_col = {
        f"paper {v}": f"top1_{v}_224",
        "paper DeiT-B": "top1_DeiT-B_224",
        "paper DeiT-B↑384": "top1_DeiT-B_384",
    }
    for method, name, head in TABLE3_ROWS:
        s = c.m.top1(name, head)
        kind = c.m.field(name, "distill", NOT_RUN)
        token = c.m.field(name, "dist_token")
        fine: Value = c.m.top1("finetune/bicubic", head) if name == "pretrain/deit" else DASH
        prow = c.ref.row(ref, method=method)
        t.add_row(
            {
                "method": _method_label(method),
                "teacher supervision": kind,
                "dist. token": DASH if token is None else ("yes" if token else "no"),
                f"top-1 @{c.pre_px}px": s,
                f"top-1 ↑{c.ft_px}px (fine-tuned)": fine,
                "per seed": _per_seed(s),
                **{
                    col: _released_cell(c, shipped, name, head, rv, px)
                    for col, (rv, px) in released_cols.items()
                },
                **{col: c.ref.cell(ref, prow, paper_col[col]) for col in paper_cols},
                "paper source": c.ref.source(ref, prow),
            }
        )
    return t


def _released_cell(
    c: Context, shipped: list[released.Released], name: str, head: str, variant: str, px: int
) -> Cell:
    """Table 3's cell of a released checkpoint: the plain DeiT for the no-distillation row, the
    distilled one's ``head`` for the DeiT⚗ rows, a dash for usual and hard distillation (no
    checkpoint was released for them)."""
    if name == "pretrain/none":
        return released.top1(c, released.find(shipped, variant, distilled=False, px=px), "cls")
    if name == "pretrain/deit":
        return released.top1(c, released.find(shipped, variant, distilled=True, px=px), head)
    return Cell(DASH)


#: Table 4's classifiers: (label, evaluate.json names to try, paper row / column)
TABLE4 = (
    ("ground truth", ("ground_truth",), "groundtruth", "groundtruth"),
    ("teacher", ("teacher",), "convnet (RegNetY)", "convnet_RegNetY"),
    ("DeiT (no distillation)", ("none", "none/cls"), "DeiT (no distillation)", "DeiT_no_distill"),
    ("DeiT⚗ class only", ("deit/cls",), "DeiT-alembic - class only", "DeiT-alembic_class_only"),
    (
        "DeiT⚗ distil. only",
        ("deit/dist",),
        "DeiT-alembic - distil. only",
        "DeiT-alembic_distil_only",
    ),
    (
        "DeiT⚗ class+distil.",
        ("deit/joint", "deit"),
        "DeiT-alembic - class+distil.",
        "DeiT-alembic_class+distil",
    ),
)


def classifier(c: Context, names: Sequence[str], file: str = "evaluate") -> str | None:
    if not c.m.has(file):
        return None
    have = c.m.get(file)["disagreement"]
    return next((n for n in names if n in have), None)


def disagreement(c: Context, a: str | None, b: str | None, file: str = "evaluate") -> Stat | Cell:
    """Fraction of test images on which two classifiers disagree (evaluate.json stores %)."""
    if not c.m.has(file):
        return Cell(NOT_RUN)
    if a is None or b is None:
        return Cell(DASH)
    s = c.m.stat(file, "disagreement", a, b)
    return s.scaled(0.01) if isinstance(s, Stat) else s


def table4(c: Context) -> Table:
    """Disagreement between classifiers (paper Table 4), mean ± std over seeds, as a fraction."""
    t = _table4(
        c,
        "table4_disagreement",
        "Table 4 analogue: disagreement between classifiers",
        "evaluate",
        [classifier(c, n) for _, n, _, _ in TABLE4],
    )
    t.notes.insert(
        0,
        "Fraction (0-1, as the paper) of test images on which the row and column "
        "classifiers predict different classes, per seed from metrics/evaluate.json "
        "(stored there in %), mean ± std over seeds.",
    )
    return t


def table4_released(c: Context) -> Table | None:
    """Table 4 of the released checkpoints (``tables --released``): the largest DeiT variant
    with a released DeiT⚗ at 224 px, its plain DeiT, and the released convnet teacher; None
    without a released DeiT⚗."""
    shipped = released.released_models(c)
    variant = next(
        (
            v
            for v in reversed(released.variants(shipped))
            if released.find(shipped, v, distilled=True, px=224)
        ),
        None,
    )
    if variant is None:
        return None
    deit = released.find(shipped, variant, distilled=True, px=224)
    plain = released.find(shipped, variant, distilled=False, px=224)
    teacher = next((r for r in shipped if r.variant is None), None)
    assert deit is not None
    names = [
        "ground_truth",
        teacher.name if teacher else None,
        plain.name if plain else None,
        f"{deit.name}/cls",
        f"{deit.name}/dist",
        f"{deit.name}/joint",
    ]
    t = _table4(
        c,
        "table4_disagreement_released",
        f"Table 4 analogue: disagreement between the released {variant} classifiers",
        released.RELEASED,
        names,
    )
    t.notes.insert(
        0,
        "Fraction (0-1, as the paper) of test images on which the row and column classifiers "
        f"predict different classes: released {deit.timm}'s heads, "
        f"{plain.timm if plain else 'no released plain DeiT'} and "
        f"{teacher.timm if teacher else 'no released convnet teacher'}.",
    )
    t.notes.append(released.note(c))
    return t


def _table4(c: Context, name: str, title: str, file: str, names: list[str | None]) -> Table:
    ref = "table4_disagreement"
    ours = [label for label, *_ in TABLE4]
    paper = [f"paper: {label}" for label in ours]
    t = Table(name, title, ["classifier", *ours, *paper, "paper source"])
    t.notes = [c.paper_note(ref)]
    for (label, _, paper_row, _), a in zip(TABLE4, names):
        prow = c.ref.row(ref, row_classifier=paper_row)
        row: dict[str, Value] = {"classifier": label}
        for (other, _, _, paper_col), b in zip(TABLE4, names):
            cell = disagreement(c, a, b, file)
            # a released model is one set of weights: its number is the same for every seed
            row[other] = released.once(cell, 3) if file == released.RELEASED else cell
            row[f"paper: {other}"] = c.ref.cell(ref, prow, paper_col)
        row["paper source"] = c.ref.source(ref, prow)
        t.add_row(row, digits=3)
    return t


def _range(s: Stat) -> Cell:
    return Cell(f"{num(min(s.values), 2)}–{num(max(s.values), 2)}", s.sources)


def budget_run(c: Context, variant: str, epochs: int) -> str:
    """The metrics name of Figure 3's ``variant`` (none | deit) run of ``epochs`` epochs: the
    pretrain stage's own run for ``student.train.epochs``, else a figure3 stage's."""
    if epochs == c.params.student.train.epochs:
        return f"pretrain/{variant}"
    return f"figure3/{variant}-{epochs}"


FIGURE3_SERIES = (("none", "DeiT (no distillation)"), ("deit", "DeiT⚗ (class+distillation)"))


def figure3(c: Context) -> tuple[Table, list[figures.Curve], dict[str, dict[int, Stat]]]:
    """Top-1 against the training budget with and without distillation (paper Figure 3): one
    run per budget, each with its whole schedule, as a table and curves."""
    ref = "figure3_epochs_anchors_from_tables_and_text"
    t = Table(
        "figure3_epochs",
        "Figure 3 analogue: top-1 vs training epochs",
        [
            "epochs",
            "DeiT (no distillation)",
            "DeiT min–max",
            "DeiT⚗ (class+distil.)",
            "DeiT⚗ min–max",
            "gap DeiT⚗ − DeiT",
        ],
        latex=False,
        figure="figure3_epochs.png",
    )
    budgets = c.params.budget_epochs()
    by: dict[str, dict[int, Stat]] = {}
    for key, _ in FIGURE3_SERIES:
        for e in budgets:
            stat = c.m.top1(budget_run(c, key, e))
            if isinstance(stat, Stat):
                by.setdefault(key, {})[e] = stat
    curves = []
    for key, label in FIGURE3_SERIES:
        points = by.get(key, {})
        epochs = tuple(sorted(points))
        if epochs:
            curves.append(
                figures.Curve(
                    label,
                    epochs,
                    tuple(points[e].mean for e in epochs),
                    tuple(min(points[e].values) for e in epochs),
                    tuple(max(points[e].values) for e in epochs),
                    tuple(points[e].sources for e in epochs),
                )
            )
    anchors = c.ref.table(ref)
    said = "; ".join(
        f"{r.series}: {f'{r.imagenet_top1} at {r.epochs} epochs' if r.imagenet_top1 else r.epochs}"
        f" ({r.source})"
        for r in anchors.itertuples()
        if r.series.startswith(("DeiT-B (no", "DeiT-B alembic (distillation token)"))
    )
    main = c.params.student.train.epochs
    t.notes = [
        "One run per budget and seed, each with its whole schedule (warmup, then the cosine "
        "decay ending at its last epoch), as the paper trained a model per budget: "
        f"metrics/figure3/{{none,deit}}-<epochs>.json, and for {main} epochs the pretrain "
        "stage's runs (metrics/pretrain/{none,deit}.json). Final epoch of each run; mean over "
        "seeds, min–max across seeds as the band. Gap: mean ± std of the per-seed differences "
        "(seeds paired).",
        f"The paper's curve values are not printed; its anchors (DeiT-B, ImageNet, "
        f"`reference/paper/{ref}.csv`): {said}. A different scale (hundreds of epochs), "
        "so they are cited, not plotted.",
    ]
    for e in budgets:
        a, b = by.get("deit", {}).get(e), by.get("none", {}).get(e)
        t.add_row(
            {
                "epochs": Cell(
                    str(e), tuple(c.m.path(budget_run(c, k, e)) for k in ("none", "deit"))
                ),
                "DeiT (no distillation)": b or Cell(NOT_RUN),
                "DeiT min–max": _range(b) if b else DASH,
                "DeiT⚗ (class+distil.)": a or Cell(NOT_RUN),
                "DeiT⚗ min–max": _range(a) if a else DASH,
                "gap DeiT⚗ − DeiT": difference(a, b) if a and b else DASH,
            }
        )
    return t, curves, by
