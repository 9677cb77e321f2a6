"""The benchmark scripts run and report sane figures. Their numbers are shown by the
scripts, never asserted as timings here: only that every figure is there and positive."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, tmp_path) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_profile_training_bench_reports_both_models(tmp_path, fashion_small):
    res = _run(
        "profile_training.py",
        "--params",
        str(SMOKE),
        "--data",
        str(fashion_small),
        "--rounds",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        tmp_path=tmp_path,
    )
    assert [r["model"] for r in res["results"]] == ["student", "teacher"]
    for r in res["results"]:
        for key in (
            "A_engine_images_per_s",
            "B_plain_loop_images_per_s",
            "C_batch_in_memory_images_per_s",
            "train_flops_per_image",
            "matmul_peak_gflops",
            "pct_of_peak_A",
        ):
            assert r[key] > 0, key
    # torch's FLOP counter: a ViT's training FLOPs are about 3x its forward, >= 6 x params x tokens
    student = res["results"][0]
    assert student["train_flops_per_image"] > 6 * student["params_m"] * 1e6 * 25


def test_gpu_bench_runs_in_smoke_mode_on_cpu(tmp_path):
    res = _run("gpu_train.py", "--smoke", tmp_path=tmp_path)
    for k in ("fp32", "official", "ours"):
        assert res["training"][k]["images_per_s"] > 0
    assert {r["precision"] for r in res["inference"]} == {"fp32", "amp"}
    assert res["decode"]["cpu_pil_images_per_s_per_core"] > 0


def test_the_gpu_check_runs_its_code_on_a_cpu(tmp_path):
    """`bench/gpu_check.py --smoke`: the NCCL step is skipped without CUDA; the rehearsal step
    distils DeiT-Ti⚗ from the generated RegNetY-16GF, is interrupted after one epoch and resumes;
    the benchmark goes through engine.fit."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["nccl"] == {"skipped": "no CUDA"}
    assert res["rehearsal"]["resumed_from_epoch"] == 0
    assert set(res["rehearsal"]["student_heads"]) == {"cls", "dist", "joint"}
    (bench,) = res["fit_benchmark"].values()
    assert bench["images_per_s"] > 0 and len(bench["per_epoch"]) == 2
