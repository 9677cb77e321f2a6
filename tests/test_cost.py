"""`deit-repro launch-plan --cost`: the bill of a profile's DAG before it is run, from the
measured rates in bench/results/gpu_rates.json."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT
from deit_repro.config import load_params
from deit_repro.run.cost import RATES, cost_table, load_rates, training_jobs


@pytest.fixture(scope="module")
def imagenet():
    return load_params(ROOT / "profiles" / "imagenet.yaml")


@pytest.fixture(scope="module")
def bill(imagenet, tmp_path_factory):
    return cost_table(imagenet, load_rates(), tmp_path_factory.mktemp("nodata"))


def _rows(text: str) -> dict[str, list[str]]:
    return {
        line.split()[0]: line.split()
        for line in text.splitlines()
        if re.match(r"^[a-z0-9_]+(@\S+)?\s+\d", line)
    }


def test_the_bill_lists_every_training_job_of_the_papers_dag(bill, imagenet, tmp_path):
    rows = _rows(bill)
    jobs = training_jobs(imagenet, tmp_path)
    assert set(rows) == {j.stage for j in jobs}
    # 4,600 DeiT-B epochs: teacher@vit 300, five pretrain x 300, Figure 3's 400+400+1000+1000
    epochs = sum(
        int(rows[s][2])
        for s in rows
        if s.startswith(("pretrain@", "figure3_")) or s == "teacher@vit"
    )
    assert epochs == 4600
    assert rows["pretrain@deit"][3] == f"{300 * 1_281_167 / 1e6:.2f}M"  # ImageNet-1k, 300 epochs
    # released RegNetY-16GF weights: evaluated once, on one GPU, not 2 x 8 GPUs for 2800 min
    assert rows["teacher@convnet"][1] == "1" and rows["teacher@convnet"][8] == "1x1GPU"
    assert rows["pretrain@deit"][8] == "2x8GPU"


def test_the_measured_model_is_priced_at_its_measured_rate(bill):
    """DeiT-B⚗ + RegNetY-16GF at 224 is what the rates file measured (1,334.5 images/s on an
    H200): the bill's rate for pretrain@deit is that one (FLOPs counted here within 1 %)."""
    measured = json.loads(RATES.read_text())["runs"][1]
    assert measured["model"] == "deit_base_distilled_patch16_224"
    rate = float(_rows(bill)["pretrain@deit"][5].replace(",", ""))
    assert rate == pytest.approx(measured["images_per_s"], rel=0.01)


def test_the_total_is_the_sum_of_the_rows_and_scales_with_the_rates(bill, imagenet, tmp_path):
    rows = _rows(bill)
    total = float(re.search(r"^total: ([\d,.]+) GPU-hours", bill, re.M)[1].replace(",", ""))
    assert total == pytest.approx(sum(float(r[7].replace(",", "")) for r in rows.values()), abs=1)
    without = float(re.search(r"without Figure 3's runs: ([\d,.]+)", bill)[1].replace(",", ""))
    fig3 = sum(float(r[7].replace(",", "")) for s, r in rows.items() if s.startswith("figure3"))
    assert without == pytest.approx(total - fig3, abs=1)
    slow = load_rates()
    for run in slow["runs"]:
        run["images_per_s"] /= 2
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(slow))
    half = cost_table(imagenet, load_rates(path), tmp_path)
    again = float(re.search(r"^total: ([\d,.]+) GPU-hours", half, re.M)[1].replace(",", ""))
    assert again == pytest.approx(2 * total, rel=0.01)


def test_a_rates_file_without_rates_is_one_line(tmp_path):
    from deit_repro.errors import ConfigError

    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"peak_tflops": 1, "runs": []}))
    with pytest.raises(ConfigError, match=r"rates file .* is unreadable or incomplete"):
        load_rates(path)


def test_the_readme_states_the_bill_the_command_prints(bill):
    """README's totals for the paper's configuration are what `launch-plan --cost` prints."""
    readme = (ROOT / "README.md").read_text()
    said = float(re.search(r"about ([\d,]+)\s+H200 GPU-hours", readme)[1].replace(",", ""))
    without = float(re.search(r"without Figure 3, about ([\d,]+)\*\*", readme)[1].replace(",", ""))
    total = float(re.search(r"^total: ([\d,.]+) GPU-hours", bill, re.M)[1].replace(",", ""))
    printed = float(re.search(r"without Figure 3's runs: ([\d,.]+)", bill)[1].replace(",", ""))
    assert said == pytest.approx(total, rel=0.01) and without == pytest.approx(printed, rel=0.01)


def test_an_image_tree_not_prepared_yet_is_counted_and_published_sizes_are_said(
    imagenet, bill, tmp_path
):
    """Sizes come from a prepared manifest, else a listing of an ImageFolder tree, else the
    source's published split, which the bill names."""
    import dataclasses

    from PIL import Image

    from deit_repro.run.cost import dataset_size

    for split, n in (("train", 3), ("val", 1)):
        for cls in ("a", "b"):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4)).save(tmp_path / "tree" / split / cls / f"{i}.JPEG")
    cfg = dataclasses.replace(imagenet.datasets["imagenet"], root=str(tmp_path / "tree"))
    p = dataclasses.replace(imagenet, datasets={**imagenet.datasets, "imagenet": cfg})
    assert dataset_size(p, "imagenet", tmp_path / "nodata") == (6, 2, 2)
    assert dataset_size(imagenet, "imagenet", tmp_path / "nodata") == (1_281_167, 50_000, 1000)
    assert "the sources' published splits" in bill and "imagenet, inat2018" in bill


def test_the_loader_cores_follow_the_pipeline_each_job_runs(imagenet, tmp_path):
    """The imagenet profile's `pipeline: auto` runs the device pipeline on its GPU jobs: the CPU
    cores per GPU are the byte readers' plus the one driving process, not timm's per-image
    transform's; a rates file without a read rate prices it as timm's."""
    from deit_repro.run.cost import loader_cores

    jobs = training_jobs(imagenet, tmp_path)
    assert {j.pipeline for j in jobs if j.res.gpus_per_node > 0} == {"device"}
    rates = {**load_rates(), "loader_images_per_s_per_core": 200.0}
    rates.pop("loader_read_images_per_s_per_core")  # a rates file of before the device pipeline
    assert loader_cores("timm", 4000.0, rates) == pytest.approx(20.0)
    assert loader_cores("device", 4000.0, rates) == pytest.approx(20.0)  # no read rate: as timm
    assert loader_cores("tensor", 4000.0, rates) == 0.0
    rates["loader_read_images_per_s_per_core"] = 8000.0
    assert loader_cores("device", 4000.0, rates) == pytest.approx(1.5)
    bill = cost_table(imagenet, rates, tmp_path)
    worst = float(re.search(r"^loader: up to ([\d.]+) CPU cores per GPU", bill, re.M)[1])
    fastest = max(float(r[5].replace(",", "")) for r in _rows(bill).values() if r[-1] != "-")
    assert worst == pytest.approx(fastest / 8000.0 + 1, abs=0.06)
    assert "device pipeline: bytes read at 8000 images/s per core" in bill
