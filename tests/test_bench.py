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


def test_the_gpu_check_runs_its_code_on_a_cpu(rehearsal_data, tmp_path):
    """`bench/gpu_check.py --smoke`: the NCCL step is skipped without CUDA; the rehearsal step
    distils DeiT-Ti⚗ from the generated RegNetY-16GF, is interrupted after one epoch and resumes;
    the benchmark measures a matmul ceiling, FLOPs per image, the official-style loop, and
    engine.fit on synthetic batches and from ImageNet-sized JPEG files through the device
    pipeline, with the ratios between them."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data").symlink_to(rehearsal_data.out)  # the session's generated data
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
    bench = res["benchmark"]
    assert bench["ceiling_tflops"] > 0 and bench["photos"]["train_images"] == 8
    assert bench["photos"]["mean_kb"] > 20  # ImageNet-sized JPEGs, not thumbnails
    assert set(bench["models"]) == {
        "deit_tiny_patch16_224",
        "deit_tiny_distilled_patch16_224+regnety_002",
    }
    for row in bench["models"].values():
        # the device pipeline (what `auto` is on a GPU), from the files, through engine.fit
        assert row["pipeline"] == "device" and row["train_gflop_per_image"] > 0
        for kind in ("synthetic", "files"):
            r = row[kind]
            assert len(r["per_epoch"]) == 3 and r["steps_per_epoch"] == 2, r
            assert r["images_per_s"] == pytest.approx(sum(r["per_epoch"][1:]) / 2, abs=0.1)
            assert r["compiled"] is False  # compile: auto is off on a CPU
        for kind in ("official", "synthetic", "files"):
            r = row[kind]
            mfu = r["images_per_s"] * row["train_gflop_per_image"] / bench["ceiling_tflops"] / 1e3
            assert r["mfu"] == pytest.approx(mfu, rel=0.02, abs=1e-4)
            assert r["vs_official"] == pytest.approx(
                r["images_per_s"] / row["official"]["images_per_s"], rel=0.01
            )
        assert row["loader"]["images_per_s"] > 0
        assert row["files_vs_synthetic"] == pytest.approx(
            row["files"]["images_per_s"] / row["synthetic"]["images_per_s"], rel=0.01
        )
    assert "| deit_tiny_patch16_224 | files |" in proc.stdout


def test_machine_spread_compares_two_dispatches_on_smoke(dvc_reference, tmp_path):
    """The mechanics (smoke: one seed, so no interval): the session's reference run of the smoke
    DAG as the default-dispatch clone (``--default-clone``, checked up to date and of this code),
    a fresh clone under another kernel dispatch that its provenance records, every claim side by
    side."""
    default = dvc_reference["copy"](tmp_path / "default")
    res = _run(
        "machine_spread.py",
        "--profile",
        "smoke",
        "--default-clone",
        str(default),
        tmp_path=tmp_path,
    )
    fp = res["float_paths"]
    assert len(fp["default"]) == len(fp["other"]) == 1  # every run of a DAG on one float path
    default, other = fp["default"][0], fp["other"][0]
    assert default["dispatch_env"] == {}
    assert other["dispatch_env"] == {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    }
    assert other["torch_cpu_capability"] == "DEFAULT" != default["torch_cpu_capability"]
    with open(ROOT / "results" / "claims.csv", encoding="utf-8") as fh:
        n_claims = len(fh.read().splitlines()) - 1
    assert len(res["claims"]) == n_claims
    for row in res["claims"]:
        a, b = row["default"], row["other"]
        assert {a["verdict"], b["verdict"]} <= {"holds", "reversed", "not resolved"}
        assert row["mean_difference"] == pytest.approx(abs(a["mean"] - b["mean"]), abs=1e-4)
        assert a["n_seeds"] == b["n_seeds"] == 1 and row["inside_half_width"] is None
    assert res["contradicting"] == sum(r["contradicts"] for r in res["claims"])
    records = res["training_records"]
    # teachers 2, pretrain 5, Figure 3 2, finetune 3, transfer 2, evaluate 1
    assert len(records["identical"]) + len(records["different"]) == 15


def test_machine_spread_verdict_logic_and_bad_dispatch(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import machine_spread as ms

    def c(verdict, mean, ci=None):
        return {
            "verdict": verdict,
            "mean": mean,
            "ci": ci,
            "half_width": (ci[1] - ci[0]) / 2 if ci else None,
            "n_seeds": 5,
            "unit": "pts",
        }

    assert ms.contradicts(c("holds", 2.0), c("reversed", -1.0))
    assert ms.contradicts(c("holds", 2.0), c("not resolved", -0.5))
    assert ms.contradicts(c("not resolved", 0.3), c("reversed", -1.0))
    assert not ms.contradicts(c("holds", 2.0), c("not resolved", 0.5))
    assert not ms.contradicts(c("not resolved", 0.4), c("not resolved", -0.4))
    rows = ms.compare(
        {"x": c("holds", 2.0, [1.0, 3.0]), "y": c("holds", 2.0, [1.5, 2.5])},
        {"x": c("holds", 2.8, [1.5, 4.1]), "y": c("not resolved", 1.2, [-0.2, 2.6])},
    )
    # x: |2.0 - 2.8| = 0.8 <= min(1.0, 1.3); y: 0.8 > min(0.5, 1.4)
    assert [r["inside_half_width"] for r in rows] == [True, False]
    assert [r["contradicts"] for r in rows] == [False, False]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "machine_spread.py"), "--dispatch", "AVX2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--dispatch item 'AVX2' is not VAR=value" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_loader_bench_measures_the_paper_pipeline_per_core_and_the_cores_a_gpu_needs(tmp_path):
    """`bench/loader_bench.py --smoke`: JPEGs written to disk, the imagenet profile's timm training
    transform per core, a DataLoader with workers, and the cores the measured GPU rates need."""
    res = _run("loader_bench.py", "--smoke", tmp_path=tmp_path)
    core = res["per_core"]
    assert core["decode_images_per_s"] > core["decode_transform_images_per_s"] > 0
    assert res["transform"]["rand_augment"] == "rand-m9-mstd0.5-inc1"
    assert res["transform"]["reprob"] == 0.25 and res["transform"]["interpolation"] == "bicubic"
    assert res["images"]["count"] == 8 and res["images"]["mean_kb"] > 20
    assert set(res["loader_images_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in res["loader_images_per_s"].values())
    rates = json.loads((ROOT / "bench" / "results" / "gpu_rates.json").read_text())["runs"]
    assert [r["gpu_images_per_s"] for r in res["feeding"]] == [r["images_per_s"] for r in rates]
    for row in res["feeding"]:
        need = row["gpu_images_per_s"] / core["decode_transform_images_per_s"]
        assert row["cores_needed"] == pytest.approx(need, rel=1e-2)
        fed = min(1.0, res["profile_num_workers"] / need)
        assert row["fed_by_profile_workers"] == pytest.approx(fed, abs=2e-3)
    # The device pipeline: its workers read bytes, far faster than they decode and augment; the
    # cores a GPU needs are the readers' plus the one process that drives the GPU.
    dev = res["device_pipeline"]
    assert dev["per_core"]["read_images_per_s"] > 5 * core["decode_images_per_s"]
    assert dev["per_core"]["dispatch_images_per_s"] > 0
    assert dev["per_core"]["device_pipeline_on_cpu_images_per_s"] > 0
    assert set(dev["read_loader_images_per_s"]) == {"1", "2"}
    for row in dev["feeding"]:
        need = row["gpu_images_per_s"] / dev["read_loader_images_per_s"]["1"] + 1
        assert row["cores_needed"] == pytest.approx(need, rel=1e-2)
        drive = min(1.0, dev["per_core"]["dispatch_images_per_s"] / row["gpu_images_per_s"])
        assert row["fed_by_one_dispatching_core"] == pytest.approx(drive, abs=2e-3)


def test_cpu_compile_bench_compares_compile_off_and_on_through_fit(tmp_path, fashion_small):
    """`bench/cpu_compile.py --smoke`: a profile's student through engine.fit with compile off
    and on, the compile overhead and the steady ratio computed from the epochs."""
    res = _run(
        "cpu_compile.py",
        "--smoke",
        "--params",
        str(SMOKE),
        "--data",
        str(fashion_small),
        tmp_path=tmp_path,
    )
    off, on = res["off"], res["on"]
    assert len(off["epoch_seconds"][0]) == len(on["epoch_seconds"][0]) == 2
    assert on["first_epoch_s"] > off["first_epoch_s"]  # tracing and inductor's build
    assert res["compile_overhead_s"] == pytest.approx(
        on["first_epoch_s"] - off["first_epoch_s"], abs=0.06
    )
    ratio = on["steady_images_per_s"] / off["steady_images_per_s"]
    assert res["steady_ratio_on_vs_off"] == pytest.approx(ratio, rel=0.01)
