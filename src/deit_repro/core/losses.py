"""The DeiT distillation loss (paper §4, "Soft distillation" and "Hard-label distillation").

Matches the official ``losses.py`` (facebookresearch/deit at 7e160fe) term for term, and extends it
to a student without a distillation token, which the official code cannot train: the paper's Table 3
rows "usual distillation" and "hard distillation" apply the teacher term to the single class token
(facebookresearch/deit#174).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from deit_repro.config import DISTILL_MODES, DistillKind
from deit_repro.errors import ConfigError

_logger = logging.getLogger(__name__)

__all__ = ["DISTILL_MODES", "DistillationLoss"]


class DistillationLoss(nn.Module):
    """Supervised loss plus, optionally, a soft or hard distillation term from a frozen teacher.

    ``total = (1 - alpha) * base + alpha * distill`` with

    - ``base = base_criterion(cls_logits, labels)``: label-smoothed CE, or soft-target CE when
      Mixup/CutMix is on (torch's fused CE with ``label_smoothing``, the same loss as timm's
      ``LabelSmoothingCrossEntropy``; timm ``SoftTargetCrossEntropy``);
    - ``soft``: ``KL(softmax(t/τ) ‖ softmax(s/τ)) · τ²``, summed over batch and classes and divided
      by ``B · C`` (``s.numel()``). The official code divides by the number of elements, not by the
      batch ('batchmean'), which the authors found similar or slightly better
      (facebookresearch/deit#61); it makes the term ``C`` times smaller than timm's
      TokenDistillationTask, so the same ``alpha`` means a different weighting there.
    - ``hard``: ``CE(s, argmax(t))``, the teacher's decision as a hard label, without label
      smoothing (the paper's "hard-label distillation"; the official code applies no smoothing to
      it).
    - ``none``: ``base`` only (``alpha`` is ignored). For a distillation-token student this is the
      class-head loss alone, exactly as the official code returns it; the distillation head gets no
      gradient.

    Tensor contract of ``forward(inputs, outputs, labels)``:

    - ``inputs``: float [B, C_in, H, W], the batch the student saw, after Mixup/CutMix; the teacher
      runs on it under ``torch.no_grad()``. The teacher must accept this resolution (see
      facebookresearch/deit#90 for 384 px).
    - ``outputs``: either a float tensor [B, K] — a student with a class token only, the
      distillation term then acts on it — or a tuple ``(cls_logits, dist_logits)`` of two [B, K]
      tensors — DeiT⚗, base loss on ``cls_logits``, distillation on ``dist_logits`` (timm
      ``VisionTransformerDistilled`` in train mode after ``set_distilled_training(True)``).
    - ``labels``: int64 [B] class indices or float [B, K] soft targets; only ``base_criterion``
      reads them.
    - returns a 0-dim float tensor (the total), differentiable w.r.t. the student only.

    After each call ``last_parts`` holds ``{"base": ..., "distill": ...}`` as detached 0-dim tensors
    (``distill`` is 0 for ``none``); kept as tensors so that logging does not force a device sync
    every step — call ``float()`` on them when logging.

    The caller puts the teacher in eval mode (BatchNorm statistics would otherwise drift even under
    ``no_grad``); ``train()`` on this module leaves the teacher in eval, and a teacher found in
    train mode is reported once in the log.

    Args:
        base_criterion: loss on the class head and the labels.
        teacher: frozen teacher returning [B, K] logits; may be None only for ``distill='none'``.
        distill: ``'none'``, ``'soft'`` or ``'hard'``.
        alpha: weight of the distillation term, in [0, 1] (paper: 0.1 soft, 0.5 hard).
        tau: softmax temperature of the soft term, > 0 (paper: 3.0; unused by ``hard``).

    Raises:
        ConfigError: unknown ``distill``, ``alpha`` outside [0, 1], ``tau`` <= 0, or no teacher for
            ``soft``/``hard``.
    """

    def __init__(
        self,
        base_criterion: nn.Module,
        teacher: nn.Module | None,
        *,
        distill: DistillKind,
        alpha: float,
        tau: float,
    ):
        super().__init__()
        if distill not in DISTILL_MODES:
            raise ConfigError(
                f"distill = {distill!r} is unknown", f"use one of {', '.join(DISTILL_MODES)}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"distillation alpha = {alpha!r} is outside [0, 1]",
                "use 0.1 for soft (paper text) and 0.5 for hard distillation (§4, equal weights)",
            )
        if not tau > 0.0:
            raise ConfigError(
                f"distillation tau = {tau!r} must be > 0",
                "use 3.0 (paper text, soft distillation) or 1.0 (official main.py default)",
            )
        if distill != "none" and teacher is None:
            raise ConfigError(
                f"distill = {distill!r} needs a teacher but none was given",
                "train or load a teacher first, or set distill: none",
            )
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distill = distill
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.last_parts: dict[str, torch.Tensor] = {}
        self._warned_train_mode = False

    def train(self, mode: bool = True) -> DistillationLoss:
        """Set the mode of the base criterion; the teacher stays in eval (as timm's
        TokenDistillationTask)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def with_teacher(self, teacher: nn.Module) -> DistillationLoss:
        """This loss with ``teacher`` in place of its own (its ``torch.compile`` wrapper, in
        :func:`deit_repro.core.engine.fit`); this one is left as it is."""
        return DistillationLoss(
            self.base_criterion, teacher, distill=self.distill, alpha=self.alpha, tau=self.tau
        )

    def extra_repr(self) -> str:
        return f"distill={self.distill!r}, alpha={self.alpha}, tau={self.tau}"

    def forward(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Total loss for one batch; see the class docstring for the tensor contract."""
        if isinstance(outputs, torch.Tensor):
            cls_logits = dist_logits = outputs
        else:
            if len(outputs) != 2:
                raise ValueError(
                    f"outputs must be a tensor or a (cls, dist) pair, got {len(outputs)} items"
                )
            cls_logits, dist_logits = outputs

        base = self.base_criterion(cls_logits, labels)
        if self.distill == "none":
            self.last_parts = {"base": base.detach(), "distill": torch.zeros_like(base.detach())}
            return base

        if self.teacher.training and not self._warned_train_mode:
            _logger.warning(
                "the teacher is in train mode during distillation; call teacher.eval() first"
            )
            self._warned_train_mode = True
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)

        if self.distill == "soft":
            tau = self.tau
            # reduction='sum' / numel (= B·K), not 'batchmean': facebookresearch/deit#61.
            distill = (
                F.kl_div(
                    F.log_softmax(dist_logits / tau, dim=1),
                    F.log_softmax(teacher_logits / tau, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (tau * tau)
                / dist_logits.numel()
            )
        else:
            # Hard label = the teacher's argmax, unsmoothed: §4 applies ε = 0.1 to the true labels
            # only, and the official losses.py uses plain cross-entropy here.
            distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))

        total = (1.0 - self.alpha) * base + self.alpha * distill
        self.last_parts = {"base": base.detach(), "distill": distill.detach()}
        return total
