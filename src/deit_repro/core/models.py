"""Student and teacher factories (DeiT paper §4 "Distillation through attention", §5.1 / Table 1).

Everything here is a thin layer over timm: students are timm's ``VisionTransformer`` (no
distillation token) or ``VisionTransformerDistilled`` (class + distillation token, §4); the
paper-profile teacher is timm's ``regnety_160`` (RegNetY-16GF, §5.2); the small-profile teachers are
timm ``ByobNet`` / ``RegNet`` instances configured for 28×28 inputs. The factories take explicit
keyword arguments, no config objects; the config layer adapts ``params.yaml`` to these kwargs.

What this module adds on top of timm:

- ``student_heads``: the class, distillation and joint logits from one forward pass. timm's
  ``VisionTransformerDistilled`` returns the two heads separately only in train mode after
  ``set_distilled_training(True)``; in eval it averages them, so per-head evaluation (Table 3,
  Table 4) needs the heads applied by hand.
- ``load_state_dict_checked``: a strict load whose error names the first bad key, both shapes and
  the fix.
- ``classifiers_in_fp32``: every model these factories build computes its logits in float32 under
  bf16/fp16 autocast (the teacher's argmax, top-k and the joint head's mean read them).
"""

from __future__ import annotations

from contextlib import nullcontext

import functools
import logging
import math
import types
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import timm
import torch
from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg
from timm.models.deit import VisionTransformerDistilled
from timm.models.regnet import RegNet, RegNetCfg
from timm.models.vision_transformer import VisionTransformer
import torch.nn.functional as F
from torch import nn

from deit_repro.errors import CheckpointError, ConfigError

_logger = logging.getLogger(__name__)

__all__ = [
    "STUDENT_VARIANTS",
    "StudentVariant",
    "TEACHER_ARCHS",
    "classifiers_in_fp32",
    "count_params",
    "create_student",
    "create_teacher",
    "load_state_dict_checked",
    "reported_head",
    "set_training_outputs",
    "student_heads",
]


@dataclass(frozen=True)
class StudentVariant:
    """One row of the paper's Table 1 (DeiT variants), with the matching timm model names.

    Attributes:
        timm_name: timm model without distillation token.
        timm_distilled_name: timm model with distillation token (DeiT⚗).
        embed_dim: embedding dimension.
        num_heads: attention heads.
        depth: transformer layers.
        paper_params_m: the parameter count as printed in Table 1, in millions. The paper truncates
            (DeiT-Ti has 5.72 M parameters in timm and in the official code, printed "5M").
    """

    timm_name: str
    timm_distilled_name: str
    embed_dim: int
    num_heads: int
    depth: int
    paper_params_m: int


# Table 1 of the paper (patch 16, 224 px, MLP ratio 4, head dim 64).
STUDENT_VARIANTS: dict[str, StudentVariant] = {
    "deit_tiny": StudentVariant(
        "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", 192, 3, 12, 5
    ),
    "deit_small": StudentVariant(
        "deit_small_patch16_224", "deit_small_distilled_patch16_224", 384, 6, 12, 22
    ),
    "deit_base": StudentVariant(
        "deit_base_patch16_224", "deit_base_distilled_patch16_224", 768, 12, 12, 86
    ),
}

TEACHER_ARCHS = ("resnet_small", "regnety_small", "vit")


def _fp32_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # (no autocast on the meta device, where `launch-plan --cost` counts FLOPs: nothing to undo)
    off = torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else nullcontext()
    with off:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def classifiers_in_fp32(model: nn.Module) -> nn.Module:
    """Make the model's classifier layers (timm ``get_classifier()``: ``head`` and ``head_dist``
    of a DeiT⚗, ``head.fc`` of a RegNet) compute in float32 even inside a bf16/fp16 autocast.

    Under bf16 the logits carry 8 bits of mantissa: the hard-distillation label (the teacher's
    argmax), top-k and the mean of the two heads would be taken on rounded values. The layer's
    ``forward`` is replaced on the instance, so parameter names and the state dict are
    unchanged, and without autocast the result is bit-identical to ``nn.Linear``.
    """
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    for head in heads if isinstance(heads, tuple) else (heads,):
        if isinstance(head, nn.Linear):
            head.forward = types.MethodType(_fp32_linear, head)
    return model


def _with_fp32_classifiers(factory):
    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> nn.Module:
        return classifiers_in_fp32(factory(*args, **kwargs))

    return build


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{key} = {value!r} must be positive", f"set {key} to a value > 0")


@_with_fp32_classifiers
def create_student(
    *,
    name: str | None = None,
    distilled: bool,
    num_classes: int,
    img_size: int,
    in_chans: int,
    patch_size: int = 16,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.1,
) -> nn.Module:
    """Build a DeiT student, untrained.

    With ``name`` the architecture comes from timm's registry and ``patch_size``, ``embed_dim``,
    ``depth``, ``num_heads`` and ``mlp_ratio`` are ignored. Without it a timm ``VisionTransformer``
    (``distilled=False``) or ``VisionTransformerDistilled`` (``distilled=True``) is built with those
    sizes, with timm's DeiT defaults otherwise (qkv bias, LayerNorm eps 1e-6, class-token pooling).

    A student without a distillation token is a plain ``VisionTransformer``: it serves the
    no-distillation baseline and the "usual"/"hard distillation" rows of Table 3, whose single class
    token receives both losses (facebookresearch/deit#174). A ``VisionTransformerDistilled`` would
    average an untrained distillation head into its eval logits.

    Args:
        name: exact timm model name, e.g. ``deit_small_distilled_patch16_224``; None for a custom
            size.
        distilled: whether the student has a distillation token (DeiT⚗, §4); must agree with
            ``name``.
        num_classes: classifier outputs (for both heads).
        img_size: input resolution in pixels (square); a multiple of the patch size.
        in_chans: input channels (1 for Fashion-MNIST, 3 for ImageNet).
        patch_size: patch side in pixels.
        embed_dim: token dimension.
        depth: transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden size / embed dim.
        drop_rate: dropout before the head(s) (0 in the paper, Table 9).
        drop_path_rate: stochastic depth (0.1 in the paper, Table 9).

    Returns:
        The model, in training mode, with ``distilled_training`` off (see ``set_training_outputs``).

    Raises:
        ConfigError: unknown name, ``distilled`` contradicting the name, sizes that don't fit.
    """
    _check_positive(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    if name is not None:
        if not timm.is_model(name):
            raise ConfigError(
                f"student model {name!r} is not a timm model",
                "use an exact timm name such as deit_tiny_patch16_224 or "
                "deit_small_distilled_patch16_224",
            )
        # All DeiT⚗ models in timm carry 'distilled' in their name; checking before building avoids
        # allocating DeiT-B for nothing. The isinstance check below is the authoritative one.
        if ("distilled" in name) != distilled:
            raise ConfigError(
                f"student {name!r} {'has' if 'distilled' in name else 'has no'} "
                "distillation token but "
                f"distilled = {distilled}",
                "pick the matching timm name (with or without '_distilled') or flip distilled",
            )
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            img_size=img_size,
            in_chans=in_chans,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
        )
        if not isinstance(model, VisionTransformer):
            raise ConfigError(
                f"student {name!r} is a {type(model).__name__}, not a vision transformer",
                "use a DeiT/ViT name for students; convnets belong in the teacher",
            )
        if isinstance(model, VisionTransformerDistilled) != distilled:
            raise ConfigError(
                f"student {name!r} builds {type(model).__name__} but distilled = {distilled}",
                "pick the matching timm name or flip distilled",
            )
        model_patch = model.patch_embed.patch_size[0]
        if img_size % model_patch:
            raise ConfigError(
                f"img_size {img_size} is not a multiple of patch_size {model_patch} of {name!r}",
                f"use an image size divisible by {model_patch}",
            )
        return model

    _check_positive(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
    )
    if img_size % patch_size:
        # timm's PatchEmbed would silently drop the border pixels (stride-p conv without padding).
        raise ConfigError(
            f"img_size {img_size} is not a multiple of patch_size {patch_size}",
            "choose a patch size that divides the image size (e.g. 28 px with patch 7 or 4)",
        )
    if embed_dim % num_heads:
        raise ConfigError(
            f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}",
            "choose num_heads dividing embed_dim (the paper keeps the head dimension at 64)",
        )
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )


def student_heads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of every classifier of a model, from one forward pass.

    For a ``VisionTransformerDistilled`` the class and distillation tokens (0 and 1 after the final
    norm) go through ``head`` and ``head_dist``, and the joint prediction is their mean — the
    official code averages logits where the paper text says softmax outputs are added (README,
    Table 3 note). This works in any mode and whatever ``distilled_training`` says. Any other timm
    model (plain ViT, convnet teacher) gives its usual logits.

    Args:
        model: a student (or teacher) model.
        x: images [B, C, H, W].

    Returns:
        ``{"cls", "dist", "joint"}`` for a distilled student, ``{"cls"}`` otherwise; each
        [B, num_classes].
    """
    if isinstance(model, VisionTransformerDistilled):
        tokens = model.forward_features(x)
        # Same ops as VisionTransformerDistilled.forward_head (head_drop is identity in eval).
        cls = model.head(model.head_drop(tokens[:, 0]))
        dist = model.head_dist(model.head_drop(tokens[:, 1]))
        return {"cls": cls, "dist": dist, "joint": (cls + dist) / 2}
    return {"cls": model(x)}


def reported_head(heads: dict[str, Any]) -> Any:
    """The head a model's accuracy is reported with: the joint classifier of a distilled student
    (paper Table 3's "DeiT⚗: class+distillation", the official evaluation), else the class
    head."""
    return heads.get("joint", heads["cls"])


def set_training_outputs(model: nn.Module, distilled_training: bool) -> None:
    """Choose what a distilled student returns in train mode.

    With ``distilled_training=True`` a ``VisionTransformerDistilled`` in train mode returns
    ``(cls_logits, dist_logits)`` (what ``DistillationLoss`` needs for DeiT⚗); in eval mode it
    always returns their mean. With False it returns the mean in both modes (plain fine-tuning). A
    model without a distillation token is left as is.

    Args:
        model: the student.
        distilled_training: return the pair in train mode.
    """
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(distilled_training)
    elif distilled_training:
        _logger.debug(
            "%s has no distillation token; set_training_outputs is a no-op", type(model).__name__
        )


# A 4-stage RegNetY (timm's RegNet needs exactly four stages): widths 16/32/64/128, one block each,
# group width 8, squeeze-excitation 0.25 as in every RegNetY. generate_regnet(wa=27.2, w0=16, wm=2,
# depth=4) quantises to exactly these widths. ~70 k parameters.
_REGNETY_SMALL_CFG = RegNetCfg(
    w0=16, wa=27.2, wm=2.0, depth=4, group_size=8, se_ratio=0.25, stem_width=16
)


@_with_fp32_classifiers
def create_teacher(
    *,
    name: str | None = None,
    arch: str = "resnet_small",
    num_classes: int,
    in_chans: int,
    img_size: int | None = None,
    channels: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (1, 1, 1),
    strides: Sequence[int] = (1, 2, 2),
    drop_path_rate: float = 0.0,
    patch_size: int = 7,
    embed_dim: int = 96,
    depth: int = 6,
    num_heads: int = 3,
) -> nn.Module:
    """Build a teacher, untrained.

    With ``name`` (paper profile: ``regnety_160``, RegNetY-16GF, §5.2) the model comes from timm's
    registry and ``arch`` and the size arguments are ignored. Without it, ``arch`` selects a small
    teacher for 28×28 inputs, always built from timm's classes:

    - ``resnet_small``: timm ``ByobNet`` of ResNet basic blocks, 3×3 stride-2 stem without max-pool,
      stages of ``channels``/``depths``/``strides``. The defaults give 78 k parameters and an output
      stride of 8 (28 px → 14 → 14 → 7 → 4); the small profiles use this arch
      (profiles/fashion.yaml, profiles/smoke.yaml).
    - ``regnety_small``: timm ``RegNet`` with a tiny RegNetY configuration (SE blocks, group
      width 8, widths 16/32/64/128, ~70 k parameters), output stride 8 (the last two stages dilate
      instead of striding), the small analogue of the paper's RegNetY teacher.
    - ``vit``: a plain DeiT without distillation token (``patch_size``, ``embed_dim``, ``depth``,
      ``num_heads``), for the convnet-vs-transformer teacher comparison of Table 2.

    Args:
        name: exact timm model name, or None for a small ``arch``.
        arch: one of ``TEACHER_ARCHS``; used when ``name`` is None.
        num_classes: classifier outputs.
        in_chans: input channels.
        img_size: input resolution; needed for ``vit`` and used to check the convnets' final map
            size.
        channels: output channels of each ``resnet_small`` stage (the stem has ``channels[0]``).
        depths: basic blocks per ``resnet_small`` stage.
        strides: stride of each ``resnet_small`` stage (the stem adds a factor 2).
        drop_path_rate: stochastic depth of a timm model, the small convnets and the ViT.
        patch_size: ``vit`` only.
        embed_dim: ``vit`` only.
        depth: ``vit`` only.
        num_heads: ``vit`` only.

    Returns:
        The model in training mode. Put it in eval mode before distilling from it.

    Raises:
        ConfigError: unknown name or arch, inconsistent stage lists, a final feature map under 2 px.
    """
    _check_positive(num_classes=num_classes, in_chans=in_chans)
    if name is not None:
        if not timm.is_model(name):
            raise ConfigError(
                f"teacher model {name!r} is not a timm model",
                "use an exact timm name such as regnety_160 (the DeiT paper's teacher)",
            )
        # Stochastic depth too: the Table 2 DeiT-B teacher trains with drop_path 0.1 as the
        # official main.py passes it to every model (`--drop-path`).
        return timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
        )

    if arch == "vit":
        if img_size is None:
            raise ConfigError("teacher arch 'vit' needs img_size", "pass the training resolution")
        return create_student(
            distilled=False,
            num_classes=num_classes,
            img_size=img_size,
            in_chans=in_chans,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            drop_path_rate=drop_path_rate,
        )

    if arch == "resnet_small":
        if not (len(channels) == len(depths) == len(strides) > 0):
            raise ConfigError(
                f"teacher channels {tuple(channels)}, depths {tuple(depths)} "
                f"and strides {tuple(strides)} "
                "must have the same non-zero length",
                "give one entry per stage in each list",
            )
        for key, values in (("channels", channels), ("depths", depths), ("strides", strides)):
            if any(int(v) < 1 for v in values):
                raise ConfigError(
                    f"teacher {key} {tuple(values)} has an entry < 1", "use positive integers"
                )
        output_stride = 2 * math.prod(strides)  # the 3×3 ByobNet stem always has stride 2
        _check_final_map(img_size, output_stride)
        cfg = ByoModelCfg(
            blocks=tuple(
                ByoBlockCfg(type="basic", d=int(d), c=int(c), s=int(s))
                for c, d, s in zip(channels, depths, strides)
            ),
            stem_type="3x3",
            stem_chs=int(channels[0]),
            # No max-pool: with it a 28 px image would be down to 7 px before the first block.
            stem_pool="",
            downsample="conv1x1",
        )
        return ByobNet(
            cfg, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate
        )

    if arch == "regnety_small":
        _check_final_map(img_size, 8)
        return RegNet(
            _REGNETY_SMALL_CFG,
            in_chans=in_chans,
            num_classes=num_classes,
            output_stride=8,
            drop_path_rate=drop_path_rate,
        )

    raise ConfigError(f"teacher arch {arch!r} is unknown", f"use one of {', '.join(TEACHER_ARCHS)}")


def _check_final_map(img_size: int | None, output_stride: int) -> None:
    if img_size is None:
        return
    final = math.ceil(img_size / output_stride)  # 3×3/1×1 stride-2 convs with padding round up
    if final < 2:
        raise ConfigError(
            f"teacher output stride {output_stride} leaves a {final}×{final} feature map "
            f"at {img_size} px",
            "use fewer stride-2 stages (strides of 1) for small images",
        )


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _shape(value: object) -> list[int] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else list(shape)


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str
) -> None:
    """Load a state dict strictly, after checking keys and shapes for a clear error.

    ``torch``'s own strict load lists every problem in one long message; this names the first one,
    its likely cause and the fix.

    Args:
        model: the model to load into (in place).
        state_dict: the weights (already unwrapped from a training checkpoint).
        what: what the weights are, for the message, e.g.
            "teacher checkpoint runs/teacher/model.pt".

    Raises:
        CheckpointError: keys missing or unexpected (another architecture), or a shape differs.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        hint = ""
        if all(k.startswith("module.") for k in state_dict):
            hint = " (every key starts with 'module.': strip the DistributedDataParallel prefix)"
        elif "model" in state_dict and not hasattr(state_dict["model"], "shape"):
            hint = (
                " (it holds a 'model' entry: pass checkpoint['model'], "
                "not the whole training checkpoint)"
            )
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]!r})")
        raise CheckpointError(
            f"{what} is of the wrong architecture for {type(model).__name__}: "
            f"{', '.join(parts)}{hint}",
            "use a checkpoint saved from the same model (name, distillation token, sizes) "
            "as params.yaml builds",
        )
    for key, tensor in expected.items():
        got, want = _shape(state_dict[key]), list(tensor.shape)
        if got == want:
            continue
        if key.startswith(("head.", "head_dist.", "fc.")) or ".fc." in key:
            fix = (
                "class count mismatch between dataset and checkpoint; "
                "use a checkpoint trained on this "
                "dataset or drop the heads (finetune/transfer do)"
            )
        elif key == "pos_embed":
            fix = (
                "resolution or patch size mismatch; resample the positional embedding "
                "(deit_repro.core.pos_embed.adapt_for_finetune) "
                "or build the model at the checkpoint's size"
            )
        else:
            fix = (
                "architecture mismatch (width, depth, patch size or input channels differ); "
                "build the model the checkpoint came from"
            )
        raise CheckpointError(f"{what} has {key} {got} but the model expects {want}", fix)
    model.load_state_dict(state_dict, strict=True)
