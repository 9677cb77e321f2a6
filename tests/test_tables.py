"""The tables stage on a synthetic metrics directory with known numbers.

The files are written in exactly the schema of the DAG's metrics (core.records.aggregate: every
measured number is {"mean", "std", "values"} over seeds; evaluate.json's per-seed disagreement in %;
throughput.json's models), so every expected cell below is computed by hand from these numbers.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as sps

from deit_repro.core.model_dirs import save_predictions
from deit_repro.errors import DataError
from deit_repro.reporting.stats import fmt_p

from deit_repro.config import load_params
from deit_repro.reporting.report import run_tables
from deit_repro.reporting.trace import resolve, stale, trace

ROOT = Path(__file__).resolve().parents[1]
EVAL = {"crop_pct": 1.0, "interpolation": "bicubic", "split": "test", "weights": "raw (not EMA)"}


def stat(*values: float) -> dict:
    return {
        "mean": round(statistics.fmean(values), 6),
        "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def heads(**top1: tuple[float, ...]) -> dict:
    return {h: {"top1": stat(*v), "top5": stat(*(99.0 for _ in v))} for h, v in top1.items()}


def model_json(img_size: int, seeds: list[int], extra: dict, **top1: tuple[float, ...]) -> dict:
    hs = heads(**top1)
    return {
        **extra,
        "epochs": 20,
        "eval": dict(EVAL, img_size=img_size),
        "heads": hs,
        "n": len(seeds),
        "role": extra.get("role", "student"),
        "seeds": seeds,
        "top1": hs.get("joint", hs["cls"])["top1"],
        "train_loss": stat(*(1.0 for _ in seeds)),
    }


def write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


STUDENT = {"alpha": 0.5, "dist_token": False, "distill": "none", "tau": 1.0}

#: per-seed predicted disagreement in % (seed 0, seed 1), symmetric; the diagonal is 0
DISAGREE = {
    ("ground_truth", "teacher"): (17.0, 17.0),
    ("ground_truth", "none"): (29.4, 29.4),
    ("ground_truth", "deit/cls"): (30.8, 31.0),
    ("ground_truth", "deit/dist"): (26.6, 27.4),
    ("ground_truth", "deit/joint"): (27.6, 27.6),
    ("teacher", "none"): (24.0, 24.2),
    ("teacher", "deit/cls"): (24.6, 24.8),
    ("teacher", "deit/dist"): (20.0, 20.8),
    ("teacher", "deit/joint"): (21.0, 21.13),
    ("none", "deit/cls"): (12.6, 13.0),
    ("none", "deit/dist"): (14.6, 15.2),
    ("none", "deit/joint"): (12.6, 13.4),
    ("deit/cls", "deit/dist"): (11.8, 12.0),
    ("deit/cls", "deit/joint"): (7.6, 7.8),
    ("deit/dist", "deit/joint"): (4.4, 4.4),
}


def synthetic_metrics(root: Path, *, vit_teacher: bool = False) -> Path:
    """A metrics/ directory of the fashion profile (seeds 0, 1) with hand-picked numbers."""
    m = root / "metrics"
    write(
        m / "teacher.json",
        model_json(16, [0], {"arch": "resnet_small", "role": "teacher"}, cls=(83.0,)),
    )
    write(m / "pretrain/none.json", model_json(16, [0, 1], STUDENT, cls=(71.8, 72.2)))
    write(
        m / "pretrain/soft.json",
        model_json(16, [0, 1], dict(STUDENT, distill="soft", alpha=0.1, tau=3.0), cls=(72.0, 72.2)),
    )
    write(
        m / "pretrain/hard.json",
        model_json(16, [0, 1], dict(STUDENT, distill="hard"), cls=(75.0, 75.4)),
    )
    deit = dict(STUDENT, distill="hard", dist_token=True)
    write(
        m / "pretrain/deit.json",
        model_json(16, [0, 1], deit, cls=(69.0, 69.2), dist=(73.4, 72.5), joint=(72.41, 72.37)),
    )
    if vit_teacher:
        write(
            m / "teacher_vit.json",
            model_json(16, [0], {"arch": "vit", "role": "teacher"}, cls=(78.0,)),
        )
        write(
            m / "pretrain/deit_vit_teacher.json",
            model_json(16, [0, 1], deit, cls=(68.0, 68.2), dist=(70.0, 70.2), joint=(70.39, 70.37)),
        )
    # Figure 3: a run per budget (6 and 12 epochs; 18 is pretrain/none and pretrain/deit); the
    # gap deit − none is +1.0 at 6 epochs, +2.0 at 12 and +0.39 at 18.
    for budget, none_acc, deit_acc in (
        (6, (60.0, 61.0), (61.0, 62.0)),
        (12, (65.0, 66.0), (67.0, 68.0)),
    ):
        write(m / f"figure3/none-{budget}.json", model_json(16, [0, 1], STUDENT, cls=none_acc))
        write(
            m / f"figure3/deit-{budget}.json",
            model_json(16, [0, 1], deit, cls=deit_acc, dist=deit_acc, joint=deit_acc),
        )
    for run, px, interp, before, after in (
        ("control", 16, "bicubic", (72.41, 72.37), (75.46, 75.69)),
        ("bicubic", 28, "bicubic", (56.8, 50.81), (76.28, 77.01)),
        ("bilinear", 28, "bilinear", (53.93, 47.37), (76.05, 76.82)),
    ):
        f = model_json(
            px,
            [0, 1],
            dict(deit, from_img_size=16, interpolation=interp),
            cls=after,
            dist=after,
            joint=after,
        )
        f["epochs"] = 3
        f["before_finetune"] = {
            f"test_{h}_{k}": stat(*(before if k == "top1" else (95.0, 95.0)))
            for h in ("cls", "dist", "joint")
            for k in ("top1", "top5")
        }
        write(m / f"finetune/{run}.json", f)
    for init, acc in (("pretrained", (88.61, 91.95)), ("scratch", (56.66, 58.06))):
        write(
            m / f"transfer/digits-{init}.json",
            model_json(
                16,
                [0, 1],
                {"init": init, "role": "student", "pretrained_from": None},
                **(
                    {"cls": acc, "dist": acc, "joint": acc}
                    if init == "pretrained"
                    else {"cls": acc}
                ),
            ),
        )
    names = ["ground_truth", "teacher", "none", "deit/cls", "deit/dist", "deit/joint"]
    per_pair = {**DISAGREE, **{(b, a): v for (a, b), v in DISAGREE.items()}}
    write(
        m / "evaluate.json",
        {
            "classifiers": names,
            "dataset": {"content_hash": "0" * 64, "path": "data/x", "test_images": 10000},
            "eval": EVAL,
            "n": 2,
            "seeds": [0, 1],
            "models": {
                "none": {
                    "heads": heads(cls=(71.8, 72.2)),
                    "img_size": 16,
                    "params": 202954,
                    "top1": stat(71.8, 72.2),
                }
            },
            "disagreement": {
                a: {b: stat(*per_pair.get((a, b), (0.0, 0.0))) for b in names} for a in names
            },
        },
    )
    entry = {
        "batch_size": 1024,
        "device": "cpu",
        "dtype": "float32",
        "repeats": 5,
        "threads": 1,
        "images_per_s_std": 100.0,
    }
    write(
        m / "throughput.json",
        {
            "hardware": {
                "cpu_count": 2,
                "cuda": False,
                "machine": "x86_64",
                "processor": None,
                "torch_threads": 1,
            },
            "models": {
                "teacher": dict(entry, images_per_s=28000.4, img_size=16, params=77754),
                "deit": dict(entry, images_per_s=5575.8, img_size=16, params=202954),
                "deit_distilled": dict(entry, images_per_s=5500.2, img_size=16, params=203732),
                "deit_distilled_28": dict(entry, images_per_s=1328.9, img_size=28, params=205844),
            },
            "versions": {"torch": "x"},
        },
    )
    return m


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def row(rows: list[dict[str, str]], key: str, value: str) -> dict[str, str]:
    hits = [r for r in rows if r[key] == value]
    assert len(hits) == 1, (key, value, rows)
    return hits[0]


@pytest.fixture(scope="module")
def params():
    """The fashion profile with the synthetic metrics' two seeds."""
    return dataclasses.replace(load_params(ROOT / "profiles" / "fashion.yaml"), seeds=(0, 1))


@pytest.fixture(scope="module")
def results(tmp_path_factory, params) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    metrics = synthetic_metrics(root)
    run_tables(params, metrics=metrics, out=root / "results")
    return metrics, root / "results"


def test_table3_cells(results):
    _, out = results
    rows = read_csv(out / "table3_distillation.csv")
    joint = row(rows, "method", "DeiT⚗: class+distillation")
    assert joint["top-1 @16px"] == "72.39 ± 0.03"  # [72.41, 72.37]
    assert joint["top-1 ↑28px (fine-tuned)"] == "76.64 ± 0.52"
    assert joint["per seed"] == "72.41 / 72.37"
    assert joint["paper DeiT-B"] == "83.4" and joint["paper DeiT-Ti"] == "74.5"
    assert joint["paper source"] == "ARXIV_V2_PDFTEXT+ARXIV_V2_MD+ICML2021_MD"
    none = row(rows, "method", "DeiT - no distillation")
    assert (none["top-1 @16px"], none["teacher supervision"], none["dist. token"]) == (
        "72.00 ± 0.28",
        "none",
        "no",
    )
    assert none["top-1 ↑28px (fine-tuned)"] == "–"
    assert (
        "| DeiT⚗: class+distillation | hard | yes | 72.39 ± 0.03 |"
        in (out / "table3_distillation.md").read_text()
    )


def test_captions_state_profile_seeds_and_eval(results):
    _, out = results
    for name in (
        "table1_variants",
        "table3_distillation",
        "table4_disagreement",
        "table10_finetune_resolution",
        "figure3_epochs",
    ):
        md = (out / f"{name}.md").read_text()
        assert "profile `fashion`" in md and "seeds [0, 1]" in md, name
        assert "crop_pct=1.0, bicubic" in md, name
        # the eval weights of the metrics files the table read (Table 1 reads no accuracy)
        assert ("weights raw (not EMA)" in md) == (name != "table1_variants"), name
    assert "one teacher run serves every seed" in (out / "table2_teacher.md").read_text()
    tex = (out / "table3_distillation.tex").read_text()
    assert r"\begin{tabular}{" in tex and r"\caption{Table 3 analogue" in tex
    assert r"72.39 $\pm$ 0.03" in tex and r"DeiT\alembic{}: class+distillation" in tex
    body = [
        line for line in tex.splitlines() if not line.startswith("%") and not line.endswith("{%")
    ]
    text = [re.sub(r"(?<!\\)\$[^$]*(?<!\\)\$", "", line) for line in body]  # drop math
    assert not [line for line in text if re.search(r"(?<!\\)[_%#$]", line)]


def test_table4_disagreement_is_a_fraction(results):
    _, out = results
    rows = read_csv(out / "table4_disagreement.csv")
    teacher = row(rows, "classifier", "teacher")
    assert teacher["DeiT⚗ class+distil."] == "0.211 ± 0.001"  # [21.0, 21.13] %
    assert teacher["DeiT (no distillation)"] == "0.241 ± 0.001"  # [24.0, 24.2] %
    assert teacher["teacher"] == "0.000 ± 0.000"
    assert teacher["paper: DeiT⚗ class+distil."] == "0.102"
    assert teacher["paper: DeiT (no distillation)"] == "0.133"
    gt = row(rows, "classifier", "ground truth")
    assert gt["DeiT⚗ distil. only"] == "0.270 ± 0.006"  # [26.6, 27.4] %


def test_other_tables(results):
    _, out = results
    t1 = read_csv(out / "table1_variants.csv")
    assert [r["embedding dim"] for r in t1] == ["64"] * 3  # fashion: custom 64-dim ViT
    assert [r["images/s"] for r in t1] == ["5576", "5500", "1329"]
    assert [r["params"] for r in t1] == ["0.20M", "0.20M", "0.21M"]
    assert t1[0]["paper model"] == "DeiT-Ti" and t1[0]["paper images/s"] == "2536"
    t2 = read_csv(out / "table2_teacher.csv")
    assert t2[0]["teacher top-1"] == "83.00" and t2[0]["student top-1 @16px"] == "72.39 ± 0.03"
    assert t2[1]["teacher"] == "transformer (not run)" and t2[1]["teacher top-1"] == "not run"
    assert t2[1]["paper teacher top-1"] == "81.8"
    t5 = read_csv(out / "table5_throughput_accuracy.csv")
    assert [r["top-1"] for r in t5] == ["83.00", "72.00 ± 0.28", "72.39 ± 0.03", "76.64 ± 0.52"]
    assert t5[3]["paper network"] == "DeiT-B alembic up384" and t5[3]["paper top-1"] == "84.5"
    t7 = row(read_csv(out / "table7_transfer.csv"), "dataset", "digits")
    assert (t7["pretrained (DeiT⚗)"], t7["from scratch"]) == ("90.28 ± 2.36", "57.36 ± 0.99")
    assert t7["gain"] == "+32.92 ± 1.37"  # per seed +31.95, +33.89
    assert t7["paper DeiT-B from scratch"] == "97.5"
    t10 = {r["run"]: r for r in read_csv(out / "table10_finetune_resolution.csv")}
    assert t10["bicubic"]["top-1 right after resampling"] == "53.80 ± 4.24"
    assert t10["bilinear"]["top-1 after fine-tuning"] == "76.44 ± 0.54"
    assert (t10["control"]["to px"], t10["bicubic"]["to px"]) == ("16", "28")
    assert t10["bicubic"]["paper top-1"] == "83.1" and t10["bilinear"]["paper top-1"] == "–"
    f3 = read_csv(out / "figure3_epochs.csv")
    assert [r["epochs"] for r in f3] == ["6", "12", "18"]
    assert f3[0]["DeiT (no distillation)"] == "60.50 ± 0.71"
    assert f3[0]["DeiT min–max"] == "60.00–61.00"
    assert f3[2]["DeiT⚗ (class+distil.)"] == "72.39 ± 0.03"  # the pretrain stage's own runs
    # per seed +0.61, +0.17 at 18 epochs
    assert [r["gap DeiT⚗ − DeiT"] for r in f3] == ["+1.00 ± 0.00", "+2.00 ± 0.00", "+0.39 ± 0.31"]


def _t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Independently of deit_repro.reporting.stats: the textbook paired t-interval and p."""
    d = np.asarray(diffs)
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    p = 2 * sps.t.sf(abs(d.mean()) / (d.std(ddof=1) / np.sqrt(len(d))), len(d) - 1)
    return d.mean() - half, d.mean() + half, p


def _signed(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}"


def test_claims_verdicts(results):
    _, out = results
    claims = read_csv(out / "claims.csv")

    def c(prefix: str) -> dict[str, str]:
        hits = [r for r in claims if r["claim"].startswith(prefix)]
        assert len(hits) == 1, prefix
        return hits[0]

    hard = c("hard distillation beats usual")  # 75.0/75.4 vs 72.0/72.2: +3.0, +3.2
    lo, hi, _ = _t_interval([3.0, 3.2])  # t(0.975, 1) = 12.71: [+1.83, +4.37]
    assert (hard["verdict"], hard["mean a − b"], hard["n seeds"]) == ("holds", "+3.10", "2")
    assert hard["95 % CI (seeds)"] == f"[{_signed(lo)}, {_signed(hi)}]" == "[+1.83, +4.37]"
    assert hard["95 % CI (test images)"] == "–"  # no models/: no per-image test
    assert hard["paper"] == "+1.2 (83.0 vs 81.8)"
    soft = c("usual (soft) distillation is at least")  # 72.0/72.2 vs 71.8/72.2: +0.2, 0.0
    assert (soft["verdict"], soft["mean a − b"]) == ("not resolved", "+0.10")
    assert soft["95 % CI (seeds)"] == "[-1.17, +1.37]"
    token = c("the distillation token beats hard")  # 72.41/72.37 vs 75.0/75.4
    assert token["mean a − b"] == "-2.81" and token["per seed"] == "-2.59 / -3.03"
    agree = c("the distilled student agrees more")  # teacher: none 24.0/24.2, joint 21.0/21.13
    assert (agree["mean a − b"], agree["per seed"]) == ("+0.030", "+0.030 / +0.031")
    assert agree["paper"] == "+0.031 (0.133 vs 0.102)"
    assert c("a convnet teacher")["verdict"] == "not run"
    transfer = c("pretraining beats training from scratch for transfer to digits")
    lo, hi, _ = _t_interval([88.61 - 56.66, 91.95 - 58.06])
    assert transfer["95 % CI (seeds)"] == f"[{_signed(lo)}, {_signed(hi)}]"
    assert transfer["verdict"] == "holds" and lo > 0
    gap = c("distillation gains more with a longer schedule")  # gap at 18 vs at 6 epochs
    assert gap["per seed"] == "-0.39 / -0.83"  # (+0.61, +0.17) − (+1.0, +1.0)
    keeps = c("DeiT⚗ keeps gaining with more epochs: 18 epochs beats 12")
    assert keeps["per seed"] == "+5.41 / +4.37" and keeps["paper"].startswith("+0.8 (84.2 vs 83.4)")
    readme = (out / "README.md").read_text()
    assert "[Table 3](table3_distillation.md)" in readme
    assert "](figure3_epochs.png)" in readme
    assert "| DeiT⚗: class+distillation | hard | yes | 72.39 ± 0.03 |" in readme
    assert "| hard distillation beats usual (soft) distillation | holds | +3.10 |" in readme
    assert "95% t-interval" in readme  # the rule is stated in the header


def _predictions(
    models: Path, name: str, labels: np.ndarray, hit: np.ndarray, heads=("cls",)
) -> list[float]:
    """Each seed's predictions.npy: the true class where ``hit``, another class elsewhere, for
    every head; returns each seed's top-1 in %, as the run's metrics file would hold it."""
    for seed, row in enumerate(hit):
        cls = torch.from_numpy(np.where(row, labels, (labels + 1) % 10))
        d = models / name / f"seed{seed}"
        d.mkdir(parents=True, exist_ok=True)
        save_predictions(
            d / "predictions.npy", torch.from_numpy(labels), {h: cls for h in heads}, 10
        )
    return [round(100.0 * float(r.mean()), 6) for r in hit]


def test_claims_from_known_per_seed_and_per_image_numbers(tmp_path):
    """Three seeds, 4,000 test images, predictions built with known hit rates: each claim's
    intervals, p-values and verdict equal what scipy gives directly on the same arrays."""
    params = dataclasses.replace(load_params(ROOT / "profiles" / "fashion.yaml"), seeds=(0, 1, 2))
    rng = np.random.default_rng(7)
    n = 4000
    labels = rng.integers(0, 10, n)
    base = rng.random((3, n))
    hits = {  # per seed and image; seeds differ, and the images each model gets right overlap
        "hard": base < np.array([[0.78], [0.80], [0.79]]),  # beats soft by about 6 points
        "soft": base < np.array([[0.72], [0.735], [0.74]]),
        "none": base < np.array([[0.745], [0.75], [0.76]]),  # soft is below none: reversed
        "deit": rng.random((3, n)) < np.array([[0.785], [0.80], [0.79]]),  # ≈ hard: spans 0
    }
    models, m = tmp_path / "models", tmp_path / "metrics"
    top1 = {}
    for name, hit in hits.items():
        heads = ("cls", "dist", "joint") if name == "deit" else ("cls",)
        top1[name] = _predictions(models, f"pretrain/{name}", labels, hit, heads)
        extra = dict(STUDENT, distill="hard", dist_token=name == "deit")
        per_head = {h: tuple(top1[name]) for h in heads}
        write(m / f"pretrain/{name}.json", model_json(16, [0, 1, 2], extra, **per_head))
    run_tables(params, metrics=m, models=models, out=tmp_path / "results")
    assert stale(tmp_path / "results", metrics=m, models=models) == []
    claims = read_csv(tmp_path / "results" / "claims.csv")

    def c(prefix: str) -> dict[str, str]:
        return next(r for r in claims if r["claim"].startswith(prefix))

    def interval(text: str) -> tuple[float, float]:
        lo, hi = (float(x) for x in text.strip("[]").split(", "))
        return lo, hi

    cases = (
        ("hard distillation beats usual", "hard", "soft", "holds"),
        ("usual (soft) distillation is at least", "soft", "none", "reversed"),
        ("the distillation token beats hard", "deit", "hard", "not resolved"),
    )
    for prefix, a, b, expected in cases:
        row_ = c(prefix)
        diffs = [x - y for x, y in zip(top1[a], top1[b])]
        lo, hi, p = _t_interval(diffs)
        assert row_["n seeds"] == "3"
        assert row_["95 % CI (seeds)"] == f"[{_signed(lo)}, {_signed(hi)}]", prefix
        assert row_["p (seeds)"] == fmt_p(p), (prefix, p)  # p from scipy here, same format
        # Per image: seed-averaged a − b; the bootstrap interval is close to the normal one.
        d = (100.0 * (hits[a].astype(float) - hits[b])).mean(axis=0)
        half = 1.96 * d.std(ddof=1) / np.sqrt(n)
        ilo, ihi = interval(row_["95 % CI (test images)"])
        assert abs(ilo - (d.mean() - half)) < 0.1 * half + 0.01, (prefix, ilo)
        assert abs(ihi - (d.mean() + half)) < 0.1 * half + 0.01, (prefix, ihi)
        assert row_["verdict"] == expected, (prefix, row_)
    # The smallest effect 3 seeds detect with 80 % power, at the observed seed std.
    spans = c("the distillation token beats hard")
    diffs = np.array(top1["deit"]) - np.array(top1["hard"])
    mde = float(spans["MDE (80 % power)"].lstrip("±"))
    crit, se = sps.t.ppf(0.975, 2), diffs.std(ddof=1) / np.sqrt(3)
    power = sps.nct.sf(crit, 2, mde / se) + sps.nct.sf(crit, 2, -mde / se)
    assert abs(power - 0.8) < 0.01

    # A predictions file that disagrees with its run's metrics (stale) stops the tables.
    stale_hit = hits["hard"].copy()
    stale_hit[0, :50] = ~stale_hit[0, :50]
    _predictions(models, "pretrain/hard", labels, stale_hit)
    assert stale(tmp_path / "results", metrics=m, models=models) == [
        "models/pretrain/hard/seed0/predictions.npy"
    ]
    with pytest.raises(DataError, match="per-image predictions give"):
        run_tables(params, metrics=m, models=models, out=tmp_path / "again")
    # A missing one does not quietly drop the claim's per-image test.
    (models / "pretrain" / "hard" / "seed1" / "predictions.npy").unlink()
    with pytest.raises(DataError, match="has no predictions.npy for seed 1"):
        run_tables(params, metrics=m, models=models, out=tmp_path / "again")
    # Seeds are paired by position: a metrics file of other seeds (or order) is refused.
    reordered = dataclasses.replace(params, seeds=(2, 1, 0))
    with pytest.raises(DataError, match=r"holds seeds \[0, 1, 2\], params.yaml \[2, 1, 0\]"):
        run_tables(reordered, metrics=m, models=models, out=tmp_path / "again")


def test_vit_teacher_rows_when_present(tmp_path, params):
    metrics = synthetic_metrics(tmp_path, vit_teacher=True)
    run_tables(params, metrics=metrics, out=tmp_path / "results")
    t2 = read_csv(tmp_path / "results" / "table2_teacher.csv")
    assert (t2[1]["teacher"], t2[1]["teacher top-1"], t2[1]["student top-1 @16px"]) == (
        "transformer (vit)",
        "78.00",
        "70.38 ± 0.01",
    )
    claim = [
        r
        for r in read_csv(tmp_path / "results" / "claims.csv")
        if r["claim"].startswith("a convnet teacher")
    ][0]
    assert claim["mean a − b"] == "+2.01"


def test_byte_identical_rerun_and_pngs(tmp_path, params, results):
    metrics, out = results
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    again = tmp_path / "again"
    run_tables(params, metrics=metrics, out=again)
    second = {p.name: p.read_bytes() for p in sorted(again.iterdir())}
    assert first == second
    assert {n.rsplit(".", 1)[1] for n in first} == {"md", "csv", "tex", "png", "json"}
    for png in ("figure3_epochs.png", "figure1_throughput_accuracy.png"):
        with Image.open(out / png) as im:
            im.verify()
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
            assert "Software" not in im.info


NUMBER = re.compile(r"^[+\-−]?\d")


def test_every_number_is_traceable(results, params):
    metrics, out = results
    for path in sorted(out.glob("*.csv")):
        sources = trace(path)
        for i, r in enumerate(read_csv(path)):
            for col, text in r.items():
                if NUMBER.match(text):
                    assert sources.get((i, col)), f"{path.name} row {i} {col!r}: {text}"
    t3 = trace(out / "table3_distillation.csv")
    (src,) = t3[(5, "top-1 @16px")]
    assert src == "metrics/pretrain/deit.json#/heads/joint/top1"
    assert resolve(src, metrics=metrics)["values"] == [72.41, 72.37]
    (paper,) = t3[(5, "paper DeiT-B")]
    assert resolve(paper, metrics=metrics) == "83.4"
    (pair,) = trace(out / "table4_disagreement.csv")[(1, "DeiT⚗ class+distil.")]
    assert pair == "metrics/evaluate.json#/disagreement/teacher/deit~1joint"
    assert resolve(pair, metrics=metrics)["values"] == [21.0, 21.13]
    (budget,) = trace(out / "figure3_epochs.csv")[(0, "DeiT (no distillation)")]
    assert budget == "metrics/figure3/none-6.json#/top1"
    assert resolve(budget, metrics=metrics)["values"] == [60.0, 61.0]
    (dim,) = trace(out / "table1_variants.csv")[(0, "embedding dim")]
    assert resolve(dim, metrics=metrics, params=params) == 64
    prov = json.loads((out / "provenance.json").read_text())
    assert all(f.startswith(("metrics/", "reference/paper/")) for f in prov["files"])
    assert "metrics/evaluate.json" in prov["tables"]["table4_disagreement"]["files"]
    assert stale(out, metrics=metrics) == []


def test_stale_after_a_metrics_change(tmp_path, params):
    metrics = synthetic_metrics(tmp_path)
    run_tables(params, metrics=metrics, out=tmp_path / "results")
    (metrics / "pretrain" / "hard.json").write_text(
        (metrics / "pretrain" / "hard.json").read_text().replace("75.2", "75.3")
    )
    assert stale(tmp_path / "results", metrics=metrics) == ["metrics/pretrain/hard.json"]


def test_missing_stages_say_not_run(tmp_path, params):
    metrics = synthetic_metrics(tmp_path)
    for name in ("evaluate.json", "throughput.json", "finetune/bilinear.json"):
        (metrics / name).unlink()
    run_tables(params, metrics=metrics, out=tmp_path / "results")
    t4 = read_csv(tmp_path / "results" / "table4_disagreement.csv")
    assert t4[0]["teacher"] == "not run" and t4[0]["paper: teacher"] == "0.171"
    t10 = {r["run"]: r for r in read_csv(tmp_path / "results" / "table10_finetune_resolution.csv")}
    assert t10["bilinear"]["top-1 after fine-tuning"] == "not run"
    assert read_csv(tmp_path / "results" / "table1_variants.csv")[0]["images/s"] == "not run"


@pytest.mark.parametrize(
    "profile",
    ["smoke", "fashion", "imagenet", "imagenet+rehearsal"],  # the overlay on imagenet
)
def test_the_tables_read_the_metrics_files_dvc_yaml_defines(tmp_path, profile):
    """dag_metrics (what the tables stage reads) is, for every profile, the set of metrics
    files (not live logs) that DVC's reading of dvc.yaml says the stages write."""
    import shutil

    import yaml
    from dvc.repo import Repo

    from deit_repro.config import compose_params
    from deit_repro.reporting.inputs import dag_metrics

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    layers = [ROOT / "profiles" / f"{name}.yaml" for name in profile.split("+")]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose_params(*layers)))
    Repo.init(tmp_path, no_scm=True)
    with Repo(tmp_path) as repo:
        written = {
            str(o.def_path)[len("metrics/") : -len(".json")]
            for stage in repo.index.stages
            for o in stage.outs
            if str(o.def_path).startswith("metrics/")
            and str(o.def_path).endswith(".json")
            and not o.metric
        }
    assert written == set(dag_metrics(load_params(tmp_path / "params.yaml")))


def test_table7_states_that_the_transfer_trains_without_a_teacher(results):
    """The official transfer of a distilled model kept distilling (facebookresearch/deit#45);
    this one does not, and the table says so."""
    _, out = results
    text = (out / "table7_transfer.md").read_text()
    assert "Deviation: the transfer trains without a teacher" in text
    assert "facebookresearch/deit#45" in text
