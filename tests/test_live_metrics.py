"""The training stages' live log (DVCLive, deit_repro.core.live_metrics): what it logs, that a
resumed log holds every epoch exactly once, that a run killed mid-way and started again ends with
the bytes of an uninterrupted run, and that `dvc exp show` sees it while a stage trains."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import smoke_dict
from deit_repro.core.live_metrics import StageLive, epoch_values, final_values
from workflow_helpers import DEIT, DVC, env, make_repo, result, run


def _history(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _row(epoch: int, loss: float, top1: float | str = "") -> dict:
    return {
        "epoch": epoch,
        "lr": 0.001,
        "train_loss": loss,
        "test_cls_top1": top1,
        "test_cls_top5": "",
        "train_images_per_s": 123.4,
    }


def _tsv(directory: Path, name: str) -> list[tuple[int, float]]:
    with open(directory / "plots" / "metrics" / f"{name}.tsv", newline="") as fh:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(fh, delimiter="\t")]


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


AGGREGATE = {
    "heads": {
        "cls": {
            "top1": {"mean": 61.0, "std": 1.414214, "values": [60.0, 62.0]},
            "top5": {"mean": 97.5, "std": 0.707107, "values": [97.0, 98.0]},
        }
    }
}


def test_epoch_values_are_the_seeds_mean_of_loss_and_every_heads_top1():
    rows = [
        {
            "epoch": "3",
            "lr": "0.1",
            "train_loss": "2.0",
            "test_cls_top1": "60",
            "test_dist_top1": "70",
            "test_cls_top5": "90",
            "ema_test_cls_top1": "61",
            "train_images_per_s": "5",
        },
        {
            "epoch": "3",
            "lr": "0.1",
            "train_loss": "1.0",
            "test_cls_top1": "62",
            "test_dist_top1": "71",
            "test_cls_top5": "91",
            "ema_test_cls_top1": "63",
            "train_images_per_s": "9",
        },
    ]
    assert epoch_values(rows) == {
        "train_loss": 1.5,
        "cls_top1": 61.0,
        "dist_top1": 70.5,
        "ema_cls_top1": 62.0,
    }
    # an epoch that was not evaluated logs the loss alone
    assert epoch_values([{"epoch": "1", "train_loss": "2", "test_cls_top1": ""}]) == {
        "train_loss": 2.0
    }
    assert final_values(AGGREGATE) == {
        "cls_top1": 61.0,
        "cls_top1_std": 1.414214,
        "cls_top5": 97.5,
        "cls_top5_std": 0.707107,
    }


def test_an_epoch_is_logged_once_every_seed_has_finished_it(tmp_path):
    h0, h1 = tmp_path / "s0.csv", tmp_path / "s1.csv"
    _history(h0, [_row(1, 2.0), _row(2, 1.8)])
    _history(h1, [_row(1, 1.0)])
    live = StageLive(tmp_path / "live", [h0, h1])
    assert live.sync() == 1  # seed 1 has not finished epoch 2
    assert _tsv(tmp_path / "live", "train_loss") == [(1, 1.5)]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary == {"train_loss": 1.5, "step": 1}
    _history(h1, [_row(1, 1.0), _row(2, 1.2, 60.0)])
    _history(h0, [_row(1, 2.0), _row(2, 1.8, 62.0)])
    assert live.sync() == 2
    live.finish([h0, h1], AGGREGATE)
    assert _tsv(tmp_path / "live", "train_loss") == [(1, 1.5), (2, 1.5)]
    assert _tsv(tmp_path / "live", "cls_top1") == [(2, 61.0)]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["step"] == 2 and summary["cls_top1_std"] == 1.414214
    assert summary["cls_top5"] == 97.5


@pytest.mark.parametrize("fault", ["tsv row past the summary", "directory deleted", "none"])
def test_a_resumed_log_holds_every_epoch_once_and_the_bytes_of_an_unbroken_one(tmp_path, fault):
    rows = [_row(e, 2.0 - e / 10, 50.0 + e if e % 2 == 0 else "") for e in range(1, 7)]
    hist = tmp_path / "h.csv"
    _history(hist, rows)
    unbroken = StageLive(tmp_path / "unbroken", [hist])
    unbroken.finish([hist], AGGREGATE)

    # The run is stopped after epoch 3: its log has epochs 1-3 ...
    _history(hist, rows[:3])
    first = StageLive(tmp_path / "live", [hist])
    first.sync()
    if fault == "tsv row past the summary":
        # ... and a kill between DVCLive's append to a .tsv and its summary left epoch 4's row
        with open(tmp_path / "live" / "plots" / "metrics" / "train_loss.tsv", "a") as fh:
            fh.write("4\t1.6\n")
    elif fault == "directory deleted":  # DVC removes a stage's outputs before it runs it again
        import shutil

        shutil.rmtree(tmp_path / "live")
    # The resumed run goes on from its checkpoint: the same rows, then the rest.
    _history(hist, rows)
    resumed = StageLive(tmp_path / "live", [hist])
    assert resumed.logged == (-1 if fault == "directory deleted" else 3)
    resumed.finish([hist], AGGREGATE)
    assert [s for s, _ in _tsv(tmp_path / "live", "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert _files(tmp_path / "live") == _files(tmp_path / "unbroken")


def test_released_weights_log_their_evaluation_at_epoch_0(tmp_path):
    """A teacher from released weights trains no epoch: its one evaluation is step 0, so the
    stage's plots directory exists (a DVC output) and a rerun logs nothing twice."""
    hist = tmp_path / "h.csv"
    _history(hist, [{"epoch": 0, "train_loss": "", "test_cls_top1": 81.5, "test_cls_top5": 95.0}])
    StageLive(tmp_path / "live", [hist]).finish([hist], AGGREGATE)
    first = _files(tmp_path / "live")
    assert _tsv(tmp_path / "live", "cls_top1") == [(0, 81.5)]
    assert "plots/metrics/train_loss.tsv" not in first
    StageLive(tmp_path / "live", [hist]).finish([hist], AGGREGATE)
    assert _files(tmp_path / "live") == first
    assert json.loads(first["metrics.json"])["step"] == 0


def test_a_run_that_started_over_rewrites_the_log(tmp_path):
    """``--restart`` moved a stale checkpoint aside: the new run's rows replace the old ones."""
    hist = tmp_path / "h.csv"
    _history(hist, [_row(e, 9.0) for e in range(1, 5)])
    StageLive(tmp_path / "live", [hist]).sync()
    _history(hist, [_row(e, 1.0) for e in range(1, 3)])
    StageLive(tmp_path / "live", [hist]).finish([hist], AGGREGATE)
    assert _tsv(tmp_path / "live", "train_loss") == [(1, 1.0), (2, 1.0)]
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["step"] == 2


# --------------------------------------------------------------------------------------------
# The real stage: two seeds trained side by side, killed mid-way, started again
# --------------------------------------------------------------------------------------------

EPOCHS = 8
HALT = 4  # the epoch (1-based) after whose checkpoint every seed of a halted run pauses

# A `sitecustomize` for the `deit-repro` processes a test starts (unserved, so that each imports
# it): the HALT-th checkpoint written to one path (atomic.py renames every checkpoint onto it;
# `os` is patched because `deit-repro` re-imports the checkout's own deit_repro) is followed by a
# marker file beside it and a pause until a release file appears there. The tests wait on these
# events, not on the machine's speed, so they pass on fast and slow machines alike.
_HALTING = f"""
import os, sys, time
from pathlib import Path

if os.path.basename(sys.argv[0]) == "deit-repro":
    replace, written = os.replace, {{}}

    def halting_replace(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if os.path.basename(str(dst)) == "checkpoint.pth":
            written[str(dst)] = written.get(str(dst), 0) + 1
            if written[str(dst)] == {HALT}:
                Path(str(dst) + ".halted").touch()
                while not Path(str(dst) + ".release").exists():
                    time.sleep(0.1)

    os.replace = halting_replace
"""


def _halting_env(tmp: Path) -> dict[str, str]:
    """The environment of a halting run (see _HALTING)."""
    site = tmp / "halting"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_HALTING)
    return dict(env(), PYTHONPATH=str(site), DEIT_REPRO_FORKSERVER="0")


def _start(cmd: list[str], cwd: Path, environ: dict[str, str], **streams) -> subprocess.Popen:
    kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **streams}
    return subprocess.Popen(cmd, cwd=cwd, env=environ, start_new_session=True, **kwargs)


def _wait(proc: subprocess.Popen, ready, what: str, limit_s: float = 600) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"the stage ended (exit {proc.returncode}) before {what}"
        assert time.time() - t0 < limit_s, f"no {what} after {limit_s} s"
        time.sleep(0.1)


def _params(tmp: Path, epochs: int = EPOCHS) -> Path:
    data = smoke_dict()
    data["seeds"] = [0, 1]
    data["student"]["model"].update(embed_dim=64, depth=4)
    data["student"]["train"].update(epochs=epochs, eval_every=2)
    path = tmp / "params-live.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _pretrain(params: Path, data: Path, where: Path) -> list[str]:
    return [
        DEIT,
        "pretrain",
        "--params",
        str(params),
        "--data",
        str(data),
        "--distill",
        "none",
        "--dist-token",
        "no",
        "--jobs",
        "2",
        "--out",
        str(where / "model"),
        "--run-dir",
        str(where / "run"),
        "--metrics",
        str(where / "metrics.json"),
        "--live",
        str(where / "live"),
    ]


@pytest.mark.slow
def test_a_killed_and_resumed_stage_keeps_its_full_per_epoch_history(fashion_small, tmp_path):
    params = _params(tmp_path)
    run(_pretrain(params, fashion_small, tmp_path / "ref"), tmp_path)
    ref = tmp_path / "ref" / "live"
    assert [s for s, _ in _tsv(ref, "train_loss")] == list(range(1, EPOCHS + 1))
    assert [s for s, _ in _tsv(ref, "cls_top1")] == [2, 4, 6, 8]

    # The kill waits on events the stage emits: every seed paused right after its checkpoint of
    # epoch HALT, and the stage's live log at two epochs or more.
    where = tmp_path / "killed"
    halted = [where / "run" / f"seed{seed}" / "checkpoint.pth.halted" for seed in (0, 1)]
    summary = where / "live" / "metrics.json"

    def seen() -> int:
        return json.loads(summary.read_text())["step"] if summary.exists() else 0

    proc = _start(_pretrain(params, fashion_small, where), tmp_path, _halting_env(tmp_path))
    try:
        _wait(proc, lambda: all(h.exists() for h in halted) and seen() >= 2, "every seed halted")
        assert seen() < EPOCHS
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (where / "metrics.json").exists()
    run(_pretrain(params, fashion_small, where), tmp_path)  # resumes every seed and the log
    for seed in (0, 1):
        info = json.loads((where / "run" / f"seed{seed}" / "run.json").read_text())
        assert info["resumed_from_epoch"] is not None
    assert _files(where / "live") == _files(ref)
    assert (where / "metrics.json").read_bytes() == (tmp_path / "ref" / "metrics.json").read_bytes()


@pytest.mark.slow
def test_dvc_exp_show_sees_the_live_log_while_the_stage_trains(tmp_path):
    repo = make_repo(tmp_path / "repo", _params(tmp_path))
    run([DVC, "repro", "prepare@fashion_mnist"], repo)
    column = "metrics/pretrain/none/metrics.json:step"

    def steps() -> tuple[str, str]:
        proc = result([DVC, "exp", "show", "--csv", "--no-pager"], repo, timeout=300)
        assert proc.returncode == 0, proc.stderr
        rows = list(csv.DictReader(proc.stdout.splitlines()))
        workspace = next(r for r in rows if r["Experiment"] == "" and r["rev"] == "workspace")
        # DVC prefixes a metric with its file only where two files share its name
        return workspace.get(column, workspace.get("step", "")), proc.stdout

    # The stage pauses after epoch HALT (every seed) until `dvc exp show` has seen its live log:
    # no race between the training and DVC's reading, however fast or loaded the machine.
    ckpts = [repo / "runs/pretrain/none" / f"seed{seed}" / "checkpoint.pth" for seed in (0, 1)]
    proc = _start(
        [DVC, "exp", "run", "pretrain@none"],
        repo,
        _halting_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait(proc, lambda: all(Path(f"{c}.halted").exists() for c in ckpts), "every seed halted")
        during, t0 = "", time.time()
        while not during and time.time() - t0 < 300:  # the live log is synced every 5 s
            step, _ = steps()
            # "-": not written yet; "!": DVC could not read it at that instant (it says so
            # rather than failing); either way, ask again
            during = step if step not in ("", "-", "!") and 0 < int(float(step)) else ""
        for c in ckpts:
            Path(f"{c}.release").touch()
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert during, "dvc exp show never showed the stage's live log while it trained"
    assert int(float(during)) <= HALT < EPOCHS
    after, text = steps()
    assert int(float(after)) == EPOCHS, text
    header = text.splitlines()[0].split(",")
    assert {"step", "train_loss", "cls_top1", "cls_top1_std", "cls_top5"} <= set(header), header
