"""Does ``torch.compile`` pay on a CPU? The default profile's student through ``engine.fit``,
``compile: off`` against ``compile: on``, in one process, interleaved (off, on, on, off, ...).

Per setting: the first epoch's seconds (with ``on``: Dynamo's trace and inductor's C++ build;
the first ``on`` run starts from an empty inductor cache, as a machine's first run does, the
later ones find it warm, as a DAG's later stages do), the steady epochs' images/s, and from both
the epochs a run must last before compiling is repaid.
The profile's recipes say ``compile: off`` (fashion) and ``compile: auto`` (imagenet: on CUDA
only); this is the measurement behind "off on a CPU".

    .venv/bin/python bench/cpu_compile.py --json bench/results/cpu_compile.json
    .venv/bin/python bench/cpu_compile.py --smoke        # seconds: the code runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before torch reads it: an empty inductor cache for this process (the first `on` run is cold).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="deit-inductor-")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deit_repro import atomic  # noqa: E402
from deit_repro.config import load_params  # noqa: E402
from deit_repro.core.datasets import open_dataset, train_batches  # noqa: E402
from deit_repro.core.engine import Runtime, base_criterion, fit  # noqa: E402
from deit_repro.core.losses import DistillationLoss  # noqa: E402
from deit_repro.core.model_dirs import student_kwargs  # noqa: E402
from deit_repro.core.models import create_student, set_training_outputs  # noqa: E402


def one_run(params, ds, compile_: str, epochs: int, steps: int) -> list[float]:
    """Seconds of each epoch of ``steps`` steps (a fresh compile cache entry per process:
    inductor's on-disk cache is warm after the first ``on`` run, as on a machine that ran
    the project before)."""
    recipe = dataclasses.replace(
        params.student.train, epochs=epochs, warmup_epochs=0, eval_every=0, compile=compile_
    )
    torch.manual_seed(0)
    kw = student_kwargs(
        params.student.model, distilled=False, num_classes=ds.num_classes, in_chans=ds.in_chans
    )
    model = create_student(**kw)
    set_training_outputs(model, False)
    batches = train_batches(ds, recipe, img_size=params.student.model.img_size, seed=0)
    loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
    seconds: list[float] = []
    t = [time.perf_counter()]

    def epoch_end(history):
        now = time.perf_counter()
        seconds.append(now - t[0])
        t[0] = now

    fit(
        model=model,
        loss_fn=loss,
        train_batches=_Cut(batches, steps),
        recipe=recipe,
        num_classes=ds.num_classes,
        seed=0,
        rt=Runtime(torch.device("cpu")),
        checkpoint_path=None,
        fingerprint="bench",
        on_epoch_end=epoch_end,
    )
    return seconds


class _Cut:
    """The first ``steps`` batches of each epoch."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, min(steps, len(batches))

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for k, b in enumerate(self.batches):
            if k == self.steps:
                return
            yield b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "fashion_mnist")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=39, help="steps per epoch (the DAG's: 39)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs, args.steps, args.rounds = 2, 2, 1
    params = load_params(args.params)
    torch.set_num_threads(params.threads or 1)
    ds = open_dataset(args.data)
    runs: dict[str, list[list[float]]] = {"off": [], "on": []}
    order = ["off", "on"]
    for r in range(args.rounds):
        for setting in order if r % 2 == 0 else order[::-1]:
            runs[setting].append(one_run(params, ds, setting, args.epochs, args.steps))
    batch = params.student.train.batch_size
    res: dict = {
        "machine": {
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },  # fmt: skip
        "model": "params.yaml student.model",
        "batch": batch,
        "steps_per_epoch": args.steps,
        "epochs": args.epochs,
    }
    for setting, rows in runs.items():
        steady = [batch * args.steps / s for row in rows for s in row[1:]]
        warm = rows[1:] if setting == "on" and len(rows) > 1 else rows
        res[setting] = {
            "first_epoch_s": round(statistics.median(row[0] for row in warm), 2),
            "steady_images_per_s": round(statistics.median(steady), 1),
            "epoch_seconds": [[round(s, 3) for s in row] for row in rows],
        }
    res["on"]["first_epoch_cold_cache_s"] = round(runs["on"][0][0], 2)
    off, on = res["off"], res["on"]
    per_epoch_off = batch * args.steps / off["steady_images_per_s"]
    per_epoch_on = batch * args.steps / on["steady_images_per_s"]
    overhead = on["first_epoch_s"] - off["first_epoch_s"]
    gain = per_epoch_off - per_epoch_on
    res["steady_ratio_on_vs_off"] = round(on["steady_images_per_s"] / off["steady_images_per_s"], 3)
    res["compile_overhead_s"] = round(overhead, 1)  # a warm cache (a cold one when rounds is 1)
    res["compile_overhead_cold_s"] = round(on["first_epoch_cold_cache_s"] - off["first_epoch_s"], 1)
    res["break_even_epochs"] = round(overhead / gain, 1) if gain > 0 else None
    print(
        f"compile off: first epoch {off['first_epoch_s']} s, then {off['steady_images_per_s']} "
        f"img/s; on: first epoch {on['first_epoch_s']} s, then {on['steady_images_per_s']} img/s "
        f"({res['steady_ratio_on_vs_off']}x); compiling costs {res['compile_overhead_cold_s']} s "
        f"with an empty cache, {overhead:.1f} s with a warm one, repaid after "
        f"{res['break_even_epochs'] if gain > 0 else 'never'} epochs of {args.steps} steps"
    )
    if args.json:
        atomic.write_json(args.json, res)  # makes the folder
    return 0


if __name__ == "__main__":
    sys.exit(main())
