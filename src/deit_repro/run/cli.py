"""deit-repro STAGE ...: every stage of the DAG as a plain command.

Parameters come from ``--params`` (default ``params.yaml``), loaded once; every path a stage reads
or writes is an argument. This module only parses, dispatches and reports: what a stage computes,
and every rule that changes a number, lives in :mod:`deit_repro.stages` (a DVC dep of the stage);
where the runs happen is :mod:`deit_repro.run.launch` / :mod:`deit_repro.run.seeds`. Errors the
user can fix print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from deit_repro.config import DISTILL_MODES, LAUNCHED_STAGES, Params, load_params
from deit_repro.errors import ConfigError, DeitReproError

_logger = logging.getLogger("deit_repro")


def _cmd_prepare(args, params: Params) -> None:
    from deit_repro.stages.prepare import run_prepare

    if args.dataset not in params.datasets:
        raise ConfigError(
            f"dataset '{args.dataset}' is not in params.yaml datasets "
            f"({', '.join(sorted(params.datasets))})",
            "add it under datasets:",
        )
    manifest = run_prepare(
        params.datasets[args.dataset],
        out=args.out,
        source_dir=args.source_dir,
        splits=("test",) if args.splits == "test" else ("train", "test"),
    )
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    print(
        f"prepared {args.dataset} -> {args.out}: {counts}, content hash "
        f"{manifest['content_hash'][:12]}"
    )


def _train(args, run) -> list[dict]:
    """Run a training stage where ``params.launch.launcher`` (or ``--launcher``) says
    (:func:`deit_repro.run.launch.run_stage`); every seed's final metrics."""
    from deit_repro.run.launch import run_stage

    return run_stage(
        run,
        data=args.data,
        out=args.out,
        run_dir=args.run_dir,
        seed=args.seed,
        metrics=args.metrics,
        history=args.history,
        live=args.live,
        launcher=args.launcher,
        jobs=args.jobs,
        log_level=args.log_level,
    )


def _summary(runs: list[dict]) -> str:
    heads = runs[0]["heads"]
    parts = []
    for h in heads:
        vals = [r["heads"][h]["top1"] for r in runs]
        sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        parts.append(f"{h} {statistics.fmean(vals):.2f}{sd}")
    return f"top-1 ({len(runs)} seed{'s' if len(runs) > 1 else ''}): " + ", ".join(parts)


def _cmd_teacher(args, params: Params) -> None:
    from deit_repro.stages.teacher import TeacherRun

    run = TeacherRun(
        params=params, data=args.data, weights=args.weights, arch=args.arch, restart=args.restart
    )
    print(f"teacher -> {args.out}: {_summary(_train(args, run))}")


def _cmd_pretrain(args, params: Params) -> None:
    from deit_repro.stages.pretrain import PretrainRun, dist_token_of

    run = PretrainRun(
        params=params,
        data=args.data,
        teacher=args.teacher,
        distill=args.distill,
        dist_token=dist_token_of(args.distill, args.dist_token),
        epochs=args.epochs,
        restart=args.restart,
    )
    print(
        f"pretrain {args.distill} token={run.dist_token} -> {args.out}: "
        f"{_summary(_train(args, run))}"
    )


def _cmd_finetune(args, params: Params) -> None:
    from deit_repro.stages.finetune import FinetuneRun

    run = FinetuneRun(
        params=params,
        data=args.data,
        student=args.student,
        teacher=args.teacher,
        img_size=args.img_size,
        interpolation=args.interpolation,
        restart=args.restart,
    )
    print(f"finetune -> {args.out}: {_summary(_train(args, run))}")


def _cmd_transfer(args, params: Params) -> None:
    from deit_repro.stages.transfer import TransferRun

    run = TransferRun(
        params=params,
        data=args.data,
        init=args.init,
        student=args.student,
        dataset=args.dataset,
        restart=args.restart,
    )
    print(f"transfer ({args.init}) -> {args.out}: {_summary(_train(args, run))}")


def _cmd_launch_plan(args, params: Params) -> None:
    """Dry run: what the submitit launcher would submit for a training stage (no job is sent)."""
    from deit_repro.core.datasets import per_rank_batch
    from deit_repro.run import launch

    if args.cost:
        from deit_repro.run.cost import RATES, cost_table, load_rates

        print(cost_table(params, load_rates(args.rates or RATES), args.data_root))
        return
    evaluate_only = (
        args.launch_stage == "teacher" and args.arch == "convnet" and params.teacher.weights
    )
    res = params.launch.resources(args.launch_stage, evaluate_only=bool(evaluate_only))
    recipe = params.recipe(args.launch_stage)
    if args.launch_stage == "transfer" and args.dataset is not None:
        if args.dataset not in params.transfer.datasets:
            raise ConfigError(
                f"--dataset {args.dataset!r} is not in transfer.datasets "
                f"{list(params.transfer.datasets)}",
                "pass one of them",
            )
        recipe = params.transfer.recipe(args.dataset)
    world = res.world_size
    per_task = per_rank_batch(recipe.batch_size, world)
    if evaluate_only:
        what = "released weights, downloaded and evaluated: one job for every seed"
    else:
        what = (
            f"global batch {recipe.batch_size} = {per_task} per task; effective lr "
            f"{recipe.effective_lr():g}; one job per seed {list(params.seeds)}"
        )
    print(
        f"# {args.launch_stage} on launcher {params.launch.launcher}: {res.nodes} node(s) x "
        f"{res.tasks_per_node} task(s) = world size {world}, {res.gpus_per_node} GPU(s)/node; "
        f"{what}"
    )
    # the run directory dvc.yaml gives the stage's first variant
    first = {
        "teacher": "runs/teacher" if args.arch == "convnet" else "runs/teacher_vit",
        "pretrain": "runs/pretrain/deit",
        "finetune": "runs/finetune/bicubic",
        "transfer": f"runs/transfer/{args.dataset or params.transfer.datasets[0]}-pretrained",
    }[args.launch_stage]
    folder = Path(args.folder or first)
    folder = (folder if evaluate_only else folder / f"seed{params.seeds[0]}") / "submitit"
    print(
        launch.sbatch_script(
            params.launch,
            res,
            folder.resolve(),
            f"deit-repro-{args.launch_stage}-seed{params.seeds[0]}",
        )
    )


def _cmd_evaluate(args, params: Params) -> None:
    from deit_repro.stages.evaluate import run_evaluate

    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r} is not NAME=DIR", "write e.g. --model deit=runs/x")
        models[name] = Path(path)
    res = run_evaluate(
        params,
        data=args.data,
        models=models,
        teacher=args.teacher,
        out=args.out,
        summary=args.summary,
    )
    for name, entry in res["models"].items():
        print(
            f"{name}: "
            + ", ".join(
                f"{h} {v['top1']['mean']:.2f} ± {v['top1']['std']:.2f}"
                for h, v in entry["heads"].items()
            )
        )


def _cmd_throughput(args, params: Params) -> None:
    from deit_repro.stages.throughput import run_throughput

    res = run_throughput(params, data=args.data, out=args.out, summary=args.summary)
    for name, entry in res["models"].items():
        print(
            f"{name} ({entry['img_size']} px): {entry['images_per_s']:.0f} images/s "
            f"(batch {entry['batch_size']})"
        )


def _cmd_import_weights(args, params: Params | None) -> None:
    from deit_repro.stages.released import import_weights

    meta = import_weights(
        model=args.model,
        weights=args.weights,
        sha256=args.sha256,
        data=args.data,
        out=args.out,
        img_size=args.img_size,
    )
    print(f"{args.model} ({meta['img_size']} px, sha256 {meta['sha256'][:12]}) -> {args.out}")


def _cmd_tables(args, params: Params) -> None:
    from deit_repro.reporting.report import run_tables

    written = run_tables(
        params,
        metrics=args.metrics,
        out=args.out,
        reference=args.reference,
        models=args.models,
        released=args.released,
    )
    print("wrote " + ", ".join(str(p) for p in written))


#: what `check-params` writes: the same bytes whatever the params, so that the stages that
#: depend on it re-run for their own params, not for this gate's
PARAMS_CHECKED = (
    "params.yaml loads: every key known, every value in range (deit-repro check-params)\n"
)


def _cmd_check_params(args, params: Params) -> None:
    from deit_repro import atomic

    # Loading params.yaml (main, before this) is the check; a bad value never gets here.
    if not args.out.is_file() or args.out.read_text() != PARAMS_CHECKED:
        atomic.write_text(args.out, PARAMS_CHECKED)
    print(f"{args.params}: valid")


def _cmd_compose(args, params: Params | None) -> None:
    import yaml

    from deit_repro import atomic
    from deit_repro.config import compose_params

    data = compose_params(args.profile, *args.overlay)
    names = " + ".join(str(p) for p in (args.profile, *args.overlay))
    header = (
        f"# Composed by `deit-repro compose` from {names}:\n"
        "# edit those files and compose again rather than this one.\n"
    )
    atomic.write_text(args.out, header + yaml.safe_dump(data, sort_keys=False, width=100))
    print(f"wrote {args.out} ({names})")


def _cmd_schema(args, params: Params | None) -> None:
    import yaml

    from deit_repro import atomic
    from deit_repro.config import params_schema

    text = yaml.safe_dump(params_schema(), sort_keys=False, width=100)
    atomic.write_text(args.out, text)
    print(f"wrote {args.out}")


def _subcommand(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """A stage's subcommand, with the --params option every stage reads."""
    sp = sub.add_parser(name, help=help, description=help)
    sp.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="experiment parameters (default: params.yaml)",
    )
    sp.set_defaults(func=func)
    return sp


def _summary_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="JSON file of the headline numbers (the DVC metric); the whole result goes to --out",
    )


def _training_options(sp: argparse.ArgumentParser) -> None:
    """What every training stage takes: its data, outputs, seeds and where its runs happen."""
    sp.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    sp.add_argument("--out", type=Path, required=True, help="model directory to write")
    sp.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="the run's working directory: resumable checkpoint, live history, "
        "run.json provenance (default: none; run.json goes to --out)",
    )
    sp.add_argument(
        "--seed",
        type=int,
        default=None,
        help="train this one seed into --out (default: every seed of params "
        "seeds, into --out/seed<k>/)",
    )
    sp.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="JSON file for the metrics' mean ± std over the seeds",
    )
    sp.add_argument(
        "--history",
        type=Path,
        default=None,
        help="CSV file for the per-epoch metrics of every seed",
    )
    sp.add_argument(
        "--live",
        type=Path,
        default=None,
        help="DVCLive directory of the stage: per-epoch mean over the seeds while they "
        "train, and the final numbers (metrics.json, plots/metrics/*.tsv)",
    )
    sp.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="seeds trained at a time (default: cores / params threads)",
    )
    sp.add_argument(
        "--launcher",
        choices=["in-process", "local", "slurm"],
        default=None,
        help="where the runs train (default: params launch.launcher): here, "
        "or one submitit job per seed on this machine or on SLURM",
    )
    sp.add_argument(
        "--restart",
        action="store_true",
        help="when --run-dir holds an unfinished checkpoint of other params or code, "
        "move it aside (<name>.replaced-<fingerprint>.pth) and start over instead of "
        "stopping; a checkpoint of this run is still resumed from",
    )


def _add_prepare(sub) -> None:
    sp = _subcommand(
        sub, "prepare", _cmd_prepare, "materialise a dataset of the profile (with manifest)"
    )
    sp.add_argument("--dataset", required=True, help="a key of datasets: in params.yaml")
    sp.add_argument(
        "--out", type=Path, required=True, help="prepared dataset directory to write (data/NAME)"
    )
    sp.add_argument(
        "--source-dir",
        type=Path,
        default=None,
        help="where the raw data is (default: the source's usual place)",
    )
    sp.add_argument(
        "--splits",
        choices=["both", "test"],
        default="both",
        help="test: an image tree's val/ alone (ImageNet for evaluating released checkpoints, "
        "README 'Evaluate-only'); the training stages need both",
    )


def _add_teacher(sub) -> None:
    sp = _subcommand(
        sub, "teacher", _cmd_teacher, "train the convnet teacher or load released weights"
    )
    _training_options(sp)
    sp.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="a local weights file instead of training / downloading",
    )
    sp.add_argument(
        "--arch",
        choices=["convnet", "vit"],
        default="convnet",
        help="the distillation teacher (convnet) or Table 2's transformer teacher",
    )


def _add_pretrain(sub) -> None:
    sp = _subcommand(
        sub, "pretrain", _cmd_pretrain, "train a DeiT student (none | soft | hard distillation)"
    )
    _training_options(sp)
    sp.add_argument("--teacher", type=Path, default=None, help="teacher model directory")
    sp.add_argument(
        "--distill",
        choices=list(DISTILL_MODES),
        required=True,
        help="distillation from --teacher: none, soft (KL on the teacher's softened output), "
        "hard (its argmax)",
    )
    sp.add_argument(
        "--dist-token",
        choices=["yes", "no", "auto"],
        default="auto",
        help="add the distillation token (DeiT⚗); auto: yes unless --distill none",
    )
    sp.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="a Figure 3 budget: the recipe with its own whole schedule of this many epochs "
        "(default: student.train.epochs)",
    )


def _add_finetune(sub) -> None:
    sp = _subcommand(sub, "finetune", _cmd_finetune, "fine-tune a student at a higher resolution")
    _training_options(sp)
    sp.add_argument(
        "--student", type=Path, required=True, help="the pretrained student's model directory"
    )
    sp.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="teacher model directory (a distilled student keeps distilling while fine-tuned)",
    )
    sp.add_argument("--img-size", type=int, default=None, help="default: finetune.img_size")
    sp.add_argument(
        "--interpolation",
        choices=["bicubic", "bilinear"],
        default=None,
        help="positional-embedding resampling (default: finetune.interpolation)",
    )


def _add_transfer(sub) -> None:
    sp = _subcommand(
        sub, "transfer", _cmd_transfer, "fine-tune a pretrained student on another dataset"
    )
    _training_options(sp)
    sp.add_argument(
        "--init",
        choices=["pretrained", "scratch"],
        default="pretrained",
        help="start from --student, or train the same architecture from scratch",
    )
    sp.add_argument("--student", type=Path, default=None, help="pretrained student directory")
    sp.add_argument(
        "--dataset",
        default=None,
        help="the key of transfer.datasets whose recipe applies (default: the --data "
        "directory's name)",
    )


def _add_evaluate(sub) -> None:
    sp = _subcommand(sub, "evaluate", _cmd_evaluate, "accuracy per head, disagreement, throughput")
    sp.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    sp.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        required=True,
        help="a model directory under a name (repeat); the tables read the names none, soft, "
        "hard, deit and deit_ft (README, 'The DAG'), and released checkpoints (import-weights) "
        "as released/<timm name> (README, 'Evaluate-only')",
    )
    sp.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="teacher model directory: its predictions join Table 4's disagreement matrix",
    )
    sp.add_argument("--out", type=Path, required=True, help="JSON file to write")
    _summary_option(sp)


def _add_throughput(sub) -> None:
    sp = _subcommand(
        sub,
        "throughput",
        _cmd_throughput,
        "inference throughput of the profile's models (largest batch that fits, mean of repeats)",
    )
    sp.add_argument(
        "--data",
        type=Path,
        required=True,
        help="prepared dataset giving the class count and channels",
    )
    sp.add_argument("--out", type=Path, required=True, help="JSON file to write")
    _summary_option(sp)


def _add_import_weights(sub) -> None:
    sp = _subcommand(
        sub,
        "import-weights",
        _cmd_import_weights,
        "released weights (URL or file, pinned "
        "sha256) as a model directory: the evaluate-only path",
    )
    sp.add_argument(
        "--model", required=True, help="exact timm name, e.g. deit_base_distilled_patch16_224"
    )
    sp.add_argument("--weights", required=True, help="a local file or a URL")
    sp.add_argument(
        "--sha256",
        required=True,
        help="pinned digest (or the >= 8-digit prefix in a release's file name)",
    )
    sp.add_argument(
        "--data",
        type=Path,
        required=True,
        help="prepared dataset it will be evaluated on (classes, channels)",
    )
    sp.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input resolution (default: from the name, else 224)",
    )
    sp.add_argument("--out", type=Path, required=True, help="model directory to write")


def _add_launch_plan(sub) -> None:
    sp = _subcommand(
        sub,
        "launch-plan",
        _cmd_launch_plan,
        "dry run: print the sbatch file the submitit "
        "launcher would submit for a training stage (nothing is submitted)",
    )
    # dest: `stage` is the subcommand's own name (the error prefix, the cost line)
    sp.add_argument(
        "--stage",
        dest="launch_stage",
        choices=LAUNCHED_STAGES,
        default="pretrain",
        help="the training stage whose job to show (default: pretrain)",
    )
    sp.add_argument(
        "--dataset",
        default=None,
        help="with --stage transfer: the dataset whose recipe the plan scales "
        "(default: transfer.train)",
    )
    sp.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="the stage's run directory (submitit logs go below it; default: the one dvc.yaml "
        "gives the stage's first variant, e.g. runs/finetune/bicubic)",
    )
    sp.add_argument(
        "--arch",
        choices=["convnet", "vit"],
        default="convnet",
        help="with --stage teacher: which teacher (the convnet with released weights is only "
        "evaluated: one GPU)",
    )
    sp.add_argument(
        "--cost",
        action="store_true",
        help="instead: every training job of the DAG with its epochs, images, GPU-hours and "
        "wall time on the configured nodes, and the total (the bill before the run)",
    )
    sp.add_argument(
        "--rates",
        type=Path,
        default=None,
        help="with --cost: measured training images/s per GPU (default: "
        "bench/results/gpu_rates.json, one H200)",
    )
    sp.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="with --cost: where prepared datasets' manifests give their sizes (else the "
        "sources' published sizes)",
    )


def _add_compose(sub) -> None:
    sp = sub.add_parser(
        "compose",
        help="write a profile with overlays laid on it (e.g. the imagenet profile + the "
        "CPU rehearsal overlay) as a params file",
    )
    sp.add_argument("profile", type=Path, help="the base profile, e.g. profiles/imagenet.yaml")
    sp.add_argument("overlay", type=Path, nargs="+", help="overlays, applied in order")
    sp.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the params file to write (params.yaml to run it; required: it replaces the file)",
    )
    sp.set_defaults(func=_cmd_compose)


def _add_schema(sub) -> None:
    sp = sub.add_parser(
        "schema",
        help="write the JSON schema of params.yaml (Snakemake validates its config with it)",
    )
    sp.add_argument(
        "--out",
        type=Path,
        default=Path("workflow/schemas/params.schema.yaml"),
        help="where to write it (default: workflow/schemas/params.schema.yaml)",
    )
    sp.set_defaults(func=_cmd_schema)


def _add_check_params(sub) -> None:
    sp = _subcommand(
        sub,
        "check-params",
        _cmd_check_params,
        "load params.yaml with every check and write --out (the DAG's first stage: a bad value "
        "stops `dvc repro` before DVC removes any stage's outputs to re-run it)",
    )
    sp.add_argument("--out", type=Path, required=True, help="the file the other stages depend on")


def _add_tables(sub) -> None:
    sp = _subcommand(sub, "tables", _cmd_tables, "regenerate the paper's tables from the metrics")
    sp.add_argument(
        "--metrics", type=Path, required=True, help="the metrics directory of the DAG (metrics/)"
    )
    sp.add_argument(
        "--models",
        type=Path,
        default=None,
        help="the trained models (models/): each run's predictions.npy feeds the claims' "
        "per-image paired tests (without it: the seed tests alone)",
    )
    sp.add_argument(
        "--reference",
        type=Path,
        default=Path("reference/paper"),
        help="the paper's numbers as CSV (default: reference/paper)",
    )
    sp.add_argument(
        "--released",
        type=Path,
        default=None,
        help="an evaluate JSON of released checkpoints (evaluate --model released/<timm name>=DIR"
        "): their rows in Tables 1, 3, 4 and 5 (README, 'Evaluate-only')",
    )
    sp.add_argument("--out", type=Path, required=True, help="results directory")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deit-repro", description=__doc__.splitlines()[0])
    p.add_argument(
        "--version",
        action=_Version,
        help="print the version and the directory of the code that runs, and exit",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("DEIT_REPRO_LOG", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: $DEIT_REPRO_LOG, else INFO)",
    )
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for add in (
        _add_prepare,
        _add_teacher,
        _add_pretrain,
        _add_finetune,
        _add_transfer,
        _add_evaluate,
        _add_throughput,
        _add_import_weights,
        _add_launch_plan,
        _add_compose,
        _add_schema,
        _add_check_params,
        _add_tables,
    ):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one ``deit-repro`` command; its exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    _export_code_path()
    t0 = time.perf_counter()
    try:
        params = load_params(args.params) if hasattr(args, "params") else None
        args.func(args, params)
        _report_cost(args.stage, time.perf_counter() - t0)
    except DeitReproError as err:
        print(f"deit-repro {args.stage}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.errno == errno.ENOSPC:
            # A failed write() carries no file name: name the stage's outputs instead.
            outputs = [
                f"--{flag.replace('_', '-')} {getattr(args, flag)}"
                for flag in ("out", "run_dir")
                if getattr(args, flag, None)
            ]
            where = err.filename or ", ".join(outputs) or "an output"
            print(
                f"deit-repro {args.stage}: error: no space left on device writing {where}; "
                "free disk space and re-run (outputs are written atomically: the last "
                "complete checkpoint is kept)",
                file=sys.stderr,
            )
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

    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(
        f"deit-repro {stage}: done in {seconds:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB",
        file=sys.stderr,
    )


class _Version(argparse.Action):
    """``--version``, unwrapped (argparse's own wraps a long path)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import deit_repro

        where = Path(deit_repro.__file__).resolve().parent
        print(f"deit-repro {deit_repro.__version__} ({where})")
        parser.exit()


def checkout_src(cwd: Path | None = None) -> Path | None:
    """``<cwd>/src`` when the working directory is a checkout of this project whose code is not
    the code imported here, else None.

    ``scripts/setup.sh`` installs the package in editable mode from one checkout. A stage run in
    another copy (a queued ``dvc exp run`` in ``.dvc/tmp/exps/``, a clone, a test's repository)
    must run that copy's code: it is what DVC hashed as the stage's deps and what ``run.json``
    records (the copy's git commit)."""
    import deit_repro

    src = (cwd or Path.cwd()) / "src"
    here = src / "deit_repro"
    if not (here / "__init__.py").is_file():
        return None
    if here.resolve() == Path(deit_repro.__file__).resolve().parent:
        return None
    return src


def _export_code_path() -> None:
    """The processes this command starts (submitit jobs and their DDP ranks) import the code it
    runs: the checkout's ``src/`` in the working directory goes first on their PYTHONPATH (see
    :func:`checkout_src`)."""
    import deit_repro

    src = Path(deit_repro.__file__).resolve().parent.parent
    if (Path.cwd() / "src").resolve() == src:
        paths = [str(src), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def entry() -> None:
    """The ``deit-repro`` command: :func:`main` in a child of the fork server when one runs (torch
    and timm already imported; see :mod:`deit_repro.run.forkserver`), else in this process; in
    both, the code of the checkout in the working directory (:func:`checkout_src`)."""
    from deit_repro.run import forkserver

    src = checkout_src()
    path = [str(src), *sys.path] if src is not None else None
    try:
        code = forkserver.call(sys.argv, target=f"{__name__}:main", sys_path=path)
    except DeitReproError as err:
        print(f"deit-repro: error: {err}", file=sys.stderr)
        code = err.exit_code
    if code is None and src is not None:  # unserved: import the checkout's code here
        import importlib

        sys.path[:] = path
        for name in [m for m in sys.modules if m == "deit_repro" or m.startswith("deit_repro.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        code = importlib.import_module(__name__).main()
    forkserver.finish(main() if code is None else code)


if __name__ == "__main__":
    entry()
