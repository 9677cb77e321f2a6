"""`deit-repro` runs the code of the checkout it is started in (a queued `dvc exp run` in
.dvc/tmp/exps/, a clone, a test's repository), not the checkout the package was installed from:
that code is what DVC hashed as the stage's deps and what run.json records."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflow_helpers import DEIT, copy_project, result


@pytest.mark.parametrize("served", ["require", "0"])
def test_a_copy_of_the_project_runs_its_own_code(tmp_path, served):
    copy = tmp_path / "copy"
    copy.mkdir()
    copy_project(copy)
    init = copy / "src" / "deit_repro" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "9.9-copy"'))

    def version(cwd: Path) -> str:
        proc = result([DEIT, "--version"], cwd, DEIT_REPRO_FORKSERVER=served)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert version(copy) == f"deit-repro 9.9-copy ({(copy / 'src' / 'deit_repro').resolve()})"
    # elsewhere, the installed code
    assert version(tmp_path).startswith("deit-repro 0.1.0 (")
