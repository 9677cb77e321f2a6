"""The README's commands are the ones CI runs (so they can't drift)."""

from __future__ import annotations

import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(
        r"\*\*Install everything and run the tests\*\*\s*```bash\n(.+?)\n```", readme, re.S
    )
    assert block, "README lost its test command block"
    command = block.group(1).strip()
    assert command == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert command in [line.strip() for line in ci.splitlines()]


def test_readme_shows_the_committed_headline_table():
    """The README's copy of Table 3 is the table the pipeline wrote (it cannot drift)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- results:table3 -->\n(.+?)\n<!-- /results:table3 -->", readme, re.S)
    assert block, "README lost its headline table"
    table = (ROOT / "results" / "table3_distillation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert block.group(1).strip().splitlines() == rows
    assert "![Figure 3" in readme and "results/figure3_epochs.png" in readme


def test_readme_shows_the_committed_claims_table():
    """The README's claims table is results/claims.md's, verdicts and intervals included."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- results:claims -->\n(.+?)\n<!-- /results:claims -->", readme, re.S)
    assert block, "README lost its claims table"
    table = (ROOT / "results" / "claims.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) > 2 and block.group(1).strip().splitlines() == rows
