"""Shared fixtures: real Fashion-MNIST subsets prepared once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from deit_repro.data.sources import DEBIAN_FASHION_DIR

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "profiles" / "smoke.yaml"

#: CIFAR-10's class names in label order (its batches.meta; torchvision's ``classes``)
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def smoke_dict() -> dict:
    """smoke.yaml as a plain dict whose sections share nothing.

    smoke.yaml reuses one train recipe through a YAML anchor, so ``yaml.safe_load`` returns the
    *same* dict under teacher.train, student.train, ...; ``copy.deepcopy`` keeps that sharing, a
    JSON round trip does not (a mutation must reach exactly one key).
    """
    return json.loads(json.dumps(yaml.safe_load(SMOKE.read_text())))


def _need_fashion() -> None:
    if (
        not (DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").exists()
        and not (DEBIAN_FASHION_DIR / "train-images-idx3-ubyte").exists()
    ):
        pytest.skip(
            "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist "
            "(scripts/setup.sh does it as root)"
        )


@pytest.fixture(autouse=True)
def _one_thread():
    """Results on CPU depend on the thread count: tests fix it like params.threads does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prepared(tmp_path_factory, name: str, train_per_class: int, test_per_class: int) -> Path:
    _need_fashion()
    from deit_repro.config import DatasetCfg
    from deit_repro.stages.prepare import run_prepare

    out = tmp_path_factory.mktemp("data") / name
    cfg = DatasetCfg(
        source="fashion_mnist", train_per_class=train_per_class, test_per_class=test_per_class
    )
    run_prepare(cfg, out=out)
    return out


@pytest.fixture(scope="session")
def fashion_small(tmp_path_factory) -> Path:
    """400 training / 200 test images of the real Fashion-MNIST, class-balanced."""
    return _prepared(tmp_path_factory, "fashion_small", 40, 20)


@pytest.fixture(scope="session")
def fashion_5k(tmp_path_factory) -> Path:
    """5,000 training / 1,000 test images of the real Fashion-MNIST, class-balanced."""
    return _prepared(tmp_path_factory, "fashion_5k", 500, 100)


@pytest.fixture(scope="session")
def smoke_params():
    from deit_repro.config import load_params

    return load_params(SMOKE)


@pytest.fixture(scope="session")
def slurm():
    """A running real SLURM cluster (started by the project's script as root; stopped again at
    the end if this session started it)."""
    import slurm_cluster

    started = slurm_cluster.start()
    yield
    if started and os.environ.get("DEIT_REPRO_KEEP_SLURM") != "1":
        slurm_cluster.stop()


@dataclass(frozen=True)
class RehearsalData:
    """scripts/rehearsal_data.py's output folder and what it printed."""

    out: Path
    stdout: str


@pytest.fixture(scope="session")
def rehearsal_data(tmp_path_factory) -> RehearsalData:
    """The rehearsal's generated datasets and RegNetY-16GF weights (scripts/rehearsal_data.py),
    written once per session: its own tests, the rehearsal and the GPU check's CPU run read
    them (none writes there; a test that needs a second generation makes its own)."""
    # mktemp gives an existing, empty folder: the script must accept it without --force.
    out = tmp_path_factory.mktemp("rehearsal")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rehearsal_data.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return RehearsalData(out, proc.stdout)


@pytest.fixture(scope="session")
def dvc_reference(tmp_path_factory):
    """The smoke DAG run once by `dvc repro` in a fresh repository: what the other engines must
    reproduce. Returns the repo, the repro's output, its dvc.lock stages and metric files (a
    snapshot: later tests may change the repository), and ``copy``, which gives a test a
    repository of its own as the repro left it (git, DVC cache and outputs), so that no test
    runs the same DAG again to start from there."""
    import shutil

    from workflow_helpers import DVC, lock_stages, make_repo, metric_files, run

    repo = make_repo(tmp_path_factory.mktemp("dvc") / "repo")
    out = run([DVC, "repro"], repo)
    pristine = tmp_path_factory.mktemp("dvc_pristine") / "repo"
    shutil.copytree(repo, pristine, symlinks=True)

    def copy(dst: Path) -> Path:
        shutil.copytree(pristine, dst, symlinks=True)
        return dst

    return {
        "repo": repo,
        "output": out,
        "lock": lock_stages(repo),
        "metrics": metric_files(repo),
        "copy": copy,
    }


# The `deit-repro` calls of this session get fork servers of their own, stopped when
# the session ends instead of idling for 5 minutes; tests that need another server extend the tag.
# Under pytest-xdist every worker extends the session's tag with its name (gw0, gw1, ...): a
# worker that ends stops its own servers, never one the other worker is calling.
FORKSERVER_TAG = os.environ.setdefault("DEIT_REPRO_FORKSERVER_TAG", f"pytest-{os.getpid()}")
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and not FORKSERVER_TAG.endswith(f"-{_WORKER}"):
    FORKSERVER_TAG = os.environ["DEIT_REPRO_FORKSERVER_TAG"] = f"{FORKSERVER_TAG}-{_WORKER}"


REHEARSAL = (
    "tests/test_rehearsal.py::test_the_rehearsal_runs_under_dvc_and_under_snakemake_on_slurm"
)


def pytest_collection_modifyitems(config, items):
    """The rehearsal, the longest test by far, goes first.

    The README's test command runs two workers that steal each other's pending tests
    (`-n 2 --dist worksteal`): one starts the rehearsal at once, the other runs the rest meanwhile
    and takes over the first one's queue. Started last, the rehearsal would run alone at the end.
    The tests on the SLURM cluster may then run side by side: each counts only the jobs submitted
    from its own directory (`slurm_cluster.sacct(under=...)`).
    """
    items.sort(key=lambda item: item.nodeid != REHEARSAL)


def pytest_sessionfinish(session, exitstatus):
    from deit_repro.run import forkserver

    forkserver.stop_all(tag=FORKSERVER_TAG)
