"""Running a training stage for every seed of the profile, and aggregating mean ± std.

A training stage command without ``--seed`` trains one run per seed of ``params.seeds`` into
``<out>/seed<k>/`` and writes the aggregate (mean, std and per-seed values of every metric) to
``--metrics``. Runs are independent forked processes (each with ``params.threads`` torch threads),
up to ``--jobs`` at a time: results do not depend on how many run side by side, only on the thread
count of each (notes/small-scale.md: 1 thread per process, independent runs in parallel).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from deit_repro import atomic
from deit_repro.errors import DeitReproError, TrainingError

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
    """As many runs at once as the CPUs have room for at ``threads`` threads each."""
    return max(1, min(num_runs, available_cpus() // max(threads, 1)))


def fork_runs(run_one: Callable[[int, Path, Path | None], dict[str, Any]],
              specs: Sequence[tuple[int, Path, Path | None]], jobs: int) -> list[dict[str, Any]]:
    """Run ``run_one(seed, out, run_dir)`` for every spec in forked processes, ``jobs`` at a time.

    Forked, not spawned: the children inherit the imported torch/timm (about 3 s a process here,
    issue #7) and the parsed params. Each child trains with the thread count the parent set.

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
                seed, out, run_dir = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_forked_run, args=(run_one, seed, out, run_dir, send),
                                   name=f"seed{seed}")
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, recv, seed, out)
            if not running:
                break
            for sentinel in wait(list(running)):
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
    return [json.loads((out / "metrics.json").read_text()) for _, out, _ in specs]


def _death(exitcode: int | None) -> str:
    import signal

    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _forked_run(run_one, seed: int, out: Path, run_dir: Path | None, conn) -> None:
    """A forked child: one run; its one-line error (or the crash) goes back through ``conn``."""
    import traceback

    code = 0
    try:
        run_one(seed, out, run_dir)
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


def combine_histories(path: Path, histories: Sequence[Path], seeds: Sequence[int]) -> None:
    """One CSV of every seed's per-epoch metrics, with a leading ``seed`` column (plots)."""
    import csv
    import io

    rows, keys = [], ["seed"]
    for seed, hist in zip(seeds, histories):
        with open(hist, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({"seed": seed, **row})
                keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


#: top-level keys whose numbers are measurements (aggregated over seeds); every other key
#: describes the run (alpha, tau, img_size, ...) and is kept as is when the seeds agree
METRIC_KEYS = ("heads", "top1", "train_loss", "before_finetune", "models", "disagreement")


def aggregate(runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean, sample std and per-seed values of every measured number over the seeds.

    ``{"top1": 80.1}`` from two runs becomes ``{"top1": {"mean": .., "std": .., "values": [..]}}``
    (also for one seed, so consumers see one schema); descriptive fields stay scalars.
    """
    def stat(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
            return {k: stat([v[k] for v in values]) for k in keys}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and all(
                v == first for v in values):
            return first  # a count or a size (img_size, params): the same for every seed
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
            return {"mean": round(statistics.fmean(values), 6),
                    "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
                    "values": values}
        return first if all(v == first for v in values) else values

    def keep(values: list[Any]) -> Any:
        first = values[0]
        return first if all(v == first for v in values) else values

    out: dict[str, Any] = {"seeds": list(seeds), "n": len(runs)}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        out[key] = stat(values) if key in METRIC_KEYS else keep(values)
    return out


def write_aggregate(path: Path, runs: Sequence[dict[str, Any]], seeds: Sequence[int],
                    drop: Sequence[str] = ("train_seconds", "resumed_from_epoch")) -> dict:
    """Write the seeds' aggregate, without timing fields (metrics files must be reproducible)."""
    clean = [{k: v for k, v in r.items() if k not in drop} for r in runs]
    agg = aggregate(clean, seeds)
    atomic.write_json(path, agg)
    return agg


# --------------------------------------------------------------------------------------------------
# submitit: the training stages on this machine's processes or on SLURM (issue #4)
# --------------------------------------------------------------------------------------------------
#
# One scheme, whatever engine calls the stage: the stage command submits one job per seed (nodes x
# tasks_per_node processes, one per GPU, DDP over NCCL on GPUs and gloo on CPUs) and waits. Under
# Snakemake's SLURM profile such a stage is a *local* rule (Snakefile): it is never itself a SLURM
# job that submits SLURM jobs. On timeout or preemption (SLURM's USR2, `signal_delay_s` before the
# kill) submitit requeues the job and it resumes from the run's last complete checkpoint, written
# every epoch (engine.fit); `scontrol requeue` restarts it the same way.

#: the stages a submitit launcher runs (the teacher trains in-process or is downloaded)
LAUNCHED_STAGES = ("pretrain", "finetune", "transfer")

#: where a stage's run directory keeps the job it submitted (to wait on it again after a restart)
JOB_FILE = "submitit-job.json"


def sbatch_parameters(launch, stage: str, name: str) -> dict[str, Any]:
    """The sbatch options of one training job of ``stage`` (submitit SlurmExecutor keywords).

    Everything comes from ``params.launch``: resources per stage and the user's site settings
    (partition, account, qos, constraint, extra options); nothing about a cluster is in code.
    """
    res = getattr(launch, stage)
    mem = (f"{int(res.mem_gb)}GB" if float(res.mem_gb).is_integer()
           else f"{int(res.mem_gb * 1024)}MB")
    slurm = launch.slurm
    params: dict[str, Any] = {
        "job_name": name, "time": res.timeout_min, "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task,
        "gpus_per_node": res.gpus_per_node or None, "mem": mem,
        "signal_delay_s": launch.signal_delay_s, "partition": slurm.partition,
        "account": slurm.account, "qos": slurm.qos, "constraint": slurm.constraint,
        "additional_parameters": dict(slurm.additional) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(launch, stage: str, folder: Path, name: str) -> str:
    """The sbatch file submitit would submit for ``stage`` (the dry run of ``launch-plan``)."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder,
                               **sbatch_parameters(launch, stage, name))


def make_executor(cluster: str, folder: Path, launch, stage: str, name: str):
    """A submitit executor for one training job of ``stage``: ``slurm`` or ``local``.

    Always explicit: submitit's AutoExecutor silently picks SLURM wherever ``srun`` is on PATH.
    """
    res = getattr(launch, stage)
    if cluster == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=launch.max_requeues)
        ex.update_parameters(**sbatch_parameters(launch, stage, name))
        return ex
    if cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=launch.max_requeues)
        ex.update_parameters(timeout_min=res.timeout_min, tasks_per_node=res.tasks_per_node,
                             gpus_per_node=res.gpus_per_node, nodes=1,
                             signal_delay_s=launch.signal_delay_s)
        return ex
    raise DeitReproError(f"launcher {cluster!r} is not local or slurm",
                         "set launch.launcher to in-process, local or slurm")


class TrainingJob(submitit.helpers.Checkpointable):
    """One seed of a training stage as a submitit job: every task joins one DDP group.

    The job re-runs the stage's own command line (``argv``, one seed) in each task, so a job and an
    in-process run execute the same code. Requeued after a timeout or preemption, it simply runs
    again: :func:`deit_repro.engine.fit` resumes from the run directory's checkpoint.
    """

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def __call__(self) -> dict[str, Any]:
        import torch

        env = submitit.helpers.TorchDistributedEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if env.world_size > 1:
            env.export(set_cuda_visible_devices=False, overwrite=True)
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend, init_method="env://")
        from deit_repro.cli import run_single

        try:
            metrics = run_single(self.argv)
        except DeitReproError as err:
            return {"error": str(err), "exit_code": err.exit_code, "rank": env.rank}
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return {"metrics": metrics if env.rank == 0 else None, "rank": env.rank,
                "world_size": env.world_size, "restarts": restarts}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on USR2 (timeout / preemption): requeue the same job. The model
        state is already on disk (a complete checkpoint every epoch, written atomically)."""
        _logger.warning("training job interrupted: requeuing; it resumes from the last complete "
                        "checkpoint")
        return submitit.helpers.DelayedSubmission(TrainingJob(self.argv))


def _reattach(cluster: str, job_file: Path, argv: list[str]):
    """The SLURM job an earlier (killed) invocation submitted for the same command, if it is
    still queued or running: wait for it instead of training the same run twice."""
    if cluster != "slurm" or not job_file.is_file():
        return None
    try:
        rec = json.loads(job_file.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("argv") != argv:
        return None
    job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
    return job if _live_state(job) in _ALIVE else None


#: SLURM states of a job that is queued, running or will run again (a requeued job is PENDING
#: again); any other state, UNKNOWN included (neither scontrol nor sacct knows the job), is over
_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
          "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT")


def _live_state(job) -> str:
    """The job's state as the controller sees it now (``scontrol``), not as accounting last
    recorded it: after a requeue, ``sacct`` may still report the first allocation's end
    (COMPLETED) while the job is pending again. Falls back to submitit's (sacct) state; only the
    state's name (``CANCELLED by 0`` -> ``CANCELLED``), UNKNOWN when neither knows the job."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job.job_id)],
                             capture_output=True, text=True, timeout=30).stdout
        state = dict(kv.split("=", 1) for kv in out.split() if "=" in kv).get("JobState")
    except (OSError, subprocess.TimeoutExpired):
        state = None
    words = (state or job.state).split()
    return words[0].upper() if words else "UNKNOWN"


def _wait_through_requeues(job, poll_s: float = 5.0, grace_s: float = 120.0) -> None:
    """Wait until the job has written its result or is over for good.

    submitit alone gives up 15 s after ``sacct`` says the job ended without a result file, which
    is what a requeued job looks like between its allocations (issue #4: USR2 / scontrol
    requeue). Here an ended job gets ``grace_s`` for its result to appear, and a job the
    controller shows as queued or running again is waited for.
    """
    ended_at = None
    while not job.paths.result_pickle.exists():
        if _live_state(job) in _ALIVE:
            ended_at = None
        else:
            ended_at = ended_at or time.time()
            if time.time() - ended_at > grace_s:
                return  # job.results() raises with submitit's own account of the failure
        time.sleep(poll_s)


def _interrupt(_signum, _frame) -> None:
    """SIGTERM (an engine stopping the stage) handled as Ctrl-C: the waiting stage cancels its
    jobs on the way out."""
    raise KeyboardInterrupt


def submit_runs(argv: Sequence[str], runs: Sequence[tuple[int, Path, Path]], launch, *,
                stage: str, cluster: str) -> list[dict[str, Any]]:
    """Submit one job per ``(seed, out, run_dir)`` and wait for all; their ``metrics.json``.

    Args:
        argv: the stage's command line without the per-run options (see cli._child_argv).
        runs: each run's seed, model directory and run directory (checkpoint, submitit logs).
        launch: ``params.launch``.
        stage: pretrain | finetune | transfer (selects ``launch.<stage>`` resources).
        cluster: ``local`` or ``slurm``.
    """
    import signal

    from submitit.core.utils import FailedJobError, UncompletedJobError

    res = getattr(launch, stage)
    jobs = []
    for seed, out, run_dir in runs:
        run_argv = [*argv, "--seed", str(seed), "--out", str(out), "--run-dir", str(run_dir),
                    "--launcher", "in-process"]
        run_dir.mkdir(parents=True, exist_ok=True)
        job_file = run_dir / JOB_FILE
        job = _reattach(cluster, job_file, run_argv)
        if job is not None:
            print(f"deit-repro {stage}: seed {seed}: waiting again for slurm job {job.job_id}, "
                  "submitted by an earlier invocation", file=sys.stderr, flush=True)
        else:
            folder = (run_dir / "submitit").resolve()
            name = f"deit-repro-{stage}-seed{seed}"
            # One flat folder that exists before sbatch returns: with a per-job "%j" folder,
            # submitit creates it only after submission, and a job the scheduler starts at
            # once fails to open its log there (slurmd: "Could not open stdout file").
            folder.mkdir(parents=True, exist_ok=True)
            ex = make_executor(cluster, folder, launch, stage, name)
            job = ex.submit(TrainingJob(run_argv))
            atomic.write_json(job_file, {"job_id": job.job_id, "cluster": cluster,
                                         "folder": str(folder), "argv": run_argv})
            print(f"deit-repro {stage}: seed {seed} submitted as {cluster} job {job.job_id} "
                  f"({res.nodes} node(s) x {res.tasks_per_node} task(s), "
                  f"{res.gpus_per_node} GPU(s)/node); logs in {folder}/{job.job_id}_*",
                  file=sys.stderr, flush=True)
        jobs.append((seed, out, job))

    # The stage waits for its jobs; if it is stopped (Ctrl-C, SIGTERM from an engine) it cancels
    # them, so no job keeps training into a run directory that a later invocation will use.
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    results = []
    try:
        for seed, out, job in jobs:
            try:
                if cluster == "slurm":
                    _wait_through_requeues(job)
                result = job.results()[0]  # task 0 is global rank 0
            except (FailedJobError, UncompletedJobError) as err:
                first = " ".join(line.strip() for line in str(err).splitlines()[:2])
                raise TrainingError(
                    f"seed {seed}: {cluster} job {job.job_id} failed ({first[:200]}); its log: "
                    f"{job.paths.stderr}", "fix the cause and re-run: the run resumes from its "
                    "last checkpoint") from None
            if "error" in result:
                err = DeitReproError(f"seed {seed}: {result['error']}")
                err.exit_code = result.get("exit_code", 2)
                raise err
            print(f"deit-repro {stage}: seed {seed} {cluster} job {job.job_id} finished (world "
                  f"size {result['world_size']}, {result['restarts']} restart(s))",
                  file=sys.stderr, flush=True)
            results.append(json.loads((out / "metrics.json").read_text()))
    except BaseException:
        for _, _, job in jobs:
            if not job.done():
                job.cancel(check=False)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results
