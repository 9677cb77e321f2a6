"""The ``device`` input pipeline (core/device_augment.py), run on the CPU: each RandAugment op
against timm's PIL op, the decode against PIL's, the whole transform's output distribution against
timm's create_transform, and its batches: seeded per epoch, resumable, every file format read."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit_repro.config import AugCfg
from deit_repro.core.batches import (
    _timm_posterize_any_bits,
    epoch_seed,
    seed_everything,
    timm_train_transform,
)
from deit_repro.core.device_augment import (
    _AFFINE,
    _OPS,
    DeviceAugment,
    DeviceBatches,
    EncodedImages,
    decode,
)
from deit_repro.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PAPER = AugCfg()  # Table 9: bicubic RRC, flip, rand-m9-mstd0.5-inc1, erasing 0.25 pixel


def _rehearsal_data():
    spec = importlib.util.spec_from_file_location(
        "rehearsal_data", ROOT / "scripts" / "rehearsal_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """ImageNet-sized photo-like JPEGs (the rehearsal generator's)."""
    return _rehearsal_data().write_photos(tmp_path_factory.mktemp("photos"), 24)


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


# op -> level arguments as timm's level functions produce them, and the largest mean |difference|
# to PIL, in 8-bit levels (measured: 0 for every colour/histogram op, AutoContrast 0.006 (PIL's
# float32 scale), 0.23-0.46 for the geometric ops: torch's bicubic taps (a = -0.75) against those
# of PIL's affine transform (a = -1) on a grainy image, and which border pixels take the fill)
OP_CASES = {
    "AutoContrast": ((), 0.02),
    "Equalize": ((), 0.0),
    "Invert": ((), 0.0),
    "PosterizeIncreasing": ((2,), 0.0),
    "SolarizeIncreasing": ((100,), 0.0),
    "SolarizeAdd": ((60,), 0.0),
    "ColorIncreasing": ((1.6,), 0.0),
    "ContrastIncreasing": ((0.4,), 0.0),
    "BrightnessIncreasing": ((1.7,), 0.0),
    "SharpnessIncreasing": ((1.8,), 0.0),
    "Rotate": ((17.0,), 0.6),
    "ShearX": ((0.2,), 0.6),
    "ShearY": ((-0.25,), 0.6),
    "TranslateXRel": ((0.3,), 0.6),
    "TranslateYRel": ((-0.2,), 0.6),
}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_each_rand_augment_op_is_timms_pil_op(photos, name):
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, NAME_TO_OP

    assert set(OP_CASES) == set(_RAND_INCREASING_TRANSFORMS)  # the paper's op set, all of it
    _timm_posterize_any_bits()
    args, bound = OP_CASES[name]
    imgs = [Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC) for f in photos[:8]]
    pil = torch.stack(
        [
            _tensor(NAME_TO_OP[name](im, *args, fillcolor=(124, 116, 104), resample=Image.BICUBIC))
            for im in imgs
        ]
    )
    aug = DeviceAugment(PAPER, 224, 3, CPU)
    x = torch.stack([_tensor(im) for im in imgs])
    ours = _OPS["affine" if name in _AFFINE else name](aug, x, [(name, *args)] * len(imgs))
    diff = (ours.int() - pil.int()).abs().float()
    print(f"{name}: mean |diff| {diff.mean():.4f}, max {diff.max():.0f}")
    assert ours.dtype == torch.uint8 and ours.shape == pil.shape
    assert diff.mean() <= bound, (name, float(diff.mean()))
    if bound == 0.0:
        assert torch.equal(ours, pil), name
    # the op did something (the comparison is not between two unchanged images)
    assert not torch.equal(pil, x), name


def test_the_crop_is_resized_as_pils_bicubic(photos):
    """The random-resized crop's resize: torch's antialiased bicubic against PIL's ``resize(box=)``
    (timm's RandomResizedCropAndInterpolation) on the same crops, up- and downscaling. Measured:
    mean 0.21 levels, 0.7 % of values more than 1 level apart (other cubic taps)."""
    import torch.nn.functional as F

    diffs = []
    for f in photos[:8]:
        im = Image.open(f).convert("RGB")
        full = _tensor(im)[None].float()
        for i, j, h, w in [(10, 20, 300, 260), (50, 40, 120, 150), (0, 0, im.size[1], im.size[0])]:
            pil = _tensor(im.resize((224, 224), Image.BICUBIC, box=(j, i, j + w, i + h)))
            crop = full[:, :, i : i + h, j : j + w]
            ours = F.interpolate(crop, size=(224, 224), mode="bicubic", antialias=True)
            diffs.append((ours[0].round().clamp(0, 255) - pil.float()).abs())
    d = torch.stack(diffs)
    print(f"crop resize: mean |diff| {d.mean():.3f}, > 1 level {float((d > 1).float().mean()):.4f}")
    assert d.mean() < 0.35 and (d > 1).float().mean() < 0.02


def test_posterize_to_zero_bits_is_black_as_the_pipeline_on_cpu():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = _OPS["PosterizeIncreasing"](
        None, x, [("PosterizeIncreasing", 0), ("PosterizeIncreasing", 8)]
    )
    assert not out[0].any() and torch.equal(out[1], x[1])


def test_decode_reads_what_pil_reads_and_any_file_format(photos, tmp_path):
    raw = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in photos[:6]]
    gray = tmp_path / "gray.JPEG"
    Image.open(photos[0]).convert("L").save(gray, "JPEG", quality=90)
    png = tmp_path / "png.JPEG"  # ImageNet's n02105855_2933.JPEG is a PNG
    Image.open(photos[1]).convert("RGB").save(png, "PNG")
    cmyk = tmp_path / "cmyk.JPEG"  # ImageNet holds a couple of dozen
    Image.open(photos[2]).convert("CMYK").save(cmyk, "JPEG", quality=90)
    extra = [
        torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in (gray, png, cmyk)
    ]
    out = decode(raw + extra, CPU, 3)
    for img, f in zip(out, photos[:6]):
        ref = _tensor(Image.open(f).convert("RGB"))
        assert img.shape == ref.shape
        assert (img.int() - ref.int()).abs().float().mean() < 0.5
    assert out[6].shape[0] == 3 and torch.equal(out[6][0], out[6][1])  # grey → RGB
    assert torch.equal(out[7], _tensor(Image.open(photos[1]).convert("RGB")))  # lossless PNG
    assert torch.equal(out[8], _tensor(Image.open(cmyk).convert("RGB")))  # CMYK as PIL reads it


def _moments(batch: torch.Tensor) -> dict[str, float]:
    per_image_std = batch.flatten(1).std(dim=1)
    return {
        "mean": float(batch.mean()),
        "std": float(batch.std()),
        "per_image_std": float(per_image_std.mean()),
        # random erasing in pixel mode draws N(0, 1) noise: pixels far outside the image range
        "beyond_3": float((batch.abs() > 3).float().mean()),
        "flat_rows": float((batch.diff(dim=-1).abs() < 1e-6).float().mean()),
    }


def test_the_whole_transform_draws_the_distribution_of_timms(photos):
    """Exactness is impossible (other random draws, other bicubic taps), so the output moments of
    256 augmented images are compared, each pipeline seeded alike: mean, spread, the share of
    erased-looking pixels and of flat runs (fills, posterize, solarize)."""
    n = 256
    seed_everything(11)
    timm_tf = timm_train_transform(PAPER, 224, 3)
    pil = [Image.open(photos[i % len(photos)]).convert("RGB") for i in range(n)]
    ref = torch.stack([timm_tf(im) for im in pil])
    seed_everything(11)
    ours = DeviceAugment(PAPER, 224, 3, CPU)([_tensor(im) for im in pil])
    a, b = _moments(ours), _moments(ref)
    print("device", a, "\ntimm  ", b)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert abs(a["mean"] - b["mean"]) < 0.08
    assert abs(a["std"] / b["std"] - 1) < 0.08
    assert abs(a["per_image_std"] / b["per_image_std"] - 1) < 0.1
    assert abs(a["beyond_3"] - b["beyond_3"]) < 0.01
    assert abs(a["flat_rows"] - b["flat_rows"]) < 0.03


def _batches(files, aug=PAPER, size=64, batch=4, repeats=1, workers=0, images=None):
    data = EncodedImages(
        files=None if images is not None else [str(f) for f in files],
        images=images,
        labels=list(range(len(files))),
    )
    return DeviceBatches(
        data,
        DeviceAugment(aug, size, 3, CPU),
        batch_size=batch,
        seed=5,
        in_chans=3,
        repeats=repeats,
        num_workers=workers,
    )


def _epoch(batches, epoch: int):
    seed_everything(epoch_seed(5, epoch))  # what engine.fit does at each epoch's start
    batches.set_epoch(epoch)
    return list(batches)


def test_device_batches_are_seeded_per_epoch_and_resume_exactly(photos):
    run = _batches(photos[:12], repeats=3)
    e0, e1 = _epoch(run, 0), _epoch(run, 1)
    assert len(e0) == len(run) == 12 // 4  # under 256 images, trimmed to one pass (RASampler)
    # repeated augmentation: an image's 3 copies are consecutive, each augmented differently
    first = e0[0]
    assert first[1][0] == first[1][1] == first[1][2]
    assert not torch.equal(first[0][0], first[0][1])
    resumed = _batches(photos[:12], repeats=3)  # a new process resuming at epoch 1
    for (x, y), (rx, ry) in zip(e1, _epoch(resumed, 1)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert not torch.equal(e0[0][0], e1[0][0])
    assert e0[0][0].shape == (4, 3, 64, 64)


def test_auto_is_the_device_pipeline_on_a_gpu_and_timm_on_a_cpu():
    auto = dataclasses.replace(PAPER, pipeline="auto")
    assert auto.pipeline_on(gpu=False) == "timm"
    assert auto.pipeline_on(gpu=True) == "device"
    assert PAPER.pipeline_on(gpu=True) == "timm"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"rand_augment": "original-mstd0.5"}, "rand_augment"),
        ({"rand_augment": None}, "color_jitter"),
    ],
)
def test_a_recipe_the_device_pipeline_lacks_is_refused_by_name(change, key):
    from deit_repro.config import compose_params, params_from_dict

    raw = compose_params(ROOT / "profiles" / "imagenet.yaml")
    raw["student"]["train"]["aug"].update(pipeline="device", **change)
    # the profile's recipes share one YAML anchor: the first one checked is named
    with pytest.raises(ConfigError, match=rf"train\.aug\.{key}. = .* is out of range"):
        params_from_dict(raw)


def test_the_workers_hand_over_a_batch_in_one_piece_and_change_nothing(photos):
    """Workers read the files and pack a batch's bytes into one tensor (one shared-memory
    transfer a batch); the batches are those of the main process reading alone. In-memory
    images take the same path without a decode."""
    from deit_repro.core.device_augment import pack

    raw = [(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8), 0) for f in photos[:3]]
    (data, lengths), _ = pack(raw)
    assert data.dim() == 1 and lengths.tolist() == [len(x) for x, _ in raw]
    alone, workers = _batches(photos[:8]), _batches(photos[:8], workers=2)
    for (x, y), (wx, wy) in zip(_epoch(alone, 1), _epoch(workers, 1)):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    arrays = torch.stack(
        [_tensor(Image.open(f).convert("RGB").resize((96, 80))) for f in photos[:8]]
    )
    in_memory = _epoch(_batches(photos[:8], images=arrays, workers=1), 0)
    assert [x.shape for x, _ in in_memory] == [(4, 3, 64, 64)] * 2
