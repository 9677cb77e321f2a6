"""The seeds of a training stage as forked processes on this machine.

A training stage command without ``--seed`` trains one run per seed of ``params.seeds``; here they
are independent forked processes, up to ``--jobs`` at a time. Results do not depend on how many run
side by side, only on each run's thread count (:attr:`StageRun.threads`), so this is
orchestration: no stage depends on this file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from deit_repro.errors import DeitReproError

_logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may use: its SLURM allocation inside a job (a Snakemake SLURM job
    running a training stage), else its affinity mask."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(var, "").isdigit() and os.environ.get("SLURM_JOB_ID"):
            return int(os.environ[var])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(num_runs: int, threads: int) -> int:
    """As many runs at once as the CPUs have room for at ``threads`` threads each; one-thread
    runs up to three times the CPUs. The kernel shares cores fairly between single-threaded
    processes, so seeds that all start together finish together, where a last wave of fewer
    runs than cores leaves cores idle: on 2 cores, 3 seeds all at once take 1.5 times one
    seed's time where two, then one, take twice; 5 seeds (3 epochs of the fashion student) all
    at once 21.6 s, four then one 25.7 s. A torch thread pool spins when it has fewer cores
    than threads, so multi-threaded runs are never oversubscribed."""
    cpus = available_cpus()
    room = 3 * cpus if threads <= 1 else cpus // threads
    return max(1, min(num_runs, room))


def fork_runs(
    run_one: Callable[[Any], dict[str, Any]],
    specs: Sequence[Any],
    jobs: int,
    *,
    tick: Callable[[], None] | None = None,
    tick_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Run ``run_one(spec)`` for every spec (a seed, ``out``, ``run_dir``) in forked processes,
    ``jobs`` at a time.

    Forked, not spawned: the children inherit the imported torch/timm (about 3 s a process on a
    2-core machine, bench/README.md) and the parsed params.

    ``tick`` is called every ``tick_s`` seconds while runs are going (the stage's live log),
    in this thread: a thread beside the forks could hold a lock that a child then inherits.

    Returns:
        Each run's ``metrics.json``, in spec order.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("fork")
    pending = list(specs)
    running: dict[int, tuple[Any, Any, int, Path]] = {}
    failure: DeitReproError | None = None
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        while pending or running:
            while pending and len(running) < jobs and failure is None:
                spec = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_forked_run, args=(run_one, spec, send), name=f"seed{spec.seed}"
                )
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, recv, spec.seed, spec.out)
            if not running:
                break
            ready = wait(list(running), timeout=tick_s if tick is not None else None)
            if tick is not None:
                tick()
            for sentinel in ready:
                proc, recv, seed, out = running.pop(sentinel)
                proc.join()
                try:
                    message = recv.recv() if recv.poll() else None
                except EOFError:  # the child finished (or died) without a word
                    message = None
                recv.close()
                if proc.exitcode == 0:
                    _logger.info("seed %d finished", seed)
                elif failure is None:
                    text, code = message or (f"its process died ({_death(proc.exitcode)})", 3)
                    failure = DeitReproError(f"seed {seed}: {text}")
                    failure.exit_code = code
                    pending.clear()  # finish what runs, start nothing new
    except BaseException:
        for proc, *_ in running.values():
            proc.kill()
        raise
    if failure is not None:
        raise failure
    return [json.loads((spec.out / "metrics.json").read_text()) for spec in specs]


def _death(exitcode: int | None) -> str:
    import signal

    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _forked_run(run_one, spec, conn) -> None:
    """A forked child: one run; its one-line error (or the crash) goes back through ``conn``."""
    import traceback

    code = 0
    try:
        run_one(spec)
    except DeitReproError as err:
        conn.send((str(err), err.exit_code))
        code = err.exit_code
    except BaseException as err:  # a bug or an OOM: keep the traceback in the log
        traceback.print_exc()
        conn.send((f"{type(err).__name__}: {err} (traceback above)", 3))
        code = 3
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no atexit handlers or buffers of the parent run twice
