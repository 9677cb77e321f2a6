"""A second machine, on one machine: the DAG's claim-bearing stages run twice, in two fresh clones
of this checkout, once under this machine's default kernel dispatch and once under another one
that computes the same thing with other rounding (the way another CPU does), and the two claims
tables side by side.

    .venv/bin/python bench/machine_spread.py --json bench/results/machine_spread.json  # fashion
    .venv/bin/python bench/machine_spread.py --profile fashion --default-clone DIR   # reuse a run

Another CPU changes the float path, not the computation: torch dispatches its vectorised ATen
kernels by the CPU's instruction set (``ATEN_CPU_CAPABILITY``), oneDNN its convolutions and
matmuls (``ONEDNN_MAX_CPU_ISA``), MKL its BLAS code path (``MKL_CBWR``). The other run sets some
of those (``--dispatch``; default: ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41``, the
non-vectorised ATen kernels and oneDNN's SSE4.1 code, about the cost of the default path here;
``MKL_CBWR=COMPATIBLE`` as well doubles the students' time). Every result file then differs in
its last bits, and training amplifies the difference: what is left to compare is what the
results claim.

Per claim (results/claims.csv) it writes both runs' verdicts, means and seed intervals, the
difference of the means against each interval's half-width, and whether the two runs contradict
each other: one *holds* where the other is *reversed*, or one is resolved (holds or reversed)
where the other's mean has the opposite sign. The goal: no contradiction, and every difference
inside both half-widths (each run's interval holds the other run's mean).

``--default-clone DIR`` takes the default-dispatch run from a clone that already ran the DAG
(``bench/dag_timing.py --keep`` prints its path), after checking that its `dvc status` is clean
and that it is this checkout's commit; the other run is always made here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dag_timing import BIN, _env, fresh_clone  # noqa: E402

DEFAULT_DISPATCH = "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"


def _dispatch(text: str) -> dict[str, str]:
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            sys.exit(
                f"machine_spread: --dispatch item {item!r} is not VAR=value; pass e.g. "
                f"--dispatch '{DEFAULT_DISPATCH}'"
            )
        out[key] = value
    return out


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"machine_spread: {' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-4000:]}")
    return proc.stdout


def _head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def reproduce(repo: Path, profile: str, dispatch: dict[str, str]) -> float:
    """A fresh clone of this checkout in ``repo``, its DAG run up to the tables under
    ``dispatch``; the seconds it took."""
    repo.mkdir(parents=True)
    fresh_clone(repo, profile)
    env = {**_env("cold"), **dispatch}
    t0 = time.perf_counter()
    _run([str(BIN / "dvc"), "repro", "tables"], repo, env)
    return time.perf_counter() - t0


def check_clone(repo: Path, profile: str) -> None:
    """A reused default-dispatch clone must hold this checkout's code and an up-to-date DAG."""
    env = _env("cold")
    status = _run([str(BIN / "dvc"), "status"], repo, env)
    if "up to date" not in status:
        sys.exit(
            f"machine_spread: --default-clone {repo} is not up to date (dvc status):\n"
            f"{status}\nrun `dvc repro` there or leave out --default-clone"
        )
    ours = Path(__file__).resolve().parents[1]
    for rel in ("dvc.yaml", f"profiles/{profile}.yaml"):  # what they define; comments aside
        if yaml.safe_load((repo / rel).read_text()) != yaml.safe_load((ours / rel).read_text()):
            sys.exit(
                f"machine_spread: --default-clone {repo} has another {rel} than this "
                "checkout; pass a clone of this commit (bench/dag_timing.py --keep)"
            )
    src_diff = subprocess.run(
        [
            "diff",
            "-rq",
            "-x",
            "__pycache__",
            "-x",
            "*.egg-info",
            str(ours / "src"),
            str(repo / "src"),
        ],
        capture_output=True,
        text=True,
    )
    if src_diff.returncode != 0:
        sys.exit(
            f"machine_spread: --default-clone {repo} runs other code:\n{src_diff.stdout}"
            "pass a clone of this commit (bench/dag_timing.py --keep)"
        )


def _interval(text: str) -> tuple[float, float] | None:
    m = re.fullmatch(r"\[([-+]?[\d.]+), ([-+]?[\d.]+)\]", text.strip())
    return (float(m.group(1)), float(m.group(2))) if m else None


def read_claims(repo: Path) -> dict[str, dict]:
    with open(repo / "results" / "claims.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for r in rows:
        ci = _interval(r["95 % CI (seeds)"])
        out[r["claim"]] = {
            "verdict": r["verdict"],
            "mean": float(r["mean a − b"]),
            "ci": list(ci) if ci else None,
            "half_width": (ci[1] - ci[0]) / 2 if ci else None,
            "n_seeds": int(r["n seeds"]),
            "unit": r["unit"],
        }
    return out


def contradicts(a: dict, b: dict) -> bool:
    """One run's verdict says the opposite of the other's: holds vs reversed, or a resolved
    verdict where the other's mean has the opposite sign."""
    sign = {"holds": 1, "reversed": -1}
    for x, y in ((a, b), (b, a)):
        if x["verdict"] in sign and y["mean"] * sign[x["verdict"]] < 0:
            return True
    return False


def compare(default: dict[str, dict], other: dict[str, dict]) -> list[dict]:
    if set(default) != set(other):
        sys.exit("machine_spread: the two runs' claims tables list other claims")
    rows = []
    for claim, a in default.items():
        b = other[claim]
        diff = abs(a["mean"] - b["mean"])
        widths = [w for w in (a["half_width"], b["half_width"]) if w is not None]
        rows.append(
            {
                "claim": claim,
                "default": a,
                "other": b,
                "same_verdict": a["verdict"] == b["verdict"],
                "contradicts": contradicts(a, b),
                "mean_difference": round(diff, 4),
                # each run's interval holds the other run's mean
                "inside_half_width": diff <= min(widths) if len(widths) == 2 else None,
            }
        )
    return rows


def _metrics_alike(a: Path, b: Path) -> dict[str, list[str]]:
    """Which records of the training stages and evaluate (metrics/<stage>[/<variant>].json,
    their float path left out) came out the same under both dispatches."""

    def record(path: Path) -> dict:
        data = json.loads(path.read_text())
        return {k: v for k, v in data.items() if k != "float_path"}

    same, differ = [], []
    for p in sorted((a / "metrics").rglob("*.json")):
        rel = p.relative_to(a).as_posix()
        if p.name == "metrics.json" or "float_path" not in json.loads(p.read_text()):
            continue  # a live log's summary, the throughput timings
        (same if (b / rel).is_file() and record(p) == record(b / rel) else differ).append(rel)
    return {"identical": same, "different": differ}


def _float_path(repo: Path) -> list[dict]:
    prov = json.loads((repo / "results" / "provenance.json").read_text())
    return [g["float_path"] for g in prov.get("float_paths", [])]


def _fmt(c: dict) -> str:
    if not c["ci"]:
        return f"{c['verdict']} {c['mean']:+.2f} (no interval)"
    lo, hi = c["ci"]
    return f"{c['verdict']} {c['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _width(c: dict) -> str:
    return "–" if c["half_width"] is None else f"{c['half_width']:.2f}"


def report(rows: list[dict]) -> str:
    lines = [
        "| claim | default dispatch | other dispatch | \\|Δ mean\\| | half-widths | inside | "
        "contradiction |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["default"], r["other"]
        lines.append(
            f"| {r['claim']} | {_fmt(a)} | {_fmt(b)} | {r['mean_difference']:.2f} | "
            f"{_width(a)} / {_width(b)} | "
            f"{ {True: 'yes', False: 'no', None: '–'}[r['inside_half_width']] } | "
            f"{'**yes**' if r['contradicts'] else 'no'} |"
        )
    n = len(rows)
    lines.append("")
    lines.append(
        f"{sum(r['same_verdict'] for r in rows)} of {n} verdicts the same; "
        f"{sum(r['contradicts'] for r in rows)} contradicting; "
        f"{sum(r['inside_half_width'] is True for r in rows)} of "
        f"{sum(r['inside_half_width'] is not None for r in rows)} differences of the means "
        "inside both half-widths (claims with an interval)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="fashion", help="a file of profiles/ (default: fashion)")
    p.add_argument(
        "--dispatch",
        default=DEFAULT_DISPATCH,
        help=f"the other run's variables (default: {DEFAULT_DISPATCH!r})",
    )
    p.add_argument(
        "--default-clone",
        type=Path,
        default=None,
        help="a clone of this commit that already ran the DAG (default dispatch)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the clones (their paths printed)")
    args = p.parse_args(argv)
    if not (Path(__file__).resolve().parents[1] / "profiles" / f"{args.profile}.yaml").is_file():
        p.error(f"--profile {args.profile}: no profiles/{args.profile}.yaml")
    dispatch = _dispatch(args.dispatch)
    if not dispatch:
        p.error("--dispatch is empty: the other run needs another kernel dispatch")
    overlap = sorted(k for k in dispatch if k in os.environ)
    if overlap:
        p.error(
            f"{', '.join(overlap)} already set here: the default run would not be the "
            "default dispatch; unset them"
        )

    tmp = Path(tempfile.mkdtemp(prefix=f"deit-spread-{args.profile}-"))
    try:
        seconds = {}
        if args.default_clone is not None:
            default = args.default_clone.resolve()
            check_clone(default, args.profile)
            seconds["default"] = None
        else:
            default = tmp / "default"
            seconds["default"] = reproduce(default, args.profile, {})
            print(f"default dispatch: {seconds['default']:.0f} s in {default}", flush=True)
        other = tmp / "other"
        seconds["other"] = reproduce(other, args.profile, dispatch)
        print(f"{args.dispatch}: {seconds['other']:.0f} s in {other}", flush=True)
        rows = compare(read_claims(default), read_claims(other))
        result = {
            "profile": args.profile,
            "commit": _head(),
            "dispatch": {"default": {}, "other": dispatch},
            "float_paths": {"default": _float_path(default), "other": _float_path(other)},
            "seconds": seconds,
            "training_records": _metrics_alike(default, other),
            "claims": rows,
            "contradicting": sum(r["contradicts"] for r in rows),
            "outside_half_width": sum(r["inside_half_width"] is False for r in rows),
        }
        text = report(rows)
        alike = result["training_records"]
        print(
            f"training records byte-identical under both dispatches (float path aside): "
            f"{len(alike['identical'])} of {len(alike['identical']) + len(alike['different'])}"
        )
        print(text)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    finally:
        if args.keep:
            print(f"clones kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
