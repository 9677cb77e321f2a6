"""Bad input through the real CLI: one line on stderr naming the thing and the fix, a non-zero exit
code, no traceback, and no lost or half-written outputs (the error contract of RELIABILITY.md).

Most cases call ``deit_repro.run.cli.main`` in process (imports cost ~4 s per subprocess); a few run
``python -m deit_repro`` as a subprocess, concurrently, to prove the exit code and the absence of a
traceback end to end.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import smoke_dict
from deit_repro import atomic
from deit_repro.run import cli
from deit_repro.data.sources import DEBIAN_FASHION_DIR, RawDataset, Split
from deit_repro.data.store import write_prepared
from deit_repro.core.engine import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "profiles" / "smoke.yaml"
SENTINEL = b'{"top1": 99.0, "note": "a finished run that must survive"}\n'


# ----------------------------------------------------------------------------------------- helpers


def params_file(path: Path, **changes) -> Path:
    """smoke.yaml with dotted keys changed (a JSON round trip breaks the YAML anchor sharing)."""
    data = smoke_dict()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def sentinel_run(path: Path) -> Path:
    """A finished model directory that a failed run must leave byte-identical."""
    path.mkdir(parents=True)
    (path / "metrics.json").write_bytes(SENTINEL)
    (path / "model.pt").write_bytes(b"previous weights")
    return path


def assert_one_line_error(rc: int, err: str, stage: str, *needles: str, code: int = 2) -> str:
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith(f"deit-repro {stage}: error: "), err
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    what, sep, fix = last.partition("; ")
    assert sep and fix.strip(), f"no fix hint in {last!r}"
    return last


def run_in_process(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(["--log-level", "WARNING", *map(str, argv)])
    return rc, capsys.readouterr().err


def refused_everywhere(
    capsys,
    tmp_path: Path,
    stage: str,
    argv,
    *needles: str,
    code: int = 2,
    out_is_file: bool = False,
) -> str:
    """Run ``argv(out)`` twice: onto a finished output (must stay byte-identical) and onto a fresh
    path (must not appear, and nothing half-written may be left beside it)."""
    if out_is_file:
        old = tmp_path / "old" / "eval.json"
        old.parent.mkdir()
        old.write_bytes(SENTINEL)
        before = snapshot(old.parent)
    else:
        old = sentinel_run(tmp_path / "old")
        before = snapshot(old)
    rc, err = run_in_process(capsys, *argv(old))
    last = assert_one_line_error(rc, err, stage, *needles, code=code)
    assert snapshot(old.parent if out_is_file else old) == before

    fresh_parent = tmp_path / "fresh"
    fresh_parent.mkdir()
    fresh = fresh_parent / ("eval.json" if out_is_file else "run")
    rc, err = run_in_process(capsys, *argv(fresh))
    assert assert_one_line_error(rc, err, stage, *needles, code=code) == last
    assert list(fresh_parent.iterdir()) == []
    return last


class Gadget:
    """A pickled custom object: what a weights file must never make torch.load unpickle."""

    def __reduce__(self):
        return (print, ("this would run on load",))


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_small):
    """A 1-epoch teacher and a 1-epoch student (no distillation) on the smoke profile."""
    root = tmp_path_factory.mktemp("trained")
    for argv in (
        # one run (--seed): a teacher directory, as released weights make
        ["teacher", "--data", fashion_small, "--out", root / "teacher", "--seed", "0"],
        [
            "pretrain",
            "--data",
            fashion_small,
            "--out",
            root / "student",
            "--distill",
            "none",
            "--seed",
            "0",
        ],
    ):
        assert (
            cli.main(
                ["--log-level", "WARNING", argv[0], "--params", str(SMOKE), *map(str, argv[1:])]
            )
            == 0
        )
    torch.set_num_threads(1)
    return {"teacher": root / "teacher", "student": root / "student"}


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    """A prepared 28x28 grey dataset with 3 classes (Fashion-MNIST has 10)."""
    rng = np.random.default_rng(0)

    def split(n):
        return Split(
            labels=np.arange(n, dtype=np.int64) % 3,
            images=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
        )

    out = tmp_path_factory.mktemp("three") / "three"
    write_prepared(
        out,
        RawDataset(
            name="three",
            source="imagefolder",
            classes=["a", "b", "c"],
            splits={"train": split(30), "test": split(9)},
        ),
        {},
    )
    return out


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory, fashion_small):
    """A few cases through ``python -m deit_repro``, run concurrently (imports dominate)."""
    root = tmp_path_factory.mktemp("e2e")
    typo = params_file(root / "typo.yaml", **{"student.train.epochz": 3})
    gadget = root / "gadget.pt"
    torch.save({"model": Gadget()}, gadget)
    old = sentinel_run(root / "old")
    cases = {
        "unknown_key": (
            [
                "pretrain",
                "--params",
                typo,
                "--data",
                fashion_small,
                "--out",
                root / "fresh_pretrain",
                "--distill",
                "none",
            ],
            ["'student.train.epochz'", "did you mean 'student.train.epochs'?", str(typo)],
        ),
        "missing_source": (
            [
                "prepare",
                "--params",
                SMOKE,
                "--dataset",
                "fashion_mnist",
                "--source-dir",
                "/nonexistent",
                "--out",
                root / "fresh_data",
            ],
            ["/nonexistent", "dataset-fashion-mnist", "--source-dir"],
        ),
        "pickled_object": (
            [
                "teacher",
                "--params",
                SMOKE,
                "--data",
                fashion_small,
                "--out",
                old,
                "--weights",
                gadget,
            ],
            [str(gadget), "weights_only", "it pickles print", "state_dict"],
        ),
        "model_not_name_eq_dir": (
            [
                "evaluate",
                "--params",
                SMOKE,
                "--data",
                fashion_small,
                "--model",
                "foo",
                "--out",
                root / "fresh_eval.json",
            ],
            ["'foo'", "NAME=DIR", "--model deit=runs/x"],
        ),
    }
    env = {**os.environ, "DEIT_REPRO_LOG": "WARNING"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "deit_repro", *map(str, argv)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, _) in cases.items()
    }
    results = {
        name: (p.wait(timeout=120), p.stderr.read(), p.stdout.read(), cases[name])
        for name, p in procs.items()
    }
    return root, results


@pytest.mark.parametrize(
    "name", ["unknown_key", "missing_source", "pickled_object", "model_not_name_eq_dir"]
)
def test_subprocess_exit_code_one_line_no_traceback(subprocess_results, name):
    root, results = subprocess_results
    rc, err, out, (argv, needles) = results[name]
    assert_one_line_error(rc, err, argv[0], *needles)
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert out == ""
    assert snapshot(root / "old") == {"metrics.json": SENTINEL, "model.pt": b"previous weights"}
    assert not any(
        p.name.startswith("fresh") or p.name.startswith(".fresh") for p in root.iterdir()
    )


# -------------------------------------------------------------------------------------- bad params


@pytest.mark.parametrize(
    "change, needles",
    [
        (
            {"student.train.epochs": "ten"},
            ["'student.train.epochs' = 'ten'", "expected an integer"],
        ),
        ({"threads": 1.5}, ["'threads' = 1.5", "expected an integer"]),
        (
            {"student.train.epochs": -2},
            ["'student.train.epochs' = -2", "expected a positive integer"],
        ),
        ({"distillation.hard.alpha": 1.5}, ["'distillation.hard.alpha' = 1.5", "in [0, 1]"]),
        (
            {"student.model.patch_size": 6},
            ["'student.model.patch_size' = 6", "a divisor of img_size=20"],
        ),
        (
            {"student.train.epochz": 3},
            ["unknown params key 'student.train.epochz'", "did you mean 'student.train.epochs'?"],
        ),
        # two identical runs would report a std of 0
        (
            {"seeds": [0, 0]},
            ["params key 'seeds' = [0, 0] repeats 0", "give each run its own seed"],
        ),
    ],
)
def test_bad_params_refused_before_anything_is_written(
    capsys, tmp_path, fashion_small, change, needles
):
    params = params_file(tmp_path / "params.yaml", **change)
    refused_everywhere(
        capsys,
        tmp_path,
        "pretrain",
        lambda out: [
            "pretrain",
            "--params",
            params,
            "--data",
            fashion_small,
            "--out",
            out,
            "--distill",
            "none",
        ],
        *needles,
        str(params),
    )


# ---------------------------------------------------------------------------------------- bad data


def _fashion_copy(dst: Path) -> Path:
    dst.mkdir()
    for f in DEBIAN_FASHION_DIR.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def test_truncated_gzip_idx_names_the_file_and_keeps_the_prepared_dataset(
    capsys, tmp_path, fashion_small
):
    src = _fashion_copy(tmp_path / "src")
    bad = src / "train-images-idx3-ubyte.gz"
    data = bad.read_bytes()
    assert gzip.decompress(data)[:4] == struct.pack(">I", 0x803)  # a real IDX before truncation
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "prepared"
    shutil.copytree(fashion_small, out)
    before = snapshot(out)
    assert "manifest.json" in before
    rc, err = run_in_process(
        capsys,
        "prepare",
        "--params",
        SMOKE,
        "--dataset",
        "fashion_mnist",
        "--source-dir",
        src,
        "--out",
        out,
    )
    assert_one_line_error(
        rc,
        err,
        "prepare",
        f"corrupt IDX file {bad}",
        "EOFError",
        "re-download the file or reinstall dataset-fashion-mnist",
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "src"]


def test_truncated_raw_idx_names_the_file_and_sizes(capsys, tmp_path):
    src = _fashion_copy(tmp_path / "src")
    (src / "train-images-idx3-ubyte.gz").unlink()
    bad = src / "train-images-idx3-ubyte"  # raw: header says 60000x28x28, 1000 bytes follow
    bad.write_bytes(struct.pack(">IIII", 0x803, 60000, 28, 28) + bytes(1000))
    out = tmp_path / "fresh"
    rc, err = run_in_process(
        capsys,
        "prepare",
        "--params",
        SMOKE,
        "--dataset",
        "fashion_mnist",
        "--source-dir",
        src,
        "--out",
        out,
    )
    assert_one_line_error(
        rc,
        err,
        "prepare",
        f"corrupt IDX file {bad}",
        "1000 bytes",
        "47040000",
        "reinstall dataset-fashion-mnist",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------------- bad checkpoints


def test_teacher_checkpoint_of_the_wrong_architecture(capsys, tmp_path, trained, fashion_small):
    fake = tmp_path / "fake_teacher"
    shutil.copytree(trained["teacher"], fake)
    shutil.copy(trained["student"] / "model.pt", fake / "model.pt")  # a ViT state dict
    refused_everywhere(
        capsys,
        tmp_path,
        "pretrain",
        lambda out: [
            "pretrain",
            "--params",
            SMOKE,
            "--data",
            fashion_small,
            "--teacher",
            fake,
            "--distill",
            "soft",
            "--out",
            out,
        ],
        f"{fake / 'model.pt'} is of the wrong architecture",
        "keys missing (first: 'stem.",
        "unexpected keys (first: 'cls_token')",
        "use a checkpoint saved from the same model",
    )


def test_weights_that_fail_the_pinned_sha256(capsys, tmp_path, trained, fashion_small):
    weights = trained["teacher"] / "model.pt"  # a real, loadable state dict of the right shape
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    pin = "0" * 64
    params = params_file(
        tmp_path / "pinned.yaml",
        **{"teacher.weights": {"url": "file:///nonexistent/w.pth", "sha256": pin}},
    )
    refused_everywhere(
        capsys,
        tmp_path,
        "teacher",
        lambda out: [
            "teacher",
            "--params",
            params,
            "--data",
            fashion_small,
            "--out",
            out,
            "--weights",
            weights,
        ],
        f"weights file {weights} has sha256 {digest}",
        f"not the pinned {pin}",
        "get the released file again",
    )


@pytest.mark.parametrize(
    "payload, needles",
    [
        (
            lambda: {"conv.weight": torch.zeros(1), "hook": functools.partial(print, "hi")},
            ["weights_only=True", "functools.partial"],
        ),
        (
            lambda: {"model": {"conv.weight": torch.zeros(1)}, "epoch": 3, "args": Gadget()},
            ["weights_only=True", "it pickles print"],
        ),
        (
            lambda: {"conv.weight": torch.zeros(1), "epoch": 3},
            ["is not a plain state dict (name -> tensor)"],
        ),
        (lambda: b"PK\x03\x04 torn zip", ["weights_only=True"]),
    ],
)
def test_weights_that_are_not_a_plain_state_dict(capsys, tmp_path, fashion_small, payload, needles):
    weights = tmp_path / "weights.pth"
    obj = payload()
    if isinstance(obj, bytes):
        weights.write_bytes(obj)
    else:
        torch.save(obj, weights)
    refused_everywhere(
        capsys,
        tmp_path,
        "teacher",
        lambda out: [
            "teacher",
            "--params",
            SMOKE,
            "--data",
            fashion_small,
            "--out",
            out,
            "--weights",
            weights,
        ],
        f"weights file {weights}",
        *needles,
        "torch.save(model.state_dict())",
    )


# --------------------------------------------------------------------------------------- bad flags


# ------------------------------------------------------------------ refused before anything runs

#: Each case: the stage, its options (``{name}``: a path of ``_paths``; ``--out`` is added) and
#: what its one-line error must say. Every one is run onto a finished output (left byte-identical)
#: and onto a fresh path (never created): ``refused_everywhere``.
REFUSALS = {
    "missing-params-file": (
        "teacher",
        "--params {missing} --data {fashion}",
        ["params file {missing} not found", "--params PATH"],
    ),
    "directory-without-manifest": (
        "teacher",
        "--params {smoke} --data {raw}",
        ["not a prepared dataset: {raw} (no manifest.json)", "deit-repro prepare"],
    ),
    "class-count-student-vs-dataset": (
        "finetune",
        "--params {smoke} --data {three} --student {student} --seed 0",
        ["model {student} has 10 classes", "dataset {three} has 3", "class count mismatch"],
    ),
    "class-count-teacher-vs-dataset": (
        "pretrain",
        "--params {smoke} --data {three} --teacher {teacher} --distill hard --dist-token yes",
        [
            "teacher {teacher} was trained on classes",
            "(10), the dataset has 3",
            "use a teacher trained on this dataset",
        ],
    ),
    "dist-token-without-distillation": (
        "pretrain",
        "--params {smoke} --data {fashion} --distill none --dist-token yes",
        ["distillation token without distillation", "--distill soft|hard with --dist-token yes"],
    ),
    "distillation-without-a-teacher": (
        "pretrain",
        "--params {smoke} --data {fashion} --distill hard",
        ["--distill hard needs a teacher", "pass --teacher DIR"],
    ),
    **{
        f"evaluate-model-{item}-is-not-name-eq-dir": (
            "evaluate",
            f"--params {{smoke}} --data {{fashion}} --model {item}",
            [f"--model {item!r} is not NAME=DIR", "--model deit=runs/x"],
        )
        for item in ("foo", "=runs/x", "deit=")
    },
    "prepare-dataset-not-in-params": (
        "prepare",
        "--params {smoke} --dataset cifar10",
        [
            "dataset 'cifar10' is not in params.yaml datasets (digits, fashion_mnist)",
            "add it under datasets:",
        ],
    ),
}


def _paths(request, tmp_path: Path, options: str) -> dict[str, Path]:
    """The paths the options name; the module's trained models and datasets only when used."""
    paths = {"smoke": SMOKE, "missing": tmp_path / "nope.yaml", "raw": tmp_path / "raw_images"}
    if "{fashion}" in options:
        paths["fashion"] = request.getfixturevalue("fashion_small")
    if "{three}" in options:
        paths["three"] = request.getfixturevalue("three_classes")
    if "{student}" in options or "{teacher}" in options:
        paths.update(request.getfixturevalue("trained"))
    paths["raw"].mkdir()
    (paths["raw"] / "train_images.npy").write_bytes(b"not really")  # no manifest.json
    return paths


@pytest.mark.parametrize("case", REFUSALS)
def test_a_bad_command_line_is_refused_before_anything_is_written(capsys, tmp_path, request, case):
    stage, options, needles = REFUSALS[case]
    paths = _paths(request, tmp_path, options)
    argv = [stage, *(o.format(**paths) for o in options.split())]
    refused_everywhere(
        capsys,
        tmp_path,
        stage,
        lambda out: [*argv, "--out", out],
        *(n.format(**paths) for n in needles),
        out_is_file=stage == "evaluate",
    )


# --------------------------------------------------------------------------------------- disk full


def test_disk_full_while_checkpointing_keeps_the_last_complete_checkpoint(
    capsys, tmp_path, fashion_small, monkeypatch
):
    """ENOSPC in the middle of the epoch-2 checkpoint: exit 4, one line, the epoch-1 checkpoint
    still whole and loadable, no temporary file left, no model directory written."""
    params = params_file(tmp_path / "two_epochs.yaml", **{"teacher.train.epochs": 2})
    ckdir, out = tmp_path / "ck", tmp_path / "teacher"
    written: list[bytes] = []  # the checkpoint on disk when the second one starts

    class FillingDisk(io.FileIO):
        """The temporary file of the epoch-2 checkpoint: the disk fills half-way through."""

        def __init__(self, path, mode, room: int):
            super().__init__(path, mode)
            self.room = room

        def write(self, b):
            n = memoryview(b).nbytes
            if n > self.room:
                # what write(2) gives: errno 28 and no file name
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= n
            return super().write(b)

    def filling_disk(file, mode="r", *args, **kwargs):
        target = Path(file).parent / "checkpoint.pth"
        if "w" in mode and Path(file).name.startswith(".checkpoint.pth.") and target.exists():
            written.append(target.read_bytes())
            return FillingDisk(file, mode, room=len(written[0]) // 2)
        return open(file, mode, *args, **kwargs)

    # atomic.torch_save serialises straight into its temporary file, opened in atomic.py.
    monkeypatch.setattr(atomic, "open", filling_disk, raising=False)
    rc, err = run_in_process(
        capsys,
        "teacher",
        "--params",
        params,
        "--data",
        fashion_small,
        "--out",
        out,
        "--run-dir",
        ckdir,
        "--seed",
        "0",
    )
    assert_one_line_error(
        rc,
        err,
        "teacher",
        "no space left on device",
        f"--out {out}",
        f"--run-dir {ckdir}",
        "free disk space and re-run",
        code=4,
    )
    assert len(written) == 1
    ckpt_file = ckdir / "checkpoint.pth"
    assert ckpt_file.read_bytes() == written[0]
    ckpt = load_checkpoint(ckpt_file)
    assert ckpt["epoch"] == 0 and len(ckpt["history"]) == 1
    assert sorted(p.name for p in ckdir.iterdir()) == ["checkpoint.pth", "history.csv"]
    assert not out.exists()


def test_ctrl_c_while_checkpointing_is_an_interrupt_and_keeps_the_last_checkpoint(
    capsys, tmp_path, fashion_small, monkeypatch
):
    """Ctrl-C landing in the middle of the epoch-2 checkpoint: the stage says it was interrupted
    and exits 130 (no traceback, though torch's zip writer fails to close the cut archive), the
    epoch-1 checkpoint is whole, no temporary file is left, no model directory written."""
    params = params_file(tmp_path / "two_epochs.yaml", **{"teacher.train.epochs": 2})
    ckdir, out = tmp_path / "ck", tmp_path / "teacher"
    written: list[bytes] = []

    class CtrlC(io.FileIO):
        """The temporary file of the epoch-2 checkpoint: SIGINT's handler raises in a write."""

        writes = 0

        def write(self, b):
            self.writes += 1
            if self.writes > 2:
                raise KeyboardInterrupt
            return super().write(b)

    def interrupted(file, mode="r", *args, **kwargs):
        target = Path(file).parent / "checkpoint.pth"
        if "w" in mode and Path(file).name.startswith(".checkpoint.pth.") and target.exists():
            written.append(target.read_bytes())
            return CtrlC(file, mode)
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", interrupted, raising=False)
    rc, err = run_in_process(
        capsys,
        *("teacher", "--params", params, "--data", fashion_small),
        *("--out", out, "--run-dir", ckdir, "--seed", "0"),
    )
    assert rc == 130 and err.splitlines()[-1] == "deit-repro teacher: interrupted", err
    assert "Traceback" not in err, err
    assert len(written) == 1 and (ckdir / "checkpoint.pth").read_bytes() == written[0]
    assert load_checkpoint(ckdir / "checkpoint.pth")["epoch"] == 0
    assert sorted(p.name for p in ckdir.iterdir()) == ["checkpoint.pth", "history.csv"]
    assert not out.exists()


# ----------------------------------------------------------------------- torn files, crashed writes


@pytest.mark.parametrize("torn", [b"", b"PK\x03\x04 half a zip", b"\x80\x04 not a checkpoint"])
def test_a_torn_checkpoint_is_never_loaded(capsys, tmp_path, fashion_small, torn):
    """The engine writes checkpoints atomically; a torn one (a copy cut short, a full disk on a
    filesystem without rename) is refused by name, with the fix, and nothing is written."""
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    (ckdir / "checkpoint.pth").write_bytes(torn)
    out = tmp_path / "teacher"
    rc, err = run_in_process(
        capsys,
        "teacher",
        "--params",
        SMOKE,
        "--data",
        fashion_small,
        "--out",
        out,
        "--run-dir",
        ckdir,
        "--seed",
        "0",
    )
    assert_one_line_error(
        rc,
        err,
        "teacher",
        str(ckdir / "checkpoint.pth"),
        "delete it to restart the run from scratch",
    )
    assert not out.exists() and (ckdir / "checkpoint.pth").read_bytes() == torn


def test_a_checkpoint_of_other_params_stops_the_requeued_run(capsys, tmp_path, fashion_small):
    """Params changed between two requeues of an unfinished run: exit 2, one line naming the
    checkpoint, both fingerprints and the fix; the checkpoint is untouched, nothing is written."""
    ckdir = tmp_path / "ck"
    ckpt_file = ckdir / "checkpoint.pth"
    argv = ["--data", fashion_small, "--run-dir", ckdir, "--seed", "0"]
    assert (
        run_in_process(capsys, "teacher", "--params", SMOKE, "--out", tmp_path / "a", *argv)[0] == 0
    )
    # As if killed after its first epoch of two.
    ckpt = load_checkpoint(ckpt_file)
    ckpt["num_epochs"] = 2
    atomic.torch_save(ckpt, ckpt_file)
    before = ckpt_file.read_bytes()
    changed = params_file(tmp_path / "lr.yaml", **{"teacher.train.lr_per_512": 1e-3})
    out = tmp_path / "b"
    rc, err = run_in_process(capsys, "teacher", "--params", changed, "--out", out, *argv)
    assert_one_line_error(
        rc,
        err,
        "teacher",
        f"checkpoint {ckpt_file} (epoch 1, fingerprint {ckpt['fingerprint']})",
        "delete it or move it away to start over, or pass --restart",
    )
    assert ckpt_file.read_bytes() == before and not out.exists()


def test_a_crash_while_writing_the_model_directory_keeps_the_previous_one(
    capsys, tmp_path, fashion_small, monkeypatch
):
    """The model directory is replaced whole: a failure while writing it (here: the final
    metrics.json) leaves the previous complete directory byte-identical and no temporary one."""
    out = tmp_path / "teacher"
    argv = [
        "teacher",
        "--params",
        SMOKE,
        "--data",
        fashion_small,
        "--out",
        out,
        "--run-dir",
        tmp_path / "ck",
        "--seed",
        "0",
    ]
    assert run_in_process(capsys, *argv)[0] == 0
    before = snapshot(out)
    real = atomic.write_json

    def crash_on_metrics(path, obj):
        if Path(path).name == "metrics.json":
            raise OSError(errno.EIO, "simulated crash")
        return real(path, obj)

    monkeypatch.setattr(atomic, "write_json", crash_on_metrics)
    shutil.rmtree(tmp_path / "ck")  # train again (no finished checkpoint to resume from)
    with pytest.raises(OSError, match="simulated crash"):
        cli.main(["--log-level", "WARNING", *map(str, argv)])
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "teacher"]


def test_swapped_labels_stop_the_stage_naming_the_file(capsys, tmp_path, fashion_small):
    data = tmp_path / "data"
    shutil.copytree(fashion_small, data)
    labels = np.load(data / "train_labels.npy")
    j = int(np.flatnonzero(labels != labels[0])[0])
    swapped = labels.copy()
    swapped[[0, j]] = labels[[j, 0]]
    np.save(data / "train_labels.npy", swapped, allow_pickle=False)
    # Class counts unchanged: only the manifest's sha256 can tell.
    assert np.bincount(swapped).tolist() == np.bincount(labels).tolist()
    refused_everywhere(
        capsys,
        tmp_path,
        "teacher",
        lambda out: ["teacher", "--params", SMOKE, "--data", data, "--out", out],
        f"corrupt prepared dataset {data}: train_labels.npy does not match its sha256",
        "re-run `deit-repro prepare`",
    )


def test_every_subcommand_and_option_says_what_it_is():
    """`deit-repro STAGE --help` explains every option, with no reStructuredText in it."""
    import argparse

    from deit_repro.run.cli import build_parser

    parser = build_parser()
    missing = [
        a.option_strings
        for a in parser._actions
        if a.help is None and a.dest != "help" and not isinstance(a, argparse._SubParsersAction)
    ]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, sub in action.choices.items():
                missing += [name] if not helps.get(name) else []
                missing += [
                    (name, a.option_strings)
                    for a in sub._actions
                    if a.help is None and a.dest != "help"
                ]
    assert not missing, missing
    assert "``" not in parser.format_help()
