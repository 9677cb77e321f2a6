"""Released checkpoints in the tables: the models ``deit-repro evaluate`` measured from released
weights (``deit-repro import-weights``), read from the evaluate JSON that ``tables --released``
names (README, "Evaluate-only (released checkpoints)").

A released model is found by the ``released`` block evaluate writes for it (its timm name), not
by its display name; README names them ``released/<timm name>``. One released model is one fixed
set of weights: every seed's number is the same, so its cells print that one number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deit_repro.reporting.cells import DASH, Cell, Stat, num, pointer
from deit_repro.reporting.context import Context

#: the metrics name of the released evaluate JSON (``Metrics(..., extra={RELEASED: path})``)
RELEASED = "released"

#: timm's DeiT sizes -> the paper's variant names (timm/models/deit.py, paper Table 1)
_VARIANT = {"tiny": "DeiT-Ti", "small": "DeiT-S", "base": "DeiT-B"}
_DEIT = re.compile(r"deit_(tiny|small|base)(_distilled)?_patch16_(224|384)")
#: the convnets of paper Table 5 that timm releases under these names
_CONVNET = {
    "regnety_040": "RegNetY-4GF (DeiT-trained teacher, star)",
    "regnety_080": "RegNetY-8GF (DeiT-trained teacher, star)",
    "regnety_160": "RegNetY-16GF (DeiT-trained teacher, star)",
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnet152": "ResNet-152",
}


@dataclass(frozen=True)
class Released:
    """One released model of the evaluate JSON."""

    name: str  # its display name there (``released/deit_base_distilled_patch16_224``)
    timm: str  # the timm model it was built as
    info: dict[str, Any]  # evaluate's ``released`` block: source, sha256, dims, throughput
    variant: str | None  # DeiT-Ti / -S / -B, None for a convnet
    distilled: bool
    img_size: int

    @property
    def paper_network(self) -> str | None:
        """Its network's name in the paper's Table 5 (None if the paper lists no such row)."""
        if self.variant is None:
            return _CONVNET.get(self.timm)
        return (
            self.variant
            + (" alembic" if self.distilled else "")
            + (" up384" if self.img_size == 384 else "")
        )


def released_models(c: Context) -> list[Released]:
    """The released models of ``tables --released``, in the evaluate JSON's order; none when no
    such file was given."""
    if not c.m.has(RELEASED):
        return []
    data = c.m.get(RELEASED)
    out = []
    for name, info in data.get("released", {}).items():
        timm = str(info["model"])
        hit = _DEIT.fullmatch(timm)
        out.append(
            Released(
                name=name,
                timm=timm,
                info=info,
                variant=_VARIANT[hit.group(1)] if hit else None,
                distilled=bool(info.get("distilled")),
                img_size=int(data["models"][name]["img_size"]),
            )
        )
    return out


def find(models: list[Released], variant: str, *, distilled: bool, px: int) -> Released | None:
    return next(
        (
            r
            for r in models
            if r.variant == variant and r.distilled == distilled and r.img_size == px
        ),
        None,
    )


def variants(models: list[Released]) -> list[str]:
    """The DeiT variants present, smallest first."""
    have = {r.variant for r in models}
    return [v for v in _VARIANT.values() if v in have]


def once(s: Stat | Cell, digits: int = 2) -> Cell:
    """One released model's number: the same for every seed, printed once."""
    if isinstance(s, Cell):
        return s
    return Cell(num(s.values[0], digits), s.sources)


def top1(c: Context, r: Released | None, head: str | None = None) -> Cell:
    """A released model's top-1 (its reported head, or ``head``); a dash without the model."""
    if r is None:
        return Cell(DASH)
    keys = ("models", r.name, "heads", head, "top1") if head else ("models", r.name, "top1")
    return once(c.m.stat(RELEASED, *keys))


def field(c: Context, r: Released, *keys: str, fmt=str) -> Cell:
    """A value of a released model's ``released`` block (dims, throughput), with its source."""
    node: Any = r.info
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return Cell(DASH)
        node = node[k]
    src = c.m.path(RELEASED) + "#" + pointer("released", r.name, *keys)
    return Cell(fmt(node), (src,))


def params_cell(c: Context, r: Released) -> Cell:
    n = c.m.get(RELEASED)["models"][r.name]["params"]
    return Cell(
        f"{n / 1e6:.2f}M", (c.m.path(RELEASED) + "#" + pointer("models", r.name, "params"),)
    )


def images_per_s(c: Context, r: Released) -> Cell:
    return field(c, r, "throughput", "images_per_s", fmt=lambda v: num(float(v), 0))


def note(c: Context) -> str:
    """Which file the released rows come from, and how it was measured."""
    models = released_models(c)
    if not models:
        return ""
    names = ", ".join(f"`{r.timm}`" for r in models)
    return (
        f"Released rows: {names}, the released weights evaluated by `deit-repro evaluate` into "
        f"`{c.m.path(RELEASED)}` (sha256 of each file in it); throughput measured there as the "
        "throughput stage measures (fp32, largest batch that fits)."
    )
