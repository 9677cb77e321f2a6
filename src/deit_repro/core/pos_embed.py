"""Positional-embedding resampling for fine-tuning at another resolution (DeiT paper §3, §6).

The patch size stays fixed when the resolution changes, so the number of patches changes and the
learned positional embedding of the patch grid is interpolated to the new grid; the class and
distillation token rows (the "prefix") are kept as they are. The paper uses bicubic interpolation:
bilinear interpolation of a vector from its neighbours lowers its L2 norm, which the pre-trained
network does not expect and which costs accuracy (§6).

We call timm's ``resample_abs_pos_embed`` with the official code's settings (main.py at 7e160fe:
``F.interpolate(..., mode='bicubic', align_corners=False)``, no antialiasing). timm's own default is
``antialias=True``, which changes the result even when *up*sampling (PyTorch's antialiased bicubic
uses the Keys kernel with a = -0.5 instead of -0.75), so ``antialias=False`` is passed explicitly.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Mapping

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from deit_repro.errors import CheckpointError, ConfigError

_logger = logging.getLogger(__name__)

__all__ = ["INTERPOLATIONS", "adapt_for_finetune", "resample_student_state_dict"]

INTERPOLATIONS = ("bicubic", "bilinear")

# Classifier weights: `head.*` (class token), `head_dist.*` (distillation token, §4).
_HEAD_KEY = re.compile(r"^head(_dist)?\.")


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"interpolation {interpolation!r} is not supported",
            "use 'bicubic' (the paper's choice) or 'bilinear' (the §6 ablation)",
        )


def _resample(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int, interpolation: str
) -> torch.Tensor:
    """Resample a [1, P + G², D] embedding to [1, P + new_grid[0]·new_grid[1], D]."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(
            f"pos_embed has shape {list(pos_embed.shape)}, expected [1, tokens, dim]",
            "pass the state dict of a timm VisionTransformer",
        )
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    old = math.isqrt(max(num_grid, 0))
    if num_grid <= 0 or old * old != num_grid:
        raise CheckpointError(
            f"pos_embed has {pos_embed.shape[1]} tokens: minus {num_prefix_tokens} prefix tokens "
            "that is not a square grid",
            "check num_prefix_tokens (1 without, 2 with a distillation token) "
            "against the checkpoint",
        )
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=[old, old],
        num_prefix_tokens=num_prefix_tokens,
        interpolation=interpolation,
        # The official fine-tuning code: plain F.interpolate, no antialiasing. (Its
        # align_corners=False is F.interpolate's default for bicubic and bilinear; not passed,
        # so that timm releases before the keyword existed work too.)
        antialias=False,
    )


def resample_student_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    new_img_size: int,
    patch_size: int,
    num_prefix_tokens: int,
    interpolation: str = "bicubic",
) -> dict[str, torch.Tensor]:
    """Return a copy of a ViT state dict with ``pos_embed`` resampled to a new resolution.

    Args:
        state_dict: weights of a ViT whose ``pos_embed`` is [1, P + G_old², D].
        new_img_size: the new (square) input resolution in pixels.
        patch_size: the patch side, unchanged by fine-tuning.
        num_prefix_tokens: P, the rows kept unchanged (1: class token; 2: class + distillation
            token).
        interpolation: ``'bicubic'`` (paper) or ``'bilinear'``.

    Returns:
        A new dict (other tensors shared, not copied) with ``pos_embed``
        [1, P + (new_img_size/patch)², D].

    Raises:
        ConfigError: bad interpolation, or ``new_img_size`` not a multiple of ``patch_size``.
        CheckpointError: no ``pos_embed``, or one that isn't P + a square grid.
    """
    _check_interpolation(interpolation)
    if patch_size <= 0 or new_img_size <= 0 or new_img_size % patch_size:
        raise ConfigError(
            f"new_img_size {new_img_size} is not a positive multiple of patch_size {patch_size}",
            "choose a fine-tuning resolution divisible by the patch size",
        )
    if num_prefix_tokens < 0:
        raise ConfigError(f"num_prefix_tokens {num_prefix_tokens} is negative", "use 1 or 2")
    if "pos_embed" not in state_dict:
        raise CheckpointError(
            "state dict has no 'pos_embed'", "pass the weights of a ViT/DeiT student"
        )
    grid = new_img_size // patch_size
    out = dict(state_dict)
    out["pos_embed"] = _resample(
        state_dict["pos_embed"], (grid, grid), num_prefix_tokens, interpolation
    )
    return out


def adapt_for_finetune(
    model_new: nn.Module,
    state_dict_old: Mapping[str, torch.Tensor],
    *,
    interpolation: str = "bicubic",
    drop_heads: bool,
) -> list[str]:
    """Load pre-trained weights into a model built for another resolution and/or class count.

    As the official fine-tuning code: the positional embedding is resampled to ``model_new``'s patch
    grid (prefix rows kept), head weights whose shape differs are dropped (all heads when
    ``drop_heads``, e.g. transfer to another dataset with the same class count), and the rest is
    loaded non-strictly. Only head keys may be missing afterwards; they keep ``model_new``'s fresh
    initialisation.

    Args:
        model_new: a freshly built timm ViT at the target resolution (loaded in place).
        state_dict_old: the pre-trained weights (not modified).
        interpolation: ``'bicubic'`` (paper) or ``'bilinear'``.
        drop_heads: re-initialise every classifier head, whatever its shape.

    Returns:
        The sorted keys left at their initial values (head weights and biases).

    Raises:
        ConfigError: bad interpolation.
        CheckpointError: a non-head key missing, unexpected or of the wrong shape.
    """
    _check_interpolation(interpolation)
    target = model_new.state_dict()
    sd = dict(state_dict_old)

    if "pos_embed" in sd and "pos_embed" in target:
        # DeiT-III style models (no_embed_class) keep no prefix rows in pos_embed.
        prefix = (
            0 if getattr(model_new, "no_embed_class", False) else int(model_new.num_prefix_tokens)
        )
        grid = tuple(model_new.patch_embed.grid_size)
        sd["pos_embed"] = _resample(sd["pos_embed"], grid, prefix, interpolation)
        _logger.info(
            "pos_embed resampled %s -> %s (%s)",
            list(state_dict_old["pos_embed"].shape),
            list(sd["pos_embed"].shape),
            interpolation,
        )

    for key in [k for k in sd if _HEAD_KEY.match(k)]:
        if drop_heads or key not in target or target[key].shape != sd[key].shape:
            del sd[key]

    for key, value in sd.items():
        if key in target and target[key].shape != value.shape:
            raise CheckpointError(
                f"pre-trained {key} has shape {list(value.shape)} "
                f"but the model expects {list(target[key].shape)}",
                "fine-tune the same architecture (width, depth, patch size, input channels) "
                "as pre-trained",
            )
    # Checked before loading so that a failure leaves model_new untouched.
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    not_heads = [k for k in missing if not _HEAD_KEY.match(k)]
    if not_heads or unexpected:
        raise CheckpointError(
            f"pre-trained weights do not fit {type(model_new).__name__}: missing {not_heads[:3]}, "
            f"unexpected {unexpected[:3]}",
            "fine-tune the model that was pre-trained (same name, same distillation token)",
        )
    model_new.load_state_dict(sd, strict=False)
    reinit = sorted(missing)
    if reinit:
        _logger.info("re-initialised: %s", ", ".join(reinit))
    return reinit
