"""The training and evaluation engine: the paper's recipe through timm's components.

AdamW via ``create_optimizer_v2``, cosine + warmup via ``create_scheduler_v2`` (stepped after each
epoch, as the official main.py), Mixup/CutMix via ``timm.data.Mixup``, label smoothing via timm's
losses, stochastic depth in the model, optional EMA via ``ModelEmaV3`` (paper §6, Table 9).

``fit`` writes one complete checkpoint (model, optimizer, scheduler, scaler, EMA, epoch, RNG states,
history) atomically after every epoch and resumes from it automatically (RELIABILITY.md,
"Interruptions"). Each epoch reseeds every generator from (seed, epoch, rank), so a run resumed from
epoch k ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from deit_repro import atomic
from deit_repro.core.batches import epoch_seed, seed_everything
from deit_repro.config import TrainCfg
from deit_repro.errors import CheckpointError, DeitReproError, TrainingError

_logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "deit-repro/checkpoint-v1"


# --------------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where and how a process trains: device, precision and its place in a DDP job."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def detect(amp: str = "auto") -> "Runtime":
        """CUDA when present (bf16/fp16 autocast), CPU fp32 otherwise; DDP rank if initialised."""
        dist = torch.distributed
        world, rank = (
            (dist.get_world_size(), dist.get_rank())
            if (dist.is_available() and dist.is_initialized())
            else (1, 0)
        )
        if torch.cuda.is_available():
            local = gpu_index(os.environ.get("LOCAL_RANK"), rank, torch.cuda.device_count())
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            # As the official main.py: cuDNN times its convolution algorithms once per input
            # shape and keeps the fastest (the teachers' convs, the patch embedding). The choice
            # is timed, so two GPU runs may pick different kernels and differ in the last bits.
            torch.backends.cudnn.benchmark = True
            # bf16 only where the GPU has it: before Ampere (V100) torch emulates it, slowly.
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            if amp == "off":
                dtype = None
            elif amp == "fp16" or (amp == "auto" and not native_bf16):
                dtype = torch.float16
            else:
                dtype = torch.bfloat16
            return Runtime(device, dtype, world, rank)
        return Runtime(torch.device("cpu"), None, world, rank)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # Every collective goes through these methods, with its tensor on this runtime's device: NCCL
    # has no CPU backend ("No backend type associated with device type cpu"), so a CPU tensor
    # kills a multi-GPU run at its first reduction (the official utils.py builds it on cuda).

    def sum_over_ranks(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the DDP ranks (as they are in a one-process run)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        total = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def gather_strided(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """``[H, total]`` from every rank's ``[H, n_rank]`` shard of columns ``rank::world``
        (:func:`deit_repro.core.datasets.eval_batches`' sharding), in the split's order.

        Integer values, summed into place: each column is filled by exactly one rank, so one
        all_reduce of a zero-filled buffer puts every rank's values where they belong."""
        if self.world_size == 1:
            return local
        full = torch.zeros((local.shape[0], total), dtype=torch.int64, device=self.device)
        full[:, self.rank :: self.world_size] = local.to(self.device, torch.int64)
        torch.distributed.all_reduce(full)
        return full

    def same_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank. DDP broadcasts them at the
        start of each forward, so after the last step each rank holds its own batch's update;
        a sharded evaluation must score every shard with the model rank 0 saves."""
        if self.world_size > 1:
            for buf in module.buffers():
                torch.distributed.broadcast(buf, src=0)

    def main_first(self, fn: Callable[[], Any]) -> None:
        """``fn`` on rank 0 alone (a download, a file one rank writes), then every rank learns
        whether it worked: if it raised, every rank raises rank 0's error, the same line, at
        once. Without this, rank 0 exits while the others wait in the next collective until its
        timeout (NCCL's: 10 minutes or more), and the job's log shows their timeouts."""
        failure: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                fn()
            except Exception as err:  # every kind: the other ranks must not wait on any
                error = err
                failure = [_portable(err)]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(failure, src=0, device=self.device)
        if error is not None:
            raise error
        if failure[0] is not None:
            cls, what, fix = failure[0]
            raise cls(what, fix)

    def nonfinite(self, first: tuple[int, float] | None) -> list[tuple[int, int, float]]:
        """``(rank, step, value)`` of each rank whose loss went non-finite, given this rank's
        ``first`` such (step, value) or None: decided together, so that every rank stops at the
        same check with the same error (one rank raising alone leaves the others in DDP's
        gradient all-reduce until its timeout)."""
        if self.world_size == 1:
            return [] if first is None else [(0, *first)]
        both = torch.zeros((3, self.world_size), dtype=torch.float64, device=self.device)
        if first is not None:
            both[0, self.rank], both[1, self.rank], both[2, self.rank] = 1.0, *first
        torch.distributed.all_reduce(both)
        flags, steps, values = both.tolist()
        return [(r, int(steps[r]), values[r]) for r in range(self.world_size) if flags[r]]

    def synchronize(self) -> None:
        """Wait for this process's queued GPU work (a timed span ends with it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compiles(self, recipe: TrainCfg) -> bool:
        """Whether ``recipe.compile`` compiles here: ``auto`` on CUDA only."""
        return recipe.compile == "on" or (recipe.compile == "auto" and self.device.type == "cuda")

    def barrier(self) -> None:
        """Wait for every rank (NCCL's barrier on this process's own GPU)."""
        if self.world_size > 1:
            on_gpu = self.device.type == "cuda"
            torch.distributed.barrier(device_ids=[self.device.index] if on_gpu else None)


def gpu_index(local_rank: str | None, rank: int, device_count: int) -> int:
    """The GPU a process trains on: one per process, picked by the node-local rank (LOCAL_RANK,
    exported from submitit's environment; the global rank without it), modulo the GPUs this
    process sees, as the official utils.py does. A site that binds one GPU per task
    (``--gpu-bind``, CUDA_VISIBLE_DEVICES per task) shows each process one device, index 0:
    ``cuda:LOCAL_RANK`` there is "invalid device ordinal"."""
    return int(local_rank if local_rank not in (None, "") else rank) % max(device_count, 1)


def _portable(err: Exception) -> tuple[type, str, str | None]:
    """An error as the other ranks raise it: a DeitReproError as itself, anything else as a
    TrainingError naming rank 0's exception (its traceback is in rank 0's log)."""
    if isinstance(err, DeitReproError):
        return type(err), err.what, err.fix
    return (
        TrainingError,
        f"rank 0 failed: {type(err).__name__}: {err}",
        "see rank 0's log (task 0) for its traceback",
    )


# --------------------------------------------------------------------------------------------------
# Recipe components
# --------------------------------------------------------------------------------------------------


def base_criterion(recipe: TrainCfg) -> nn.Module:
    """Soft-target CE under Mixup/CutMix, label-smoothed CE otherwise (official main.py)."""
    from timm.loss import SoftTargetCrossEntropy

    if recipe.mixing:
        return SoftTargetCrossEntropy()
    # The same loss as the official timm LabelSmoothingCrossEntropy, (1-s)·NLL + s·mean(-log p),
    # in one fused kernel: a few % of a small model's step on CPU (bench/README.md).
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


def mixup_fn(recipe: TrainCfg, num_classes: int):
    """timm Mixup/CutMix with label smoothing folded into the targets; None when off."""
    if not recipe.mixing:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        prob=recipe.mixup_prob,
        switch_prob=recipe.mixup_switch_prob,
        mode="batch",
        label_smoothing=recipe.label_smoothing,
        num_classes=num_classes,
    )


def optimizer_and_scheduler(
    model: nn.Module, recipe: TrainCfg, steps_per_epoch: int, *, fused: bool = False
):
    """AdamW (timm, no weight decay on norms/biases) + cosine with warmup (timm).

    ``fused``: torch's one-kernel AdamW (CUDA): the multi-tensor update of a DeiT-S is a few %
    of its step on a GPU. On a CPU the default implementation stays, so CPU results do not move.

    Returns ``(optimizer, scheduler, num_epochs)``; ``num_epochs`` is create_scheduler_v2's second
    return value (schedule length incl. cooldown), honoured by :func:`fit`.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    lr = recipe.effective_lr()
    kwargs: dict[str, Any] = {"eps": recipe.opt_eps} if "adam" in recipe.opt else {}
    if fused and recipe.opt in ("adam", "adamw"):
        kwargs["fused"] = True
    opt = create_optimizer_v2(
        model,
        opt=recipe.opt,
        lr=lr,
        weight_decay=recipe.weight_decay,
        momentum=recipe.momentum,
        **kwargs,
    )
    sched, num_epochs = create_scheduler_v2(
        opt,
        sched=recipe.sched,
        num_epochs=recipe.epochs,
        min_lr=recipe.min_lr,
        warmup_lr=recipe.warmup_lr,
        warmup_epochs=recipe.warmup_epochs,
        step_on_epochs=True,
        updates_per_epoch=steps_per_epoch,
    )
    return opt, sched, num_epochs


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    heads_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    rt: Runtime,
) -> dict[str, Any]:
    """Logits of every head over a loader: ``{"labels": [N], head: [N, C] float32}``."""
    out: dict[str, list[torch.Tensor]] = {}
    labels = []
    for x, y in batches:
        x = x.to(rt.device, non_blocking=True)
        with rt.autocast():
            heads = heads_fn(x)
        for k, v in heads.items():
            out.setdefault(k, []).append(v.float().cpu())
        labels.append(y.cpu())
    res: dict[str, Any] = {k: torch.cat(v) for k, v in out.items()}
    res["labels"] = torch.cat(labels)
    return res


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Top-k accuracy in percent."""
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    # Integer counts, then one float64 division: 16.5, not float32's 16.500001.
    return 100.0 * int(hit.sum()) / len(labels)


def accuracy_table(pred: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{head: {"top1", "top5"}}`` for every head in a :func:`predict` result."""
    return {
        k: {
            "top1": topk_accuracy(v, pred["labels"], 1),
            "top5": topk_accuracy(v, pred["labels"], 5),
        }
        for k, v in pred.items()
        if k != "labels"
    }


@dataclass(frozen=True)
class ShardEval:
    """The sharded evaluation of a model: accuracies over the whole test split, and each head's
    top-1 class of every test image, in the split's order (the per-image paired tests of
    results/claims.md compare two models image by image)."""

    table: dict[str, dict[str, float]]  # {head: {"top1", "top5"}}
    classes: dict[str, torch.Tensor]  # {head: int64 [N]}, on the CPU


@torch.no_grad()
def shard_evaluate(
    heads_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    rt: Runtime,
) -> ShardEval:
    """Accuracy of every head over the whole test split when every rank passes its own shard
    (images ``rank::world``, :func:`deit_repro.core.datasets.eval_batches`): each rank counts
    its hits and the counts are summed over the ranks; each image's top-1 class is gathered
    into its place in the split.

    Every rank evaluates (official main.py, ``--dist-eval``), so a DDP job spends 1/world of the
    time on it and no rank idles in a barrier; summing counts instead of gathering padded
    predictions keeps the figure exact whatever the process count (the official sampler pads the
    last shard, facebookresearch/deit#24). On one process the table equals
    ``accuracy_table(predict(...))``. A collective: every rank must call it, with the same heads.
    """
    hits: dict[str, list[int]] = {}
    mine: dict[str, list[torch.Tensor]] = {}
    seen = 0
    for x, y in batches:
        x = x.to(rt.device, non_blocking=True)
        y = y.to(rt.device, non_blocking=True)
        with rt.autocast():
            heads = heads_fn(x)
        for name, logits in heads.items():
            logits = logits.float()
            k = min(5, logits.shape[1])
            top1 = logits.topk(1, dim=1).indices[:, 0]
            topk = (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1)
            count = hits.setdefault(name, [0, 0])
            count[0] += int((top1 == y).sum())
            count[1] += int(topk.sum())
            mine.setdefault(name, []).append(top1)
        seen += len(y)
    names = sorted(hits)
    totals = rt.sum_over_ranks([seen, *(c for name in names for c in hits[name])])
    n = int(totals[0])
    local = torch.stack([torch.cat(mine[name]) for name in names])
    classes = rt.gather_strided(local, n).cpu()
    # Integer counts, then one float64 division, as topk_accuracy.
    return ShardEval(
        table={
            name: {
                "top1": 100.0 * int(totals[1 + 2 * i]) / n,
                "top5": 100.0 * int(totals[2 + 2 * i]) / n,
            }
            for i, name in enumerate(names)
        },
        classes={name: classes[i] for i, name in enumerate(names)},
    )


def disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percentage of samples on which two classifiers' predicted classes differ (Table 4)."""
    return 100.0 * int((a != b).sum()) / len(a)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit`; a torn or foreign file is a CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated zip, a pickle from elsewhere, ...
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__})",
            "delete it to restart the run from scratch",
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a deit-repro training checkpoint",
            "delete it, or pass another --run-dir",
        )
    return ckpt


def _finished(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint is its run's last epoch; unknown counts as unfinished.

    Checkpoints written before ``num_epochs`` was recorded have their cosine schedule's length:
    one cycle of ``t_initial`` epochs (:func:`optimizer_and_scheduler` sets no cooldown).
    """
    total = ckpt.get("num_epochs")
    if total is None:
        sched = ckpt.get("scheduler") or {}
        if sched.get("cycle_limit") == 1 and isinstance(sched.get("t_initial"), int):
            total = sched["t_initial"]
    return total is not None and ckpt["epoch"] + 1 >= total


def _aside(path: Path, fingerprint: str) -> Path:
    """``<name>.replaced-<fingerprint>.pth`` beside ``path``, numbered if that exists."""
    stem, suffix = path.name.rsplit(".", 1) if "." in path.name else (path.name, "")
    suffix = f".{suffix}" if suffix else ""
    candidate = path.with_name(f"{stem}.replaced-{fingerprint}{suffix}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{stem}.replaced-{fingerprint}-{n}{suffix}")
        n += 1
    return candidate


def _replace_checkpoint(
    path: Path, ckpt: dict[str, Any], fingerprint: str, *, restart: bool, rt: Runtime
) -> None:
    """Deal with a checkpoint of another fingerprint before a run starts over.

    An unfinished one may be days of a run whose params or code changed between two requeues:
    it is kept untouched and the run stops, unless ``restart``. Otherwise it is moved aside, not
    deleted, so nothing trained is lost.
    """
    old = ckpt["fingerprint"]
    if not restart and not _finished(ckpt):
        raise CheckpointError(
            f"checkpoint {path} (epoch {ckpt['epoch'] + 1}, fingerprint {old}) is of another "
            f"configuration than this run (fingerprint {fingerprint}: params, data or "
            "computing code changed) and was left untouched",
            "resume it with the params and code that wrote it, or delete it or move it away "
            "to start over, or pass --restart (it is then kept as "
            f"{_aside(path, old).name})",
        )
    # Every rank has read it (the same file) before the main rank moves it.
    rt.barrier()
    if rt.is_main:
        aside = _aside(path, old)
        os.replace(path, aside)
        _logger.warning(
            "checkpoint %s (epoch %d, fingerprint %s) is of another configuration than this "
            "run (%s): moved to %s, starting over",
            path,
            ckpt["epoch"] + 1,
            old,
            fingerprint,
            aside,
        )


def _hms(seconds: float) -> str:
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _log_interval(steps: int) -> int:
    """About 10 progress lines an epoch, at least one every 50 steps."""
    return max(1, min(50, math.ceil(steps / 10)))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What :func:`fit` returns: final-epoch metrics and the per-epoch history."""

    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    seconds: float = 0.0


def _tqdm(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off without a terminal (CI logs stay readable).
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=False,
        disable=None if enabled else True,
        dynamic_ncols=True,
    )


def fit(
    *,
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor],
    train_batches,
    recipe: TrainCfg,
    num_classes: int,
    seed: int,
    rt: Runtime,
    checkpoint_path: Path | None,
    fingerprint: str,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    on_epoch_end: Callable[[list[dict[str, Any]]], None] | None = None,
    desc: str = "train",
    restart: bool = False,
) -> FitResult:
    """Train ``model`` for ``recipe.epochs`` epochs, checkpointing and resuming.

    Args:
        model: the model on ``rt.device`` (wrapped in DDP when ``rt.world_size > 1``).
        loss_fn: ``loss_fn(inputs, outputs, targets) -> scalar``; e.g. a DistillationLoss.
        train_batches: yields ``(x, y)`` per step and has ``set_epoch`` and ``__len__``.
        recipe: the training recipe.
        num_classes: for Mixup's soft targets.
        seed: the run seed; with the epoch it seeds each epoch's randomness.
        rt: the runtime (device, precision, rank).
        checkpoint_path: where the complete checkpoint lives; ``None`` disables checkpointing.
        fingerprint: what the run is (params hash, variant, computing code). A checkpoint with
            another fingerprint is never resumed from. An unfinished one (a run interrupted,
            then requeued after its params or code changed) stops the run with a
            CheckpointError and is left untouched, unless ``restart``; a finished one (its
            outputs were written, e.g. ``dvc exp run -S`` after a complete run) is moved aside
            to ``<name>.replaced-<its fingerprint>.pth`` and the run starts over.
        evaluate: called on every rank with the raw model every ``recipe.eval_every`` epochs and
            after the last epoch (a collective: each rank evaluates its shard); returns metrics
            merged into the epoch's history row.
        on_epoch_end: called with the history after each epoch (e.g. to write it to a file).
        desc: progress-bar label.
        restart: replace a checkpoint of another fingerprint, unfinished or not: it is moved
            aside (never deleted) and the run starts over. A checkpoint of this fingerprint is
            resumed from all the same, so a requeued job that keeps the flag resumes its own.

    The host reads the loss every ``recipe.check_every`` steps (default: about 10 times an
    epoch, at least every 50 steps) and at the end of each epoch, never in between: a GPU step
    is queued while the previous one runs. The loss is summed on the device, and a non-finite
    loss is recorded there with its step; the next read stops the run, naming that step, before
    any checkpoint of the diverged weights is written (the last good one is left as it was).
    Without a terminal (a SLURM log) the progress bar is silent and the main rank logs a line at
    each read instead, with throughput, loss and the epoch's and the run's ETA.

    With ``recipe.compile`` in effect (:meth:`Runtime.compiles`) the training forward of the
    student and the teacher's forward are ``torch.compile``'d; the checkpoints and ``evaluate``
    get the uncompiled module, so state dicts have no ``_orig_mod.`` prefix.
    """
    from timm.utils import ModelEmaV3

    t0 = time.perf_counter()
    raw = _unwrap(model)
    steps = len(train_batches)
    if steps == 0:
        raise TrainingError(
            f"batch_size={recipe.batch_size} is larger than the training split "
            f"(one epoch has no full batch)",
            "lower batch_size in params.yaml",
        )
    optimizer, scheduler, num_epochs = optimizer_and_scheduler(
        raw, recipe, steps, fused=rt.device.type == "cuda"
    )
    # fp16 needs loss scaling; under bf16 or fp32 the disabled scaler passes every call through
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    ema = ModelEmaV3(raw, decay=recipe.ema_decay) if recipe.ema else None
    mixup = mixup_fn(recipe, num_classes)
    state = _TrainState(raw, optimizer, scheduler, scaler, ema)
    result = FitResult()
    start = 0
    if checkpoint_path is not None and checkpoint_path.exists():
        start, result.history = _resume(checkpoint_path, fingerprint, state, restart=restart, rt=rt)
        result.resumed_from_epoch = start - 1 if start else None

    last_good = checkpoint_path if start > 0 else None
    forward, loss_fn = _compiled(model, loss_fn, recipe, rt)
    check_every = recipe.check_every or _log_interval(steps)
    epoch_seconds: list[float] = []  # whole epochs of this process (training, eval, checkpoint)
    for epoch in range(start, num_epochs):
        # Every random draw of this epoch derives from (seed, epoch, rank): resuming is exact.
        seed_everything(epoch_seed(seed, epoch, rt.rank))
        train_batches.set_epoch(epoch)
        model.train()
        lr = optimizer.param_groups[0]["lr"]  # this epoch's: the scheduler steps after it
        t_epoch = time.perf_counter()
        progress = _Progress(desc, epoch, num_epochs, steps, rt, epoch_seconds, t_epoch)
        watch = _LossWatch(rt.device)
        n_seen = 0
        for step, (x, y) in enumerate(progress.wrap(train_batches)):
            x = x.to(rt.device, non_blocking=True)
            y = y.to(rt.device, non_blocking=True)
            targets = y
            if mixup is not None:
                x, targets = mixup(x, y)
            loss = _train_step(forward, loss_fn, x, targets, state, recipe.clip_grad, rt)
            watch.add(loss, x.shape[0], step)
            n_seen += x.shape[0]
            if (step + 1) % check_every == 0 or step + 1 == steps:
                loss_sum = watch.read(rt, epoch, step, last_good, raw)
                progress.line(step, n_seen, loss_sum)
        rt.synchronize()  # the epoch's time is the GPU's, not the time it took to queue it
        if rt.world_size > 1:  # the loss over the global batch, as one process would report it
            loss_sum, seen = rt.sum_over_ranks([loss_sum, n_seen])
            n_seen = int(seen)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / max(n_seen, 1),
            "train_images_per_s": n_seen / (time.perf_counter() - t_epoch),
        }
        last = epoch == num_epochs - 1
        # Every rank evaluates its shard (``evaluate`` is a collective, see shard_evaluate).
        if evaluate is not None and (
            last or (recipe.eval_every and (epoch + 1) % recipe.eval_every == 0)
        ):
            rt.same_buffers(raw)
            row.update(evaluate(raw))
            if ema is not None:
                rt.same_buffers(ema.module)
                row.update({f"ema_{k}": v for k, v in evaluate(ema.module).items()})
        result.history.append(row)
        _logger.info(
            "%s epoch %d/%d %s",
            desc,
            epoch + 1,
            num_epochs,
            {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
        )

        # As the official main.py (``lr_scheduler.step(epoch)`` after each epoch): epoch e > 0
        # trains at the schedule's value for e - 1, epoch 0 at its start (warmup_lr, or the base
        # lr without warmup), so the warmup's first value is used twice and the last epoch
        # trains at the schedule's value for the one before it.
        scheduler.step(epoch)

        def end_epoch() -> None:
            if checkpoint_path is not None:
                _save_checkpoint(
                    checkpoint_path, fingerprint, state, epoch, num_epochs, result.history
                )
            if on_epoch_end is not None:
                on_epoch_end(result.history)

        # Rank 0 writes the checkpoint and the live log; the other ranks wait for it, and a
        # failure there (a full disk) stops every rank with rank 0's message.
        rt.main_first(end_epoch)
        last_good = checkpoint_path or last_good
        epoch_seconds.append(time.perf_counter() - t_epoch)
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class _TrainState:
    """What a checkpoint holds besides the history: the model (unwrapped from DDP), the
    optimizer, the LR scheduler, the fp16 loss scaler and the EMA weights."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: nn.Module | None


def _resume(
    path: Path, fingerprint: str, state: _TrainState, *, restart: bool, rt: Runtime
) -> tuple[int, list[dict[str, Any]]]:
    """The epoch to start from and the history so far: the checkpoint's, loaded into ``state``,
    when its fingerprint is this run's; else (0, []) once the checkpoint of another
    configuration is dealt with (:func:`_replace_checkpoint`)."""
    ckpt = load_checkpoint(path)
    if ckpt["fingerprint"] != fingerprint:
        _replace_checkpoint(path, ckpt, fingerprint, restart=restart, rt=rt)
        return 0, []
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None and ckpt.get("ema") is not None:
        state.ema.load_state_dict(ckpt["ema"])
    _logger.info("resumed %s from epoch %d of %d", path, ckpt["epoch"] + 1, ckpt["num_epochs"])
    return ckpt["epoch"] + 1, list(ckpt["history"])


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    state: _TrainState,
    epoch: int,
    num_epochs: int,
    history: list[dict[str, Any]],
) -> None:
    """The complete checkpoint after ``epoch``, written atomically (a crash keeps the last
    complete one). No RNG state: every epoch reseeds from (seed, epoch, rank)."""
    atomic.torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "epoch": epoch,
            "num_epochs": num_epochs,
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),
            "ema": state.ema.state_dict() if state.ema is not None else None,
            "history": history,
        },
        path,
    )


def _compiled(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor],
    recipe: TrainCfg,
    rt: Runtime,
) -> tuple[Callable[[torch.Tensor], Any], Callable[[torch.Tensor, Any, torch.Tensor], Any]]:
    """The training forward and the loss, ``torch.compile``'d where the recipe says so. The
    DDP wrapper itself is compiled (torch's DDPOptimizer splits the graph at its gradient
    buckets, so communication still overlaps the backward); a distillation loss gets its
    teacher compiled. ``model`` itself is left as it is: what checkpoints and evaluation see."""
    if not rt.compiles(recipe):
        return model, loss_fn
    from deit_repro.core.losses import DistillationLoss

    if isinstance(loss_fn, DistillationLoss) and loss_fn.teacher is not None:
        loss_fn = loss_fn.with_teacher(torch.compile(loss_fn.teacher))
    return torch.compile(model), loss_fn


def _train_step(
    forward: Callable[[torch.Tensor], Any],
    loss_fn: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    state: _TrainState,
    clip_grad: float | None,
    rt: Runtime,
) -> torch.Tensor:
    """One optimisation step, queued without a host sync; the loss, detached, on the device."""
    with rt.autocast():
        outputs = forward(x)
        loss = loss_fn(x, outputs, targets)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if clip_grad is not None:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(state.model)
    return loss.detach()


class _LossWatch:
    """An epoch's loss, kept on the device: the sum over its images (float64, as the host's sum
    of ``loss.item() * batch`` would be: the same bits on a CPU) and the first step whose loss
    was not finite, with that loss. The host reads it every ``check_every`` steps."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, n: int, step: int) -> None:
        value = loss.to(torch.float64)
        self.sum += value * n
        new = torch.logical_and(~torch.isfinite(value), self.first_bad < 0)
        self.first_bad = torch.where(new, float(step), self.first_bad)
        self.bad_value = torch.where(new, value, self.bad_value)

    def read(
        self, rt: Runtime, epoch: int, step: int, last_good: Path | None, model: nn.Module
    ) -> float:
        """The loss sum so far (one sync); a TrainingError when any rank's loss went non-finite,
        naming its first such step, or when the weights did (a finite loss whose gradients
        overflowed: under bf16 no loss scaler skips that step), naming the checkpoint left
        intact (``last_good``). Every epoch ends with a read, so diverged weights are never
        checkpointed."""
        # one norm per weight tensor, NaN or inf where any element is: one pass over the weights
        norms = torch._foreach_norm([q.detach() for q in model.parameters()])
        weights = torch.stack(norms).sum().to(self.sum.device, torch.float64)
        values = torch.stack([self.sum, self.first_bad, self.bad_value, weights]).tolist()
        total, first, value, norm = values
        bad = rt.nonfinite((int(first), value) if first >= 0 else None)
        kept = (
            f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
        )
        if bad:
            what = (
                f"{bad[0][2]}"
                if rt.world_size == 1
                else ", ".join(f"{v} on rank {r}" for r, _, v in bad)
            )
            raise TrainingError(
                f"loss is {what} at epoch {epoch + 1} step {min(s for _, s, _ in bad) + 1} "
                f"({kept}; stopped at step {step + 1})",
                "lower the learning rate (lr_per_512) or enable clip_grad; "
                "facebookresearch/deit#29",
            )
        if not math.isfinite(norm):  # the same on every rank: DDP keeps the weights equal
            raise TrainingError(
                f"the weights are not finite at epoch {epoch + 1} step {step + 1}, though the "
                f"loss is ({kept})",
                "enable clip_grad or lower the learning rate (lr_per_512); "
                "facebookresearch/deit#29",
            )
        return total


class _Progress:
    """One epoch's progress: a tqdm bar on a terminal; without one (a SLURM log) tqdm is silent
    and the main rank logs a line at each of the host's reads of the loss instead, with
    throughput, loss and the epoch's and the run's ETA."""

    def __init__(
        self,
        desc: str,
        epoch: int,
        num_epochs: int,
        steps: int,
        rt: Runtime,
        epoch_seconds: list[float],
        t_epoch: float,
    ):
        self.desc, self.epoch, self.num_epochs, self.steps = desc, epoch, num_epochs, steps
        self.rt, self.epoch_seconds, self.t_epoch = rt, epoch_seconds, t_epoch
        self.mark = (t_epoch, 0, 0.0)  # time, images and loss sum at the last progress line
        self.logs = False

    def wrap(self, batches):
        bar = _tqdm(
            batches, self.steps, f"{self.desc} {self.epoch + 1}/{self.num_epochs}", self.rt.is_main
        )
        self.logs = self.rt.is_main and bool(bar.disable)
        return bar

    def line(self, step: int, n_seen: int, loss_sum: float) -> None:
        if not self.logs:
            return
        now = time.perf_counter()
        per_epoch = (now - self.t_epoch) / (step + 1) * self.steps
        eta_epoch = per_epoch - (now - self.t_epoch)
        mean_epoch = statistics.fmean(self.epoch_seconds) if self.epoch_seconds else per_epoch
        later = mean_epoch * (self.num_epochs - self.epoch - 1)
        t, n, loss = self.mark
        _logger.info(
            "%s epoch %d/%d step %d/%d: %.1f images/s, loss %.4f, ETA epoch %s, run %s",
            self.desc,
            self.epoch + 1,
            self.num_epochs,
            step + 1,
            self.steps,
            # every rank trains the same per-rank batch: the job's rate is world x ours
            (n_seen - n) * self.rt.world_size / max(now - t, 1e-9),
            (loss_sum - loss) / max(n_seen - n, 1),
            _hms(eta_epoch),
            _hms(eta_epoch + later),
        )
        self.mark = (now, n_seen, loss_sum)
