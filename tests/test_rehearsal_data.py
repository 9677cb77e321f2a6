"""scripts/rehearsal_data.py: small datasets in the real formats, read by the project's loaders and
by torchvision's own parsers, byte-identical on every run."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy.io import loadmat

from conftest import CIFAR10_CLASSES

from deit_repro.data.sources import decode_files, load_source
from deit_repro.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "rehearsal_data.py"
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
CARS_CLASSES = [
    "AM General Hummer SUV 2000",
    "Acura RL Sedan 2012",
    "Acura TL Sedan 2012",
    "Acura TL Type-S 2008",
    "Acura TSX Sedan 2012",
]
INAT_IDS = [3, 17, 42, 108, 999]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def gen(rehearsal_data):
    """The session's generated folder (conftest.rehearsal_data)."""
    return rehearsal_data


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- ImageNet


def test_imagenet_loads_with_the_project_loader(gen):
    ds = load_source("imagefolder", source_dir=gen.out / "imagenet")
    assert ds.classes == WNIDS
    assert len(ds.splits["train"]) == 32 and len(ds.splits["test"]) == 16
    assert Counter(ds.splits["train"].labels.tolist()) == {i: 8 for i in range(4)}
    assert Counter(ds.splits["test"].labels.tolist()) == {i: 4 for i in range(4)}
    # The pre-resize path converts the grayscale, CMYK and PNG files to RGB like the rest.
    arrays = decode_files(
        ds.splits["train"], 16, on_bad_image="error", split_name="train", skipped={}
    )
    assert arrays.images.shape == (32, 16, 16, 3)


def test_imagenet_has_the_odd_files_of_the_real_one(gen):
    kinds, sizes = Counter(), set()
    for path in sorted((gen.out / "imagenet").rglob("*")):
        if path.is_file():
            with Image.open(path) as img:
                kinds[(img.format, img.mode, path.suffix, path.parts[-3])] += 1
                sizes.add(img.size)
    assert kinds == {
        ("JPEG", "L", ".JPEG", "train"): 1,
        ("JPEG", "CMYK", ".JPEG", "train"): 1,
        ("PNG", "RGB", ".png", "train"): 1,
        ("JPEG", "RGB", ".JPEG", "train"): 29,
        ("JPEG", "RGB", ".JPEG", "val"): 16,
    }
    assert len(sizes) >= 5
    assert any(h > w for w, h in sizes) and any(w > h for w, h in sizes)


# ------------------------------------------------------------------------- CIFAR


def _cifar_with_md5s_of(base: Path, hundred: bool) -> type:
    """torchvision's own CIFAR reader, pinned to the generated files' md5s instead of the
    originals' (its data and meta checks both use them), so everything else runs unchanged."""
    parent = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    attrs = {
        "train_list": [[name, _md5(base / name)] for name, _ in parent.train_list],
        "test_list": [[name, _md5(base / name)] for name, _ in parent.test_list],
        "meta": {**parent.meta, "md5": _md5(base / parent.meta["filename"])},
    }
    return type(f"Generated{parent.__name__}", (parent,), attrs)


@pytest.mark.parametrize(
    "hundred, folder, n_classes, counts",
    [(False, "cifar-10-batches-py", 10, (20, 10)), (True, "cifar-100-python", 100, (200, 100))],
)
def test_cifar_pickles_match_the_folder_stand_in(gen, hundred, folder, n_classes, counts):
    cls = _cifar_with_md5s_of(gen.out / "cifar" / folder, hundred)
    stand_in = gen.out / ("cifar100_folder" if hundred else "cifar10_folder")
    folder_ds = load_source("imagefolder", source_dir=stand_in)
    assert len(folder_ds.classes) == n_classes
    for train, split, n in ((True, "train", counts[0]), (False, "test", counts[1])):
        tv = cls(str(gen.out / "cifar"), train=train)
        assert tv.data.shape == (n, 32, 32, 3) and tv.data.dtype == np.uint8
        assert len(tv.classes) == n_classes and folder_ds.classes == tv.classes
        if not hundred:
            assert tv.classes == CIFAR10_CLASSES
        assert Counter(tv.targets) == {c: n // n_classes for c in range(n_classes)}
        files = folder_ds.splits[split].files
        assert len(files) == n
        for path in files:
            index, class_name = int(Path(path).stem), Path(path).parent.name
            assert class_name == tv.classes[tv.targets[index]]
            np.testing.assert_array_equal(np.asarray(Image.open(path)), tv.data[index])


def test_cifar_pickles_are_python2_style(gen):
    # As the originals: str keys under encoding="latin1" (torchvision), bytes under "bytes".
    path = gen.out / "cifar" / "cifar-10-batches-py" / "data_batch_1"
    assert path.read_bytes()[:2] == b"\x80\x02"
    as_bytes = pickle.loads(path.read_bytes(), encoding="bytes")
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_bytes[b"data"].shape == (4, 3072) and as_bytes[b"data"].dtype == np.uint8
    assert as_bytes[b"batch_label"] == b"training batch 1 of 5"
    meta = pickle.loads(
        (gen.out / "cifar" / "cifar-10-batches-py" / "batches.meta").read_bytes(),
        encoding="latin1",
    )
    assert meta == {"num_cases_per_batch": 4, "label_names": CIFAR10_CLASSES, "num_vis": 3072}
    base = gen.out / "cifar" / "cifar-100-python"
    meta = pickle.loads((base / "meta").read_bytes(), encoding="latin1")
    train = pickle.loads((base / "train").read_bytes(), encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20
    assert meta["fine_label_names"][0] == "apple" and meta["fine_label_names"][99] == "worm"
    # Each superclass holds exactly five classes.
    pairs = set(zip(train["fine_labels"], train["coarse_labels"]))
    assert len(pairs) == 100
    assert Counter(coarse for _, coarse in pairs) == {c: 5 for c in range(20)}


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_torchvision_refuses_the_generated_cifar(gen, source):
    # Why the *_folder stand-ins exist: torchvision pins the originals' md5.
    with pytest.raises(DataError):
        load_source(source, source_dir=gen.out / "cifar")


# ------------------------------------------------------------------------- Flowers-102


def test_flowers_mat_files_match_the_folder_stand_in(gen):
    base = gen.out / "flowers102" / "flowers-102"
    labels = loadmat(base / "imagelabels.mat")["labels"]
    assert labels.shape == (1, 48)
    assert Counter(labels[0].tolist()) == {c: 8 for c in range(1, 7)}
    sets = loadmat(base / "setid.mat")
    ids = {key: sets[key][0].tolist() for key in ("trnid", "valid", "tstid")}
    assert [len(v) for v in ids.values()] == [18, 12, 18]
    assert sorted(sum(ids.values(), [])) == list(range(1, 49))

    class GeneratedFlowers(torchvision.datasets.Flowers102):
        _file_dict = {
            **torchvision.datasets.Flowers102._file_dict,
            "label": ("imagelabels.mat", _md5(base / "imagelabels.mat")),
            "setid": ("setid.mat", _md5(base / "setid.mat")),
        }

    # loader=Path: indexing yields (path, label) without decoding.
    tv = {
        s: GeneratedFlowers(str(gen.out / "flowers102"), split=s, loader=Path)
        for s in ("train", "val", "test")
    }
    stand_in = load_source("imagefolder", source_dir=gen.out / "flowers102_folder")
    assert stand_in.classes == [f"{c:03d}" for c in range(1, 7)]
    for split, tv_splits in (("train", ("train", "val")), ("test", ("test",))):
        expected = {f.name: (label, f) for s in tv_splits for f, label in tv[s]}
        got = stand_in.splits[split]
        assert len(got) == len(expected)
        for path, label in zip(got.files, got.labels.tolist()):
            want_label, original = expected[Path(path).name]
            assert label == want_label
            assert Path(path).read_bytes() == original.read_bytes()
    with pytest.raises(DataError):
        load_source("flowers102", source_dir=gen.out / "flowers102")


# ------------------------------------------------------------------------- Stanford Cars


def test_stanford_cars_loads_through_torchvision(gen):
    ds = load_source("stanford_cars", source_dir=gen.out / "stanford_cars")
    assert ds.classes == CARS_CLASSES
    assert len(ds.splits["train"]) == 15 and len(ds.splits["test"]) == 10
    assert Counter(ds.splits["train"].labels.tolist()) == {c: 3 for c in range(5)}
    assert Counter(ds.splits["test"].labels.tolist()) == {c: 2 for c in range(5)}
    base = gen.out / "stanford_cars" / "stanford_cars"
    for split, mat in (
        ("train", base / "devkit" / "cars_train_annos.mat"),
        ("test", base / "cars_test_annos_withlabels.mat"),
    ):
        annos = loadmat(mat, squeeze_me=True)["annotations"]
        want = {str(a["fname"]): int(a["class"]) - 1 for a in annos}
        got = ds.splits[split]
        assert {Path(f).name: lab for f, lab in zip(got.files, got.labels.tolist())} == want
        for a in annos:
            with Image.open(base / f"cars_{split}" / str(a["fname"])) as img:
                w, h = img.size
            assert 1 <= a["bbox_x1"] < a["bbox_x2"] <= w and 1 <= a["bbox_y1"] < a["bbox_y2"] <= h


# ------------------------------------------------------------------------- iNaturalist


@pytest.mark.parametrize("year", [2018, 2019])
def test_inaturalist_loads_with_the_project_loader(gen, year):
    root = gen.out / f"inat{year}"
    ds = load_source(f"inat{year}", source_dir=root)
    train_doc = json.loads((root / f"train{year}.json").read_text())
    name_of = {c["id"]: c["name"] for c in train_doc["categories"]}
    assert ds.classes == [name_of[cid] for cid in INAT_IDS]
    assert len(ds.splits["train"]) == 15 and len(ds.splits["test"]) == 10
    for split, per_class in (("train", 3), ("test", 2)):
        got = ds.splits[split]
        assert Counter(got.labels.tolist()) == {c: per_class for c in range(5)}
        for path, label in zip(got.files, got.labels.tolist()):
            assert Path(path).parts[-4] == f"train_val{year}"
            assert Path(path).parent.name == str(INAT_IDS[label])
    val_doc = json.loads((root / f"val{year}.json").read_text())
    for doc in (train_doc, val_doc):
        for img in doc["images"]:
            with Image.open(root / img["file_name"]) as pil:
                assert pil.size == (img["width"], img["height"])
    train_ids = {i["id"] for i in train_doc["images"]}
    assert train_ids.isdisjoint(i["id"] for i in val_doc["images"])


# ------------------------------------------------------------------------- weights


def test_weights_are_pinned_and_load_strictly(gen):
    import timm

    (path,) = (gen.out / "weights").glob("regnety_160-*.pth")
    digest = _sha256(path)
    assert (gen.out / "weights" / "SHA256").read_text() == digest + "\n"
    assert path.name == f"regnety_160-{digest[:8]}.pth"
    assert digest in gen.stdout
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = timm.create_model("regnety_160", num_classes=4)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert state["head.fc.weight"].shape == (4, 3024)
    # The rehearsal overlay pins exactly this file, by URL name and full digest.
    import yaml

    pin = yaml.safe_load((ROOT / "profiles" / "rehearsal.yaml").read_text())["teacher"]["weights"]
    assert pin["sha256"] == digest and pin["url"].endswith("/" + path.name)


def test_second_run_with_force_writes_the_same_bytes(gen, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run\n")
    proc = _run(out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists()
    assert _tree_digests(out) == _tree_digests(gen.out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no .tmp-/.old- left over


def test_refuses_a_non_empty_out_dir_without_force(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    proc = _run(out)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "--force" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_help_works():
    proc = _run(Path("unused"), "--help")
    assert proc.returncode == 0 and "--force" in proc.stdout
