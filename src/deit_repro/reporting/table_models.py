"""The tables about the models themselves: the DeiT variants (paper Table 1) and top-1 against
measured throughput (paper Table 5 / Figure 1), with the throughput cells other tables reuse."""

from __future__ import annotations

from typing import Any

from deit_repro.reporting import figures, released
from deit_repro.reporting.cells import DASH, NOT_RUN, Cell, Stat, num, pointer
from deit_repro.reporting.context import Context, paper_variant, student_dims
from deit_repro.reporting.writers import Table


def _params_m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def throughput(c: Context, key: str) -> tuple[Cell, Cell, Any]:
    """(images/s cell, params cell, raw entry) of one architecture of metrics/throughput.json."""
    if not c.m.has("throughput"):
        return Cell(NOT_RUN), Cell(NOT_RUN), None
    entry = c.m.get("throughput")["models"].get(key)
    if entry is None:
        return Cell(DASH), Cell(DASH), None
    base = c.m.path("throughput") + "#" + pointer("models", key)
    return (
        Cell(num(entry["images_per_s"], 0), (base + "/images_per_s",)),
        Cell(_params_m(entry["params"]), (base + "/params",)),
        entry,
    )


def _resolution(c: Context, key: str, entry: Any) -> Cell:
    """The resolution an architecture's throughput was measured at (a dash when not measured)."""
    if not entry:
        return Cell(DASH)
    return Cell(
        str(entry["img_size"]), (f"{c.m.path('throughput')}#{pointer('models', key, 'img_size')}",)
    )


def _throughput_note(c: Context) -> str:
    if not c.m.has("throughput"):
        return "Throughput: not run."
    t = c.m.get("throughput")
    any_entry = next(iter(t["models"].values()))
    hw = ", ".join(
        f"{k}={v}" for k, v in sorted(t.get("hardware", {}).items()) if v not in (None, False, "")
    )
    return (
        f"Throughput measured by the `throughput` stage on {any_entry.get('device')}"
        f"{' (' + hw + ')' if hw else ''}, "
        f"{any_entry.get('dtype')}, batch {any_entry.get('batch_size')}, "
        f"{any_entry.get('threads')} thread(s), mean of {any_entry.get('repeats')} timed "
        "passes on synthetic input; params counted from the built models. The paper's: one "
        "V100-16GB, largest batch that fits, float32 (facebookresearch/deit#38)."
    )


def _table1_paper(c: Context, variant: str, row: int | None) -> dict[str, Any]:
    """Table 1's paper columns for the paper's ``variant`` (its row of the reference CSV)."""
    ref = "table1_deit_variants"
    return {
        "paper model": variant,
        "paper embedding dim": c.ref.cell(ref, row, "embedding_dim"),
        "paper heads": c.ref.cell(ref, row, "heads"),
        "paper layers": c.ref.cell(ref, row, "layers"),
        "paper params": c.ref.cell(ref, row, "params"),
        "paper resolution": c.ref.cell(ref, row, "training_resolution"),
        "paper images/s": c.ref.cell(ref, row, "throughput_im_per_s"),
        "paper source": c.ref.source(ref, row),
    }


def table1(c: Context) -> Table:
    """DeiT variants (paper Table 1): dims from params, params and throughput measured."""
    variant = paper_variant(c.params)
    dim, heads, depth = student_dims(c.params)
    ref = "table1_deit_variants"
    prow = c.ref.row(ref, model=variant)
    t = Table(
        "table1_variants",
        "Table 1 analogue: the profile's DeiT variants",
        [
            "model",
            "embedding dim",
            "heads",
            "layers",
            "params",
            "resolution",
            "images/s",
            "paper model",
            "paper embedding dim",
            "paper heads",
            "paper layers",
            "paper params",
            "paper resolution",
            "paper images/s",
            "paper source",
        ],
    )
    t.notes = [
        _throughput_note(c),
        f"Dims from params `student.model`; the paper's row is {variant}, the variant "
        "closest to the profile's student.",
        c.paper_note(ref),
        *filter(None, [released.note(c)]),
    ]
    name = c.params.student.model.name or "custom ViT"
    for label, key in (
        (f"DeiT ({name})", "deit"),
        (f"DeiT⚗ ({name})", "deit_distilled"),
        (f"DeiT⚗↑{c.ft_px} ({name})", f"deit_distilled_{c.ft_px}"),
    ):
        ips, npar, entry = throughput(c, key)
        res = _resolution(c, key, entry)
        t.add_row(
            {
                "model": label,
                "embedding dim": dim,
                "heads": heads,
                "layers": depth,
                "params": npar,
                "resolution": res,
                "images/s": ips,
                **_table1_paper(c, variant, prow),
            }
        )
    for r in released.released_models(c):
        if r.variant is None:  # Table 1 lists the DeiT variants only
            continue
        vrow = c.ref.row(ref, model=r.variant)
        t.add_row(
            {
                "model": f"released {r.timm}",
                "embedding dim": released.field(c, r, "embed_dim"),
                "heads": released.field(c, r, "num_heads"),
                "layers": released.field(c, r, "depth"),
                "params": released.params_cell(c, r),
                "resolution": Cell(
                    str(r.img_size),
                    (c.m.path(released.RELEASED) + "#" + pointer("models", r.name, "img_size"),),
                ),
                "images/s": released.images_per_s(c, r),
                **_table1_paper(c, r.variant, vrow),
            }
        )
    return t


def _table5_models(c: Context) -> list[tuple[str, str, str, str, Stat | Cell, str, str]]:
    """(label, family, throughput key, metrics file, top-1, paper network, series)."""
    v = paper_variant(c.params)
    arch = c.m.field("teacher", "arch", "teacher")
    return [
        (
            f"teacher ({arch})",
            "convnet",
            "teacher",
            "teacher",
            c.m.top1("teacher"),
            "RegNetY-16GF (DeiT-trained teacher, star)",
            "",
        ),
        ("DeiT", "transformer", "deit", "pretrain/none", c.m.top1("pretrain/none"), v, "deit"),
        (
            "DeiT⚗",
            "transformer",
            "deit_distilled",
            "pretrain/deit",
            c.m.top1("pretrain/deit"),
            f"{v} alembic",
            "deit_distilled",
        ),
        (
            f"DeiT⚗↑{c.ft_px}",
            "transformer",
            f"deit_distilled_{c.ft_px}",
            "finetune/bicubic",
            c.m.top1("finetune/bicubic"),
            f"{v} alembic up384",
            "deit_distilled",
        ),
    ]


def _table5_paper(c: Context, network: str | None, row: int | None) -> dict[str, Any]:
    """Table 5's paper columns for ``network`` (its 300-epoch row of the reference CSV)."""
    ref = "table5_throughput_accuracy"
    return {
        "paper network": network if row is not None else DASH,
        "paper params": c.ref.cell(ref, row, "params"),
        "paper resolution": c.ref.cell(ref, row, "image_size"),
        "paper images/s (V100)": c.ref.cell(ref, row, "throughput_im_per_s_V100_16GB"),
        "paper top-1": c.ref.cell(ref, row, "imagenet_top1"),
        "paper source": c.ref.source(ref, row),
    }


def _table5_row(c: Context, network: str) -> int | None:
    """The paper's 300-epoch row of a network (Table 5 also lists 1000-epoch DeiT⚗ rows)."""
    df = c.ref.table("table5_throughput_accuracy")
    hit = df.index[(df["network"] == network) & df["train_epochs"].isin(["", "300"])]
    return int(hit[0]) if len(hit) else None


def table5(c: Context) -> tuple[Table, list[figures.Point]]:
    """Top-1 vs measured throughput (paper Table 5 / Figure 1)."""
    ref = "table5_throughput_accuracy"
    t = Table(
        "table5_throughput_accuracy",
        "Table 5 / Figure 1 analogue: accuracy vs throughput",
        [
            "network",
            "family",
            "params",
            "resolution",
            "images/s",
            "top-1",
            "paper network",
            "paper params",
            "paper resolution",
            "paper images/s (V100)",
            "paper top-1",
            "paper source",
        ],
        figure="figure1_throughput_accuracy.png",
    )
    t.notes = [
        _throughput_note(c),
        "DeiT⚗ top-1: class+distillation head.",
        c.paper_note(ref, what="300-epoch rows"),
        *filter(None, [released.note(c)]),
    ]
    points = []
    for label, family, key, _name, top1, paper_net, series in _table5_models(c):
        ips, npar, entry = throughput(c, key)
        res = _resolution(c, key, entry)
        prow = _table5_row(c, paper_net)
        if prow is None and "up384" in paper_net:  # only DeiT-B was fine-tuned at 384
            paper_net = "DeiT-B alembic up384"
            prow = _table5_row(c, paper_net)
        t.add_row(
            {
                "network": label,
                "family": family,
                "params": npar,
                "resolution": res,
                "images/s": ips,
                "top-1": top1,
                **_table5_paper(c, paper_net, prow),
            }
        )
        if entry and isinstance(top1, Stat):
            points.append(
                figures.Point(
                    label,
                    family,
                    float(entry["images_per_s"]),
                    top1.mean,
                    top1.std,
                    series,
                    sources=(*getattr(ips, "sources", ()), *top1.sources),
                )
            )
    for r in released.released_models(c):
        paper_net = r.paper_network
        prow = _table5_row(c, paper_net) if paper_net else None
        top1 = released.top1(c, r)
        ips = released.images_per_s(c, r)
        t.add_row(
            {
                "network": f"released {r.timm}",
                "family": "convnet" if r.variant is None else "transformer",
                "params": released.params_cell(c, r),
                "resolution": Cell(str(r.img_size)),
                "images/s": ips,
                "top-1": top1,
                **_table5_paper(c, paper_net, prow),
            }
        )
        if ips.text != DASH and top1.text != DASH:
            points.append(
                figures.Point(
                    f"released {r.timm}",
                    "convnet" if r.variant is None else "transformer",
                    float(r.info["throughput"]["images_per_s"]),
                    float(top1.text),
                    0.0,
                    "",  # each released model is a point of its own
                    sources=(*ips.sources, *top1.sources),
                )
            )
    return t, points
