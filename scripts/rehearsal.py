"""Rehearse the paper's configuration on this machine: the imagenet profile, shrunk by the
``profiles/rehearsal.yaml`` overlay, run end to end by DVC or by Snakemake on SLURM.

    .venv/bin/python scripts/rehearsal.py WORKDIR --engine snakemake   # snakemake --profile slurm
    .venv/bin/python scripts/rehearsal.py WORKDIR --engine dvc         # dvc repro
    .venv/bin/python scripts/rehearsal.py WORKDIR --engine snakemake --again   # same copy, anew
    .venv/bin/python scripts/rehearsal.py WORKDIR --engine snakemake --again --keep-runs

In WORKDIR it writes the generated data (``data/``, scripts/rehearsal_data.py: an ImageNet-layout
JPEG tree, the transfer datasets in their on-disk formats, a RegNetY-16GF state dict) and a fresh
copy of the project (``repo/``, committed to its own git repository, so this checkout's params,
lock file and results are left alone) whose params.yaml is the composed rehearsal profile. The
teacher's weights are served on 127.0.0.1 while the DAG runs, so the teacher stage downloads them
by URL and checks their full sha256 pin. Training stages run as submitit jobs on the SLURM cluster
(``launch.launcher: slurm`` of the imagenet profile): start one first, e.g. the local
scripts/slurm/start-local-slurm.sh. Prints the engine's wall time; exits with the engine's status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: what a fresh clone would not have: the DAG's outputs and this machine's state
NOT_COPIED = ("data/", "models/", "metrics/", "results/", "runs/", "logs/", ".snakemake/")


def copy_project(dst: Path) -> None:
    """The project's files as a clone would have them (tracked and new, not ignored), without
    the DAG's outputs, committed to a new git repository at ``dst``."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if rel.startswith(NOT_COPIED) or rel == "dvc.lock":
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst / rel)
        elif src.is_file():
            shutil.copy2(src, dst / rel)
    git = ["git", "-c", "user.name=rehearsal", "-c", "user.email=rehearsal@deit-repro.invalid"]
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "rehearsal"]):
        subprocess.run(git + cmd, cwd=dst, check=True)


@contextlib.contextmanager
def serve(directory: Path, url: str):
    """``python -m http.server`` on the host and port of ``url``, serving ``directory``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
        yield  # a real URL: nothing to serve
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(parsed.port), "--bind", parsed.hostname],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):  # up within a few seconds, or the port is taken
            if proc.poll() is not None:
                sys.exit(
                    f"rehearsal: cannot serve {directory} on port {parsed.port} (in use?); "
                    "stop what listens there"
                )
            try:
                urllib.request.urlopen(url.rsplit("/", 1)[0] + "/", timeout=1).close()
            except OSError:
                time.sleep(0.1)
                continue
            time.sleep(0.5)  # a server of ours that failed to bind has exited by now
            if proc.poll() is None:
                break
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="where the data and the project copy go")
    ap.add_argument("--engine", choices=["dvc", "snakemake"], default="snakemake")
    ap.add_argument(
        "--overlay", type=Path, default=ROOT / "profiles" / "rehearsal.yaml", help="the overlay"
    )
    ap.add_argument(
        "--again",
        action="store_true",
        help="run in WORKDIR's existing project copy, after deleting everything the DAG made "
        "there (prepared data, models, runs, metrics, results): e.g. the other engine",
    )
    ap.add_argument(
        "--keep-runs",
        action="store_true",
        help="with --again: keep the run directories (runs/), so that every training job, "
        "submitted as before, resumes from its finished checkpoint (same data, params and code) "
        "and only evaluates and writes its outputs again instead of training anew",
    )
    args = ap.parse_args(argv)
    if args.keep_runs and not args.again:
        ap.error("--keep-runs is for --again (a copy whose runs/ holds finished checkpoints)")
    work = args.workdir.resolve()
    data, repo = work / "data", work / "repo"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    if args.again:
        if not (repo / "params.yaml").is_file():
            print(
                f"rehearsal: no earlier rehearsal in {repo}; run without --again", file=sys.stderr
            )
            return 2
        for made in NOT_COPIED:
            if not (args.keep_runs and made == "runs/"):
                shutil.rmtree(repo / made, ignore_errors=True)
        return run_engine(args.engine, repo, data, env)
    if repo.exists():
        print(f"rehearsal: {repo} exists; pass a new WORKDIR (or --again)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "rehearsal_data.py"), str(data)], check=True
        )
    copy_project(repo)
    subprocess.run(
        [
            str(BIN / "deit-repro"),
            "compose",
            "profiles/imagenet.yaml",
            str(args.overlay),
            "--out",
            "params.yaml",
        ],
        cwd=repo,
        env=env,
        check=True,
    )
    return run_engine(args.engine, repo, data, env)


def run_engine(engine: str, repo: Path, data: Path, env: dict[str, str]) -> int:
    """Run the DAG in ``repo`` with ``engine`` while the teacher's weights are served."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    if engine == "dvc":
        cmd = [str(BIN / "dvc"), "repro"]
    else:
        # The slurm profile sizes the imagenet rules for a cluster (prepare_imagenet: 32 CPUs,
        # 64 GB); on this machine's one-node cluster they would pend for ever. Shrink them here,
        # as the overlay shrinks the training jobs (launch.*); everything else is the profile's.
        rules = [f"prepare_{name}" for name in params["datasets"]]
        small = [
            f"{r}:{k}={v}"
            for r in (*rules, "evaluate", "throughput", "tables")
            for k, v in (("cpus_per_task", 1), ("mem_mb", 6000), ("runtime", 60))
        ]
        cmd = [str(BIN / "snakemake"), "--profile", "slurm", "--set-resources", *small]
    with serve(data / "weights", params["teacher"]["weights"]["url"]):
        t0 = time.perf_counter()
        status = subprocess.run(cmd, cwd=repo, env=env).returncode
        seconds = time.perf_counter() - t0
    shown = " ".join(cmd[1:4] if engine != "dvc" else cmd[1:])
    print(
        f"rehearsal: `{Path(cmd[0]).name} {shown}` "
        f"{'finished' if status == 0 else f'failed (exit {status})'} in {seconds:.0f} s ({repo})",
        flush=True,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
