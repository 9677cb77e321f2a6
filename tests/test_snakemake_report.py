"""`snakemake --report` on a run of the smoke DAG, opened in a real headless browser (Debian's
chromium): the paper's tables and figures are the report's items, each under its category with its
caption (workflow/report/*.rst), as a reader clicking through the report sees them."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from workflow_helpers import SNAKEMAKE, run

# What a reader must find: results/<stem>.<ext> for each extension, under its category and
# subcategory, with the caption workflow/report/<stem, lower case>.rst, whose first line (a plain
# sentence) the report must show for it.
SECTIONS = {
    "table1_variants": ("md csv", "Tables", "Table 1: DeiT variants"),
    "table2_teacher": ("md csv", "Tables", "Table 2: convnet vs transformer teacher"),
    "table3_distillation": ("md csv", "Tables", "Table 3: distillation variants"),
    "table4_disagreement": ("md csv", "Tables", "Table 4: disagreement between classifiers"),
    "table5_throughput_accuracy": ("md csv", "Tables", "Table 5: throughput and top-1"),
    "table7_transfer": ("md csv", "Tables", "Table 7: transfer learning"),
    "table10_finetune_resolution": ("md csv", "Tables", "Table 10: fine-tuning resolution"),
    "figure1_throughput_accuracy": ("png", "Figures", "Figure 1: throughput vs top-1"),
    "figure3_epochs": ("png md csv", "Figures", "Figure 3: top-1 vs training epochs"),
    "claims": ("md csv", "Claims", "The paper's claims at this scale"),
    "README": ("md", "Overview", "All results on one page"),
    "provenance": ("json", "Overview", "The source of every number"),
}
ITEMS = {
    f"results/{stem}.{ext}": (category, subcategory, stem.lower())
    for stem, (exts, category, subcategory) in SECTIONS.items()
    for ext in exts.split()
}
# The view the last screenshot shows: Figure 3 beside its caption.
FINALE = ["Figures", "Figure 3: top-1 vs training epochs", "results/figure3_epochs.png"]

# Run in a copy of the report after its own scripts (chromium's command line loads a page but
# cannot click; this keeps the test free of a WebDriver): it clicks through the report as a reader
# does (each category of the menu, each subcategory, each item's info button; a category of one
# subcategory opens that at once), records the breadcrumbs and the caption each item shows, then
# opens FINALE's image and writes what it saw into <pre id="report-walk">.
WALK = """
window.addEventListener("load", async () => {
  const out = document.createElement("pre");
  out.id = "report-walk";
  const pause = () => new Promise((done) => setTimeout(done, 100));
  const navbar = () => document.querySelector("#app nav");
  const click = async (element) => { element.click(); await pause(); };
  const home = () => click(navbar().querySelector("nav ol a"));
  const entries = () => [...navbar().querySelectorAll("ul > li > a")];
  const menu = () => entries().map((a) => a.textContent.trim());
  const open = (text) => click(entries().find((a) => a.textContent.trim() === text));
  const rows = async (path) => {
    await home();
    for (const step of path) await open(step);
    return [...navbar().querySelectorAll("table tbody tr")];
  };
  const info = async (row) => {
    const buttons = row.querySelectorAll("td:last-child a");
    await click(buttons[buttons.length - 1]);
    const items = [...navbar().querySelectorAll("ul > li")];
    const heading = items.findIndex((li) => li.textContent.trim() === "Description");
    return {
      file: row.querySelector("td").textContent.trim(),
      crumbs: [...navbar().querySelectorAll("nav ol li")].map((li) => li.textContent.trim())
        .filter((text) => text),
      caption: heading < 0 ? null : items[heading + 1].innerText,
    };
  };
  const walk = [];
  try {
    await pause();
    await home();
    const categories = menu().filter((t) => !["Workflow", "Statistics", "About"].includes(t));
    for (const category of categories) {
      await home();
      await open(category);
      const subcategories = navbar().querySelector("table") ? [[]] : menu().map((s) => [s]);
      for (const subcategory of subcategories) {
        const path = [category, ...subcategory];
        const n = (await rows(path)).length;
        for (let i = 0; i < n; i++) walk.push(await info((await rows(path))[i]));
      }
    }
    const [category, subcategory, file] = FINALE;
    const row = (await rows([category, subcategory]))
      .find((tr) => tr.querySelector("td").textContent.trim() === file);
    await info(row);
    await click(navbar().querySelector("ul > li a"));  // the eye button beside the path
    out.textContent = JSON.stringify({walk});
  } catch (error) {
    out.textContent = JSON.stringify({walk, error: String(error.stack || error)});
  }
  document.body.appendChild(out);
});
"""

WINDOW = (1400, 1000)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        why = (
            "chromium is not installed: apt-get install chromium (scripts/setup.sh does it as root)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must open the report in a browser: {why}")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def report(chromium, dvc_reference, tmp_path_factory) -> Path:
    """The report of a Snakemake run of the smoke DAG, in a copy of the repository `dvc repro`
    ran for the other engine tests: Snakemake finds every stage up to date and is made to re-run
    `tables`, whose outputs are the report's items, so their jobs' records are its own."""
    repo = tmp_path_factory.mktemp("report") / "repo"
    # (without .dvc/tmp: DVC's locks and the queue of `dvc exp run`, which the copy does not need)
    shutil.copytree(
        dvc_reference["repo"],
        repo,
        symlinks=True,
        ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [],
    )
    out = run([SNAKEMAKE, "--cores", "2", "--forcerun", "tables"], repo)
    assert re.search(r"^(?:local)?rule tables:", out, re.M), out
    page = repo / "report.html"
    run([SNAKEMAKE, "--report", str(page)], repo)
    return page


def _browse(chromium: str, page: Path, screenshot: Path) -> str:
    """The page's DOM once its scripts have run, and its screenshot."""
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            # As root chromium refuses to start sandboxed; the page is our own file.
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={screenshot.parent / 'chromium-profile'}",
            # Virtual time: the page's timers run as fast as the page allows, up to 60 s of them.
            "--virtual-time-budget=60000",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--hide-scrollbars",
            f"--screenshot={screenshot}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rendered(dom: str) -> str:
    """The DOM without its scripts and styles: the report keeps its data, captions included, in
    scripts until its app renders them."""
    return re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _assert_picture(png: Path) -> None:
    """A real PNG of the window, not a blank page."""
    from PIL import Image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    background = max(count for count, _ in colours)
    assert len(colours) > 100 and background < 0.9 * WINDOW[0] * WINDOW[1], len(colours)


def _first_line(caption: str) -> str:
    line = (ROOT / "workflow" / "report" / f"{caption}.rst").read_text().splitlines()[0]
    assert line and "{" not in line and "`" not in line, f"{caption}.rst: not a plain sentence"
    return " ".join(line.split())


@pytest.mark.slow
def test_report_opens_on_the_workflow_and_its_result_categories(report, chromium, tmp_path, capsys):
    shot = tmp_path / "report.png"
    shown = _text(_rendered(_browse(chromium, report, shot)))
    _assert_picture(shot)
    # The app rendered its menu and the workflow description (workflow/report/workflow.rst,
    # with the run's profile filled in).
    for entry in ("Workflow", "Statistics", "Claims", "Figures", "Overview", "Tables"):
        assert re.search(rf"\b{entry}\b", shown), f"{entry!r} not in the rendered report"
    assert "Training data-efficient image transformers" in shown
    assert "used the smoke profile of params.yaml" in shown
    with capsys.disabled():  # in the CI log
        print(f"\nscreenshot: {shot}")


@pytest.mark.slow
def test_every_table_and_figure_is_an_item_with_its_caption(report, chromium, tmp_path, capsys):
    walked = tmp_path / "report-walked.html"
    script = WALK.replace("FINALE", json.dumps(FINALE))
    text = report.read_text()
    end = text.rindex("</body>")
    walked.write_text(f"{text[:end]}<script>{script}</script>{text[end:]}")
    shot = tmp_path / "figure3.png"
    dom = _browse(chromium, walked, shot)
    found = re.search(r'<pre id="report-walk">(.*?)</pre>', dom, re.S)
    assert found, "the walk through the report did not finish"
    result = json.loads(html.unescape(found.group(1)))
    assert "error" not in result, result["error"]
    seen = {item["file"]: item for item in result["walk"]}
    assert len(seen) == len(result["walk"]), "an item is listed twice"
    assert set(seen) == set(ITEMS), set(seen) ^ set(ITEMS)
    for file, (category, subcategory, caption) in ITEMS.items():
        item = seen[file]
        # (the report opens a category of one subcategory at once, and leaves it out of its path)
        alone = sum(c == category for _, c, _ in SECTIONS.values()) == 1
        path = [category, file] if alone else [category, subcategory, file]
        assert item["crumbs"][-len(path) :] == path, item
        shown = " ".join((item["caption"] or "").split())
        assert _first_line(caption) in shown, f"{file}: caption {shown!r}"
    # The captions are Jinja templates of the run: the profile is filled in.
    assert "the smoke profile's student" in " ".join(
        seen["results/table1_variants.md"]["caption"].split()
    )
    # The last view: Figure 3's image in the page, its caption in the menu.
    shown = _rendered(dom)
    assert re.search(r'<img src="data:image/png', shown), "Figure 3 is not displayed"
    assert _first_line("figure3_epochs") in _text(shown)
    _assert_picture(shot)
    with capsys.disabled():
        print(f"\nscreenshot: {shot}; {len(seen)} items, each with its caption")
