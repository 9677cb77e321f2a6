"""Training throughput of the engine against a plain PyTorch loop, on this CPU.

Prints training images/s of a small DeiT student (default: 28 px grayscale Fashion-MNIST, patch 7,
dim 96, depth 6, 3 heads, no distillation token, batch 128, 2 threads) measured two ways,
interleaved in one process so that both see the same machine load:

* **A, engine**: ``deit_repro.core.engine.fit`` for one epoch of ``--steps`` batches from
  ``deit_repro.core.datasets.train_batches`` (tensor pipeline), loss
  ``DistillationLoss(base_criterion(recipe), None, distill='none')``, no Mixup, no EMA, no
  evaluation, no checkpoint. Timed: the whole ``fit`` call minus its one-off setup
  (optimizer/scheduler construction, seeding: everything before the first batch is requested, also
  reported), so the per-step framework overhead is included.
* **B, reference**: the obvious loop over the same model built the same way, ``torch.optim.AdamW``
  (same lr and weight decay), ``nn.CrossEntropyLoss(label_smoothing=0.1)``, pre-made random index
  batches of the same in-memory uint8 tensor passed through the same data-side callable (the
  project's ``TensorAugment``, or a plain float+normalise with ``--no-augment``). Timed: the loop.

Rounds alternate A B, B A, ... after a warm-up of both. Another busy process on the 2 cores slows
two-thread torch several-fold: look at the per-round figures and the median paired ratio, or use
``--threads 1``, whose images per CPU-second (also printed) hardly depend on other processes. Also
reported: the CPU's fp32 matmul peak (best of 2048x2048 ``torch.mm`` samples taken between the
rounds at the same thread count) and A's share of it, from an analytic ViT FLOP count
(``torch.utils.flop_counter`` misses CPU SDPA attention).

Run from the repository root (about a minute on the 2-core dev machine)::

    .venv/bin/python bench/train_throughput.py
    .venv/bin/python bench/train_throughput.py --rounds 10 --embed-dim 128 --json results/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from deit_repro.core import engine
from deit_repro.core.batches import norm_stats
from deit_repro.config import AugCfg, ModelCfg, TrainCfg
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.models import create_student
from deit_repro.core.datasets import open_dataset, train_batches
from deit_repro.core.model_dirs import student_kwargs


# --------------------------------------------------------------------------------------------------
# Data side shared by A and B
# --------------------------------------------------------------------------------------------------


class Normalise:
    """``--no-augment``: uint8 -> float, resize if needed, normalise (``TensorAugment``'s call)."""

    def __init__(self, img_size: int, in_chans: int):
        mean, std = norm_stats(in_chans)
        self.img_size = img_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xf = x.float().div_(255.0)
        if xf.shape[-1] != self.img_size:
            xf = F.interpolate(
                xf, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
            )
        return xf.sub_(self.mean).div_(self.std)


class Steps:
    """``steps`` batches of a ``TrainBatches`` as one epoch for ``fit``, timing and counting them.

    Cycles through the underlying epochs when ``steps`` exceeds one of them. ``t_start`` is when
    ``fit`` first asks for a batch (the end of its setup), ``images`` what it actually consumed.
    """

    def __init__(self, inner, steps: int):
        self.inner, self.steps = inner, steps
        self.t_start: float | None = None
        self.images = 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.t_start = time.perf_counter()
        self.images = 0
        first_epoch, k, done = self.inner.epoch, 0, 0
        while done < self.steps:
            self.inner.set_epoch(first_epoch + k)
            for x, y in self.inner:
                self.images += x.shape[0]
                yield x, y
                done += 1
                if done == self.steps:
                    break
            k += 1
        self.inner.set_epoch(first_epoch)


# --------------------------------------------------------------------------------------------------
# A and B
# --------------------------------------------------------------------------------------------------


def run_engine(
    model: nn.Module, batches: Steps, recipe: TrainCfg, num_classes: int, seed: int
) -> dict[str, float]:
    """(A) one ``fit`` epoch of ``batches.steps`` steps; images/s excluding the one-off setup."""
    loss_fn = DistillationLoss(
        engine.base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0
    )
    t0, c0 = time.perf_counter(), time.process_time()
    engine.fit(
        model=model,
        loss_fn=loss_fn,
        train_batches=batches,
        recipe=recipe,
        num_classes=num_classes,
        seed=seed,
        rt=engine.Runtime(torch.device("cpu")),
        checkpoint_path=None,
        fingerprint="bench",
        evaluate=None,
        desc="bench",
    )
    t1, c1 = time.perf_counter(), time.process_time()
    return {
        "images_per_s": batches.images / (t1 - batches.t_start),
        "setup_s": batches.t_start - t0,
        "images_per_s_incl_setup": batches.images / (t1 - t0),
        "images_per_cpu_s_incl_setup": batches.images / (c1 - c0),
    }


def run_reference(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    index_batches: list[torch.Tensor],
    data_fn: Callable,
    g: torch.Generator,
) -> dict[str, float]:
    """(B) the plain loop over pre-made index batches."""
    model.train()
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in index_batches:
        x = data_fn(images[idx], g)
        y = labels[idx]
        loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    t1, c1 = time.perf_counter(), time.process_time()
    return {"images_per_s": n / (t1 - t0), "images_per_cpu_s": n / (c1 - c0)}


# --------------------------------------------------------------------------------------------------
# Peak and FLOPs
# --------------------------------------------------------------------------------------------------


def matmul_rates(a: torch.Tensor, b: torch.Tensor, repeats: int) -> list[float]:
    """GFLOP/s of ``repeats`` fp32 ``torch.mm(a, b)`` of square n×n matrices (2·n³ FLOPs each)."""
    n = a.shape[0]
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


FLOPS_FORMULA = (
    "train ≈ 3 × forward; forward = L·((8+4r)·T·D² + 4·T²·D) + 2·T_p·(P²·C)·D + 2·D·K "
    "(r = mlp ratio, i.e. 24·T·D² at r=4; T = T_p patches + prefix tokens)"
)


def vit_train_flops(
    *,
    img_size: int,
    patch: int,
    in_chans: int,
    dim: int,
    depth: int,
    mlp_ratio: float,
    num_classes: int,
    prefix: int,
) -> float:
    """Training FLOPs per image of a ViT, analytically (a multiply-add is 2; see FLOPS_FORMULA)."""
    t_p = (img_size // patch) ** 2
    t = t_p + prefix
    blocks = depth * ((8 + 4 * mlp_ratio) * t * dim**2 + 4 * t**2 * dim)
    embed = 2 * t_p * (patch**2 * in_chans) * dim
    head = 2 * dim * num_classes
    return 3.0 * (blocks + embed + head)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        help="an already prepared dataset (default: prepare "
        "2000 Fashion-MNIST training images into a temp dir)",
    )
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=15, help="training steps per round and method")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per method")
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TensorAugment (crop/flip/erase) on the data side of both A and B",
    )
    p.add_argument("--lr-per-512", type=float, default=8e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)

    with tempfile.TemporaryDirectory(prefix="deit-bench-") as tmp:
        data = args.data
        if data is None:
            from deit_repro.config import DatasetCfg
            from deit_repro.stages.prepare import run_prepare

            data = Path(tmp) / "fashion_mnist"
            cfg = DatasetCfg(source="fashion_mnist", train_per_class=200, test_per_class=20)
            run_prepare(cfg, out=data)
        ds = open_dataset(data)

    aug = AugCfg(
        pipeline="tensor", scale=(0.35, 1.0), rand_augment=None, color_jitter=0.0, reprob=0.25
    )
    # The smoke/small profiles' recipe, one epoch, no warm-up, Mixup/CutMix/RA/EMA/eval off.
    recipe = TrainCfg(
        epochs=1,
        batch_size=args.batch_size,
        lr_per_512=args.lr_per_512,
        warmup_epochs=0,
        min_lr=1e-5,
        drop_path=0.1,
        label_smoothing=0.1,
        mixup=0.0,
        cutmix=0.0,
        repeated_aug=1,
        ema=False,
        eval_every=0,
        aug=aug,
    )
    mcfg = ModelCfg(
        img_size=args.img_size,
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
        mlp_ratio=args.mlp_ratio,
    )
    kwargs = student_kwargs(
        mcfg,
        distilled=False,
        num_classes=ds.num_classes,
        in_chans=ds.in_chans,
        drop_path=recipe.drop_path,
    )

    def build() -> nn.Module:
        torch.manual_seed(args.seed)
        return create_student(**kwargs)

    # (A): the project's batches; --no-augment swaps only the per-batch callable.
    inner = train_batches(ds, recipe, img_size=args.img_size, seed=args.seed)
    if not args.augment:
        inner.augment = Normalise(args.img_size, ds.in_chans)
    data_fn = inner.augment
    model_a = build()

    # (B): same model, same tensor, same data-side callable, pre-made random index batches.
    model_b = build()
    lr = recipe.effective_lr()
    opt_b = torch.optim.AdamW(
        model_b.parameters(), lr=lr, weight_decay=recipe.weight_decay, eps=recipe.opt_eps
    )
    crit_b = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    images, labels = ds.train.images, ds.train.labels
    gi = torch.Generator().manual_seed(args.seed)
    index_batches = [
        torch.randint(len(labels), (args.batch_size,), generator=gi) for _ in range(args.steps)
    ]
    g_aug = torch.Generator().manual_seed(args.seed + 1)

    def do_a(steps: int) -> dict[str, float]:
        return run_engine(model_a, Steps(inner, steps), recipe, ds.num_classes, args.seed)

    def do_b(steps: int) -> dict[str, float]:
        return run_reference(
            model_b,
            opt_b,
            crit_b,
            images,
            labels,
            (index_batches * math.ceil(steps / args.steps))[:steps],
            data_fn,
            g_aug,
        )

    t_bench = time.perf_counter()
    # The peak is sampled before and between the rounds and the best kept: a busy moment on the
    # machine lowers a sample, never raises it.
    mm_a, mm_b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = matmul_rates(mm_a, mm_b, 8)[2:]  # 2 warm-up
    do_a(args.warmup)
    do_b(args.warmup)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        # A B, B A, ...: a drift in machine load hits both methods alike.
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        row: dict[str, Any] = {}
        for m in order:
            row[m] = do_a(args.steps) if m == "A" else do_b(args.steps)
        rounds.append(row)
        mm += matmul_rates(mm_a, mm_b, 2)
    peak = {"best_gflops": max(mm), "median_gflops": statistics.median(mm), "samples": len(mm)}
    bench_s = time.perf_counter() - t_bench
    info["loadavg_end"] = list(os.getloadavg())

    a = [r["A"]["images_per_s"] for r in rounds]
    a_incl = [r["A"]["images_per_s_incl_setup"] for r in rounds]
    setup = [r["A"]["setup_s"] for r in rounds]
    b = [r["B"]["images_per_s"] for r in rounds]
    paired = [x / y for x, y in zip(a, b)]
    # CPU time of the process (all threads): with one thread nearly insensitive to other processes
    # taking the cores; with two, the threads' spin-waiting under contention inflates it.
    a_cpu = [r["A"]["images_per_cpu_s_incl_setup"] for r in rounds]
    b_cpu = [r["B"]["images_per_cpu_s"] for r in rounds]
    flops = vit_train_flops(
        img_size=args.img_size,
        patch=args.patch_size,
        in_chans=ds.in_chans,
        dim=args.embed_dim,
        depth=args.depth,
        mlp_ratio=args.mlp_ratio,
        num_classes=ds.num_classes,
        prefix=1,
    )
    (am, asd), (bm, bsd), (pm, psd) = mean_std(a), mean_std(b), mean_std(paired)
    (aim, aisd), (sm, _) = mean_std(a_incl), mean_std(setup)
    (acm, acsd), (bcm, bcsd) = mean_std(a_cpu), mean_std(b_cpu)
    pct = 100 * am * flops / 1e9 / peak["best_gflops"]
    params_m = sum(p.numel() for p in model_a.parameters()) / 1e6

    print(
        f"machine  {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}, "
        f"{args.threads} threads, load avg {info['loadavg_start'][0]:.2f} -> "
        f"{info['loadavg_end'][0]:.2f}"
    )
    print(
        f"model    ViT p{args.patch_size} d{args.embed_dim} L{args.depth} h{args.num_heads} "
        f"r{args.mlp_ratio:g}, {args.img_size} px x {ds.in_chans} ch, {params_m:.2f} M params, "
        f"drop_path {recipe.drop_path}, batch {args.batch_size}, "
        f"augment {'on' if args.augment else 'off'}, {len(labels)} train images"
    )
    print(
        f"rounds   {args.rounds} x {args.steps} steps per method (A B, B A, ... after "
        f"{args.warmup} warm-up steps each); {bench_s:.1f} s"
    )
    print()
    print(f"{'':28s}{'images/s':>18s}")
    print(f"{'A engine.fit (excl. setup)':28s}{am:10.0f} ± {asd:5.0f}")
    print(
        f"{'A engine.fit (incl. setup)':28s}{aim:10.0f} ± {aisd:5.0f}   (setup {1e3 * sm:.1f} ms "
        f"per fit call)"
    )
    print(f"{'B plain loop':28s}{bm:10.0f} ± {bsd:5.0f}")
    print(
        f"{'A/B':28s}{am / bm:10.3f}           (paired per round: {pm:.3f} ± {psd:.3f}, "
        f"median {statistics.median(paired):.3f})"
    )
    print(
        f"{'per CPU-second: A (incl. setup), B, A/B':40s} {acm:.0f} ± {acsd:.0f}, "
        f"{bcm:.0f} ± {bcsd:.0f}, {acm / bcm:.3f}"
    )
    print(
        "per round (A, B images/s): "
        + "; ".join(f"{r['A']['images_per_s']:.0f}, {r['B']['images_per_s']:.0f}" for r in rounds)
    )
    print()
    print(
        f"fp32 matmul peak  {peak['best_gflops']:.0f} GFLOP/s best, {peak['median_gflops']:.0f} "
        f"median of {len(mm)} (2048x2048 torch.mm, 2·n³, {args.threads} threads, sampled "
        f"between rounds)"
    )
    print(f"training FLOPs    {flops / 1e6:.1f} MFLOP/image: {FLOPS_FORMULA}")
    print(f"A achieves        {am * flops / 1e9:.1f} GFLOP/s = {pct:.1f}% of peak")

    if args.json is not None:
        out = {
            "machine": info,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "params_m": params_m,
            "train_flops_per_image": flops,
            "flops_formula": FLOPS_FORMULA,
            "matmul_peak": peak,
            "pct_of_peak_A": pct,
            "A_images_per_s": {"mean": am, "std": asd},
            "A_images_per_s_incl_setup": {"mean": aim, "std": aisd},
            "A_setup_s_mean": sm,
            "B_images_per_s": {"mean": bm, "std": bsd},
            "ratio_A_over_B": am / bm,
            "ratio_paired": {"mean": pm, "std": psd, "median": statistics.median(paired)},
            "A_images_per_cpu_s_incl_setup": {"mean": acm, "std": acsd},
            "B_images_per_cpu_s": {"mean": bcm, "std": bcsd},
            "rounds": rounds,
            "bench_seconds": bench_s,
            "timed": {
                "A": "engine.fit wall time from the first batch request to return "
                "(setup before it excluded and reported separately)",
                "B": "the plain loop over pre-made index batches",
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
