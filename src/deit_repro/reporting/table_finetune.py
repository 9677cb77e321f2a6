"""Fine-tuning at a higher resolution (paper §6, Table 10): the headline model's positional
embedding resampled bicubic (the paper's choice) or bilinear (an ablation), and a control that
spends the same epochs at the pretraining resolution."""

from __future__ import annotations

from deit_repro.reporting.cells import DASH, NOT_RUN, Cell, first_stat, pointer
from deit_repro.reporting.context import Context
from deit_repro.reporting.table_models import throughput
from deit_repro.reporting.writers import Table


TABLE10_RUNS = (  # (run, what, paper fine-tuning resolution)
    ("control", "same extra epochs at the pretraining resolution", "224"),
    ("bicubic", "higher resolution, bicubic pos. embedding (paper)", "384"),
    ("bilinear", "higher resolution, bilinear pos. embedding (ablation)", None),
)


def table10(c: Context) -> Table:
    """Fine-tuning resolution and positional-embedding interpolation (paper §6, Table 10)."""
    ref = "table10_finetune_resolution"
    t = Table(
        "table10_finetune_resolution",
        "Table 10 analogue: fine-tuning resolution and pos.-embedding interpolation",
        [
            "run",
            "what",
            "from px",
            "to px",
            "pos. embedding",
            "epochs",
            "top-1 right after resampling",
            "top-1 after fine-tuning",
            "images/s",
            "paper fine-tuning px",
            "paper top-1",
            "paper images/s",
            "paper source",
        ],
    )
    t.notes = [
        "The headline DeiT⚗ (class+distillation head) resampled to the target resolution, "
        "evaluated before any step (`before_finetune`), then fine-tuned; `control` spends "
        "the same epochs at the pretraining resolution.",
        c.paper_note(
            ref,
            what="DeiT-B trained at 224, no distillation; the paper "
            "prints no bilinear number (§6 text)",
        ),
    ]
    for run, what, paper_px in TABLE10_RUNS:
        name = f"finetune/{run}"
        if not c.m.has(name):
            t.add_row({"run": run, "what": what, "top-1 after fine-tuning": NOT_RUN})
            continue
        to_px = c.m.get(name)["eval"]["img_size"]
        before = first_stat(
            c.m.stat(name, "before_finetune", "test_joint_top1"),
            c.m.stat(name, "before_finetune", "test_cls_top1"),
        )
        after = c.m.top1(name)
        ips, _, _ = throughput(
            c, "deit_distilled" if to_px == c.pre_px else f"deit_distilled_{to_px}"
        )
        prow = c.ref.row(ref, finetune_image_size=paper_px) if paper_px else None
        src = c.m.path(name) + "#"
        t.add_row(
            {
                "run": run,
                "what": what,
                "from px": Cell(
                    str(c.m.field(name, "from_img_size")), (src + pointer("from_img_size"),)
                ),
                "to px": Cell(str(to_px), (src + pointer("eval", "img_size"),)),
                "pos. embedding": c.m.field(name, "interpolation", DASH),
                "epochs": Cell(str(c.m.field(name, "epochs")), (src + pointer("epochs"),)),
                "top-1 right after resampling": before,
                "top-1 after fine-tuning": after,
                "images/s": ips,
                "paper fine-tuning px": c.ref.cell(ref, prow, "finetune_image_size"),
                "paper top-1": c.ref.cell(ref, prow, "imagenet_top1"),
                "paper images/s": c.ref.cell(ref, prow, "throughput_im_per_s"),
                "paper source": c.ref.source(ref, prow),
            }
        )
    return t
