"""Transfer learning (paper Table 7): the headline DeiT⚗ fine-tuned on each downstream dataset of
the profile against the same architecture trained there from scratch (paper §5.4)."""

from __future__ import annotations

from deit_repro.reporting.cells import DASH, difference
from deit_repro.reporting.context import Context
from deit_repro.reporting.writers import Table


#: downstream datasets of the paper's Table 7 (profile dataset name -> paper column)
TABLE7_COLUMNS = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "flowers102": "flowers102",
    "stanford_cars": "stanford_cars",
    "inat2018": "inat18",
    "inat2019": "inat19",
}


def table7(c: Context) -> Table:
    """Transfer learning (paper Table 7): pretrained vs from scratch per downstream dataset."""
    ref, scratch_ref = "table7_transfer_learning", "sec5_4_cifar10_from_scratch"
    t = Table(
        "table7_transfer",
        "Table 7 analogue: transfer learning",
        [
            "dataset",
            "pretrained (DeiT⚗)",
            "from scratch",
            "gain",
            "paper dataset",
            "paper DeiT-B",
            "paper DeiT-B⚗",
            "paper DeiT-B from scratch",
            "paper source",
        ],
    )
    t.notes = [
        "Pretrained: the headline DeiT⚗ fine-tuned on the dataset (its class+distillation "
        "output); from scratch: the same architecture trained there only. Gain: mean of "
        "the per-seed differences ± their std.",
        "A dataset the paper does not have is compared with CIFAR-10, the paper's one "
        "transfer set with a from-scratch number (§5.4). From scratch is trained for the "
        f"datasets of `transfer.scratch` only ({', '.join(c.params.transfer.scratch) or 'none'}); "
        "– elsewhere.",
        "Deviation: the transfer trains without a teacher (plain cross-entropy through the "
        "joint output); the authors kept distilling their distilled models during transfer "
        "(facebookresearch/deit#45), with a teacher for each downstream set that is not "
        "trained here.",
        c.paper_note(ref, scratch_ref, what="DeiT-B rows; from scratch: §5.4"),
    ]
    for ds in c.params.transfer.datasets:
        pre = c.m.top1(f"transfer/{ds}-pretrained")
        # Only the datasets of transfer.scratch get a baseline (the paper has one for CIFAR-10).
        scr = c.m.top1(f"transfer/{ds}-scratch") if ds in c.params.transfer.scratch else DASH
        gain = difference(pre, scr) if ds in c.params.transfer.scratch else DASH
        col = TABLE7_COLUMNS.get(ds)
        paper_ds = col or "cifar10"
        rb = c.ref.row(ref, model="DeiT-B")
        rd = c.ref.row(ref, model="DeiT-B alembic")
        rs = c.ref.row(scratch_ref, model="DeiT-B") if paper_ds == "cifar10" else None
        sources = sorted({c.ref.source(ref, rb).text, c.ref.source(scratch_ref, rs).text} - {DASH})
        t.add_row(
            {
                "dataset": ds,
                "pretrained (DeiT⚗)": pre,
                "from scratch": scr,
                "gain": gain,
                "paper dataset": paper_ds if col else f"{paper_ds} (analogue)",
                "paper DeiT-B": c.ref.cell(ref, rb, paper_ds),
                "paper DeiT-B⚗": c.ref.cell(ref, rd, paper_ds),
                "paper DeiT-B from scratch": c.ref.cell(
                    scratch_ref, rs, "cifar10_top1_trained_from_scratch"
                ),
                "paper source": "; ".join(sources),
            }
        )
    return t
