"""How fast the paper's CPU input pipeline is, per core, and how many cores one GPU needs to be fed.

The imagenet profile trains from JPEG files through timm's training transform (paper Table 9:
PIL decode, bicubic random-resized crop 224, flip, RandAugment m9-mstd0.5-inc1, random erasing 0.25
in pixel mode), one image at a time in DataLoader workers. This measures, on this machine's CPU:

* **decode**: ``PIL.Image.open(...).convert("RGB")`` alone, images/s on one core;
* **decode + transform**: the profile's whole per-image path (``timm_train_transform`` of
  ``student.train.aug``, what ``core.batches.ImageDataset`` runs), images/s on one core;
* **loader**: ``torch.utils.data.DataLoader`` over those files with 1 .. ``--workers`` worker
  processes (the collate included), images/s: whether the per-core rate scales.

and the same for the ``device`` pipeline (``core.device_augment``, the imagenet profile's on a GPU:
``pipeline: auto``), whose workers only read the files' bytes:

* **read**: ``EncodedImages[i]`` (a file's bytes as a tensor), images/s on one core, and its
  DataLoader with 1 .. ``--workers`` workers (each packs its batch into one tensor for the hand-over
  to the main process); the cores a GPU needs are counted at the one-worker loader's rate;
* **dispatch**: the host's side of decoding and augmenting on the device, the work the main
  process does per image whatever the device: ``DeviceAugment`` on 12 x 10 px in-memory images
  cropped to 8 px, where the arithmetic is negligible and the per-image Python and operator
  dispatch is what is timed (on a GPU each operator is a kernel launch, somewhat dearer: the
  GPU check measures the pipeline there);
* **on this CPU**: decode (torchvision's libjpeg) + ``DeviceAugment`` at 224 on the CPU, one core:
  the device pipeline where no GPU is (for comparison with the PIL path; ``auto`` keeps timm's).

and, against the engine's training rates measured on a GPU (``--rates``: bench/results/
gpu_rates.json, images/s of DeiT-S and of DeiT-B⚗ + RegNetY-16GF through ``engine.fit``), the CPU
cores one GPU needs at the per-core rate, and the fraction of the GPU rate the profile's
``num_workers`` feed.

The JPEGs are written first (``--images N`` files of ImageNet's typical size, about 500 x 375 px
with natural-image-like texture and detail; their mean size in KB is printed: ImageNet-1k's train
JPEGs average about 110 KB), or read from ``--from-dir`` (an ImageFolder tree: real ImageNet, or
scripts/rehearsal_data.py's). Figures on this machine only: speeds drift, compare ratios measured
in one run.

    .venv/bin/python bench/loader_bench.py --json bench/results/loader_bench.json
    .venv/bin/python bench/loader_bench.py --smoke --json /tmp/loader.json   # seconds, the tests
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deit_repro import atomic  # noqa: E402
from deit_repro.config import load_params  # noqa: E402
from deit_repro.core.batches import ImageDataset, timm_train_transform  # noqa: E402
from deit_repro.core.device_augment import DeviceAugment, EncodedImages, decode, pack  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from rehearsal_data import write_photos  # noqa: E402


def _rate(fn, items: list, min_s: float) -> float:
    """Items per second of ``fn`` over ``items``, repeated until ``min_s`` seconds have passed."""
    done, t0 = 0, time.perf_counter()
    while True:
        for x in items:
            fn(x)
        done += len(items)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return done / elapsed


def per_core(files: list[Path], transform, min_s: float) -> dict[str, float]:
    """Decode alone, and decode + the training transform, on one core of this process."""
    from PIL import Image

    torch.set_num_threads(1)

    def decode(path: Path):
        with Image.open(path) as im:
            return im.convert("RGB")

    for p in files[:4]:  # warm-up: first-call imports and allocations
        transform(decode(p))
    return {
        "decode_images_per_s": _rate(decode, files, min_s),
        "decode_transform_images_per_s": _rate(lambda p: transform(decode(p)), files, min_s),
    }


def device_per_core(files: list[Path], aug, img_size: int, min_s: float) -> dict[str, float]:
    """The device pipeline's CPU work: reading bytes (a worker's), the host dispatch of decode
    and augmentation (the main process's), and the whole pipeline computed on this CPU."""
    torch.set_num_threads(1)
    read = EncodedImages(files=[str(p) for p in files], labels=[0] * len(files))
    tiny = torch.randint(0, 256, (64, 3, 10, 12), dtype=torch.uint8)
    cpu = torch.device("cpu")
    small, full = DeviceAugment(aug, 8, 3, cpu), DeviceAugment(aug, img_size, 3, cpu)
    batch = 16
    groups = [list(range(i, i + batch)) for i in range(0, len(files) - batch + 1, batch)] or [
        list(range(len(files)))
    ]

    def on_cpu(idx: list[int]):
        return full(decode([read[i][0] for i in idx], cpu, 3))

    on_cpu(groups[0])  # warm-up
    return {
        "read_images_per_s": _rate(lambda i: read[i], list(range(len(files))), min_s),
        "dispatch_images_per_s": _rate(lambda _: small(list(tiny)), [0], min_s) * len(tiny),
        "device_pipeline_on_cpu_images_per_s": _rate(on_cpu, groups, min_s) * len(groups[0]),
    }


def loader_rates(
    files: list[Path], transform, workers: list[int], batch: int, min_batches: int
) -> dict[int, float]:
    """images/s of a DataLoader over ``files`` (their transform in ``w`` worker processes; the
    bytes alone, as the device pipeline's workers read them, when ``transform`` is None)."""
    paths, labels = [str(p) for p in files], [0] * len(files)
    if transform is None:
        ds = EncodedImages(files=paths, labels=labels)
        collate = pack
    else:
        ds, collate = ImageDataset(transform, files=paths, labels=labels), None
    out = {}
    for w in workers:
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=batch,
            shuffle=True,
            num_workers=w,
            drop_last=True,
            persistent_workers=w > 0,
            collate_fn=collate,
        )
        it = iter(loader)
        next(it)  # workers up, first batch out: the start-up is not the rate
        n, t0 = 0, time.perf_counter()
        while n < min_batches:
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                continue
            n += 1
        out[w] = n * batch / (time.perf_counter() - t0)
        del it, loader
    return out


def feeding(per_core_rate: float, rates: dict, num_workers: int) -> list[dict[str, Any]]:
    """Per model trained on the GPU: the cores needed at ``per_core_rate``, and what the profile's
    ``num_workers`` feed as a fraction of the GPU's rate."""
    rows = []
    for run in rates["runs"]:
        gpu = float(run["images_per_s"])
        name = run["model"] + (f" + {run['teacher']}" if run.get("teacher") else "")
        rows.append(
            {
                "model": name,
                "gpu_images_per_s": gpu,
                "cores_needed": gpu / per_core_rate,
                "fed_by_profile_workers": min(1.0, num_workers * per_core_rate / gpu),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="JPEGs to write (default 200)")
    ap.add_argument("--from-dir", type=Path, default=None, help="an ImageFolder tree to read")
    ap.add_argument("--params", type=Path, default=ROOT / "profiles" / "imagenet.yaml")
    ap.add_argument("--rates", type=Path, default=ROOT / "bench" / "results" / "gpu_rates.json")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="most loader workers")
    ap.add_argument("--min-seconds", type=float, default=20.0, help="per timed measurement")
    ap.add_argument("--smoke", action="store_true", help="a few images, a second per measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.min_seconds, args.workers = 8, 1.0, min(args.workers, 2)

    params = load_params(args.params)
    train = params.student.train
    transform = timm_train_transform(train.aug, params.student.model.img_size, 3)
    with tempfile.TemporaryDirectory(prefix="deit-loader-") as tmp:
        if args.from_dir is not None:
            files = sorted(
                p for p in args.from_dir.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")
            )[: args.images]
            if not files:
                sys.exit(f"loader_bench: no JPEG or PNG under --from-dir {args.from_dir}")
        else:
            files = write_photos(Path(tmp), args.images)
        kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        core = per_core(files, transform, args.min_seconds)
        device = device_per_core(files, train.aug, params.student.model.img_size, args.min_seconds)
        batch = 8 if args.smoke else 64
        workers = sorted({1, args.workers})
        n = 2 if args.smoke else 30
        loader = loader_rates(files, transform, workers, batch, min_batches=n)
        read_loader = loader_rates(files, None, workers, batch, min_batches=n * 4)
    rates = json.loads(args.rates.read_text())
    rows = feeding(core["decode_transform_images_per_s"], rates, train.num_workers)
    # a worker's rate is its reads plus the hand-over of the packed batch to the main process
    device_rows = feeding(read_loader[1], rates, train.num_workers)
    for r in device_rows:  # the main process drives the device: one more core, its own bound
        r["cores_needed"] += 1
        r["fed_by_one_dispatching_core"] = min(
            1.0, device["dispatch_images_per_s"] / r["gpu_images_per_s"]
        )
    res = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
        "images": {
            "count": len(files),
            "mean_kb": round(kb, 1),
            "source": str(args.from_dir) if args.from_dir else "written (write_photos)",
        },
        "transform": {
            "params": _shown(args.params),
            "img_size": params.student.model.img_size,
            "rand_augment": train.aug.rand_augment,
            "reprob": train.aug.reprob,
            "interpolation": train.aug.interpolation,
        },
        "per_core": {k: round(v, 1) for k, v in core.items()},
        "loader_images_per_s": {str(w): round(v, 1) for w, v in loader.items()},
        "gpu_rates": {"file": _shown(args.rates), "device": rates.get("device")},
        "profile_num_workers": train.num_workers,
        "feeding": _rounded(rows),
        "device_pipeline": {
            "per_core": {k: round(v, 1) for k, v in device.items()},
            "read_loader_images_per_s": {str(w): round(v, 1) for w, v in read_loader.items()},
            "feeding": _rounded(device_rows),
        },
    }
    print(
        f"{len(files)} JPEGs, mean {kb:.0f} KB; per core: decode "
        f"{core['decode_images_per_s']:.0f} img/s, decode + paper transform "
        f"{core['decode_transform_images_per_s']:.0f} img/s"
    )
    print("loader: " + ", ".join(f"{w} worker(s) {v:.0f} img/s" for w, v in loader.items()))
    for r in rows:
        print(
            f"{r['model']}: GPU {r['gpu_images_per_s']:.0f} img/s needs "
            f"{r['cores_needed']:.1f} cores at this per-core rate; "
            f"{train.num_workers} workers feed {100 * r['fed_by_profile_workers']:.0f} %"
        )
    print(
        f"device pipeline per core: read {device['read_images_per_s']:.0f} img/s, host dispatch "
        f"{device['dispatch_images_per_s']:.0f} img/s, the whole pipeline on this CPU "
        f"{device['device_pipeline_on_cpu_images_per_s']:.0f} img/s; loader (bytes): "
        + ", ".join(f"{w} worker(s) {v:.0f} img/s" for w, v in read_loader.items())
    )
    for r in device_rows:
        print(
            f"{r['model']}: GPU {r['gpu_images_per_s']:.0f} img/s needs "
            f"{r['cores_needed']:.1f} cores with the device pipeline (readers + the dispatching "
            f"process); one dispatching core keeps up with "
            f"{100 * r['fed_by_one_dispatching_core']:.0f} %"
        )
    if args.json:
        atomic.write_json(args.json, res)  # makes the folder
    return 0


def _rounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (the JSON is committed)."""
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
