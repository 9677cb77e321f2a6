"""One teacher per seed: student seed k distils from teacher seed k, through the real CLI (the
commands dvc.yaml runs), as every run's run.json records; released teacher weights are one run
that serves every seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import smoke_dict
from workflow_helpers import DEIT, run

SEEDS = [3, 5]
TEACHER_OUT = ["--out", "teacher", "--run-dir", "runs/teacher", "--metrics", "teacher.json"]


def _params(tmp: Path) -> Path:
    data = smoke_dict()
    data["seeds"] = SEEDS
    path = tmp / "params-seeds.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _distil(common: list[str], where: Path) -> None:
    """Hard distillation from ``where/teacher`` into ``where/deit``, runs in ``runs/deit``."""
    argv = ["--distill", "hard", "--teacher", "teacher", "--out", "deit", "--run-dir", "runs/deit"]
    run([DEIT, "pretrain", *common, *argv], where)


@pytest.mark.slow
def test_student_seed_k_reads_teacher_seed_k(fashion_small, tmp_path):
    params = _params(tmp_path)
    common = ["--params", str(params), "--data", str(fashion_small)]
    run(
        [
            DEIT,
            "teacher",
            *common,
            *TEACHER_OUT,
        ],
        tmp_path,
    )
    # one teacher run per seed, each with its own weights, aggregated over the seeds
    assert _json(tmp_path / "teacher.json")["seeds"] == SEEDS
    for k in SEEDS:
        assert _json(tmp_path / "teacher" / f"seed{k}" / "model.json")["seed"] == k
    assert _json(tmp_path / "runs/teacher/seed3/run.json")["seed"] == 3
    _distil(common, tmp_path)
    run(
        [
            DEIT,
            "finetune",
            *common,
            "--student",
            "deit",
            "--teacher",
            "teacher",
            "--out",
            "ft",
            "--run-dir",
            "runs/ft",
        ],
        tmp_path,
    )
    hashes = set()
    for k in SEEDS:
        for stage in ("deit", "ft"):
            info = _json(tmp_path / "runs" / stage / f"seed{k}" / "run.json")
            assert info["seed"] == k
            assert info["teacher"]["seed"] == k, (stage, info["teacher"])
            assert info["teacher"]["dir"] == f"teacher/seed{k}", (stage, info["teacher"])
            hashes.add((k, info["teacher"]["weights"]))
    assert len({h for _, h in hashes}) == len(SEEDS) == len(hashes)  # per seed, one teacher


@pytest.mark.slow
def test_released_teacher_weights_are_one_run_for_every_seed(fashion_small, tmp_path):
    """Fixed released weights (the imagenet profile's RegNetY-16GF): one teacher run, read by
    every seed of the students; their run.json says it has no seed of its own."""
    import torch

    from deit_repro.core.model_dirs import teacher_kwargs
    from deit_repro.core.models import create_teacher
    from deit_repro.config import load_params

    params = _params(tmp_path)
    cfg = load_params(params).teacher.model
    model = create_teacher(**teacher_kwargs(cfg, num_classes=10, in_chans=1, drop_path=0.0))
    torch.save(model.state_dict(), tmp_path / "released.pth")
    common = ["--params", str(params), "--data", str(fashion_small)]
    run(
        [
            DEIT,
            "teacher",
            *common,
            "--weights",
            "released.pth",
            *TEACHER_OUT,
        ],
        tmp_path,
    )
    assert _json(tmp_path / "teacher" / "model.json")["seed"] is None
    assert not list((tmp_path / "teacher").glob("seed*"))
    _distil(common, tmp_path)
    for k in SEEDS:
        info = _json(tmp_path / "runs" / "deit" / f"seed{k}" / "run.json")
        assert info["teacher"]["dir"] == "teacher" and info["teacher"]["seed"] is None


def test_a_directory_with_one_run_and_per_seed_runs_is_refused(tmp_path):
    """Which teacher a seed would read is unclear: a stale output of the other layout."""
    from deit_repro.core.model_dirs import resolve_model_dir
    from deit_repro.errors import CheckpointError

    (tmp_path / "t" / "seed0").mkdir(parents=True)
    (tmp_path / "t" / "model.json").write_text("{}")
    (tmp_path / "t" / "seed0" / "model.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds a single run \(model.json\) and per-seed"):
        resolve_model_dir(tmp_path / "t", 0)
    (tmp_path / "t" / "model.json").unlink()
    assert resolve_model_dir(tmp_path / "t", 0) == tmp_path / "t" / "seed0"


def test_the_claims_note_says_which_teacher_each_seed_read(tmp_path):
    """Per-seed teachers: the teacher's variance is inside the intervals; one run (released
    weights): the intervals are about that teacher."""
    import dataclasses

    from conftest import ROOT
    from deit_repro.config import load_params
    from deit_repro.reporting.context import Context
    from deit_repro.reporting.inputs import REFERENCE, Metrics, Reference

    params = dataclasses.replace(load_params(ROOT / "profiles" / "fashion.yaml"), seeds=(0, 1))
    m = tmp_path / "metrics"
    m.mkdir()
    imagenet = load_params(ROOT / "profiles" / "imagenet.yaml")  # released RegNetY-16GF
    notes = []
    for p, seeds in ((params, [0, 1]), (params, [0]), (imagenet, [0])):
        (m / "teacher.json").write_text(json.dumps({"seeds": seeds, "n": len(seeds)}))
        notes.append(Context(p, Metrics(m), Reference(REFERENCE)).teacher_note())
    assert "distils from the teacher trained with seed k" in notes[0]
    assert "variance is inside the seed intervals" in notes[0]
    assert notes[1].startswith("every seed distils from one teacher run: the intervals are about")
    assert notes[2].startswith("every seed distils from the one released teacher (fixed weights")
