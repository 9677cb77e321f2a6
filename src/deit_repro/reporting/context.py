"""What a table is built from: params, metrics and the paper's numbers (:class:`Context`), the
settings every caption states, and the paper's DeiT variant matching the profile's student."""

from __future__ import annotations

from deit_repro.config import Params
from deit_repro.errors import DataError
from deit_repro.reporting.cells import DASH, Cell
from deit_repro.reporting.inputs import Metrics, Predictions, Reference

#: dims of timm's DeiT family (timm/models/deit.py), for a profile that names a timm model
_TIMM_DEIT = {
    "tiny": ("DeiT-Ti", 192, 3, 12),
    "small": ("DeiT-S", 384, 6, 12),
    "base": ("DeiT-B", 768, 12, 12),
}


class Context:
    """Params, metrics and paper numbers a table is built from, and the caption context."""

    def __init__(
        self,
        params: Params,
        metrics: Metrics,
        ref: Reference,
        predictions: Predictions | None = None,
    ):
        self.params, self.m, self.ref = params, metrics, ref
        self.pred = predictions or Predictions(None)
        self._same_seeds()
        self.pre_px = params.student.model.img_size
        self.ft_px = params.finetune.img_size

    def _same_seeds(self) -> None:
        """Per-seed values are paired by position (cells.paired): every multi-seed metrics file
        must hold the params' seeds, in their order (a single run, released teacher weights,
        serves all)."""
        want = list(self.params.seeds)
        for name in self.m.files:
            if not self.m.files[name].suffix == ".json":
                continue
            seeds = self.m.peek(name).get("seeds")
            if isinstance(seeds, list) and len(seeds) > 1 and seeds != want:
                raise DataError(
                    f"metrics file {self.m.files[name]} holds seeds {seeds}, params.yaml {want}",
                    "re-run the training stages with these params (dvc repro)",
                )

    def caption(self) -> str:
        """Profile, seeds and eval settings: the params', and the weights the metrics files read
        for this table were evaluated with."""
        p = self.params
        weights = ", ".join(self.m.eval_weights()) or None
        teacher = ""
        if self.m.has("teacher") and self.m.files["teacher"] in self.m.read:
            seeds = self.m.peek("teacher").get("seeds", [])
            if len(seeds) == 1 and len(p.seeds) > 1:
                teacher = "; one teacher run serves every seed"
            elif len(seeds) > 1:
                teacher = "; student seed k distils from teacher seed k"
        return (
            f"profile `{p.profile}`, seeds {list(p.seeds)} (mean ± sample std over "
            f"{len(p.seeds)} run{'s' if len(p.seeds) > 1 else ''} per model{teacher}); "
            f"test split, final epoch (never best-on-test)"
            f"{', weights ' + weights if weights else ''}, eval resize + centre crop "
            f"crop_pct={p.eval.crop_pct}, {p.eval.interpolation}; top-1 in %."
        )

    def teacher_note(self) -> str:
        """Which teacher the distilled students of each seed read, and so what the seed
        intervals include: released weights (one fixed teacher), one teacher run serving every
        seed (its metrics file lists one seed, the params several: weights given by hand), or a
        teacher per seed."""
        if self.params.teacher.weights is not None:
            return (
                "every seed distils from the one released teacher (fixed weights, as the paper's "
                "RegNetY-16GF): the intervals are about that teacher, not about teacher training"
            )
        seeds = self.m.peek("teacher").get("seeds") if self.m.has("teacher") else None
        if isinstance(seeds, list) and len(seeds) == 1 and len(self.params.seeds) > 1:
            return (
                "every seed distils from one teacher run: the intervals are about that teacher, "
                "not about teacher training"
            )
        return (
            "seed k of every distilled student distils from the teacher trained with seed k: "
            "the teacher's run-to-run variance is inside the seed intervals"
        )

    def paper_note(self, *files: str, what: str = "") -> str:
        names = ", ".join(f"`reference/paper/{f}.csv`" for f in files)
        return (
            f"Paper columns: {names}{' (' + what + ')' if what else ''}, ImageNet, as printed; "
            "`paper source` names the transcription (reference/paper/SOURCES.md)."
        )


def paper_variant(params: Params) -> str:
    """The paper's DeiT variant matching the profile's student: its timm name, or the closest
    embedding dimension for a small custom one."""
    m = params.student.model
    if m.name:
        for size, (variant, *_dims) in _TIMM_DEIT.items():
            if f"deit_{size}_" in m.name:
                return variant
    return min(_TIMM_DEIT.values(), key=lambda v: abs(v[1] - m.embed_dim))[0]


def student_dims(params: Params) -> tuple[Cell, Cell, Cell]:
    """Embedding dim, heads, layers of the profile's student, with their source: the params keys
    (a custom size), or for a timm name that name's definition in timm/models/deit.py."""
    m = params.student.model
    if m.name:
        for size, (_variant, *dims) in _TIMM_DEIT.items():
            if f"deit_{size}_" in m.name:
                src = (f"params:student.model.name={m.name} (timm/models/deit.py)",)
                return tuple(Cell(str(d), src) for d in dims)  # type: ignore[return-value]
        return Cell(DASH), Cell(DASH), Cell(DASH)
    return tuple(
        Cell(str(getattr(m, k)), (f"params:student.model.{k}",))  # type: ignore
        for k in ("embed_dim", "num_heads", "depth")
    )
