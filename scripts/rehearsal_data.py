"""Write small datasets in the real on-disk formats, for a rehearsal of the paper's runs on a CPU.

The paper's configuration reads ImageNet, CIFAR-10/100, Flowers-102, Stanford Cars and
iNaturalist 2018/2019, and distils from a RegNetY-16GF teacher. None of that fits on a CPU
machine, yet every reader, every layout assumption and every format quirk (CMYK and grayscale
JPEGs inside ImageNet, Python 2 pickles, MATLAB structs, iNaturalist's JSON) is exercised only by
files that look like the originals. This script writes such files, a few dozen images per dataset,
deterministically (fixed seeds: the same bytes on every run with the same library versions):

  imagenet/{train,val}/<wnid>/*.JPEG       4 classes, 8 train + 4 val each, varied sizes; among the
                                           train images one grayscale JPEG, one CMYK JPEG, one PNG
  cifar/cifar-10-batches-py/               data_batch_1..5, test_batch, batches.meta (20 + 10)
  cifar/cifar-100-python/                  train, test, meta (100 classes, 200 + 100)
  cifar10_folder/, cifar100_folder/        the same images as PNG in an ImageFolder tree
  flowers102/flowers-102/                  jpg/, imagelabels.mat, setid.mat (6 classes, 48 images)
  flowers102_folder/{train,val}/<label>/   the same files, train = trnid + valid, val = tstid
  stanford_cars/stanford_cars/             devkit/, cars_train/, cars_test/, annotation .mat files
  inat2018/, inat2019/                     train{year}.json, val{year}.json, train_val{year}/...
  weights/regnety_160-<sha8>.pth, SHA256   a seeded timm regnety_160 (4 classes) state dict

torchvision checks the md5 of the original CIFAR and Flowers-102 files, so it refuses the
generated ones; the ``*_folder`` trees hold the very same images for the ImageFolder reader.

Usage: python scripts/rehearsal_data.py OUT_DIR [--force]

OUT_DIR appears complete or not at all: everything is written into ``OUT_DIR.tmp-<pid>`` and
renamed at the end. An existing non-empty OUT_DIR is refused (exit 2) unless ``--force``.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20210101

IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
IMAGENET_PER_CLASS = {"train": 8, "val": 4}

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
# CIFAR-100's superclasses and their five classes each; both name lists are sorted, as in the
# original meta file.
CIFAR100_COARSE = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
CIFAR100_CLASSES = sorted(f for fines in CIFAR100_COARSE.values() for f in fines)
CIFAR100_COARSE_NAMES = sorted(CIFAR100_COARSE)
CIFAR10_PER_CLASS = {"train": 2, "test": 1}  # 20 train images spread over the five batch files
CIFAR100_PER_CLASS = {"train": 2, "test": 1}

FLOWERS_CLASSES = 6
FLOWERS_PER_CLASS = {"trnid": 3, "valid": 2, "tstid": 3}

CARS_CLASSES = [
    "AM General Hummer SUV 2000",
    "Acura RL Sedan 2012",
    "Acura TL Sedan 2012",
    "Acura TL Type-S 2008",
    "Acura TSX Sedan 2012",
]
CARS_PER_CLASS = {"train": 3, "test": 2}

# (category id, name, 2018 supercategory, 2019 supercategory); ids are sparse on purpose: readers
# must map them to contiguous labels.
INAT_CATEGORIES = [
    (3, "Quercus agrifolia", "Plantae", "Plants"),
    (17, "Danaus plexippus", "Insecta", "Insects"),
    (42, "Cardinalis cardinalis", "Aves", "Birds"),
    (108, "Amanita muscaria", "Fungi", "Fungi"),
    (999, "Anaxyrus boreas", "Amphibia", "Amphibians"),
]
INAT_PER_CLASS = {"train": 3, "val": 2}

WEIGHTS_MODEL = "regnety_160"

# MATLAB writes the creation time into a .mat file's 116-byte text header; a fixed text keeps the
# bytes reproducible.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: rehearsal_data.py (fixed header)"


# ------------------------------------------------------------------------- images


def _pixels(rng: np.random.Generator, label: int, n_classes: int, w: int, h: int) -> np.ndarray:
    """An RGB uint8 [h, w, 3] image a classifier can tell apart by class: a class hue and a class
    stripe orientation, with a random stripe period, phase and pixel noise."""
    r, g, b = colorsys.hsv_to_rgb(label / n_classes, 0.75, 0.9)
    theta = np.pi * label / n_classes
    period = rng.uniform(0.08, 0.25) * min(w, h) + 2.0
    phase = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = np.sin(2.0 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    shade = 0.55 + 0.45 * wave
    img = shade[..., None] * (255.0 * np.array([r, g, b], dtype=np.float32))
    img += rng.normal(0.0, 12.0, size=(h, w, 3)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _size(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    """(width, height), each side drawn independently: portrait, landscape and square."""
    w, h = rng.integers(lo, hi + 1, size=2)
    return int(w), int(h)


def _save_image(arr: np.ndarray, path: Path, mode: str = "RGB", fmt: str = "JPEG") -> None:
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=90)
    else:
        img.save(path, fmt)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"


# ------------------------------------------------------------------------- ImageNet


def write_imagenet(root: Path, rng: np.random.Generator) -> str:
    # Real ImageNet-1k train holds grayscale JPEGs, a couple of dozen CMYK JPEGs and a PNG (named
    # .JPEG there); readers must convert them all to RGB. One of each, in three different classes.
    odd = {(0, 0): ("L", "JPEG", ".JPEG"), (1, 0): ("CMYK", "JPEG", ".JPEG")}
    odd[(2, 0)] = ("RGB", "PNG", ".png")
    n_val = len(IMAGENET_WNIDS) * IMAGENET_PER_CLASS["val"]
    # Val file names are numbered across classes in a random order, as ILSVRC2012_val_*.
    val_numbers = iter(rng.permutation(n_val) + 1)
    for split, per_class in IMAGENET_PER_CLASS.items():
        for label, wnid in enumerate(IMAGENET_WNIDS):
            # Train files are <wnid>_<number>.JPEG, numbers unique within a class.
            numbers = rng.choice(np.arange(1, 20000), size=per_class, replace=False)
            for k in range(per_class):
                w, h = _size(rng, 60, 400)
                arr = _pixels(rng, label, len(IMAGENET_WNIDS), w, h)
                mode, fmt, ext = ("RGB", "JPEG", ".JPEG")
                if split == "train":
                    mode, fmt, ext = odd.get((label, k), (mode, fmt, ext))
                    name = f"{wnid}_{int(numbers[k])}{ext}"
                else:
                    name = f"ILSVRC2012_val_{int(next(val_numbers)):08d}{ext}"
                _save_image(arr, root / split / wnid / name, mode, fmt)
    n_train = len(IMAGENET_WNIDS) * IMAGENET_PER_CLASS["train"]
    return f"imagenet: {len(IMAGENET_WNIDS)} classes, {n_train} train / {n_val} val images"


# ------------------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):
    """A protocol-2 pickler that writes every str and bytes as a Python 2 ``str``.

    The CIFAR files were pickled by Python 2: their keys, names and the arrays' raw data are
    Python 2 strings, which Python 3 decodes as ``encoding`` says (``"latin1"``: ``"data"``, what
    torchvision reads; ``"bytes"``: ``b"data"``). Python 3's own pickler writes ``str`` as unicode
    and ``bytes`` as a ``_codecs.encode`` call, which load the same under any encoding, so
    torchvision's ``entry["data"]`` would fail on bytes keys. The pure-Python pickler is used
    because only it lets a subclass replace how a type is written.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        # numpy >= 2 names its array reconstructor numpy._core.multiarray; the originals (and
        # readers with numpy 1.x) use numpy.core.multiarray, which numpy 2 still resolves.
        if obj is _NDARRAY_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


_NDARRAY_RECONSTRUCT = np.empty(0).__reduce__()[0]


def py2_pickle(obj) -> bytes:
    """``obj`` pickled like Python 2's ``cPickle.dump(obj, f, 2)`` did the CIFAR files."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _cifar_split(rng: np.random.Generator, n_classes: int, per_class: int):
    """Images uint8 [N, 32, 32, 3] and labels, classes interleaved in random order."""
    labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
    images = np.stack([_pixels(rng, int(c), n_classes, 32, 32) for c in labels])
    return images, [int(c) for c in labels]


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    # One image per row: the 1024 red values (row-major), then the green, then the blue.
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _cifar_filenames(rng: np.random.Generator, names: list[str], labels: list[int]) -> list[str]:
    return [f"{names[c]}_s_{int(rng.integers(0, 1000000)):06d}.png" for c in labels]


def _write_folder(root: Path, split: str, names: list[str], images, labels) -> None:
    for i, (img, c) in enumerate(zip(images, labels)):
        _save_image(img, root / split / _safe_name(names[c]) / f"{i:05d}.png", fmt="PNG")


def write_cifar10(out: Path, rng: np.random.Generator) -> str:
    base = out / "cifar" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    n_batches = 5
    train_x, train_y = _cifar_split(rng, len(CIFAR10_CLASSES), CIFAR10_PER_CLASS["train"])
    test_x, test_y = _cifar_split(rng, len(CIFAR10_CLASSES), CIFAR10_PER_CLASS["test"])
    per_batch = len(train_y) // n_batches
    for b in range(n_batches):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        batch = {
            "batch_label": f"training batch {b + 1} of {n_batches}",
            "labels": train_y[sl],
            "data": _cifar_rows(train_x[sl]),
            "filenames": _cifar_filenames(rng, CIFAR10_CLASSES, train_y[sl]),
        }
        (base / f"data_batch_{b + 1}").write_bytes(py2_pickle(batch))
    test = {
        "batch_label": "testing batch 1 of 1",
        "labels": test_y,
        "data": _cifar_rows(test_x),
        "filenames": _cifar_filenames(rng, CIFAR10_CLASSES, test_y),
    }
    (base / "test_batch").write_bytes(py2_pickle(test))
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072}
    (base / "batches.meta").write_bytes(py2_pickle(meta))
    folder = out / "cifar10_folder"
    _write_folder(folder, "train", CIFAR10_CLASSES, train_x, train_y)
    _write_folder(folder, "val", CIFAR10_CLASSES, test_x, test_y)
    return f"cifar10: 10 classes, {len(train_y)} train (5 batches) / {len(test_y)} test images"


def write_cifar100(out: Path, rng: np.random.Generator) -> str:
    base = out / "cifar" / "cifar-100-python"
    base.mkdir(parents=True)
    coarse_of = {
        fine: CIFAR100_COARSE_NAMES.index(coarse)
        for coarse, fines in CIFAR100_COARSE.items()
        for fine in fines
    }
    counts = {}
    for split, file_split, folder_split in (
        ("train", "training", "train"),
        ("test", "testing", "val"),
    ):
        x, y = _cifar_split(rng, len(CIFAR100_CLASSES), CIFAR100_PER_CLASS[split])
        batch = {
            "filenames": _cifar_filenames(rng, CIFAR100_CLASSES, y),
            "batch_label": f"{file_split} batch 1 of 1",
            "fine_labels": y,
            "coarse_labels": [coarse_of[CIFAR100_CLASSES[c]] for c in y],
            "data": _cifar_rows(x),
        }
        (base / split).write_bytes(py2_pickle(batch))
        _write_folder(out / "cifar100_folder", folder_split, CIFAR100_CLASSES, x, y)
        counts[split] = len(y)
    meta = {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": CIFAR100_COARSE_NAMES}
    (base / "meta").write_bytes(py2_pickle(meta))
    return f"cifar100: 100 classes, {counts['train']} train / {counts['test']} test images"


# ------------------------------------------------------------------------- MATLAB files


def write_mat(path: Path, variables: dict) -> None:
    """``scipy.io.savemat`` (MAT v5, uncompressed) with a fixed text header."""
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, variables)
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------- Flowers-102


def write_flowers102(out: Path, rng: np.random.Generator) -> str:
    base = out / "flowers102" / "flowers-102"
    per_class = sum(FLOWERS_PER_CLASS.values())
    # Image ids 1..N with the classes shuffled over them, as in the original numbering.
    labels = rng.permutation(np.repeat(np.arange(1, FLOWERS_CLASSES + 1), per_class))
    for image_id, label in enumerate(labels, 1):
        w, h = _size(rng, 80, 240)
        arr = _pixels(rng, int(label) - 1, FLOWERS_CLASSES, w, h)
        _save_image(arr, base / "jpg" / f"image_{image_id:05d}.jpg")
    sets: dict[str, list[int]] = {key: [] for key in FLOWERS_PER_CLASS}
    for label in range(1, FLOWERS_CLASSES + 1):
        ids = [i for i, lab in enumerate(labels, 1) if lab == label]
        start = 0
        for key, n in FLOWERS_PER_CLASS.items():
            sets[key].extend(ids[start : start + n])
            start += n
    # Row vectors [1, N] like the originals. Readers take the values through tolist() / int(), so
    # the integer type does not matter.
    write_mat(base / "imagelabels.mat", {"labels": labels.astype(np.uint8)[None, :]})
    write_mat(
        base / "setid.mat",
        {key: np.array(sorted(ids), dtype=np.uint16)[None, :] for key, ids in sets.items()},
    )
    # The project's Flowers split: train = trnid + valid, test = tstid.
    folder = out / "flowers102_folder"
    for split, keys in (("train", ("trnid", "valid")), ("val", ("tstid",))):
        for key in keys:
            for image_id in sets[key]:
                name = f"image_{image_id:05d}.jpg"
                dest = folder / split / f"{int(labels[image_id - 1]):03d}" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(base / "jpg" / name, dest)
    n = {k: len(v) for k, v in sets.items()}
    return (
        f"flowers102: {FLOWERS_CLASSES} classes, {len(labels)} images "
        f"(trn {n['trnid']}, val {n['valid']}, tst {n['tstid']})"
    )


# ------------------------------------------------------------------------- Stanford Cars


_CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def write_stanford_cars(out: Path, rng: np.random.Generator) -> str:
    base = out / "stanford_cars" / "stanford_cars"
    write_mat(
        base / "devkit" / "cars_meta.mat", {"class_names": np.array(CARS_CLASSES, dtype=object)}
    )
    for split, mat_path in (
        ("train", base / "devkit" / "cars_train_annos.mat"),
        ("test", base / "cars_test_annos_withlabels.mat"),
    ):
        classes = rng.permutation(
            np.repeat(np.arange(1, len(CARS_CLASSES) + 1), CARS_PER_CLASS[split])
        )
        # A MATLAB struct array is a numpy record array of object fields, shape [1, N].
        annos = np.empty((1, len(classes)), dtype=[(f, object) for f in _CARS_FIELDS])
        for i, cls in enumerate(classes):
            fname = f"{i + 1:05d}.jpg"
            w, h = _size(rng, 120, 360)
            _save_image(
                _pixels(rng, int(cls) - 1, len(CARS_CLASSES), w, h), base / f"cars_{split}" / fname
            )
            x1, y1 = (int(v) for v in rng.integers(1, [w // 4, h // 4]))
            x2, y2 = (int(v) for v in rng.integers([3 * w // 4, 3 * h // 4], [w, h]))
            annos[0, i] = (
                np.uint16(x1),
                np.uint16(y1),
                np.uint16(x2),
                np.uint16(y2),
                np.uint8(cls),
                fname,
            )
        write_mat(mat_path, {"annotations": annos})
    n_train = len(CARS_CLASSES) * CARS_PER_CLASS["train"]
    n_test = len(CARS_CLASSES) * CARS_PER_CLASS["test"]
    return f"stanford_cars: {len(CARS_CLASSES)} classes, {n_train} train / {n_test} test images"


# ------------------------------------------------------------------------- iNaturalist


def write_inaturalist(out: Path, year: int, rng: np.random.Generator) -> str:
    root = out / f"inat{year}"
    super_col = 2 if year == 2018 else 3
    categories = [
        {"id": c[0], "name": c[1], "supercategory": c[super_col]} for c in INAT_CATEGORIES
    ]
    next_id = 0  # image and annotation ids run on from train into val, as in the originals
    counts = {}
    for split, per_class in INAT_PER_CLASS.items():
        cats = rng.permutation(np.repeat(np.arange(len(INAT_CATEGORIES)), per_class))
        images, annotations = [], []
        for k, ci in enumerate(cats):
            cid, supercategory = INAT_CATEGORIES[ci][0], INAT_CATEGORIES[ci][super_col]
            uid = hashlib.md5(f"inat{year}/{split}/{k}".encode()).hexdigest()
            file_name = f"train_val{year}/{supercategory}/{cid}/{uid}.jpg"
            w, h = _size(rng, 100, 300)
            _save_image(_pixels(rng, int(ci), len(INAT_CATEGORIES), w, h), root / file_name)
            images.append({"id": next_id, "file_name": file_name, "width": w, "height": h})
            annotations.append({"id": next_id, "image_id": next_id, "category_id": cid})
            next_id += 1
        doc = {
            "info": {"year": year, "description": f"rehearsal copy of iNaturalist {year}"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / f"{split}{year}.json").write_text(json.dumps(doc), encoding="utf-8")
        counts[split] = len(images)
    return (
        f"inat{year}: {len(INAT_CATEGORIES)} categories, "
        f"{counts['train']} train / {counts['val']} val images"
    )


# ------------------------------------------------------------------------- teacher weights


def write_photos(out: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of ImageNet's typical geometry (about 500 x 375, the mean of its train set's
    ~110 KB files within a factor of two) and texture, quality 90 as most of its files:
    a smooth colour field, object-like blobs with edges, and fine grain, so that the entropy
    decoder has the work a photo gives it (a flat image decodes several times faster)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        w, h = (500, 375) if rng.random() < 0.7 else (int(rng.integers(300, 640)), 375)
        if rng.random() < 0.3:
            w, h = h, w  # portrait
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 128 + 70 * np.sin(fx * xx + ph) * np.cos(fy * yy)
        for _ in range(int(rng.integers(4, 12))):  # blobs: hard edges, like objects
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 24, img.shape)  # grain: the high frequencies a photo carries
        path = out / f"img_{i:05d}.JPEG"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        files.append(path)
    return files


def write_photo_tree(
    root: Path, *, classes: int, per_class: int, unique: int, processes: int = 1
) -> int:
    """An ImageFolder tree (``train/`` and ``val/``, ``n<8 digits>/`` per class) of ImageNet-sized
    photo-like JPEGs (:func:`write_photos`) for a throughput run at ImageNet's geometry: ``unique``
    distinct files written (in ``processes`` processes), hard-linked ``per_class`` times into each
    training class (a quarter as many for validation). A reader decodes each name in full, as it
    would distinct photos; the page cache holds them, as a node's does a hot dataset. Returns the
    number of training images."""
    from concurrent.futures import ProcessPoolExecutor

    pool_dir = root / "unique"
    chunks = [
        (pool_dir / f"part{k}", len(range(k, unique, processes)), k) for k in range(processes)
    ]
    with ProcessPoolExecutor(processes) as pool:
        parts = list(pool.map(write_photos, *zip(*chunks)))
    photos = [p for part in parts for p in part]
    n = 0
    for split, count in (("train", per_class), ("val", max(1, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                os.link(photos[(c * count + k) % len(photos)], folder / f"n{c:08d}_{k}.JPEG")
            n += count if split == "train" else 0
    return n


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_weights(out: Path, num_classes: int) -> tuple[Path, str]:
    """A seeded ``regnety_160`` state dict, named like a release (``<model>-<sha256[:8]>.pth``).

    torch.save to a *path* names the zip archive's top folder after the file's stem, so the bytes
    would depend on the file name (which here holds their own hash). Saving through a file object
    uses the fixed folder name ``archive``; the rest of the file (storage keys in pickling order,
    zip entries dated 1980, a serialization id derived from the contents) is already
    deterministic.
    """
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(WEIGHTS_MODEL, num_classes=num_classes)
    root = out / "weights"
    root.mkdir(parents=True)
    partial = root / f"{WEIGHTS_MODEL}.pth.partial"
    with open(partial, "wb") as fh:
        torch.save(model.state_dict(), fh)
    digest = sha256_file(partial)
    path = root / f"{WEIGHTS_MODEL}-{digest[:8]}.pth"
    partial.rename(path)
    (root / "SHA256").write_text(digest + "\n", encoding="ascii")
    return path, digest


# ------------------------------------------------------------------------- main


def generate(out: Path) -> list[str]:
    """Write every dataset and the weights into the (empty) folder ``out``; return summary
    lines."""

    # One generator per dataset, so changing one dataset leaves the others' bytes alone.
    def rng(i: int) -> np.random.Generator:
        return np.random.default_rng([SEED, i])

    lines = [
        write_imagenet(out / "imagenet", rng(0)),
        write_cifar10(out, rng(1)),
        write_cifar100(out, rng(2)),
        write_flowers102(out, rng(3)),
        write_stanford_cars(out, rng(4)),
        write_inaturalist(out, 2018, rng(5)),
        write_inaturalist(out, 2019, rng(6)),
    ]
    path, digest = write_weights(out, num_classes=len(IMAGENET_WNIDS))
    lines.append(f"weights: {path.relative_to(out)}  sha256 {digest}")
    return lines


def _is_nonempty(path: Path) -> bool:
    if not path.exists() and not path.is_symlink():
        return False
    return not path.is_dir() or path.is_symlink() or any(path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write small datasets in the real on-disk formats (ImageNet, CIFAR-10/100, "
        "Flowers-102, Stanford Cars, iNaturalist 2018/2019) and seeded regnety_160 teacher "
        "weights, for a CPU rehearsal of the paper's configuration.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument(
        "--force", action="store_true", help="replace OUT_DIR even if it exists and is not empty"
    )
    args = parser.parse_args(argv)
    out: Path = args.out_dir
    if _is_nonempty(out) and not args.force:
        print(
            f"rehearsal_data.py: error: {out} exists and is not empty; pass --force to replace it",
            file=sys.stderr,
        )
        return 2
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        lines = generate(tmp)
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists() or out.is_symlink():
            out.rename(old)  # moved aside first, so OUT_DIR is never half old, half new
        tmp.rename(out)
        _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}:")
    for line in lines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
