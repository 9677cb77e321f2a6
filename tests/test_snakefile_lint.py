"""The Snakefile as the Snakemake workflow catalog checks one: `snakemake --lint` finds nothing and
`snakefmt --check` would change nothing (line length from pyproject.toml's [tool.snakefmt])."""

from __future__ import annotations

import subprocess

from conftest import ROOT
from workflow_helpers import BIN, env


def test_snakemake_lint_finds_nothing(capsys):
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--lint"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out
    assert "Congratulations, your workflow is in a good condition!" in out, out
    with capsys.disabled():  # in the CI log
        print(f"\nsnakemake --lint: exit {proc.returncode}, {out.strip().splitlines()[-1]}")


def test_snakefile_is_formatted_by_snakefmt(capsys):
    proc = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "--diff", "Snakefile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with capsys.disabled():
        last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
        print(f"\nsnakefmt --check --diff Snakefile: exit {proc.returncode}, {last}")
