"""The fork server: a served ``deit-repro`` call gives the bytes, exit statuses and
streams of an unserved one, signals reach it, a killed caller takes its stage with it, and the
server keys, switches off and idles out as documented."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import FORKSERVER_TAG, SMOKE, smoke_dict
from workflow_helpers import DEIT, env

from deit_repro.run import forkserver


@pytest.fixture
def served(monkeypatch):
    """The environment of a server of this test's own (a fresh tag), which goes away 30 s after
    its last call; and that server's log."""
    tag = f"{FORKSERVER_TAG}-{uuid.uuid4().hex[:12]}"
    e = dict(env(), DEIT_REPRO_FORKSERVER_TAG=tag, DEIT_REPRO_FORKSERVER_IDLE_S="30")
    e.pop("DEIT_REPRO_FORKSERVER", None)
    for k, v in e.items():
        monkeypatch.setenv(k, v)  # socket_path() in this process computes the same key
    log = forkserver.socket_path().with_suffix(".log")
    return e, log


def _calls(log: Path) -> list[tuple[int, str]]:
    return [
        (int(pid), what) for pid, what in re.findall(r"^call (\d+): (.*)$", log.read_text(), re.M)
    ]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _teacher(data: Path, out: Path, params: Path = SMOKE) -> list[str]:
    return [
        DEIT,
        "teacher",
        "--params",
        str(params),
        "--arch",
        "convnet",
        "--data",
        str(data),
        "--out",
        str(out / "model"),
        "--run-dir",
        str(out / "run"),
        "--metrics",
        str(out / "metrics.json"),
        "--seed",  # one run: the model and run directories themselves
        "0",
    ]


def _history(out: Path) -> list[list[str]]:
    """history.csv without its one timing column."""
    rows = [line.split(",") for line in (out / "run" / "history.csv").read_text().splitlines()]
    drop = rows[0].index("train_images_per_s")
    return [row[:drop] + row[drop + 1 :] for row in rows]


def test_a_served_call_gives_the_same_bytes_statuses_and_streams(fashion_small, tmp_path, served):
    e, log = served
    unserved = dict(e, DEIT_REPRO_FORKSERVER="0")
    require = dict(e, DEIT_REPRO_FORKSERVER="require")

    a = subprocess.run(
        _teacher(fashion_small, tmp_path / "a"),
        env=unserved,
        capture_output=True,
        text=True,
        timeout=300,
    )
    b = subprocess.run(
        _teacher(fashion_small, tmp_path / "b"),
        env=require,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    calls = _calls(log)
    assert (
        len(calls) == 2
        and calls[0][1].startswith("teacher --params")
        and calls[1] == (calls[0][0], "X0")
    ), "the second call was not served"
    for rel in ("model/model.pt", "metrics.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert _history(tmp_path / "a") == _history(tmp_path / "b")
    assert a.stdout.replace("/a/", "/b/") == b.stdout
    assert "done in" in b.stderr  # the child's stderr is the caller's

    # Errors keep their one line and exit status; argparse's and --help's too.
    cases = [
        (
            [DEIT, "teacher", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
            2,
            "not a prepared dataset",
        ),
        (
            [DEIT, "teacher", "--arch", "nope", "--data", "d", "--out", "o"],
            2,
            "invalid choice: 'nope'",
        ),
        ([DEIT, "pretrain", "--help"], 0, "usage: deit-repro pretrain"),
    ]
    for argv, code, text in cases:
        results = [
            subprocess.run(argv, env=ev, capture_output=True, text=True, timeout=120)
            for ev in (unserved, require)
        ]
        for r in results:
            assert r.returncode == code and text in r.stdout + r.stderr, (argv, r)
        assert results[0].stdout == results[1].stdout
        assert results[0].stderr.splitlines()[-1:] == results[1].stderr.splitlines()[-1:]
    assert [w for _, w in _calls(log)][-2:] == ["pretrain --help (in " + os.getcwd() + ")", "X0"]


def _long_params(tmp: Path) -> Path:
    data = smoke_dict()
    data["teacher"]["train"].update(epochs=1000)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "params-long.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _start_long(fashion_small, tmp: Path, e: dict, log: Path) -> tuple[subprocess.Popen, int]:
    before = len(_calls(log)) if log.exists() else 0
    proc = subprocess.Popen(
        _teacher(fashion_small, tmp, _long_params(tmp)),
        env=dict(e, DEIT_REPRO_FORKSERVER="require"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = _calls(log)[before:] if log.exists() else []
        if new and (tmp / "run" / "checkpoint.pth").exists():
            return proc, new[0][0]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the long run did not start: {log.read_text() if log.exists() else 'no log'}")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_signals_reach_the_served_stage_and_a_killed_caller_takes_it_along(
    fashion_small, tmp_path, served
):
    e, log = served
    # Ctrl-C: the stage stops the way an unserved one does (one line, status 130).
    proc, child = _start_long(fashion_small, tmp_path / "int", e, log)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "deit-repro teacher: interrupted" in err, err
    assert _gone_within(child, 10)

    # SIGTERM kills the stage, and the caller ends by the same signal.
    proc, child = _start_long(fashion_small, tmp_path / "term", e, log)
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert _gone_within(child, 10)
    assert (child, f"K{int(signal.SIGTERM)}") in _calls(log)

    # kill -9 of the caller cannot be relayed: the child sees its caller gone and kills itself.
    proc, child = _start_long(fashion_small, tmp_path / "kill", e, log)
    proc.kill()
    proc.communicate(timeout=60)
    assert _gone_within(child, 10), "the served stage outlived its killed caller"
    assert not (tmp_path / "kill" / "model").exists()


def test_the_server_is_keyed_switched_off_and_idles_out(tmp_path, monkeypatch):
    monkeypatch.setenv("DEIT_REPRO_FORKSERVER_TAG", f"{FORKSERVER_TAG}-{uuid.uuid4().hex[:12]}")
    monkeypatch.delenv("DEIT_REPRO_FORKSERVER", raising=False)
    path = forkserver.socket_path()
    assert path.parent.stat().st_mode & 0o077 == 0
    # Libraries read these at import: another value is another server.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert forkserver.socket_path() != path
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert forkserver.socket_path() == path

    # Off, or inside a SLURM job: the call runs in the caller, and no server is started.
    for name, value in (("DEIT_REPRO_FORKSERVER", "0"), ("SLURM_JOB_ID", "123")):
        monkeypatch.setenv(name, value)
        assert forkserver.call(["deit-repro", "--help"], target="deit_repro.run.cli:main") is None
        monkeypatch.delenv(name)
    assert not path.with_suffix(".log").exists()

    # A server with a 1 s idle limit removes its socket and exits after its last call.
    monkeypatch.setenv("DEIT_REPRO_FORKSERVER_IDLE_S", "1")
    path = forkserver.socket_path()
    e = dict(os.environ, DEIT_REPRO_FORKSERVER="require")
    r = subprocess.run([DEIT, "--help"], env=e, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "usage: deit-repro" in r.stdout
    server = int(re.search(r"fork server (\d+):", path.with_suffix(".log").read_text())[1])
    assert path.is_socket()
    assert _gone_within(server, 30) and not path.exists()
