"""Training throughput of the default profile's own student and teacher, and the data loader's cost
on this CPU, with the profile's batch size and thread count (latest figures in bench/README.md).

For each model (``student.model`` and ``teacher.model`` of ``--params``, built exactly as the DAG
builds them), in one process, interleaved round by round (A B, B A, ...) so both see the same
machine load:

* **A, engine**: one ``deit_repro.core.engine.fit`` epoch of ``--steps`` batches from the project's
  real loader (``runs.train_batches``: sampler, uint8 -> batched crop/flip/erase), the profile's
  recipe (drop-path, label smoothing, AdamW from timm, cosine schedule); Mixup, EMA, evaluation
  and checkpoints off.
* **B, plain loop**: the obvious loop: the same timm model, ``torch.optim.AdamW``,
  ``nn.CrossEntropyLoss(label_smoothing)``, the same augmentation callable on pre-drawn index
  batches of the same in-memory uint8 tensor.
* **C, data already in memory**: A's engine on one batch prepared once and yielded again and again.
  A / C is the data loader's cost: the issue asks A >= 95 % of C.

FLOPs per training image are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
forward + backward (timm's fused attention switched to its math path for the count only: the
counter does not see inside CPU SDPA). The peak is the best fp32 2048² ``torch.mm`` rate at the same
thread count, sampled between the rounds.

    .venv/bin/python bench/profile_training.py                   # params.yaml, data/fashion_mnist
    .venv/bin/python bench/profile_training.py --json bench/results/profile_training.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the shared A/B machinery of the first benchmark)

from deit_repro.config import load_params  # noqa: E402
from deit_repro.core.models import create_student, create_teacher  # noqa: E402
from deit_repro.core.datasets import open_dataset, train_batches  # noqa: E402
from deit_repro.core.model_dirs import student_kwargs, teacher_kwargs  # noqa: E402


class SameBatch:
    """C: one batch, prepared once, as an epoch of ``steps`` batches (no loader work at all)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int):
        self.x, self.y, self.steps = x, y, steps
        self.t_start: float | None = None
        self.images = 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.t_start = time.perf_counter()
        self.images = 0
        for _ in range(self.steps):
            self.images += self.x.shape[0]
            yield self.x, self.y


def train_flops_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """torch's FLOP counter over one forward + backward, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in fused:
        m.fused_attn = False  # the math path: same FLOPs, visible to the counter
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            nn.functional.cross_entropy(out, y).backward()
    finally:
        for m in fused:
            m.fused_attn = True
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def bench_model(name: str, model_fn, recipe, ds, img_size: int, args, mm) -> dict[str, Any]:
    recipe = type(recipe)(
        **{
            **{f: getattr(recipe, f) for f in recipe.__dataclass_fields__},
            "epochs": 1,
            "warmup_epochs": 0,
            "mixup": 0.0,
            "cutmix": 0.0,
            "ema": False,
            "eval_every": 0,
        }
    )
    inner = train_batches(ds, recipe, img_size=img_size, seed=args.seed)
    model_a, model_b, model_c = model_fn(), model_fn(), model_fn()
    opt_b = torch.optim.AdamW(
        model_b.parameters(),
        lr=recipe.effective_lr(),
        weight_decay=recipe.weight_decay,
        eps=recipe.opt_eps,
    )
    crit_b = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    gi = torch.Generator().manual_seed(args.seed)
    index_batches = [
        torch.randint(len(ds.train.labels), (recipe.batch_size,), generator=gi)
        for _ in range(args.steps)
    ]
    g_aug = torch.Generator().manual_seed(args.seed + 1)
    x0, y0 = next(iter(inner))
    flops = train_flops_per_image(model_fn(), x0, y0)

    def do(method: str, steps: int) -> dict[str, float]:
        if method == "A":
            return tt.run_engine(model_a, tt.Steps(inner, steps), recipe, ds.num_classes, args.seed)
        if method == "C":
            return tt.run_engine(
                model_c, SameBatch(x0, y0, steps), recipe, ds.num_classes, args.seed
            )
        batches = (index_batches * math.ceil(steps / args.steps))[:steps]
        return tt.run_reference(
            model_b, opt_b, crit_b, ds.train.images, ds.train.labels, batches, inner.augment, g_aug
        )

    for m in "ABC":
        do(m, args.warmup)
    rounds = []
    for r in range(args.rounds):
        order = "ABC" if r % 2 == 0 else "CBA"
        rounds.append({m: do(m, args.steps)["images_per_s"] for m in order})
        mm += tt.matmul_rates(*args.mm, 2)
    a, b, c = ([row[m] for row in rounds] for m in "ABC")
    peak = max(mm)
    # The loader alone (index, gather, augmentation), per batch, against A's time per batch: the
    # direct measure of what A/C estimates (C also reuses one cache-hot batch).
    loader_ms = []
    for _ in range(args.rounds):
        batches = iter(inner)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        loader_ms.append((time.perf_counter() - t0) / args.steps * 1e3)
    step_ms = 1e3 * recipe.batch_size / statistics.fmean(a)
    res = {
        "model": name,
        "params_m": sum(p.numel() for p in model_a.parameters()) / 1e6,
        "batch_size": recipe.batch_size,
        "img_size": img_size,
        "train_flops_per_image": flops,
        "A_engine_images_per_s": statistics.fmean(a),
        "A_std": statistics.stdev(a),
        "B_plain_loop_images_per_s": statistics.fmean(b),
        "B_std": statistics.stdev(b),
        "C_batch_in_memory_images_per_s": statistics.fmean(c),
        "C_std": statistics.stdev(c),
        "A_over_B_paired_median": statistics.median(x / y for x, y in zip(a, b)),
        "A_over_C_paired_median": statistics.median(x / y for x, y in zip(a, c)),
        "loader_ms_per_batch": statistics.median(loader_ms),
        "A_ms_per_batch": step_ms,
        "loader_share_of_A": statistics.median(loader_ms) / step_ms,
        "matmul_peak_gflops": peak,
        "pct_of_peak_A": 100 * statistics.fmean(a) * flops / 1e9 / peak,
        "rounds": rounds,
    }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="prepared student dataset (default: data/<student.dataset> if present, "
        "else prepared into a temp dir from the profile)",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: params threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    params = load_params(args.params)
    threads = args.threads or params.threads
    torch.set_num_threads(threads)
    info = tt.machine_info(threads)

    with tempfile.TemporaryDirectory(prefix="deit-bench-") as tmp:
        data = args.data or Path("data") / params.student.dataset
        if not (data / "manifest.json").is_file():
            from deit_repro.stages.prepare import run_prepare

            d = params.datasets[params.student.dataset]
            data = Path(tmp) / "data"
            run_prepare(dataclasses.replace(d, root=None, test_per_class=10), out=data)
        ds = open_dataset(data)

    s, t = params.student, params.teacher
    skw = student_kwargs(
        s.model,
        distilled=False,
        num_classes=ds.num_classes,
        in_chans=ds.in_chans,
        drop_path=s.train.drop_path,
    )
    tkw = teacher_kwargs(
        t.model, num_classes=ds.num_classes, in_chans=ds.in_chans, drop_path=t.train.drop_path
    )

    def seeded(fn, kw):
        def build():
            torch.manual_seed(args.seed)
            return fn(**kw)

        return build

    args.mm = (torch.randn(2048, 2048), torch.randn(2048, 2048))
    mm = tt.matmul_rates(*args.mm, 8)[2:]
    t0 = time.perf_counter()
    results = [
        bench_model(
            "student", seeded(create_student, skw), s.train, ds, s.model.img_size, args, mm
        ),
        bench_model(
            "teacher", seeded(create_teacher, tkw), t.train, ds, t.model.img_size, args, mm
        ),
    ]
    info["loadavg_end"] = list(__import__("os").getloadavg())
    print(
        f"machine  {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}, "
        f"{threads} thread(s), load avg {info['loadavg_start'][0]:.2f} -> "
        f"{info['loadavg_end'][0]:.2f}; profile {params.profile}; {args.rounds} rounds x "
        f"{args.steps} steps per method; {time.perf_counter() - t0:.0f} s"
    )
    print(f"fp32 matmul peak  {max(mm):.1f} GFLOP/s (best 2048² torch.mm, {threads} thread(s))")
    print()
    head = (
        f"{'model':8s} {'params':>7s} {'batch':>5s} {'MFLOP/img':>9s} {'A engine':>14s} "
        f"{'B plain loop':>14s} {'A/B':>6s} {'C in memory':>14s} {'A/C':>6s} {'% peak':>7s} "
        f"{'loader':>14s}"
    )
    print(head)
    for r in results:
        print(
            f"{r['model']:8s} {r['params_m']:6.3f}M {r['batch_size']:5d} "
            f"{r['train_flops_per_image'] / 1e6:9.2f} "
            f"{r['A_engine_images_per_s']:8.0f} ± {r['A_std']:3.0f} "
            f"{r['B_plain_loop_images_per_s']:8.0f} ± {r['B_std']:3.0f} "
            f"{r['A_over_B_paired_median']:6.3f} "
            f"{r['C_batch_in_memory_images_per_s']:8.0f} ± {r['C_std']:3.0f} "
            f"{r['A_over_C_paired_median']:6.3f} {r['pct_of_peak_A']:6.1f}% "
            f"{r['loader_ms_per_batch']:5.2f} ms {100 * r['loader_share_of_A']:4.1f}%"
        )
    print(
        "\nimages/s, mean ± std over rounds; ratios: median of the per-round ratios "
        "(A/B >= 1.0: the engine costs nothing; A/C >= 0.95: the loader is not the bottleneck);\n"
        "loader: the loader alone per batch (median over rounds) and its share of A's time per "
        "batch"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "profile": params.profile,
                    "threads": threads,
                    "matmul_peak_samples": mm,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
