"""Dataset sources for the prepare stage, each loaded into one ``RawDataset``.

Every source yields the splits ``train`` and ``test``, where ``test`` is the held-out split the
paper reports on (ImageNet's ``val/``, iNaturalist's ``val{year}.json``, Flowers-102's ``test``),
matching the train/test sizes of the paper's Table 6 (Flowers-102 train = its ``train`` + ``val``,
2,040 images).

Small sources come as in-memory uint8 arrays ``[N, H, W, C]``; large image trees come as file lists
(absolute paths + labels), decoded later only when the prepare stage is asked for a pre-resized copy
(``decode_files``). The ``source`` names are declared once, ``deit_repro.config.SOURCES``: the
contract with params.yaml and the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from deit_repro.config import ON_BAD_IMAGE, SOURCES
from deit_repro.data.idx import find_idx_files, read_idx
from deit_repro.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]  # fmt: skip  (same order and spelling as torchvision.datasets.FashionMNIST.classes)
_FASHION_COUNTS = {"train": 60000, "test": 10000}
# Same extensions as torchvision's ImageFolder, so a tree it accepts is accepted here.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Everything PIL raises on a broken file: UnidentifiedImageError is an OSError, decoding raises
# SyntaxError on some corrupt PNGs, DecompressionBombError is a plain Exception.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_IO_WORKERS = min(16, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: either in-memory images or a list of image files, plus int64 labels.

    Attributes:
        labels: int64 ``[N]`` class indices into ``RawDataset.classes``.
        images: uint8 ``[N, H, W, C]`` (channels-last, as PIL and the raw formats give them), or
            None.
        files: absolute image paths, one per label, or None.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    files: tuple[str, ...] | None = None

    def __post_init__(self):
        if (self.images is None) == (self.files is None):
            raise ValueError("a Split holds exactly one of images or files")
        n = len(self.images) if self.images is not None else len(self.files)
        if len(self.labels) != n:
            raise ValueError(f"{n} samples but {len(self.labels)} labels")
        if self.images is not None and (self.images.dtype != np.uint8 or self.images.ndim != 4):
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> Split:
        """Return the samples at ``indices`` (in the given order)."""
        if self.images is not None:
            return Split(labels=self.labels[indices], images=self.images[indices])
        return Split(labels=self.labels[indices], files=tuple(self.files[i] for i in indices))


@dataclasses.dataclass(frozen=True)
class RawDataset:
    """A loaded source, before subsetting and writing.

    Attributes:
        name: human-readable dataset name (``Fashion-MNIST``).
        source: the source key it was loaded with (``fashion_mnist``), see ``SOURCES``.
        classes: class names; label ``i`` is ``classes[i]``.
        splits: ``{"train": Split, "test": Split}``.
        skipped: ``{split: [paths]}`` of unreadable images dropped under ``on_bad_image="skip"``.
    """

    name: str
    source: str
    classes: list[str]
    splits: dict[str, Split]
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"arrays"`` or ``"files"`` (all splits are of one kind)."""
        kinds = {"arrays" if s.images is not None else "files" for s in self.splits.values()}
        if len(kinds) != 1:
            raise ValueError(f"mixed split kinds {sorted(kinds)}")
        return kinds.pop()


def _labels(values: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _require_dir(root: Path | None, what: str, how: str) -> Path:
    if root is None:
        raise DataError(
            f"{what} needs a data directory, none given", f"pass --source-dir DIR; {how}"
        )
    if not Path(root).is_dir():
        raise DataError(f"{what} not found: {root} is not a directory", how)
    return Path(root)


# ------------------------------------------------------------------------- Fashion-MNIST


def _fashion_dirs(root: Path) -> list[Path]:
    # A plain folder of the four files (the Debian package), or a torchvision root.
    return [root, root / "FashionMNIST" / "raw"]


def _find_fashion(root: Path, download: bool) -> dict[str, tuple[Path, Path]]:
    error: DataError | None = None
    for directory in _fashion_dirs(root):
        try:
            return find_idx_files(directory)
        except DataError as exc:
            error = error or exc
    if not download:
        raise error
    import torchvision

    _logger.info("Fashion-MNIST not found under %s; downloading with torchvision", root)
    try:
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
    except (RuntimeError, OSError) as exc:  # URLError is an OSError
        raise DataError(
            f"downloading Fashion-MNIST into {root} failed ({exc})",
            "check the network and that the folder is writable, or install dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) and set datasets.<name>.download: false",
        ) from exc
    return find_idx_files(root / "FashionMNIST" / "raw")


def load_fashion_mnist(
    root: str | os.PathLike | None = None, *, download: bool = False
) -> RawDataset:
    """Load Fashion-MNIST from the four IDX files.

    Args:
        root: a folder with the four IDX files (raw or ``.gz``) or a torchvision root holding
            ``FashionMNIST/raw``; default the Debian package's
            ``/usr/share/datasets/fashion-mnist``.
        download: when the files are missing, fetch them with torchvision into ``root``.

    Raises:
        DataError: the files are missing, corrupt, or not 60,000 + 10,000 28x28 images with labels
            0..9.
    """
    root = Path(root) if root is not None else DEBIAN_FASHION_DIR
    paths = _find_fashion(root, download)
    splits = {}
    for split, (images_path, labels_path) in paths.items():
        images, labels = read_idx(images_path), read_idx(labels_path)
        expected = _FASHION_COUNTS[split]
        if images.shape != (expected, 28, 28):
            raise DataError(
                f"{images_path} holds images of shape {list(images.shape)}, "
                f"expected [{expected}, 28, 28]",
                "it is not the Fashion-MNIST file; reinstall dataset-fashion-mnist",
            )
        if labels.shape != (expected,) or int(labels.max()) > 9:
            raise DataError(
                f"{labels_path} holds {labels.shape[0]} labels with max {int(labels.max())}, "
                f"expected {expected} labels in 0..9",
                "it is not the Fashion-MNIST file; reinstall dataset-fashion-mnist",
            )
        splits[split] = Split(labels=_labels(labels), images=images[..., None])
    _logger.info("Fashion-MNIST from %s: %s", root, {k: len(v) for k, v in splits.items()})
    return RawDataset(
        name="Fashion-MNIST", source="fashion_mnist", classes=list(FASHION_CLASSES), splits=splits
    )


# ------------------------------------------------------------------------- scikit-learn digits


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> RawDataset:
    """Load scikit-learn's 8x8 digits and split them, stratified by class.

    Pixel values 0..16 are scaled to uint8 with ``round(v * 255 / 16)`` so every source shares one
    pixel range.

    Args:
        test_fraction: share of each class held out as ``test``, in (0, 1).
        seed: seed of the stratified split.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"test_fraction = {test_fraction} is out of range", "use a value in (0, 1)"
        )
    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    labels = _labels(bunch.target)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    # Ascending original order: the written bytes depend only on which samples were chosen.
    splits = {
        name: Split(labels=labels[np.sort(idx)], images=images[np.sort(idx)])
        for name, idx in (("train", train_idx), ("test", test_idx))
    }
    classes = [str(c) for c in bunch.target_names]
    return RawDataset(name="digits", source="digits", classes=classes, splits=splits)


# ------------------------------------------------------------------------- image checks / decoding


def _decode_fully(path: str) -> str | None:
    """Why ``path`` cannot be trained on, or None: decoded whole and converted to RGB, as the
    training loader will (``Image.verify()`` reads headers only, and passes a JPEG cut in half
    that then raises "image file is truncated" in a loader worker, at the same step after
    every resume)."""
    try:
        with Image.open(path) as img:
            img.convert("RGB")
    except _PIL_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _bad_image_error(path: str, reason: str) -> DataError:
    return DataError(
        f"unreadable image {path} ({reason})",
        "replace or delete the file, or pass on_bad_image=skip (--on-bad-image skip) "
        "to drop it and "
        "record it in the manifest",
    )


def check_images(
    files: Sequence[str],
    labels: np.ndarray,
    *,
    on_bad_image: str,
    split: str,
    skipped: dict[str, list[str]],
) -> Split:
    """Decode every file whole with PIL and convert it to RGB, as training will (CMYK,
    grayscale, palette and RGBA files pass; a truncated or empty file does not). PIL decodes
    about 1,300 ImageNet-sized JPEGs per second per core: a minute or two for ImageNet on a
    16-core node; the time taken is logged.

    Args:
        files: image paths.
        labels: their labels.
        on_bad_image: ``"error"`` raises on the first unreadable file; ``"skip"`` drops it.
        split: split name, the key in ``skipped``.
        skipped: dict the dropped paths are appended to, under ``split``.

    Returns:
        The split without the dropped files.
    """
    t0 = time.perf_counter()
    # PIL releases the GIL while it decodes: threads use every core and overlap the reads.
    with ThreadPoolExecutor(_IO_WORKERS) as pool:
        problems = list(pool.map(_decode_fully, files))
    seconds = time.perf_counter() - t0
    _logger.info(
        "%s: decoded %d images in %.1f s (%.0f images/s, %d threads)",
        split,
        len(files),
        seconds,
        len(files) / max(seconds, 1e-9),
        _IO_WORKERS,
    )
    keep = []
    for i, (path, problem) in enumerate(zip(files, problems)):
        if problem is None:
            keep.append(i)
        elif on_bad_image == "error":
            raise _bad_image_error(path, problem)
        else:
            _logger.warning("skipping unreadable image %s (%s)", path, problem)
            skipped.setdefault(split, []).append(path)
    keep_arr = np.asarray(keep, dtype=np.int64)
    return Split(labels=labels[keep_arr], files=tuple(files[i] for i in keep))


def resize_shorter_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then center-crop ``size`` x ``size``:
    torchvision's ``Resize(size)`` + ``CenterCrop(size)`` themselves, so a pre-resized copy is
    what the usual eval transform would have produced from the original file."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if img.size == (size, size):
        return img
    return TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC), size)


def resize_arrays(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``[N, H, W, C]`` images with ``resize_shorter_and_crop`` (C = 1 stays
    grayscale)."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
        out[i] = np.asarray(resize_shorter_and_crop(img, size)).reshape(size, size, c)
    return out


def _decode(path: str, size: int) -> np.ndarray | str:
    try:
        with Image.open(path) as img:
            # RGB for every file source: ImageNet holds a few CMYK and grayscale JPEGs.
            return np.asarray(resize_shorter_and_crop(img.convert("RGB"), size))
    except _PIL_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def decode_files(
    split: Split, size: int, *, on_bad_image: str, split_name: str, skipped: dict[str, list[str]]
) -> Split:
    """Decode a file-list split into RGB uint8 arrays ``[N, size, size, 3]`` (the pre-resized path).

    Args:
        split: a file-list split.
        size: output side, after ``resize_shorter_and_crop``.
        on_bad_image: ``"error"`` or ``"skip"``, as in ``check_images``.
        split_name: key in ``skipped``.
        skipped: dict the dropped paths are appended to.
    """
    out = np.empty((len(split), size, size, 3), dtype=np.uint8)
    keep = []
    with ThreadPoolExecutor(
        _IO_WORKERS
    ) as pool:  # PIL releases the GIL while decoding and resizing
        for i, (path, result) in enumerate(
            zip(split.files, pool.map(_decode, split.files, [size] * len(split)))
        ):
            if isinstance(result, str):
                if on_bad_image == "error":
                    raise _bad_image_error(path, result)
                _logger.warning("skipping unreadable image %s (%s)", path, result)
                skipped.setdefault(split_name, []).append(path)
                continue
            out[len(keep)] = result
            keep.append(i)
    keep_arr = np.asarray(keep, dtype=np.int64)
    return Split(labels=split.labels[keep_arr], images=out[: len(keep)])


# ------------------------------------------------------------------------- ImageFolder (ImageNet)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _image_files(class_dir: Path) -> list[str]:
    # Recursive and symlink-following like torchvision's ImageFolder; sorted so the order is stable.
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        found.extend(
            os.path.abspath(os.path.join(dirpath, f))
            for f in sorted(filenames)
            if f.lower().endswith(IMG_EXTENSIONS)
        )
    return found


def load_imagefolder(
    root: str | os.PathLike | None,
    *,
    verify_images: bool = True,
    on_bad_image: str = "error",
    name: str = "imagefolder",
    splits: Sequence[str] = ("train", "test"),
) -> RawDataset:
    """List an ImageNet-layout tree ``root/{train,val}/<class>/<image>`` (``val`` becomes ``test``).

    Classes are the sorted class folder names, as in torchvision's ``ImageFolder``. With
    ``splits=("test",)`` only ``val/`` is read (evaluating released checkpoints needs no training
    image): its class folders are the classes, so they must be all of them (ImageNet's 1,000) for
    a released head's class indices to mean the same classes.

    Args:
        root: the dataset root.
        verify_images: decode every file whole (``check_images``) and apply ``on_bad_image``.
        on_bad_image: ``"error"`` or ``"skip"``.
        name: dataset name for the manifest.
        splits: ``("train", "test")``, or ``("test",)`` for ``val/`` alone.

    Raises:
        DataError: missing root or split folder, no classes, a class without images, class folders
            that differ between ``train`` and ``val``, or an unreadable image under ``"error"``.
    """
    how = (
        "lay the dataset out as ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG (ImageNet: "
        "https://image-net.org/download-images, with the val images sorted into class folders)"
    )
    root = _require_dir(None if root is None else Path(root), "ImageFolder dataset", how)
    split_dirs = {
        split: folder
        for split, folder in (("train", root / "train"), ("test", root / "val"))
        if split in splits
    }
    classes_per_split = {}
    for split, split_dir in split_dirs.items():
        if not split_dir.is_dir():
            raise DataError(f"ImageFolder split folder {split_dir} is missing", how)
        classes_per_split[split] = _class_dirs(split_dir)
        if not classes_per_split[split]:
            raise DataError(f"no class folders in {split_dir}", how)
    classes = next(iter(classes_per_split.values()))
    if classes_per_split.get("test", classes) != classes:
        only_train = sorted(set(classes) - set(classes_per_split["test"]))[:5]
        only_val = sorted(set(classes_per_split["test"]) - set(classes))[:5]
        raise DataError(
            f"class folders differ between {split_dirs['train']} and {split_dirs['test']} "
            f"(only in train: {only_train}, only in val: {only_val}; first 5 shown)",
            how,
        )
    skipped: dict[str, list[str]] = {}
    splits = {}
    for split, split_dir in split_dirs.items():
        files, labels = [], []
        for label, cls in enumerate(classes):
            class_files = _image_files(split_dir / cls)
            if not class_files:
                raise DataError(
                    f"class folder {split_dir / cls} holds no images ({', '.join(IMG_EXTENSIONS)})",
                    how,
                )
            files.extend(class_files)
            labels.extend([label] * len(class_files))
        splits[split] = _file_split(files, labels, verify_images, on_bad_image, split, skipped)
    _logger.info(
        "ImageFolder %s: %d classes, %s", root, len(classes), {k: len(v) for k, v in splits.items()}
    )
    return RawDataset(
        name=name, source="imagefolder", classes=classes, splits=splits, skipped=skipped
    )


def _file_split(
    files: Sequence[str],
    labels: Sequence[int],
    verify_images: bool,
    on_bad_image: str,
    split: str,
    skipped: dict[str, list[str]],
) -> Split:
    files = [os.path.abspath(f) for f in files]
    if verify_images:
        return check_images(
            files, _labels(labels), on_bad_image=on_bad_image, split=split, skipped=skipped
        )
    return Split(labels=_labels(labels), files=tuple(files))


# ------------------------------------------------------------------------- torchvision datasets


def _torchvision(make: Callable[[], object], what: str, root: Path, how: str) -> object:
    """Call a torchvision dataset constructor, turning its missing-file errors into a DataError."""
    try:
        return make()
    except (
        RuntimeError,
        OSError,
        ValueError,
    ) as exc:  # ValueError: StanfordCars' "cannot be downloaded"
        raise DataError(f"{what} not found or corrupt under {root} ({exc})", how) from exc


def _load_cifar(root, download: bool, hundred: bool) -> RawDataset:
    import torchvision

    name = "CIFAR-100" if hundred else "CIFAR-10"
    folder = "cifar-100-python" if hundred else "cifar-10-batches-py"
    url = f"https://www.cs.toronto.edu/~kriz/{'cifar-100' if hundred else 'cifar-10'}-python.tar.gz"
    how = (
        "set datasets.<name>.download: true in params.yaml where a network exists, "
        f"or extract {url} into the folder (giving ROOT/{folder})"
    )
    root = _require_dir(None if root is None else Path(root), name, how)
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    splits, classes = {}, None
    for split, train in (("train", True), ("test", False)):
        ds = _torchvision(
            functools.partial(cls, str(root), train=train, download=download), name, root, how
        )
        # .data is already uint8 [N, 32, 32, 3] (channels-last); no PIL round trip needed.
        splits[split] = Split(
            labels=_labels(ds.targets), images=np.ascontiguousarray(ds.data, dtype=np.uint8)
        )
        classes = list(ds.classes)
    return RawDataset(
        name=name, source="cifar100" if hundred else "cifar10", classes=classes, splits=splits
    )


def load_cifar10(root: str | os.PathLike | None, *, download: bool = False) -> RawDataset:
    """Load CIFAR-10 (50,000 train / 10,000 test 32x32 RGB) through torchvision.

    Args:
        root: torchvision root holding ``cifar-10-batches-py``.
        download: let torchvision fetch it when missing.
    """
    return _load_cifar(root, download, hundred=False)


def load_cifar100(root: str | os.PathLike | None, *, download: bool = False) -> RawDataset:
    """Load CIFAR-100 (50,000 train / 10,000 test 32x32 RGB) through torchvision.

    Args:
        root: torchvision root holding ``cifar-100-python``.
        download: let torchvision fetch it when missing.
    """
    return _load_cifar(root, download, hundred=True)


def _path_loader(path) -> str:
    # Passed as the dataset's `loader`: indexing then yields (path, label) without decoding
    # anything.
    return str(path)


def _paths_and_labels(ds) -> tuple[list[str], list[int]]:
    pairs = [ds[i] for i in range(len(ds))]
    return [p for p, _ in pairs], [int(t) for _, t in pairs]


def load_flowers102(
    root: str | os.PathLike | None,
    *,
    download: bool = False,
    verify_images: bool = True,
    on_bad_image: str = "error",
) -> RawDataset:
    """List Oxford Flowers-102 through torchvision; ``train`` = its train + val (2,040),
    ``test`` = 6,149.

    Args:
        root: torchvision root holding ``flowers-102``.
        download: let torchvision fetch it when missing.
        verify_images: open every file with PIL and apply ``on_bad_image``.
        on_bad_image: ``"error"`` or ``"skip"``.
    """
    import torchvision

    how = (
        "set datasets.<name>.download: true in params.yaml where a network exists, "
        "or get https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ "
        "(102flowers.tgz, imagelabels.mat, setid.mat) into ROOT/flowers-102"
    )
    root = _require_dir(None if root is None else Path(root), "Flowers-102", how)

    def split_files(tv_split: str) -> tuple[list[str], list[int]]:
        make = functools.partial(
            torchvision.datasets.Flowers102,
            str(root),
            split=tv_split,
            download=download,
            loader=_path_loader,
        )
        return _paths_and_labels(_torchvision(make, "Flowers-102", root, how))

    skipped: dict[str, list[str]] = {}
    train_f, train_l = split_files("train")
    val_f, val_l = split_files("val")
    test_f, test_l = split_files("test")
    splits = {
        "train": _file_split(
            train_f + val_f, train_l + val_l, verify_images, on_bad_image, "train", skipped
        ),
        "test": _file_split(test_f, test_l, verify_images, on_bad_image, "test", skipped),
    }
    classes = list(torchvision.datasets.Flowers102.classes)
    return RawDataset(
        name="Flowers-102", source="flowers102", classes=classes, splits=splits, skipped=skipped
    )


def load_stanford_cars(
    root: str | os.PathLike | None, *, verify_images: bool = True, on_bad_image: str = "error"
) -> RawDataset:
    """List Stanford Cars (8,144 train / 8,041 test, 196 classes) through torchvision.

    Args:
        root: torchvision root holding ``stanford_cars`` (devkit, cars_train, cars_test,
            cars_test_annos_withlabels.mat).
        verify_images: open every file with PIL and apply ``on_bad_image``.
        on_bad_image: ``"error"`` or ``"skip"``.
    """
    import torchvision

    # torchvision's StanfordCars download is gone (the original URL is dead), so no download flag.
    how = (
        "torchvision can no longer download it (the original URL is dead); "
        "get the files from a mirror into "
        "ROOT/stanford_cars with devkit/, cars_train/, cars_test/ "
        "and cars_test_annos_withlabels.mat"
    )
    root = _require_dir(None if root is None else Path(root), "Stanford Cars", how)
    skipped: dict[str, list[str]] = {}
    splits, classes = {}, None
    for split in ("train", "test"):
        make = functools.partial(
            torchvision.datasets.StanfordCars, str(root), split=split, loader=_path_loader
        )
        ds = _torchvision(make, "Stanford Cars", root, how)
        files, labels = _paths_and_labels(ds)
        splits[split] = _file_split(files, labels, verify_images, on_bad_image, split, skipped)
        classes = list(ds.classes)
    return RawDataset(
        name="Stanford Cars",
        source="stanford_cars",
        classes=classes,
        splits=splits,
        skipped=skipped,
    )


def _read_json(path: Path, how: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise DataError(f"iNaturalist annotation file {path} is missing", how) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"iNaturalist annotation file {path} is unreadable ({exc})", how) from exc


def load_inaturalist(
    root: str | os.PathLike | None,
    year: int,
    *,
    verify_images: bool = True,
    on_bad_image: str = "error",
) -> RawDataset:
    """List iNaturalist 2018 or 2019 from the competition's own
    ``train{year}.json``/``val{year}.json``.

    torchvision's ``INaturalist`` is not used: for 2017-2019 it indexes every image of the
    ``train_val`` archive with no train/val split, whereas the paper (Table 6) uses the official
    split (2018: 437,513 / 24,426 images, 8,142 classes; 2019: 265,240 / 3,003, 1,010 classes), as
    the official DeiT code does (``INatDataset`` in its datasets.py). Classes are the sorted
    category ids of the train annotations; names come from the JSON's ``categories`` or
    ``ROOT/categories.json``.

    Args:
        root: folder with ``train{year}.json``, ``val{year}.json`` and the extracted images
            (paths in the JSON's ``file_name`` are relative to it).
        year: 2018 or 2019.
        verify_images: open every file with PIL and apply ``on_bad_image``.
        on_bad_image: ``"error"`` or ``"skip"``.
    """
    how = (
        f"download the iNaturalist {year} competition images and train/val annotations from "
        f"https://github.com/visipedia/inat_comp/tree/master/{year} and extract them into ROOT"
    )
    root = _require_dir(None if root is None else Path(root), f"iNaturalist {year}", how)
    annotation_files = {"train": root / f"train{year}.json", "test": root / f"val{year}.json"}
    data = {split: _read_json(path, how) for split, path in annotation_files.items()}
    category_ids = sorted({int(a["category_id"]) for a in data["train"]["annotations"]})
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["train"].get("categories", [])}
    if not names and (root / "categories.json").is_file():
        names = {
            int(c["id"]): str(c.get("name", c["id"]))
            for c in _read_json(root / "categories.json", how)
        }
    classes = [names.get(cid, str(cid)) for cid in category_ids]
    skipped: dict[str, list[str]] = {}
    splits = {}
    for split, d in data.items():
        file_of = {int(img["id"]): img["file_name"] for img in d["images"]}
        files, labels = [], []
        for ann in sorted(d["annotations"], key=lambda a: int(a["image_id"])):
            cid = int(ann["category_id"])
            if cid not in label_of:
                raise DataError(
                    f"iNaturalist {year} {split} image {ann['image_id']} has category {cid}, "
                    "absent from train",
                    how,
                )
            files.append(str(root / file_of[int(ann["image_id"])]))
            labels.append(label_of[cid])
        splits[split] = _file_split(files, labels, verify_images, on_bad_image, split, skipped)
    return RawDataset(
        name=f"iNaturalist {year}",
        source=f"inat{year}",
        classes=classes,
        splits=splits,
        skipped=skipped,
    )


# ------------------------------------------------------------------------- dispatch


def load_source(
    source: str,
    *,
    source_dir: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    verify_images: bool = True,
    on_bad_image: str = "error",
    splits: Sequence[str] = ("train", "test"),
) -> RawDataset:
    """Load ``source`` (one of ``SOURCES``) with the options that apply to it.

    Args:
        source: the source key.
        source_dir: its data directory (``digits`` ignores it; ``fashion_mnist`` defaults to the
            Debian package's folder).
        download: let torchvision fetch missing files (Fashion-MNIST, CIFAR, Flowers-102).
        seed: seed of the digits train/test split.
        test_fraction: digits' held-out share.
        verify_images: open every image file with PIL (file-list sources).
        on_bad_image: ``"error"`` or ``"skip"`` for unreadable image files.
        splits: ``("train", "test")``; ``("test",)``: an image tree's ``val/`` alone.

    Raises:
        ConfigError: unknown ``source`` or ``on_bad_image``; the test split alone of a source
            that is not an image tree.
        DataError: the data is missing or malformed.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image = {on_bad_image!r} is not one of {list(ON_BAD_IMAGE)}")
    files_opts = {"verify_images": verify_images, "on_bad_image": on_bad_image}
    loaders: dict[str, Callable[[], RawDataset]] = {
        "fashion_mnist": lambda: load_fashion_mnist(source_dir, download=download),
        "digits": lambda: load_digits(test_fraction=test_fraction, seed=seed),
        "imagefolder": lambda: load_imagefolder(source_dir, splits=splits, **files_opts),
        "cifar10": lambda: load_cifar10(source_dir, download=download),
        "cifar100": lambda: load_cifar100(source_dir, download=download),
        "flowers102": lambda: load_flowers102(source_dir, download=download, **files_opts),
        "stanford_cars": lambda: load_stanford_cars(source_dir, **files_opts),
        "inat2018": lambda: load_inaturalist(source_dir, 2018, **files_opts),
        "inat2019": lambda: load_inaturalist(source_dir, 2019, **files_opts),
    }
    if source not in loaders:
        raise ConfigError(f"source = {source!r} is not one of {list(SOURCES)}")
    if tuple(splits) != ("train", "test") and source != "imagefolder":
        raise ConfigError(
            f"--splits test applies to image trees (source imagefolder, e.g. ImageNet), not to "
            f"source {source!r}",
            "prepare both splits of this dataset (drop --splits)",
        )
    if source == "digits" and source_dir is not None:
        _logger.warning(
            "source digits ships inside scikit-learn; ignoring source_dir %s", source_dir
        )
    return loaders[source]()
