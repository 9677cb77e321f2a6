"""Batches for training and evaluation: sampling order, augmentation and normalisation.

Two pipelines (``AugCfg.pipeline``):

* ``tensor`` — small datasets held in memory as uint8 ``[N, C, H, W]`` tensors. Random-resized crop
  and horizontal flip are one batched ``affine_grid``/``grid_sample`` call, random erasing is timm's
  ``RandomErasing`` on the batch; no per-image Python work, no decoding (the loader costs a few % of
  a training step, bench/README.md).
* ``timm`` — per-image ``timm.data.create_transform`` (RandAugment, colour jitter, random erasing)
  in a ``DataLoader``: the paper's ImageNet pipeline (Table 9), for file lists and for arrays alike.

Both take their sample order from :func:`epoch_indices` (repeated augmentation, paper §6 / official
``samplers.RASampler``) and draw every random number from generators seeded by (seed, epoch, rank),
so an epoch is the same whether the run was interrupted before it or not.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deit_repro.config import AugCfg, EvalCfg

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN
IMAGENET_STD = IMAGENET_DEFAULT_STD


def norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants: timm's ImageNet ones for RGB, 0.5/0.5 for grayscale."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (an augmentation's parameters) on ``device`` without waiting for the GPU:
    a plain copy from pageable memory synchronises the stream, so every batch would wait for
    the step before it; from pinned memory the copy is queued like a kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """One seed per (run seed, epoch, rank): the whole of an epoch's randomness derives from it."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    """Seed the global RNGs that timm's components use (Mixup: numpy, RandomErasing: random)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_indices(
    n: int, *, epoch: int, seed: int, repeats: int = 1, world_size: int = 1, rank: int = 0
) -> torch.Tensor:
    """This rank's sample order for one epoch.

    With ``repeats > 1`` this is the official RASampler: a seeded permutation, each index repeated
    ``repeats`` times, dealt round-robin to the ranks, then trimmed to ``n // 256 * 256 /
    world_size`` samples per rank so an epoch costs about as much as one without repetition. Unlike
    the official code at HEAD, it also applies in a single process (there the copies of an image
    land in the same batch with different augmentations).
    """
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    perm = torch.randperm(n, generator=g)
    if repeats == 1:
        # Dealt round-robin like the repeated copies below: the ranks' k-th batches together are
        # the single process's k-th global batch (DDP with the same global batch sees the same
        # images per step; tests/test_slurm.py compares the two).
        return perm[rank::world_size][: n // world_size] if world_size > 1 else perm
    idx = perm.repeat_interleave(repeats)
    total = math.ceil(n * repeats / world_size) * world_size
    idx = torch.cat([idx, idx[: total - len(idx)]])
    mine = idx[rank:total:world_size]
    keep = max(int(n // 256 * 256 / world_size), 1) if n >= 256 else n // world_size
    return mine[:keep]


# --------------------------------------------------------------------------------------------------
# Tensor pipeline
# --------------------------------------------------------------------------------------------------


class TensorAugment:
    """Random-resized crop + flip + normalise + random erasing on a uint8 batch, batched.

    Args:
        aug: augmentation settings (scale and ratio as torchvision's RandomResizedCrop).
        img_size: output side length (may differ from the stored size: e.g. pretraining below the
            native resolution, as the ``fashion`` profile does at 16 px).
        in_chans: channels of the images.
    """

    def __init__(self, aug: AugCfg, img_size: int, in_chans: int):
        from timm.data.random_erasing import RandomErasing

        self.aug = aug
        self.img_size = img_size
        mean, std = norm_stats(in_chans)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        # RandomErasing draws from Python's `random`, which seed_everything() seeds per epoch.
        self.erase = (
            RandomErasing(aug.reprob, mode=aug.remode, device="cpu") if aug.reprob > 0 else None
        )

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        area = torch.empty(b).uniform_(self.aug.scale[0], self.aug.scale[1], generator=g)
        log_r = torch.empty(b).uniform_(
            math.log(self.aug.ratio[0]), math.log(self.aug.ratio[1]), generator=g
        )
        ratio = torch.exp(log_r)
        # Crop width/height as fractions of the image side; clamped like torchvision's fallback.
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, generator=g) < self.aug.hflip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        xf = x.to(self.mean.device, torch.float32).div_(255.0)
        grid = F.affine_grid(
            to_device(theta, xf.device),
            [b, x.shape[1], self.img_size, self.img_size],
            align_corners=False,
        )
        out = F.grid_sample(
            xf, grid, mode=self.aug.interpolation, padding_mode="border", align_corners=False
        )
        out = out.clamp_(0.0, 1.0).sub_(self.mean).div_(self.std)
        if self.erase is not None:
            out = self.erase(out)
        return out


def eval_tensor(images: torch.Tensor, img_size: int, ev: EvalCfg) -> torch.Tensor:
    """Test-time preprocessing of a uint8 batch: resize to size/crop_pct, centre crop, normalise.

    The official evaluation (resize 224/0.875 then centre-crop 224, bicubic), on tensors.
    """
    mean, std = norm_stats(images.shape[1])
    resize = int(math.floor(img_size / ev.crop_pct))
    x = images.float().div_(255.0)
    if x.shape[-1] != resize or x.shape[-2] != resize:
        x = F.interpolate(
            x, size=(resize, resize), mode=ev.interpolation, align_corners=False, antialias=True
        )
    # torchvision's centre crop (timm's and the official eval transform): its offset rounds,
    # (resize - img_size) // 2 would be one pixel off when the margin is 3 mod 4
    x = TF.center_crop(x, [img_size, img_size]).clamp_(0.0, 1.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


class _EpochBatches:
    """What both pipelines share: this rank's sample order per epoch and the batch count.

    Subclasses set ``batch_size``, ``seed``, ``repeats``, ``world_size``, ``rank``, ``epoch`` and
    implement ``_num_samples``.
    """

    batch_size: int
    seed: int
    repeats: int
    world_size: int
    rank: int
    epoch: int

    def _num_samples(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        return epoch_indices(
            self._num_samples(),
            epoch=self.epoch,
            seed=self.seed,
            repeats=self.repeats,
            world_size=self.world_size,
            rank=self.rank,
        )

    def __len__(self) -> int:
        return len(self.indices()) // self.batch_size

    def _generator(self) -> torch.Generator:
        """The augmentation generator of this epoch and rank (the order has its own)."""
        return torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank) + 1)


@dataclass
class TrainBatches(_EpochBatches):
    """An epoch of training batches from in-memory uint8 images (tensor pipeline).

    Iterating yields ``(images float [B, C, S, S], labels int64 [B])`` for this rank; the last
    incomplete batch is dropped (as the official loader, and Mixup needs even batches).
    """

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    augment: TensorAugment
    seed: int
    repeats: int = 1
    world_size: int = 1
    rank: int = 0
    epoch: int = 0

    def _num_samples(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        g = self._generator()
        for start in range(0, len(idx) - self.batch_size + 1, self.batch_size):
            sel = idx[start : start + self.batch_size]
            yield self.augment(self.images[sel], g), self.labels[sel]


# --------------------------------------------------------------------------------------------------
# timm (per-image) pipeline
# --------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Per-image access to a prepared split (uint8 arrays or a file list) with a PIL transform."""

    def __init__(
        self,
        transform,
        *,
        images: torch.Tensor | None = None,
        files: list[str] | None = None,
        labels,
    ):
        self.transform = transform
        self.images = images
        self.files = files
        self.labels = torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        if self.images is not None:
            arr = self.images[i].permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        else:
            with Image.open(self.files[i]) as im:
                img = im.convert("RGB")
        return self.transform(img), self.labels[i]


def _posterize(img, bits_to_keep, **__):
    """timm's ``posterize`` for every bit count its RandAugment asks for, 0 included.

    At magnitude 10, which ``rand-m9-mstd0.5`` reaches whenever its Gaussian draw exceeds 10 (it
    is clipped there), timm's ``PosterizeIncreasing`` keeps 0 bits. Pillow 13 (pinned here)
    refuses that ("bits must be between or equal to 1 and 8"): a crash of a data-loader worker at
    a random step of an ImageNet run. The Pillow of the official runs returned a black image
    (``v & ~255``); so does this.
    """
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return posterize(img, bits_to_keep)


def _timm_posterize_any_bits() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


def timm_train_transform(aug: AugCfg, img_size: int, in_chans: int):
    """The paper's training transform through timm's create_transform (Table 9)."""
    from timm.data import create_transform

    _timm_posterize_any_bits()  # before the RandAugment ops are built: they look their op up
    mean, std = norm_stats(in_chans)
    return create_transform(
        img_size,
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.rand_augment,
        interpolation=aug.interpolation,
        re_prob=aug.reprob,
        re_mode=aug.remode,
        mean=mean,
        std=std,
    )


def timm_eval_transform(ev: EvalCfg, img_size: int, in_chans: int):
    from timm.data import create_transform

    mean, std = norm_stats(in_chans)
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=ev.crop_pct,
        interpolation=ev.interpolation,
        mean=mean,
        std=std,
    )


class _EpochIndices(torch.utils.data.Sampler):
    """The owner's sample order of its current epoch, each index paired with the epoch's worker
    seed (what the dataset's workers reseed from, see :class:`_EpochSeeded`)."""

    def __init__(self, owner: "LoaderBatches"):
        self.owner = owner

    def __iter__(self):
        token = (self.owner.epoch, self.owner.worker_base_seed())
        return ((i, token) for i in self.owner.indices().tolist())

    def __len__(self) -> int:
        return len(self.owner.indices())


class _EpochSeeded(torch.utils.data.Dataset):
    """A dataset read with ``(index, (epoch, base seed))`` keys.

    A persistent worker is seeded once, when it starts; so at the first sample of each epoch it
    reseeds ``random``, torch and numpy exactly as a DataLoader seeds a fresh worker from that
    base seed (``torch.utils.data._utils.worker._worker_loop``): an epoch's augmentations are
    those of a loader built for that epoch alone, so resuming at epoch k gives the batches of
    an uninterrupted run. In the main process (no workers) nothing is reseeded: there the
    epoch's randomness comes from the global generators :func:`seed_everything` seeded.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset
        self._token: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, tuple[int, int]]):
        i, token = key
        info = torch.utils.data.get_worker_info()
        if info is not None and token != self._token:
            from torch.utils.data._utils.worker import _generate_state

            base = token[1]
            random.seed(base + info.id)
            torch.manual_seed(base + info.id)
            np.random.seed(_generate_state(base, info.id))
            self._token = token
        return self.dataset[i]


class LoaderBatches(_EpochBatches):
    """An epoch of training batches through a DataLoader (timm pipeline; the device pipeline's
    :class:`~deit_repro.core.device_augment.DeviceBatches` is one too), same contract as
    :class:`TrainBatches`.

    One DataLoader serves every epoch; with workers they are persistent (starting them every
    epoch costs seconds, a large share of an epoch of a few steps), and
    :class:`_EpochSeeded` reseeds them per epoch from (seed, epoch, rank).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        batch_size: int,
        seed: int,
        repeats: int = 1,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
    ):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.repeats, self.world_size, self.rank = repeats, world_size, rank
        self.num_workers = num_workers
        self.epoch = 0
        self._loader: torch.utils.data.DataLoader | None = None

    def _num_samples(self) -> int:
        return len(self.dataset)

    def worker_base_seed(self) -> int:
        """The base seed of this epoch's workers: what a DataLoader given this epoch's generator
        draws for them."""
        return int(torch.empty((), dtype=torch.int64).random_(generator=self._generator()).item())

    def _loader_options(self) -> dict:
        """What a subclass's loader does differently: its collate, prefetch depth, pinning."""
        return {"pin_memory": torch.cuda.is_available()}

    @property
    def loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _EpochSeeded(self.dataset),
                batch_size=self.batch_size,
                sampler=_EpochIndices(self),
                drop_last=True,
                num_workers=self.num_workers,
                # Its own generator: the loader's draw of a base seed must not consume the
                # global torch RNG (the main-process pipeline's augmentations draw from it).
                generator=torch.Generator().manual_seed(self.seed),
                persistent_workers=self.num_workers > 0,
                **self._loader_options(),
            )
        return self._loader

    def __iter__(self):
        return iter(self.loader)
