"""The whole DAG's cost on this machine (issue #7): `dvc repro` of a profile in a fresh clone, with
the per-stage wall time and peak RSS every stage prints, then the no-op `dvc repro` and
`snakemake -n` times (median of repeats) in that clone.

    .venv/bin/python bench/dag_timing.py --profile smoke       # about a minute
    .venv/bin/python bench/dag_timing.py --profile fashion     # the default profile, ~10 minutes
    .venv/bin/python bench/dag_timing.py --profile fashion --json bench/results/dag_fashion.json

Targets (issue #7): fashion <= 10 min, smoke <= 60 s, no-op repro and `snakemake -n` <= 3 s each,
every stage's peak RSS <= 4 GiB. Run it on an otherwise idle machine: the stages use every core.
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


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
                GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
                GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")


def _run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    # One stream, in order: DVC's "Running stage" lines and each stage's "done in" line.
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}")
    return seconds, proc.stdout


def fresh_clone(dst: Path, profile: str) -> None:
    """The tracked project files without the DAG's outputs, as a clone has them."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for rel in filter(None, files):
        if rel.startswith(("data/", "models/", "metrics/", "results/", "runs/")) or \
                rel == "dvc.lock":
            continue
        src, out = ROOT / rel, dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        elif src.is_file():
            shutil.copy2(src, out)
    shutil.copy(dst / "profiles" / f"{profile}.yaml", dst / "params.yaml")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench"]):
        _run(cmd, dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="smoke", help="a file of profiles/ (default: smoke)")
    p.add_argument("--repeats", type=int, default=5, help="no-op timings: median of this many")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix=f"deit-dag-{args.profile}-"))
    try:
        repo = tmp / "repo"
        repo.mkdir()
        fresh_clone(repo, args.profile)
        total, log = _run([str(BIN / "dvc"), "repro"], repo)
        stages = []
        for name, body in re.findall(r"Running stage '([^']+)':\n(.*?)(?=Running stage|\Z)", log,
                                     re.S):
            m = re.search(r"done in ([\d.]+) s, peak RSS (\d+) MiB", body)
            if m:
                stages.append({"stage": name, "seconds": float(m.group(1)),
                               "peak_rss_mib": int(m.group(2))})
        noop = [_run([str(BIN / "dvc"), "repro"], repo)[0] for _ in range(args.repeats)]
        plan = [_run([str(BIN / "snakemake"), "-n", "--cores", "1"], repo)[0]
                for _ in range(args.repeats)]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    in_stages = sum(s["seconds"] for s in stages)
    print(f"profile {args.profile}: dvc repro in a fresh clone {total:.1f} s "
          f"({total / 60:.1f} min; {in_stages:.1f} s inside the stages, the rest DVC and process "
          f"start-up), {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'stage':34s} {'seconds':>8s} {'peak RSS':>10s}")
    for s in stages:
        print(f"{s['stage']:34s} {s['seconds']:8.1f} {s['peak_rss_mib']:7d} MiB")
    print(f"max peak RSS {max(s['peak_rss_mib'] for s in stages)} MiB")
    print(f"no-op dvc repro   median {statistics.median(noop):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in noop)})")
    print(f"snakemake -n      median {statistics.median(plan):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in plan)})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "profile": args.profile, "dvc_repro_seconds": total, "stages": stages,
            "noop_dvc_repro_seconds": noop, "snakemake_dry_run_seconds": plan,
            "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
