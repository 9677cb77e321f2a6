"""The evaluate-only path: released weights (pinned sha256, weights_only) -> model directory ->
the evaluate stage, as a user with ImageNet but no cluster would fill the tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import smoke_dict
from PIL import Image

from deit_repro import atomic
from deit_repro.run import cli
from deit_repro.core.engine import Runtime
from deit_repro.stages.evaluate import run_evaluate
from deit_repro.core.datasets import open_dataset
from deit_repro.core.model_dirs import build_model
from deit_repro.core.models import create_student


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A 'released' DeiT-Ti⚗ checkpoint in the official layout ({"model": state_dict})."""
    torch.manual_seed(0)
    net = create_student(
        name="deit_tiny_distilled_patch16_224",
        distilled=True,
        num_classes=10,
        img_size=32,
        in_chans=1,
        drop_path_rate=0.0,
    )
    path = tmp_path_factory.mktemp("release") / "deit_tiny_distilled_patch16_224-abcd.pth"
    torch.save({"model": net.state_dict()}, path)
    return path, atomic.sha256_file(path), net


def _import(path, pin: str, data, out, url: str | None = None) -> int:
    return cli.main(
        [
            "--log-level",
            "WARNING",
            "import-weights",
            "--model",
            "deit_tiny_distilled_patch16_224",
            "--weights",
            url or str(path),
            "--sha256",
            pin,
            "--data",
            str(data),
            "--img-size",
            "32",
            "--out",
            str(out),
        ]
    )


def test_released_weights_are_evaluated_like_a_trained_model(
    released, fashion_small, smoke_params, tmp_path
):
    path, digest, net = released
    assert _import(path, digest, fashion_small, tmp_path / "ti") == 0
    saved = torch.load(tmp_path / "ti" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    res = run_evaluate(
        smoke_params,
        data=fashion_small,
        models={"ti": tmp_path / "ti"},
        teacher=None,
        out=tmp_path / "eval.json",
        rt=Runtime(torch.device("cpu")),
    )
    heads = res["models"]["ti"]["heads"]
    assert set(heads) == {"cls", "dist", "joint"} and res["models"]["ti"]["img_size"] == 32


def test_a_released_file_with_another_sha256_is_refused(released, fashion_small, tmp_path, capsys):
    path, digest, _ = released
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    code = _import(path, wrong, fashion_small, tmp_path / "x")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"has sha256 {digest}, not the pinned {wrong}" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("cut", ["", "4", "9", "63", "nonhex"])
def test_a_pin_that_pins_nothing_is_refused(released, fashion_small, tmp_path, capsys, cut):
    """Only the full digest or a release name's 8 digits pin: an empty, 4-, 9- or 63-digit or
    non-hex --sha256 is refused before anything is read or written."""
    path, digest, _ = released
    pin = "xyz" + digest[:8] if cut == "nonhex" else digest[: int(cut or 0)]
    code = _import(path, pin, fashion_small, tmp_path / "x")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"--sha256 {pin!r} is not a sha256 pin" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("form", ["upper", "prefix8", "prefix8-upper"])
def test_a_pin_in_either_case_or_as_a_release_prefix_is_accepted(
    released, fashion_small, tmp_path, form
):
    path, digest, _ = released
    pin = {"upper": digest.upper(), "prefix8": digest[:8], "prefix8-upper": digest[:8].upper()}
    assert _import(path, pin[form], fashion_small, tmp_path / "x") == 0
    assert torch.load(tmp_path / "x" / "model.pt", weights_only=True)


def test_a_file_url_and_a_missing_student_file_say_released_weights(
    released, fashion_small, tmp_path, capsys
):
    """file:// reads the pre-placed file (compute nodes without internet); a missing file is
    named as the released weights it is, not as a teacher's."""
    path, digest, _ = released
    assert _import(path, digest, fashion_small, tmp_path / "x", url=path.as_uri()) == 0
    code = _import(path, digest, fashion_small, tmp_path / "y", url=str(tmp_path / "nope.pth"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    missing = tmp_path / "nope.pth"
    assert code == 2, err
    assert f"released deit_tiny_distilled_patch16_224 weights file {missing} not found" in err, err


# --- The evaluate-only path end to end: ImageNet's val/ alone, released checkpoints, the tables


def _val_tree(root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class=4) -> Path:
    """An ImageNet-layout tree with val/ alone (no train/): JPEGs of varied sizes, the evaluate-
    only user's disk."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for i in range(per_class):
            h, w = 60 + 7 * i, 80 - 5 * c
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            (root / "val" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "val" / name / f"ILSVRC2012_val_{c}{i}.JPEG")
    return root


#: (timm name, role, built at px): what `import-weights` builds for each (stages/released.py);
#: timm releases a 384-px DeiT for DeiT-B alone (350 MB: the ↑384 columns are not tested here)
_RELEASES = (
    ("deit_tiny_patch16_224", "student", 224),
    ("deit_tiny_distilled_patch16_224", "student", 224),
    ("resnet18", "teacher", 224),
)


def _release(name: str, role: str, px: int, num_classes: int, folder: Path) -> tuple[Path, str]:
    """A generated 'released' file of ``name`` in the official layout ({"model": state_dict})."""
    torch.manual_seed(len(name))
    if role == "student":
        kwargs = dict(
            name=name,
            distilled="distilled" in name,
            num_classes=num_classes,
            img_size=px,
            in_chans=3,
            drop_path_rate=0.0,
        )
    else:
        kwargs = dict(name=name, num_classes=num_classes, in_chans=3, img_size=px)
    path = folder / f"{name}-0123abcd.pth"
    torch.save({"model": build_model(role, kwargs).state_dict()}, path)
    return path, atomic.sha256_file(path)


def test_released_checkpoints_fill_tables_1_3_4_and_5_from_val_alone(tmp_path, capsys):
    """prepare --splits test (val/ only) -> import-weights x 4 -> evaluate under released/<timm
    name> -> tables --released: every released row holds the evaluate JSON's number, the
    DAG's rows say "not run", and provenance names the released file."""
    tree = _val_tree(tmp_path / "imagenet")
    params = smoke_dict()
    params["datasets"]["imagenet"] = {"source": "imagefolder", "root": str(tree)}
    params["throughput"] = {"batch_sizes": [4], "warmup": 0, "repeats": 1}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))

    def run(stage: str, *argv: str) -> int:
        return cli.main(["--log-level", "WARNING", stage, "--params", str(pfile), *argv])

    data = tmp_path / "data" / "imagenet_val"
    assert run("prepare", "--dataset", "imagenet", "--splits", "test", "--out", str(data)) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["test"] and manifest["splits"]["test"]["count"] == 12
    assert manifest["params"]["splits"] == ["test"]

    models = []
    for name, role, px in _RELEASES:
        path, digest = _release(name, role, px, 3, tmp_path)
        out = tmp_path / "models" / "released" / name
        argv = ["import-weights", "--model", name, "--weights", str(path), "--sha256", digest]
        assert run(*argv, "--data", str(data), "--out", str(out)) == 0
        models += ["--model", f"released/{name}={out}"]
    metrics = tmp_path / "metrics"
    released_json = metrics / "released.json"
    assert run("evaluate", "--data", str(data), *models, "--out", str(released_json)) == 0
    res = json.loads(released_json.read_text())
    assert sorted(res["released"]) == sorted(f"released/{n}" for n, _, _ in _RELEASES)
    info = res["released"]["released/deit_tiny_distilled_patch16_224"]
    assert (info["embed_dim"], info["num_heads"], info["depth"]) == (192, 3, 12)
    assert info["distilled"] is True and info["throughput"]["images_per_s"] > 0
    assert res["released"]["released/resnet18"]["role"] == "teacher"
    assert "embed_dim" not in res["released"]["released/resnet18"]

    results = tmp_path / "results"
    argv = ["tables", "--metrics", str(metrics), "--released", str(released_json)]
    assert run(*argv, "--out", str(results)) == 0
    capsys.readouterr()

    def rows(table: str) -> dict[str, dict[str, str]]:
        with open(results / f"{table}.csv", newline="") as fh:
            return {r[next(iter(r))]: r for r in csv.DictReader(fh)}

    def top1(name: str, head: str | None = None) -> str:
        entry = res["models"][f"released/{name}"]
        node = entry["heads"][head]["top1"] if head else entry["top1"]
        assert node["std"] == 0.0  # one set of weights: the same number for every seed
        return f"{node['values'][0]:.2f}"

    t1 = rows("table1_variants")
    ti = t1["released deit_tiny_distilled_patch16_224"]
    assert (ti["embedding dim"], ti["heads"], ti["layers"]) == ("192", "3", "12")
    assert ti["resolution"] == "224" and ti["paper model"] == "DeiT-Ti"
    assert (
        ti["params"]
        == f"{res['models']['released/deit_tiny_distilled_patch16_224']['params'] / 1e6:.2f}M"
    )
    assert "released resnet18" not in t1  # Table 1 lists DeiT variants
    assert t1[next(iter(t1))]["images/s"] == "not run"  # the DAG's rows: nothing ran

    t3 = rows("table3_distillation")
    assert t3["DeiT - no distillation"]["released DeiT-Ti"] == top1("deit_tiny_patch16_224", "cls")
    assert t3["DeiT - hard distillation"]["released DeiT-Ti"] == "–"
    for method, head in (("class embedding", "cls"), ("distil. embedding", "dist")):
        row = t3[f"DeiT⚗: {method}"]
        assert row["released DeiT-Ti"] == top1("deit_tiny_distilled_patch16_224", head)
    joint = t3["DeiT⚗: class+distillation"]
    assert joint["released DeiT-Ti"] == top1("deit_tiny_distilled_patch16_224", "joint")
    assert joint[f"top-1 @{params['student']['model']['img_size']}px"] == "not run"

    t4 = rows("table4_disagreement_released")
    d = res["disagreement"]
    cls, dist = (
        "released/deit_tiny_distilled_patch16_224/cls",
        "released/deit_tiny_distilled_patch16_224/dist",
    )
    assert t4["DeiT⚗ class only"]["DeiT⚗ distil. only"] == f"{d[cls][dist]['mean'] / 100:.3f}"
    assert t4["teacher"]["DeiT (no distillation)"] == (
        f"{d['released/resnet18']['released/deit_tiny_patch16_224']['mean'] / 100:.3f}"
    )
    assert t4["ground truth"]["ground truth"] == "0.000"

    t5 = rows("table5_throughput_accuracy")
    r5 = t5["released deit_tiny_distilled_patch16_224"]
    assert r5["top-1"] == top1("deit_tiny_distilled_patch16_224", "joint")
    assert (r5["paper network"], r5["paper top-1"]) == ("DeiT-Ti alembic", "74.5")
    assert "released DeiT-Ti↑384" not in next(iter(t3.values()))  # no 384 model was evaluated
    assert t5["released resnet18"]["paper network"] == "ResNet-18"
    ips = res["released"]["released/resnet18"]["throughput"]["images_per_s"]
    assert t5["released resnet18"]["images/s"] == f"{ips:.0f}"

    prov = json.loads((results / "provenance.json").read_text())
    assert released_json.as_posix() in prov["files"] or "metrics/released.json" in prov["files"]
    assert any("released.json" in f for f in prov["tables"]["table3_distillation"]["files"])


def test_a_training_stage_refuses_a_dataset_of_val_alone(tmp_path, capsys):
    """A dataset prepared with --splits test holds no training images: pretrain names it."""
    tree = _val_tree(tmp_path / "imagenet", per_class=1)
    params = smoke_dict()
    params["datasets"]["imagenet"] = {"source": "imagefolder", "root": str(tree)}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    data = tmp_path / "imagenet_val"
    argv = ["prepare", "--params", str(pfile), "--dataset", "imagenet", "--splits", "test"]
    assert cli.main([*argv, "--out", str(data)]) == 0
    capsys.readouterr()
    argv = ["pretrain", "--params", str(pfile), "--launcher", "in-process", "--distill", "none"]
    assert cli.main([*argv, "--data", str(data), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        f"prepared dataset {data} holds the test split alone (prepare --splits test): training "
        "needs its train split; prepare it again without --splits" in err
    ), err
    assert not (tmp_path / "m").exists()
    with pytest.raises(Exception, match="has no split 'train'"):  # and below the CLI
        open_dataset(data)


def test_splits_test_is_refused_for_a_source_that_is_not_an_image_tree(tmp_path, capsys):
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(smoke_dict()))
    argv = ["prepare", "--params", str(pfile), "--dataset", "digits", "--splits", "test"]
    assert cli.main([*argv, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--splits test applies to image trees (source imagefolder" in err, err
    assert not (tmp_path / "d").exists()
