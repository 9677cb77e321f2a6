"""``deit-repro <stage> ...``: every stage of the DAG as a plain command (DESIGN.md).

Parameters come from ``--params`` (default ``params.yaml``), loaded once; every path a stage reads
or writes is an argument. Errors the user can fix print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from pathlib import Path

_logger = logging.getLogger("deit_repro")


def _params(args):
    """params.yaml, loaded once per command (thread set-up and the stage share it)."""
    from deit_repro.config import load_params

    if getattr(args, "loaded_params", None) is None:
        args.loaded_params = load_params(args.params)
    return args.loaded_params


def _seed(args, params) -> int:
    return args.seed if args.seed is not None else params.seeds[0]


def _cmd_prepare(args) -> None:
    from deit_repro.errors import ConfigError
    from deit_repro.prepare import run_prepare

    params = _params(args)
    if args.dataset not in params.datasets:
        raise ConfigError(f"dataset '{args.dataset}' is not in params.yaml datasets "
                          f"({', '.join(sorted(params.datasets))})", "add it under datasets:")
    d = params.datasets[args.dataset]
    source_dir = args.source_dir or (Path(d.root).expanduser() if d.root else None)
    manifest = run_prepare(source=d.source, out=args.out, source_dir=source_dir,
                           train_per_class=d.train_per_class, test_per_class=d.test_per_class,
                           image_size=d.image_size, seed=d.seed, on_bad_image=d.on_bad_image,
                           download=d.download, test_fraction=d.test_fraction)
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    print(f"prepared {args.dataset} -> {args.out}: {counts}, content hash "
          f"{manifest['content_hash'][:12]}")


#: options that differ between the runs of a multi-seed stage (set per run by the launchers)
_PER_RUN = ("--seed", "--out", "--run-dir", "--metrics", "--history", "--jobs", "--launcher")


def _child_argv(argv: list[str]) -> list[str]:
    """The stage's command line without the per-run options."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok in _PER_RUN:
            skip = True
        elif not tok.startswith(tuple(f"{o}=" for o in _PER_RUN)):
            out.append(tok)
    return out


# One run of a training stage: ``runner(args, params)`` returns ``run_one(seed, out, run_dir)``.
# The same function serves the in-process path, the per-seed child processes and the submitit
# jobs (run_single), so every launcher runs the same code.


def _teacher_runner(args, params):
    from deit_repro.training import run_teacher

    return lambda seed, out, run_dir: run_teacher(
        params, data=args.data, out=out, run_dir=run_dir, seed=seed, weights=args.weights,
        arch=args.arch)


def _dist_token(args) -> bool:
    return args.distill != "none" if args.dist_token == "auto" else args.dist_token == "yes"


def _pretrain_runner(args, params):
    from deit_repro.training import run_pretrain

    # The teacher is read only when there is something to distil (the headline with distill
    # none gets --teacher too and ignores it).
    teacher = args.teacher if args.distill != "none" else None
    return lambda seed, out, run_dir: run_pretrain(
        params, data=args.data, teacher=teacher, out=out, run_dir=run_dir,
        distill=args.distill, dist_token=_dist_token(args), seed=seed)


def _finetune_runner(args, params):
    from deit_repro.training import run_finetune

    return lambda seed, out, run_dir: run_finetune(
        params, data=args.data, student=args.student, teacher=args.teacher, out=out,
        run_dir=run_dir, seed=seed, img_size=args.img_size, interpolation=args.interpolation)


def _transfer_runner(args, params):
    from deit_repro.errors import ConfigError
    from deit_repro.training import run_transfer

    if args.init == "pretrained" and args.student is None:
        raise ConfigError("--init pretrained needs --student DIR", "pass the pretrained student")
    student = args.student if args.init == "pretrained" else None
    return lambda seed, out, run_dir: run_transfer(
        params, data=args.data, student=student, out=out, run_dir=run_dir, seed=seed)


_RUNNERS = {"teacher": _teacher_runner, "pretrain": _pretrain_runner,
            "finetune": _finetune_runner, "transfer": _transfer_runner}


def run_single(argv: list[str]) -> dict:
    """One run (``--seed`` given) of a training stage in this process: what a submitit job
    executes in each of its tasks (launch.TrainingJob)."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.seed is None:
        raise ValueError("run_single needs --seed")  # a bug in the launcher
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    _configure_threads(args)
    return _RUNNERS[args.stage](args, _params(args))(args.seed, args.out, args.run_dir)


def _train(args, params, *, multi_seed: bool = True) -> list[dict]:
    """Run a training stage: one run (``--seed`` given, or the teacher) into ``--out``, or one
    run per seed of the profile into ``--out/seed<k>/``; then the aggregate to ``--metrics``.

    Where the runs happen is ``params.launch.launcher`` (or ``--launcher``): in this process (and
    child processes for the seeds), or as submitit jobs on this machine or on SLURM.
    """
    from deit_repro import launch
    from deit_repro.errors import ConfigError

    run_one = _RUNNERS[args.stage](args, params)
    single = args.seed is not None or not multi_seed
    seeds = [_seed(args, params)] if single else list(params.seeds)
    specs = [(k, args.out, args.run_dir) if single else
             (k, args.out / f"seed{k}", args.run_dir / f"seed{k}" if args.run_dir else None)
             for k in seeds]
    launcher = getattr(args, "launcher", None) or params.launch.launcher
    if launcher != "in-process" and args.stage in launch.LAUNCHED_STAGES:
        if args.run_dir is None:
            raise ConfigError(f"launcher {launcher!r} needs --run-dir (the jobs checkpoint and "
                              "requeue from it)", "pass --run-dir DIR or use --launcher "
                              "in-process")
        runs = launch.submit_runs(_child_argv(args.argv), specs, params.launch, stage=args.stage,
                                  cluster=launcher)
    elif single:
        runs = [run_one(*specs[0])]
    else:
        jobs = args.jobs or launch.default_jobs(len(seeds), params.threads)
        if jobs == 1:  # one at a time: no need for child processes
            runs = [run_one(*spec) for spec in specs]
        else:
            runs = launch.fork_runs(run_one, specs, jobs)
    histories = [out / "history.csv" for _, out, _ in specs]
    if args.metrics is not None:
        launch.write_aggregate(args.metrics, runs, seeds)
    if args.history is not None:
        launch.combine_histories(args.history, histories, seeds)
    return runs


def _summary(runs: list[dict]) -> str:
    import statistics

    heads = runs[0]["heads"]
    parts = []
    for h in heads:
        vals = [r["heads"][h]["top1"] for r in runs]
        sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        parts.append(f"{h} {statistics.fmean(vals):.2f}{sd}")
    return f"top-1 ({len(runs)} seed{'s' if len(runs) > 1 else ''}): " + ", ".join(parts)


def _cmd_teacher(args) -> None:
    runs = _train(args, _params(args), multi_seed=False)
    print(f"teacher -> {args.out}: {_summary(runs)}")


def _cmd_pretrain(args) -> None:
    runs = _train(args, _params(args))
    print(f"pretrain {args.distill} token={_dist_token(args)} -> {args.out}: {_summary(runs)}")


def _cmd_finetune(args) -> None:
    runs = _train(args, _params(args))
    print(f"finetune -> {args.out}: {_summary(runs)}")


def _cmd_transfer(args) -> None:
    runs = _train(args, _params(args))
    print(f"transfer ({args.init}) -> {args.out}: {_summary(runs)}")


def _cmd_launch_plan(args) -> None:
    """Dry run: what the submitit launcher would submit for a training stage (no job is sent)."""
    from deit_repro import launch
    from deit_repro.runs import per_rank_batch

    params = _params(args)
    res = getattr(params.launch, args.stage)
    recipe = {"pretrain": params.student.train, "finetune": params.finetune.train,
              "transfer": params.transfer.train}[args.stage]
    world = res.world_size
    per_task = per_rank_batch(recipe.batch_size, world)
    print(f"# {args.stage} on launcher {params.launch.launcher}: {res.nodes} node(s) x "
          f"{res.tasks_per_node} task(s) = world size {world}, {res.gpus_per_node} GPU(s)/node; "
          f"global batch {recipe.batch_size} = {per_task} per task; effective lr "
          f"{recipe.effective_lr():g}; one job per seed {list(params.seeds)}")
    folder = (args.folder / f"seed{params.seeds[0]}" / "submitit").resolve()
    print(launch.sbatch_script(params.launch, args.stage, folder,
                               f"deit-repro-{args.stage}-seed{params.seeds[0]}"))


def _cmd_evaluate(args) -> None:
    from deit_repro.errors import ConfigError
    from deit_repro.evaluate import run_evaluate

    params = _params(args)
    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r} is not NAME=DIR", "write e.g. --model deit=runs/x")
        models[name] = Path(path)
    res = run_evaluate(params, data=args.data, models=models, teacher=args.teacher, out=args.out)
    for name, entry in res["models"].items():
        print(f"{name}: " + ", ".join(f"{h} {v['top1']['mean']:.2f} ± {v['top1']['std']:.2f}"
                                      for h, v in entry["heads"].items()))


def _cmd_throughput(args) -> None:
    from deit_repro.evaluate import run_throughput

    res = run_throughput(_params(args), data=args.data, out=args.out)
    for name, entry in res["models"].items():
        print(f"{name} ({entry['img_size']} px): {entry['images_per_s']:.0f} images/s "
              f"(batch {entry['batch_size']})")


def _cmd_import_weights(args) -> None:
    from deit_repro.released import import_weights

    meta = import_weights(model=args.model, weights=args.weights, sha256=args.sha256,
                          data=args.data, out=args.out, img_size=args.img_size)
    print(f"{args.model} ({meta['img_size']} px, sha256 {meta['sha256'][:12]}) -> {args.out}")


def _cmd_tables(args) -> None:
    from deit_repro.tables import run_tables

    params = _params(args)
    written = run_tables(params, metrics=args.metrics, out=args.out, reference=args.reference)
    print("wrote " + ", ".join(str(p) for p in written))


def _cmd_schema(args) -> None:
    import yaml

    from deit_repro import atomic
    from deit_repro.config import params_schema

    text = yaml.safe_dump(params_schema(), sort_keys=False, width=100)
    atomic.write_text(args.out, text)
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deit-repro", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default=os.environ.get("DEIT_REPRO_LOG", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="experiment parameters (default: params.yaml)")
        sp.set_defaults(func=func)
        return sp

    def training(sp: argparse.ArgumentParser, launched: bool = True) -> None:
        sp.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
        sp.add_argument("--out", type=Path, required=True, help="model directory to write")
        sp.add_argument("--run-dir", type=Path, default=None,
                        help="the run's working directory: resumable checkpoint, live history, "
                             "run.json provenance (default: none; run.json goes to --out)")
        sp.add_argument("--seed", type=int, default=None,
                        help="train this one seed into --out (default: every seed of params "
                             "seeds, into --out/seed<k>/)")
        sp.add_argument("--metrics", type=Path, default=None,
                        help="JSON file for the metrics' mean ± std over the seeds")
        sp.add_argument("--history", type=Path, default=None,
                        help="CSV file for the per-epoch metrics of every seed")
        sp.add_argument("--jobs", type=int, default=None,
                        help="seeds trained at a time (default: cores / params threads)")
        if launched:
            sp.add_argument("--launcher", choices=["in-process", "local", "slurm"], default=None,
                            help="where the runs train (default: params launch.launcher): here, "
                                 "or one submitit job per seed on this machine or on SLURM")

    sp = stage("prepare", _cmd_prepare, "materialise a dataset of the profile (with manifest)")
    sp.add_argument("--dataset", required=True, help="a key of datasets: in params.yaml")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--source-dir", type=Path, default=None,
                    help="where the raw data is (default: the source's usual place)")

    sp = stage("teacher", _cmd_teacher, "train the convnet teacher or load released weights")
    training(sp, launched=False)
    sp.add_argument("--weights", type=Path, default=None,
                    help="a local weights file instead of training / downloading")
    sp.add_argument("--arch", choices=["convnet", "vit"], default="convnet",
                    help="the distillation teacher (convnet) or Table 2's transformer teacher")

    sp = stage("pretrain", _cmd_pretrain, "train a DeiT student (none | soft | hard distillation)")
    training(sp)
    sp.add_argument("--teacher", type=Path, default=None, help="teacher model directory")
    sp.add_argument("--distill", choices=["none", "soft", "hard"], required=True)
    sp.add_argument("--dist-token", choices=["yes", "no", "auto"], default="auto",
                    help="add the distillation token (DeiT⚗); auto: yes unless --distill none")

    sp = stage("finetune", _cmd_finetune, "fine-tune a student at a higher resolution")
    training(sp)
    sp.add_argument("--student", type=Path, required=True)
    sp.add_argument("--teacher", type=Path, default=None)
    sp.add_argument("--img-size", type=int, default=None, help="default: finetune.img_size")
    sp.add_argument("--interpolation", choices=["bicubic", "bilinear"], default=None,
                    help="positional-embedding resampling (default: finetune.interpolation)")

    sp = stage("transfer", _cmd_transfer, "fine-tune a pretrained student on another dataset")
    training(sp)
    sp.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained",
                    help="start from --student, or train the same architecture from scratch")
    sp.add_argument("--student", type=Path, default=None, help="pretrained student directory")

    sp = stage("evaluate", _cmd_evaluate, "accuracy per head, disagreement, throughput")
    sp.add_argument("--data", type=Path, required=True)
    sp.add_argument("--model", action="append", default=[], metavar="NAME=DIR", required=True)
    sp.add_argument("--teacher", type=Path, default=None)
    sp.add_argument("--out", type=Path, required=True, help="JSON file to write")

    sp = stage("throughput", _cmd_throughput, "inference throughput of the profile's models "
               "(largest batch that fits, mean of repeats)")
    sp.add_argument("--data", type=Path, required=True,
                    help="prepared dataset giving the class count and channels")
    sp.add_argument("--out", type=Path, required=True, help="JSON file to write")

    sp = stage("import-weights", _cmd_import_weights, "released weights (URL or file, pinned "
               "sha256) as a model directory: the evaluate-only path")
    sp.add_argument("--model", required=True, help="exact timm name, e.g. "
                    "deit_base_distilled_patch16_224")
    sp.add_argument("--weights", required=True, help="a local file or a URL")
    sp.add_argument("--sha256", required=True,
                    help="pinned digest (or the >= 8-digit prefix in a release's file name)")
    sp.add_argument("--data", type=Path, required=True,
                    help="prepared dataset it will be evaluated on (classes, channels)")
    sp.add_argument("--img-size", type=int, default=None,
                    help="input resolution (default: from the name, else 224)")
    sp.add_argument("--out", type=Path, required=True, help="model directory to write")

    sp = stage("launch-plan", _cmd_launch_plan, "dry run: print the sbatch file the submitit "
               "launcher would submit for a training stage (nothing is submitted)")
    sp.add_argument("--stage", choices=["pretrain", "finetune", "transfer"], default="pretrain")
    sp.add_argument("--folder", type=Path, default=Path("runs/pretrain/deit"),
                    help="the stage's run directory (submitit logs go below it)")

    sp = sub.add_parser("schema", help="write the JSON schema of params.yaml (Snakemake "
                        "validates its config with it)")
    sp.add_argument("--out", type=Path, default=Path("workflow/schemas/params.schema.yaml"))
    sp.set_defaults(func=_cmd_schema)

    sp = stage("tables", _cmd_tables, "regenerate the paper's tables from the metrics")
    sp.add_argument("--metrics", type=Path, required=True,
                    help="the metrics directory of the DAG (metrics/)")
    sp.add_argument("--reference", type=Path, default=Path("reference/paper"),
                    help="the paper's numbers as CSV (default: reference/paper)")
    sp.add_argument("--out", type=Path, required=True, help="results directory")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    from deit_repro.errors import DeitReproError

    t0 = time.perf_counter()
    try:
        _configure_threads(args)
        args.func(args)
        _report_cost(args.stage, time.perf_counter() - t0)
    except DeitReproError as err:
        print(f"deit-repro {args.stage}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.errno == errno.ENOSPC:
            # A failed write() carries no file name: name the stage's outputs instead.
            outputs = [f"--{flag.replace('_', '-')} {getattr(args, flag)}"
                       for flag in ("out", "run_dir") if getattr(args, flag, None)]
            where = err.filename or ", ".join(outputs) or "an output"
            print(f"deit-repro {args.stage}: error: no space left on device writing {where}; "
                  "free disk space and re-run (outputs are written atomically: the last "
                  "complete checkpoint is kept)", file=sys.stderr)
            return 4
        raise
    except KeyboardInterrupt:
        print(f"deit-repro {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


def _report_cost(stage: str, seconds: float) -> None:
    """One line per stage with its wall time and peak memory (this process and its children), so
    `dvc repro` shows the per-stage breakdown."""
    import resource

    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(f"deit-repro {stage}: done in {seconds:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB",
          file=sys.stderr)


#: stages that run one process where a training stage runs one per seed: they get the stage's
#: whole thread budget, threads x len(seeds) (issue #7: the 2-core DAG in under 10 minutes)
_ONE_PROCESS_STAGES = ("teacher", "evaluate")


def _configure_threads(args) -> None:
    """Fix torch's thread count from params (results on CPU depend on it: notes/small-scale.md):
    ``threads`` per run, ``threads x len(seeds)`` for the one-process stages."""
    if args.stage in ("prepare", "schema"):
        return
    import torch

    params = _params(args)
    budget = len(params.seeds) if args.stage in _ONE_PROCESS_STAGES else 1
    torch.set_num_threads(params.threads * budget)


def entry() -> None:
    """The ``deit-repro`` command: :func:`main` in a child of the fork server when one runs (torch
    and timm already imported, issue #7; see :mod:`deit_repro.forkserver`), else in this process;
    then :func:`finish`."""
    from deit_repro import forkserver

    code = forkserver.call(sys.argv)
    finish(main() if code is None else code)


def finish(code: int) -> None:
    """Exit without the interpreter's teardown.

    Freeing torch, timm and torch._dynamo at exit costs about 1 s a process here, once per DAG
    stage (issue #7). Every output is complete on disk by then (atomic writes, closed files); the
    log and the standard streams are flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
