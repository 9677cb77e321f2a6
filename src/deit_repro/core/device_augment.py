"""The paper's training transform on the training device: JPEG decode and augmentation of a whole
batch there (``AugCfg.pipeline: device``), so that a GPU is not fed by its node's CPU cores.

The per-image timm pipeline (PIL decode, RandAugment, erasing, bicubic crop) costs about 200
images/s per CPU core (``bench/loader_bench.py``): one GPU training DeiT-S would need some twenty
cores. Here the loader's workers only read the files' bytes; the main process decodes the batch
on the GPU (``torchvision.io.decode_jpeg(..., device="cuda")``, nvJPEG, one call per batch) and
applies the same recipe, in the same order, with the same random draws as timm's
``create_transform`` (Table 9):

1. random-resized crop: timm's ``RandomResizedCropAndInterpolation.get_params`` on the decoded
   image's size, then an antialiased bicubic resize of the crop (torch's ``interpolate``);
2. horizontal flip;
3. RandAugment ``rand-m9-mstd0.5-inc1``: timm's own op list, choice of ops, magnitude draws and
   level-to-argument functions (``timm.data.auto_augment``); only the pixel operations are
   re-implemented, batched over the images that drew the same op (PIL works on one image);
4. normalisation, then timm's ``RandomErasing`` on the batch (as the tensor pipeline).

Mixup/CutMix stay in the engine, repeated augmentation in the sampler (:func:`epoch_indices`).
The draws come from the global ``random``/``numpy`` generators that timm uses, seeded per epoch
(:func:`seed_everything`), so an epoch is the same whether the run was interrupted before it or
not. What differs from PIL, measured in ``tests/test_device_augment.py`` and docs/augmentation.md:
bicubic taps (torch's a = -0.75 against PIL's -0.5 in the crop's resize and -1 in its affine
transforms, rotate/shear/translate), and libjpeg vs nvJPEG rounding; colour and histogram ops are
PIL's arithmetic, exactly.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deit_repro.config import AugCfg
from deit_repro.core.batches import LoaderBatches, norm_stats, to_device
from deit_repro.errors import ConfigError

# timm's RandAugment ops by what they do to the pixels (timm.data.auto_augment.NAME_TO_OP)
_AFFINE = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


class DeviceAugment:
    """timm's training transform (crop, flip, RandAugment, normalise, erase) on a list of decoded
    uint8 ``[C, H, W]`` images on one device; returns float ``[B, C, S, S]``.

    Args:
        aug: the augmentation settings (RandAugment or none, as ``AugCfg`` checks).
        img_size: output side length.
        in_chans: channels of the images (1 or 3).
        device: where the images are and the batch is made.
    """

    def __init__(self, aug: AugCfg, img_size: int, in_chans: int, device: torch.device):
        from timm.data.random_erasing import RandomErasing

        self.aug, self.size, self.device = aug, img_size, torch.device(device)
        mean, std = norm_stats(in_chans)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.rand_augment = _timm_rand_augment(aug, img_size, mean) if aug.rand_augment else None
        # as timm's create_transform: the fill of rotate/shear/translate is the mean colour
        self.fill = torch.tensor(
            [min(255, round(255 * m)) for m in mean], dtype=torch.float32, device=self.device
        ).view(1, -1, 1, 1)
        self.erase = (
            RandomErasing(aug.reprob, mode=aug.remode, device=str(self.device))
            if aug.reprob > 0
            else None
        )

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self._crop_and_flip(images)
        if self.rand_augment is not None:
            x = self._rand_augment(x)
        out = x.float().div_(255.0).sub_(self.mean).div_(self.std)
        return self.erase(out) if self.erase is not None else out

    def _crop_and_flip(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """timm's random-resized crop, image by image (each crop has its own size), then the
        flips, batched: two operators per image, the rest per batch (the host issues every
        operator: on a GPU its per-image work is what bounds the rate, bench/loader_bench.py)."""
        from timm.data.transforms import RandomResizedCropAndInterpolation

        size = (self.size, self.size)
        crops = []
        for img in images:
            # timm's draw (global `random`), on the tensor's size: the timm pipeline's crop
            i, j, h, w = RandomResizedCropAndInterpolation.get_params(
                img, self.aug.scale, self.aug.ratio
            )
            crop = img[None, :, i : i + h, j : j + w].float()
            crops.append(
                F.interpolate(crop, size=size, mode=self.aug.interpolation, antialias=True)
            )
        x = torch.cat(crops).round_().clamp_(0, 255).to(torch.uint8)
        if self.aug.hflip > 0:  # torchvision's RandomHorizontalFlip: torch.rand < p
            flip = to_device((torch.rand(len(x)) < self.aug.hflip).nonzero()[:, 0], x.device)
            x[flip] = x[flip].flip(-1)
        return x

    def _rand_augment(self, x: torch.Tensor) -> torch.Tensor:
        """timm's RandAugment.__call__ and AugmentOp.__call__, drawn image by image in timm's
        order, applied op by op to the images that drew it."""
        ra = self.rand_augment
        plans = []  # per image: [(op name, level args) or None per layer]
        for _ in range(len(x)):
            ops = np.random.choice(
                ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights
            )
            plans.append([_draw(op) for op in ops])
        for layer in range(ra.num_layers):
            groups: dict[str, tuple[list[int], list[tuple]]] = {}
            for k, plan in enumerate(plans):
                if plan[layer] is not None:
                    name, args = plan[layer]
                    key = "affine" if name in _AFFINE else name
                    idx, arg = groups.setdefault(key, ([], []))
                    idx.append(k)
                    arg.append((name, *args))
            for key, (idx, args) in groups.items():
                sel = to_device(torch.tensor(idx), x.device)
                x[sel] = _OPS[key](self, x[sel], args)
        return x

    def _affine(self, x: torch.Tensor, args: list[tuple]) -> torch.Tensor:
        """PIL's ``Image.transform(AFFINE)`` / ``rotate`` as timm calls them, batched: each
        output pixel centre maps to a source point; a point outside the image takes the fill
        colour, one inside is interpolated with edge pixels repeated (PIL's behaviour)."""
        b, _, h, w = x.shape
        theta = torch.tensor([_theta(*a, w, h) for a in args], dtype=torch.float32)
        grid = F.affine_grid(to_device(theta, x.device), [b, x.shape[1], h, w], align_corners=False)
        out = F.grid_sample(
            x.float(), grid, mode=self.aug.interpolation, padding_mode="border", align_corners=False
        )
        outside = (grid.abs() > 1).any(dim=-1, keepdim=True).permute(0, 3, 1, 2)
        out = torch.where(outside, self.fill, out)
        # PIL's affine transform truncates its interpolated value (its resize rounds)
        return out.clamp_(0, 255).to(torch.uint8)


def _timm_rand_augment(aug: AugCfg, img_size: int, mean: Sequence[float]):
    """timm's RandAugment object for ``aug.rand_augment`` with create_transform's hparams: its
    ops, their probabilities and magnitude draws are used as they are."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    hparams = {
        "translate_const": int(img_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "interpolation": str_to_pil_interp(aug.interpolation),
    }
    ra = rand_augment_transform(aug.rand_augment, hparams)
    unknown = sorted({op.name for op in ra.ops} - set(_OPS) - _AFFINE)
    if unknown:
        raise ConfigError(
            f"aug.rand_augment {aug.rand_augment!r} uses ops the 'device' pipeline lacks: "
            f"{', '.join(unknown)}",
            "use rand-m9-mstd0.5-inc1 (the paper's) or aug.pipeline: timm",
        )
    return ra


def _draw(op) -> tuple[str, tuple] | None:
    """timm's ``AugmentOp.__call__`` without the image: whether the op applies, and its
    arguments (same draws from ``random``, in the same order)."""
    if op.prob < 1.0 and random.random() > op.prob:
        return None
    magnitude = op.magnitude
    if op.magnitude_std > 0:
        if op.magnitude_std == float("inf"):
            magnitude = random.uniform(0, magnitude)
        else:
            magnitude = random.gauss(magnitude, op.magnitude_std)
    magnitude = max(0.0, min(magnitude, op.magnitude_max or 10))
    args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
    return op.name, tuple(args)


def _theta(name: str, v: float, w: int, h: int) -> list[list[float]]:
    """affine_grid's matrix for PIL's affine map (a, b, c, d, e, f): the source of the output
    pixel centre (x, y) is (a x + b y + c, d x + e y + f), in pixels from the top-left corner;
    in affine_grid's [-1, 1] coordinates that is u' = a u + b (h/w) v + (a + b h/w - 1 + 2c/w)."""
    if name == "Rotate":  # PIL's rotate: counter-clockwise about the centre
        t = -math.radians(v)
        cx, cy = w / 2.0, h / 2.0
        a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
        c = a * -cx + b * -cy + cx
        f = d * -cx + e * -cy + cy
    elif name == "ShearX":
        a, b, c, d, e, f = 1.0, v, 0.0, 0.0, 1.0, 0.0
    elif name == "ShearY":
        a, b, c, d, e, f = 1.0, 0.0, 0.0, v, 1.0, 0.0
    elif name == "TranslateXRel":
        a, b, c, d, e, f = 1.0, 0.0, v * w, 0.0, 1.0, 0.0
    else:  # TranslateYRel
        a, b, c, d, e, f = 1.0, 0.0, 0.0, 0.0, 1.0, v * h
    return [
        [a, b * h / w, a + b * h / w - 1 + 2 * c / w],
        [d * w / h, e, d * w / h + e - 1 + 2 * f / h],
    ]


# --------------------------------------------------------------------------------------------------
# PIL's pixel operations on uint8 batches, one argument per image (timm.data.auto_augment)
# --------------------------------------------------------------------------------------------------


def _per_image(args: list[tuple], x: torch.Tensor, i: int = 1) -> torch.Tensor:
    values = torch.tensor([a[i] for a in args], dtype=torch.float32)
    return to_device(values, x.device).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: (19595 R + 38470 G + 7471 B + 2^15) >> 16, integers."""
    if x.shape[1] == 1:
        return x.to(torch.int32)
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance`` (``Image.blend(degenerate, x, factor)``): truncated to uint8."""
    d = degenerate.float()
    return (d + factor * (x.float() - d)).clamp_(0, 255).to(torch.uint8)


def _brightness(_, x, args):
    return _blend(x, torch.zeros_like(x), _per_image(args, x))


def _color(_, x, args):
    return _blend(x, _gray(x).expand_as(x), _per_image(args, x))


def _contrast(_, x, args):
    # PIL: a flat image of the grey image's mean, rounded
    mean = _gray(x).double().mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()
    return _blend(x, mean.float().expand_as(x), _per_image(args, x))


def _sharpness(_, x, args):
    # PIL's SMOOTH filter (3x3, centre 5, /13, rounded); the one-pixel border keeps the image
    c = x.shape[1]
    kernel = torch.ones((c, 1, 3, 3), device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = F.conv2d(x.float(), kernel / 13.0, groups=c).round_().clamp_(0, 255)
    degenerate = x.float().clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, _per_image(args, x))


def _auto_contrast(_, x, args):
    # PIL's ImageOps.autocontrast, cutoff 0, per channel: lut(i) = int(i * scale + offset)
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    out = (x.double() * scale - lo * scale).trunc_().clamp_(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def _equalize(_, x, args):
    import torchvision.transforms.v2.functional as TF

    return TF.equalize(x)  # PIL's ImageOps.equalize algorithm, on batches


def _invert(_, x, args):
    return 255 - x


def _posterize(_, x, args):
    # keeps the high `bits` bits; 0 bits is black (deit_repro.core.batches._posterize)
    masks = [(0xFF << (8 - int(a[1]))) & 0xFF if a[1] > 0 else 0 for a in args]
    m = to_device(torch.tensor(masks, dtype=torch.uint8), x.device).view(-1, 1, 1, 1)
    return x & m


def _solarize(_, x, args):
    return torch.where(x.float() >= _per_image(args, x), 255 - x, x)


def _solarize_add(_, x, args):
    # timm's solarize_add: below 128, add (capped at 255)
    added = (x.float() + _per_image(args, x)).clamp_(max=255).to(torch.uint8)
    return torch.where(x < 128, added, x)


_OPS: dict[str, Callable[[DeviceAugment, torch.Tensor, list[tuple]], torch.Tensor]] = {
    "affine": DeviceAugment._affine,
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "PosterizeOriginal": _posterize,
    "Solarize": _solarize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "ColorIncreasing": _color,
    "Contrast": _contrast,
    "ContrastIncreasing": _contrast,
    "Brightness": _brightness,
    "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness,
}


# --------------------------------------------------------------------------------------------------
# Batches: the files' bytes from the loader's workers, decoded and augmented on the device
# --------------------------------------------------------------------------------------------------


class EncodedImages(torch.utils.data.Dataset):
    """A split's images as the loader's workers hand them over: a file's bytes (uint8 [n]) or an
    in-memory image (uint8 [C, H, W]), with its label."""

    def __init__(self, *, files: list[str] | None = None, images=None, labels):
        self.files, self.images, self.labels = files, images, torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.images is not None:
            return self.images[i], self.labels[i]
        with open(self.files[i], "rb") as fh:
            return torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8), self.labels[i]


def pack(batch) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loader's collate, run in its worker: the batch's images as one tensor, ``(bytes of
    every file end to end, their lengths)`` or ``(images [B, C, H, W], empty)``, and the labels.
    A worker hands each tensor to the main process through its own shared-memory segment, about
    0.6 ms apiece: one per file would cap a worker near 1,500 images/s (bench/loader_bench.py)."""
    images = [x for x, _ in batch]
    labels = torch.stack([torch.as_tensor(y) for _, y in batch])
    if images[0].dim() == 3:  # in-memory images
        return (torch.stack(images), torch.empty(0, dtype=torch.int64)), labels
    return (torch.cat(images), torch.tensor([len(x) for x in images])), labels


def unpack(packed: tuple[torch.Tensor, torch.Tensor], device: torch.device, in_chans: int):
    """:func:`pack`'s images as uint8 [C, H, W] tensors on ``device``: in-memory images moved in
    one copy, files split (views) and decoded."""
    data, lengths = packed
    if data.dim() == 4:
        return list(data.to(device, non_blocking=True))
    return decode(list(torch.split(data, lengths.tolist())), device, in_chans)


def decode(encoded: list[torch.Tensor], device: torch.device, in_chans: int) -> list[torch.Tensor]:
    """Files' bytes → uint8 [C, H, W] images on ``device``: JPEGs in one batched call (nvJPEG on
    CUDA, libjpeg on a CPU); anything else (a PNG named .JPEG, as ImageNet holds, a CMYK JPEG
    nvJPEG refuses) through torchvision's CPU decoder, then moved."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
    jpeg = [k for k, e in enumerate(encoded) if e[:2].tolist() == [0xFF, 0xD8]]
    out: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg:
        try:
            with _decode_stream(device) as outputs:
                outputs += decode_jpeg([encoded[k] for k in jpeg], mode=mode, device=device)
            for k, img in zip(jpeg, outputs):
                out[k] = img
        except RuntimeError:  # one image nvJPEG cannot read fails the call: decode them one by one
            pass
    for k, img in enumerate(out):
        if img is None:
            out[k] = to_device(decode_image(encoded[k], mode=mode), device)
    return out  # type: ignore[return-value]


_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


@contextlib.contextmanager
def _decode_stream(device: torch.device):
    """Where nvJPEG's outputs are allocated: a stream of their own. torchvision allocates them on
    the current stream and nvJPEG writes them from its own without waiting for that stream's
    queued kernels (pytorch/vision#9606): on the training stream, with no per-step sync, the
    allocator could hand it memory the previous step still reads. Memory of this stream is only
    reused once the training stream is done with it (``record_stream``)."""
    outputs: list[torch.Tensor] = []
    if device.type != "cuda":
        yield outputs
        return
    main = torch.cuda.current_stream(device)
    side = _STREAMS.setdefault(device, torch.cuda.Stream(device))
    with torch.cuda.stream(side):
        yield outputs
    main.wait_stream(side)
    for img in outputs:
        img.record_stream(main)


class DeviceBatches(LoaderBatches):
    """An epoch of training batches decoded and augmented on ``device`` (the ``device``
    pipeline), same contract as :class:`deit_repro.core.batches.TrainBatches`: ``(x float
    [B, C, S, S] on device, labels [B])``. ``num_workers`` processes read the files' bytes and
    hand each batch over as one tensor (:func:`pack`)."""

    def __init__(
        self,
        dataset: EncodedImages,
        augment: DeviceAugment,
        *,
        batch_size: int,
        seed: int,
        in_chans: int,
        repeats: int = 1,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(
            dataset,
            batch_size=batch_size,
            seed=seed,
            repeats=repeats,
            world_size=world_size,
            rank=rank,
            num_workers=num_workers,
        )
        self.augment, self.in_chans = augment, in_chans

    def worker_base_seed(self) -> int:
        return 0  # the workers only read bytes: they draw nothing

    def _loader_options(self) -> dict:
        return {
            "collate_fn": pack,
            "prefetch_factor": 4 if self.num_workers > 0 else None,
            # pinned: the labels' copy to the GPU is queued, not waited for (to_device)
            "pin_memory": self.augment.device.type == "cuda",
        }

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.augment.device
        for packed, labels in self.loader:
            images = unpack(packed, device, self.in_chans)
            yield self.augment(images), labels
