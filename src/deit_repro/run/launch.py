"""Training stages as submitit jobs, on this machine's processes or on SLURM.

One scheme, whatever engine calls the stage: the stage command submits one job per seed (nodes x
tasks_per_node processes, one per GPU, DDP over NCCL on GPUs and gloo on CPUs) and waits. Under
Snakemake's SLURM profile such a stage is a *local* rule (Snakefile): it is never itself a SLURM
job that submits SLURM jobs. On timeout or preemption (SLURM's USR2, ``signal_delay_s`` before
the kill) submitit requeues the job and it resumes from the run's last complete checkpoint,
written every epoch (``deit_repro.core.engine.fit``); ``scontrol requeue`` restarts it the same
way. Each job runs a :class:`deit_repro.stages.trainer.StageRun`, the very object an
in-process run calls: this module decides where runs happen, never what they compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from deit_repro import atomic
from deit_repro.errors import ConfigError, DeitReproError, TrainingError

_logger = logging.getLogger(__name__)

#: where a stage's run directory keeps the job it submitted (to wait on it again after a restart)
JOB_FILE = "submitit-job.json"


def sbatch_parameters(launch, res, name: str) -> dict[str, Any]:
    """The sbatch options of one training job with resources ``res`` (a
    :class:`~deit_repro.config.JobResources`, from ``launch.resources``) as submitit
    SlurmExecutor keywords.

    Everything comes from ``params.launch``: resources per stage and the user's site settings
    (partition, account, qos, constraint, extra options); nothing about a cluster is in code.
    """
    mem = (
        f"{int(res.mem_gb)}GB" if float(res.mem_gb).is_integer() else f"{int(res.mem_gb * 1024)}MB"
    )
    slurm = launch.slurm
    params: dict[str, Any] = {
        "job_name": name,
        "time": res.timeout_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "gpus_per_node": res.gpus_per_node or None,
        "mem": mem,
        "signal_delay_s": launch.signal_delay_s,
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        # submitit writes `true` as a flag (#SBATCH --exclusive); `false` is left out
        "additional_parameters": {k: v for k, v in slurm.additional.items() if v is not False}
        or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(launch, res, folder: Path, name: str) -> str:
    """The sbatch file submitit would submit for a job with resources ``res`` (the dry run of
    ``launch-plan``)."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    command = (
        f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    )
    return _make_sbatch_string(
        command=command, folder=folder, **sbatch_parameters(launch, res, name)
    )


def make_executor(cluster: str, folder: Path, launch, res, name: str):
    """A submitit executor for one training job with resources ``res``: ``slurm`` or ``local``.

    Always explicit: submitit's AutoExecutor silently picks SLURM wherever ``srun`` is on PATH.
    """
    if cluster == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError(
                f"launch.launcher is slurm but this machine has no sbatch on PATH (no SLURM "
                f"client here) to submit {name}",
                "run the stage on the cluster's login node, or set launch.launcher: in-process "
                "(or local) in params.yaml",
            )
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=launch.max_requeues)
        ex.update_parameters(**sbatch_parameters(launch, res, name))
        return ex
    if cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=launch.max_requeues)
        ex.update_parameters(
            timeout_min=res.timeout_min,
            tasks_per_node=res.tasks_per_node,
            gpus_per_node=res.gpus_per_node,
            nodes=1,
            signal_delay_s=launch.signal_delay_s,
        )
        return ex
    raise DeitReproError(
        f"launcher {cluster!r} is not local or slurm",
        "set launch.launcher to in-process, local or slurm",
    )


class TrainingJob(submitit.helpers.Checkpointable):
    """One seed of a training stage as a submitit job: every task joins one DDP group.

    Each task calls ``run(spec)``, the stage's own :class:`~deit_repro.stages.trainer.StageRun`
    (pickled by submitit), so a job and an in-process run execute the same code. Requeued after
    a timeout or preemption, it simply runs again: ``fit`` resumes from the run directory's
    checkpoint.
    """

    def __init__(self, run, spec, log_level: str = "INFO"):
        self.run, self.spec, self.log_level = run, spec, log_level

    def __call__(self) -> dict[str, Any]:
        import torch

        gpus = self.run.resources.gpus_per_node
        if gpus > 0 and not torch.cuda.is_available():
            # Never fall back to gloo on CPUs: DeiT-B would "train" for weeks without a word.
            return {
                "error": cuda_unavailable(self.run.stage, gpus),
                "exit_code": 2,
                "rank": int(os.environ.get("SLURM_PROCID", "0")),
            }
        logging.basicConfig(
            level=self.log_level,
            format="%(asctime)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
        env = submitit.helpers.TorchDistributedEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if env.world_size > 1:
            env.export(set_cuda_visible_devices=False, overwrite=True)
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend, init_method="env://")
        try:
            metrics = self.run(self.spec)
        except DeitReproError as err:
            return {"error": str(err), "exit_code": err.exit_code, "rank": env.rank}
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return {
            "metrics": metrics if env.rank == 0 else None,
            "rank": env.rank,
            "world_size": env.world_size,
            "restarts": restarts,
        }

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on USR2 (timeout / preemption): requeue the same job. The model
        state is already on disk (a complete checkpoint every epoch, written atomically)."""
        _logger.warning(
            "training job interrupted: requeuing; it resumes from the last complete checkpoint"
        )
        return submitit.helpers.DelayedSubmission(TrainingJob(self.run, self.spec, self.log_level))


def cuda_unavailable(stage: str, gpus: int) -> str:
    """The one-line error of a GPU job whose torch sees no GPU."""
    import torch

    archs = " ".join(torch.cuda.get_arch_list()) or "none"
    return (
        f"launch.{stage}.gpus_per_node is {gpus} but torch {torch.__version__} sees no "
        f"usable GPU in this job (built for CUDA {torch.version.cuda}, GPU architectures "
        f"{archs}); install a torch wheel that matches the cluster's driver and GPUs (README "
        f'"GPUs"), or set launch.{stage}.gpus_per_node: 0 for a CPU run'
    )


def run_key(run, spec) -> str:
    """What a job trains, as a digest: a re-run of the same command finds the job that an
    earlier, killed invocation submitted for the same run (the dataclasses' repr is stable)."""
    return hashlib.sha256(repr((run, spec)).encode()).hexdigest()


def _reattach(cluster: str, job_file: Path, key: str):
    """The SLURM job an earlier (killed) invocation submitted for the same command, if it is
    still queued or running: wait for it instead of training the same run twice."""
    if cluster != "slurm" or not job_file.is_file():
        return None
    try:
        rec = json.loads(job_file.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != key:
        return None
    job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
    return job if _live_state(job) in _ALIVE else None


#: SLURM states of a job that is queued, running or will run again (a requeued job is PENDING
#: again); any other state, UNKNOWN included (neither scontrol nor sacct knows the job), is over
_ALIVE = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
)


def _live_state(job) -> str:
    """The job's state as the controller sees it now (``scontrol``), not as accounting last
    recorded it: after a requeue, ``sacct`` may still report the first allocation's end
    (COMPLETED) while the job is pending again. Falls back to submitit's (sacct) state; only the
    state's name (``CANCELLED by 0`` -> ``CANCELLED``), UNKNOWN when neither knows the job."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job.job_id)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        state = dict(kv.split("=", 1) for kv in out.split() if "=" in kv).get("JobState")
    except (OSError, subprocess.TimeoutExpired):
        state = None
    words = (state or job.state).split()
    return words[0].upper() if words else "UNKNOWN"


def _wait_through_requeues(
    job,
    poll_s: float = 5.0,
    grace_s: float = 120.0,
    tick: Callable[[], None] | None = None,
    look_s: float = 0.5,
) -> None:
    """Wait until the job has written its result or is over for good.

    submitit alone gives up 15 s after ``sacct`` says the job ended without a result file, which
    is what a requeued job looks like between its allocations (after USR2 or ``scontrol
    requeue``). Here an ended job gets ``grace_s`` for its result to appear, and a job the
    controller shows as queued or running again is waited for. The result file is looked for
    every ``look_s`` (a file test), the controller asked every ``poll_s`` only (``sacct`` is a
    query a cluster's controller answers for every user).
    """
    ended_at, asked = None, -float("inf")
    while not job.paths.result_pickle.exists():
        if time.monotonic() - asked >= poll_s:
            asked = time.monotonic()
            if tick is not None:
                tick()
            if _live_state(job) in _ALIVE:
                ended_at = None
            else:
                ended_at = ended_at or time.time()
                if time.time() - ended_at > grace_s:
                    return  # job.results() raises with submitit's own account of the failure
        time.sleep(look_s)


def _interrupt(_signum, _frame) -> None:
    """SIGTERM (an engine stopping the stage) handled as Ctrl-C: the waiting stage cancels its
    jobs on the way out."""
    raise KeyboardInterrupt


def submit_runs(
    run,
    specs: Sequence[Any],
    launch,
    *,
    cluster: str,
    log_level: str = "INFO",
    tick: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Submit one job per spec (seed, model directory, run directory) and wait for all; their
    ``metrics.json``.

    Args:
        run: the stage's :class:`~deit_repro.stages.trainer.StageRun`; ``run.stage``
            selects the ``launch.<stage>`` resources.
        specs: each run's seed, model directory and run directory (checkpoint, submitit logs).
        launch: ``params.launch``.
        cluster: ``local`` or ``slurm``.
        log_level: the jobs' logging level.
        tick: called every few seconds while the stage waits (its live log).
    """
    import signal

    from submitit.core.utils import FailedJobError, UncompletedJobError

    stage = run.stage
    res = run.resources
    jobs = []
    for spec in specs:
        seed, out, run_dir = spec.seed, spec.out, spec.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        job_file = run_dir / JOB_FILE
        key = run_key(run, spec)
        job = _reattach(cluster, job_file, key)
        if job is not None:
            print(
                f"deit-repro {stage}: seed {seed}: waiting again for slurm job {job.job_id}, "
                "submitted by an earlier invocation",
                file=sys.stderr,
                flush=True,
            )
        else:
            folder = (run_dir / "submitit").resolve()
            name = f"deit-repro-{stage}-seed{seed}"
            # One flat folder that exists before sbatch returns: with a per-job "%j" folder,
            # submitit creates it only after submission, and a job the scheduler starts at
            # once fails to open its log there (slurmd: "Could not open stdout file").
            folder.mkdir(parents=True, exist_ok=True)
            ex = make_executor(cluster, folder, launch, res, name)
            job = ex.submit(TrainingJob(run, spec, log_level))
            atomic.write_json(
                job_file,
                {"job_id": job.job_id, "cluster": cluster, "folder": str(folder), "key": key},
            )
            print(
                f"deit-repro {stage}: seed {seed} submitted as {cluster} job {job.job_id} "
                f"({res.nodes} node(s) x {res.tasks_per_node} task(s), "
                f"{res.gpus_per_node} GPU(s)/node); logs in {folder}/{job.job_id}_*",
                file=sys.stderr,
                flush=True,
            )
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
                    _wait_through_requeues(job, tick=tick)
                else:
                    while not job.done():
                        if tick is not None:
                            tick()
                        time.sleep(1.0)
                # Task 0 (global rank 0) first: its own error, where job.results() would raise
                # the first failed task's account, a rank that only saw rank 0 go.
                result = job.task(0).result()
                if "error" not in result:
                    job.results()  # another task's failure
            except (FailedJobError, UncompletedJobError) as err:
                first = " ".join(line.strip() for line in str(err).splitlines()[:2])
                raise TrainingError(
                    f"seed {seed}: {cluster} job {job.job_id} failed ({first[:200]}); its log: "
                    f"{job.paths.stderr}",
                    "fix the cause and re-run: the run resumes from its last checkpoint",
                ) from None
            if "error" in result:
                err = DeitReproError(f"seed {seed}: {result['error']}")
                err.exit_code = result.get("exit_code", 2)
                raise err
            print(
                f"deit-repro {stage}: seed {seed} {cluster} job {job.job_id} finished (world "
                f"size {result['world_size']}, {result['restarts']} restart(s))",
                file=sys.stderr,
                flush=True,
            )
            results.append(json.loads((out / "metrics.json").read_text()))
    except BaseException:
        for _, _, job in jobs:
            if not job.done():
                job.cancel(check=False)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results


# --------------------------------------------------------------------------------------------------
# Where a stage's runs happen
# --------------------------------------------------------------------------------------------------


def run_stage(
    run,
    *,
    data: Path,
    out: Path,
    run_dir: Path | None,
    seed: int | None,
    metrics: Path | None,
    history: Path | None,
    live: Path | None,
    launcher: str | None,
    jobs: int | None,
    log_level: str,
) -> list[dict[str, Any]]:
    """Run a training stage: one run (``seed`` given, or released teacher weights) into ``out``,
    or one run per seed of the profile into ``out/seed<k>/``; then the aggregate to ``metrics``,
    every seed's history to ``history`` and the stage's DVCLive log to ``live``.

    Where the runs happen is ``launcher`` (None: ``params.launch.launcher``): in this process
    (and a child process per seed, ``jobs`` at a time), or as submitit jobs on this machine or
    on SLURM, which checkpoint and requeue from ``run_dir``.
    """
    from deit_repro.run import seeds

    _need_train_split(data)
    specs = run.specs(out, run_dir, seed)
    stage_live = None
    if live is not None:
        from deit_repro.core.live_metrics import StageLive

        # while they train, each run's rank 0 writes its history into its run directory
        stage_live = StageLive(live, [(s.run_dir or s.out) / "history.csv" for s in specs])
    tick = _throttled(stage_live.sync) if stage_live is not None else None
    launcher = launcher or run.params.launch.launcher
    if launcher != "in-process":
        if run_dir is None:
            raise ConfigError(
                f"launcher {launcher!r} needs --run-dir (the jobs checkpoint and requeue from it)",
                "pass --run-dir DIR or use --launcher in-process",
            )
        runs = submit_runs(
            run, specs, run.params.launch, cluster=launcher, log_level=log_level, tick=tick
        )
    else:
        run.use_threads()  # before forking: the children inherit it
        jobs = jobs or seeds.default_jobs(len(specs), run.threads)
        if jobs == 1:  # one at a time: no need for child processes
            runs = [run(spec) for spec in specs]
        else:
            runs = seeds.fork_runs(run, specs, jobs, tick=tick)
    run.summarise(runs, specs, metrics=metrics, history=history, live=stage_live)
    return runs


def _need_train_split(data: Path) -> None:
    """A dataset prepared with ``--splits test`` (val/ alone, for released checkpoints) cannot
    train: said before any job is submitted. (A dataset the submit host cannot see is left to
    the job, which opens it.)"""
    from deit_repro.data.store import MANIFEST, read_manifest

    if not (Path(data) / MANIFEST).is_file():
        return
    splits = read_manifest(data)["splits"]
    if "train" not in splits:
        raise ConfigError(
            f"prepared dataset {data} holds the {' and '.join(sorted(splits))} split alone "
            "(prepare --splits test): training needs its train split",
            "prepare it again without --splits (both splits)",
        )


def _throttled(sync: Callable[[], None], every_s: float = 5.0) -> Callable[[], None]:
    """``sync`` at most every ``every_s`` seconds, its failures logged, not raised: the live log
    is a view of training, and the stage's end writes it whole (or fails) anyway."""
    last = [0.0]

    def tick() -> None:
        if time.monotonic() - last[0] < every_s:
            return
        last[0] = time.monotonic()
        try:
            sync()
        except Exception as err:  # noqa: BLE001 - a view; the runs must go on
            _logger.warning("live log not updated: %s", err)

    return tick
