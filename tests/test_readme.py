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
    assert command == (
        "bash scripts/setup.sh && "
        ".venv/bin/python -m pytest -q -n 2 --dist worksteal --durations=15"
    )
    assert command in [line.strip() for line in ci.splitlines()]


def _readme_block(tag: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- results:{tag} -->\n(.+?)\n<!-- /results:{tag} -->", readme, re.S)
    assert block, f"README lost its {tag} block"
    return block.group(1).strip().splitlines()


def _table_rows(name: str) -> list[str]:
    table = (ROOT / "results" / name).read_text()
    return [line for line in table.splitlines() if line.startswith("|")]


def test_readme_shows_the_committed_headline_table():
    """The README's copy of Table 3 is the table the pipeline wrote (it cannot drift)."""
    assert _readme_block("table3") == _table_rows("table3_distillation.md")
    readme = (ROOT / "README.md").read_text()
    assert "![Figure 3" in readme and "results/figure3_epochs.png" in readme


def test_readme_shows_the_committed_claims_table():
    """The README's claims table is results/claims.md's, verdicts and intervals included."""
    rows = _table_rows("claims.md")
    assert len(rows) > 2 and _readme_block("claims") == rows
