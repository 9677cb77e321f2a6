"""The submitit launcher on this machine (`launch.launcher: local`), no cluster needed: DDP over
2 gloo processes computes what one process computes, and a job's error comes back as the
stage's one-line error. The SLURM side is tests/test_slurm.py."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import smoke_dict
from workflow_helpers import DEIT, env, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fashion_small):
    root = tmp_path_factory.mktemp("launch")
    data = smoke_dict()
    train = data["student"]["train"]
    # No random draw (augmentation, Mixup, drop-path, repeated copies): then 2 DDP processes with
    # half the global batch each compute the 1-process gradient up to float summation order.
    train.update(epochs=2, eval_every=1, mixup=0.0, cutmix=0.0, drop_path=0.0, repeated_aug=1)
    train["aug"].update(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, reprob=0.0)
    data["launch"]["pretrain"].update(tasks_per_node=2)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    (root / "data").symlink_to(fashion_small)
    run([DEIT, "teacher", "--data", "data", "--out", "teacher", "--run-dir", "runs/teacher"], root)
    return root


def _pretrain(name: str, launcher: str, teacher: str = "teacher") -> list[str]:
    return [
        DEIT,
        "pretrain",
        "--data",
        "data",
        "--teacher",
        teacher,
        "--distill",
        "soft",
        "--seed",
        "0",
        "--out",
        f"models/{name}",
        "--run-dir",
        f"runs/{name}",
        "--launcher",
        launcher,
    ]


def _history(path: Path) -> list[dict[str, float]]:
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def test_local_submitit_ddp_matches_one_process(workdir):
    run(_pretrain("one", "in-process"), workdir)
    out = run(_pretrain("ddp", "local"), workdir)
    assert "finished (world size 2, 0 restart(s))" in out
    assert json.loads((workdir / "runs/ddp/run.json").read_text())["world_size"] == 2
    one = _history(workdir / "models/one/history.csv")
    two = _history(workdir / "models/ddp/history.csv")
    for a, b in zip(one, two, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * a["train_loss"], (a, b)
        assert abs(a["test_cls_top1"] - b["test_cls_top1"]) <= 1.0
    w1 = torch.load(workdir / "models/one/model.pt", weights_only=True)
    w2 = torch.load(workdir / "models/ddp/model.pt", weights_only=True)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3


def test_an_error_inside_a_job_is_the_stages_one_line_error(workdir):
    proc = subprocess.run(
        _pretrain("bad", "local", teacher="no/such/teacher"),
        cwd=workdir,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("deit-repro pretrain: error: seed 0: ") and "no/such/teacher" in last
    assert not (workdir / "models" / "bad" / "metrics.json").exists()


def test_a_submitit_launcher_needs_a_run_dir(workdir):
    cmd = _pretrain("norun", "local")
    cmd = cmd[: cmd.index("--run-dir")] + cmd[cmd.index("--run-dir") + 2 :]
    proc = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "launcher 'local' needs --run-dir" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fault needs a torch without a GPU")
def test_a_gpu_job_without_cuda_is_refused_not_run_on_cpu(tmp_path):
    """`gpus_per_node > 0` and a torch that sees no GPU (a driver too old for the pinned wheel,
    or a GPU it was not built for) is the job's one-line error, never a silent gloo run on CPUs."""
    from deit_repro.config import params_from_dict
    from deit_repro.run.launch import TrainingJob
    from deit_repro.stages.pretrain import PretrainRun
    from deit_repro.stages.trainer import RunSpec

    data = smoke_dict()
    data["launch"]["pretrain"].update(gpus_per_node=1, tasks_per_node=1)
    params = params_from_dict(data)
    run = PretrainRun(params=params, data=tmp_path / "data", distill="none", dist_token=False)
    result = TrainingJob(run, RunSpec(0, tmp_path / "out", tmp_path / "run"))()
    assert result["exit_code"] == 2
    assert result["error"].startswith("launch.pretrain.gpus_per_node is 1 but torch ")
    assert "sees no usable GPU" in result["error"] and "gpus_per_node: 0" in result["error"]
    assert not (tmp_path / "out").exists()  # nothing trained


def test_a_flag_sbatch_option_is_true_and_false_leaves_it_out(tmp_path):
    """`launch.slurm.additional: {exclusive: true}` is sbatch's --exclusive (a flag takes no
    value); `false` leaves the option out; a value is --key=value."""
    from deit_repro.config import params_from_dict
    from deit_repro.run.launch import sbatch_script

    data = smoke_dict()
    data["launch"]["slurm"] = {
        "additional": {"exclusive": True, "requeue": False, "exclude": "node[1-2]", "nice": 10}
    }
    launch = params_from_dict(data).launch
    script = sbatch_script(launch, launch.resources("pretrain"), tmp_path, "job")
    lines = set(script.splitlines())
    assert {"#SBATCH --exclusive", "#SBATCH --exclude='node[1-2]'", "#SBATCH --nice=10"} <= lines
    assert not [line for line in lines if "requeue" in line]


def test_a_slurm_launcher_without_sbatch_is_one_line_not_a_traceback(tmp_path, fashion_small):
    """The imagenet profile's launcher on a laptop (no SLURM client): the stage says so and what
    to do, instead of submitit's RuntimeError('Could not detect "srun"')."""
    data = smoke_dict()
    data["launch"]["launcher"] = "slurm"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    path = ":".join(p for p in env()["PATH"].split(":") if not Path(p, "sbatch").exists())
    proc = subprocess.run(
        [
            DEIT,
            "pretrain",
            "--distill",
            "none",
            "--data",
            str(fashion_small),
            "--out",
            "m",
            "--run-dir",
            "r",
        ],
        cwd=tmp_path,
        env={**env(), "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert "launch.launcher is slurm but this machine has no sbatch on PATH" in last, last
    assert "Traceback" not in proc.stderr
