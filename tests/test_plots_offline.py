"""`dvc plots show` on a machine without internet (most compute clusters): the page template
(.dvc/config `plots.html_template`, written by scripts/vendor_vega.py) carries vega, vega-lite and
vega-embed itself, so every plot draws; DVC's own template, which loads them from a CDN, draws
none. Opened in headless Chromium with every host unresolvable."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from workflow_helpers import DVC, run

TEMPLATE = ROOT / "workflow" / "plots" / "offline.html"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        why = "chromium is not installed: apt-get install chromium (scripts/setup.sh does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must open the plots in a browser: {why}")
        pytest.skip(why)
    return path


def _canvases(chromium: str, page: Path, profile: Path) -> int:
    """How many vega canvases the page drew, with the network off."""
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # as root chromium refuses its sandbox; the page is our own file
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no host resolves: offline
            "--virtual-time-budget=30000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return len(re.findall(r'<canvas[^>]*class="marks"', proc.stdout))


@pytest.mark.slow
def test_dvc_plots_show_draws_every_plot_with_the_network_off(chromium, dvc_reference, tmp_path):
    from dvc_render.html import PAGE_HTML

    repo = tmp_path / "repo"
    shutil.copytree(
        dvc_reference["repo"],
        repo,
        symlinks=True,
        ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [],
    )
    assert "html_template = ../workflow/plots/offline.html" in (repo / ".dvc/config").read_text()
    run([DVC, "plots", "show", "-o", "ours"], repo)
    page = (repo / "ours" / "index.html").read_text()
    plots = len(re.findall(r"vegaEmbed\('#", page))
    assert plots >= 5 and "cdn.jsdelivr.net" not in page
    assert _canvases(chromium, repo / "ours" / "index.html", tmp_path / "p1") == plots

    cdn = tmp_path / "cdn.html"
    cdn.write_text(PAGE_HTML)  # DVC's own template: vega from cdn.jsdelivr.net
    run([DVC, "plots", "show", "-o", "theirs", "--html-template", str(cdn)], repo)
    assert "cdn.jsdelivr.net" in (repo / "theirs" / "index.html").read_text()
    assert _canvases(chromium, repo / "theirs" / "index.html", tmp_path / "p2") == 0
