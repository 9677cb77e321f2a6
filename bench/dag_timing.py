"""The whole DAG's cost on this machine: `dvc repro` of a profile in a fresh clone, with the
per-stage wall time and peak RSS every stage prints, then the no-op `dvc repro` and `snakemake -n`
times (median of repeats) in that clone.

    .venv/bin/python bench/dag_timing.py --profile smoke --forkserver cold,off   # ~2 minutes
    .venv/bin/python bench/dag_timing.py --profile fashion     # the default profile, ~20 minutes
    .venv/bin/python bench/dag_timing.py --profile fashion --json bench/results/dag_fashion.json

``--forkserver cold,off`` runs the DAG twice in one process, with and without the fork server
(``deit_repro.run.forkserver``), and prints the ratio.

Targets (figures in bench/README.md, "The whole DAG"): fashion <= 20 min (5 seeds), smoke <= 60 s,
no-op repro and `snakemake -n` <= 3 s each, every stage's peak RSS <= 4 GiB. Run it on an
otherwise idle machine: the stages use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(forkserver: str = "cold") -> dict[str, str]:
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@localhost",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@localhost",
    )
    if forkserver == "off":
        env["DEIT_REPRO_FORKSERVER"] = "0"
    else:
        # A server of this run's own: "cold" is a fresh machine's first `dvc repro` (the first
        # stage starts it and runs unserved), "warm" one started and awaited beforehand.
        env["DEIT_REPRO_FORKSERVER_TAG"] = f"bench-{os.getpid()}-{time.time_ns()}"
        env.pop("DEIT_REPRO_FORKSERVER", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    # One stream, in order: DVC's "Running stage" lines and each stage's "done in" line.
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}")
    return seconds, proc.stdout


def fresh_clone(dst: Path, profile: str) -> None:
    """The tracked project files without the DAG's outputs, as a clone has them."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (
            rel.startswith(("data/", "models/", "metrics/", "results/", "runs/"))
            or rel == "dvc.lock"
        ):
            continue
        src, out = ROOT / rel, dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        elif src.is_file():
            shutil.copy2(src, out)
    shutil.copy(dst / "profiles" / f"{profile}.yaml", dst / "params.yaml")
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "bench"],
    ):
        _run(cmd, dst)


def _repro(profile: str, forkserver: str, repeats: int, keep: bool) -> dict:
    """One fresh-clone `dvc repro` of ``profile`` with the fork server ``forkserver``."""
    env = _env(forkserver)
    tmp = Path(tempfile.mkdtemp(prefix=f"deit-dag-{profile}-"))
    try:
        repo = tmp / "repo"
        repo.mkdir()
        fresh_clone(repo, profile)
        if forkserver == "warm":
            _run(
                [str(BIN / "deit-repro"), "--help"],
                repo,
                dict(env, DEIT_REPRO_FORKSERVER="require"),
            )
        total, log = _run([str(BIN / "dvc"), "repro"], repo, env)
        stages = []
        for name, body in re.findall(
            r"Running stage '([^']+)':\n(.*?)(?=Running stage|\Z)", log, re.S
        ):
            m = re.search(r"done in ([\d.]+) s, peak RSS (\d+) MiB", body)
            if m:
                stages.append(
                    {"stage": name, "seconds": float(m.group(1)), "peak_rss_mib": int(m.group(2))}
                )
        noop = [_run([str(BIN / "dvc"), "repro"], repo, env)[0] for _ in range(repeats)]
        plan = [
            _run([str(BIN / "snakemake"), "-n", "--cores", "1"], repo, env)[0]
            for _ in range(repeats)
        ]
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"clone kept in {repo}", flush=True)
    return {
        "profile": profile,
        "forkserver": forkserver,
        "dvc_repro_seconds": total,
        "stages": stages,
        "noop_dvc_repro_seconds": noop,
        "snakemake_dry_run_seconds": plan,
    }


def _report(r: dict) -> None:
    total, stages = r["dvc_repro_seconds"], r["stages"]
    in_stages = sum(s["seconds"] for s in stages)
    print(
        f"profile {r['profile']}, fork server {r['forkserver']}: dvc repro in a fresh clone "
        f"{total:.1f} s ({total / 60:.1f} min; {in_stages:.1f} s inside the stages, the rest DVC "
        f"and process start-up), {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}"
    )
    print(f"{'stage':34s} {'seconds':>8s} {'peak RSS':>10s}")
    for s in stages:
        print(f"{s['stage']:34s} {s['seconds']:8.1f} {s['peak_rss_mib']:7d} MiB")
    print(f"max peak RSS {max(s['peak_rss_mib'] for s in stages)} MiB")
    for label, key in (
        ("no-op dvc repro", "noop_dvc_repro_seconds"),
        ("snakemake -n", "snakemake_dry_run_seconds"),
    ):
        times = r[key]
        print(
            f"{label:17s} median {statistics.median(times):.2f} s "
            f"({', '.join(f'{t:.2f}' for t in times)})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="smoke", help="a file of profiles/ (default: smoke)")
    p.add_argument(
        "--forkserver",
        default="cold",
        help="comma-separated runs, one after the other: cold (a fresh machine: the "
        "first stage starts the fork server), warm (started beforehand), off "
        "(DEIT_REPRO_FORKSERVER=0, every stage imports torch itself); "
        "default: cold",
    )
    p.add_argument("--repeats", type=int, default=5, help="no-op timings: median of this many")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = p.parse_args(argv)
    modes = args.forkserver.split(",")
    if not set(modes) <= {"cold", "warm", "off"}:
        p.error(f"--forkserver: cold, warm or off, not {args.forkserver}")

    runs = []
    for mode in modes:
        runs.append(_repro(args.profile, mode, args.repeats, args.keep))
        _report(runs[-1])
    if len(runs) > 1:
        base = runs[0]["dvc_repro_seconds"]
        print(
            "ratios (same process, one after the other): "
            + ", ".join(
                f"{r['forkserver']}/{runs[0]['forkserver']} {r['dvc_repro_seconds'] / base:.2f}"
                for r in runs[1:]
            )
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
