# The same DAG as dvc.yaml, run by Snakemake: one rule per resolved DVC stage, derived through
# DVC's own API (dvc.yaml stays the one definition; tests/test_dvc_and_snakemake.py proves both engines see
# the same stages, edges and commands).
#
#   snakemake --cores 2                              # local
#   snakemake --profile workflow/profiles/slurm      # jobs submitted to SLURM
#   snakemake -n                                     # plan only
#   snakemake --report report.html                  # the tables and figures, after a run
#
# After each job the stage is committed to DVC (`dvc commit -f <stage>`, one at a time under a file
# lock), so `dvc status` is clean after a Snakemake run; after a `dvc repro`, Snakemake finds every
# output up to date.
#
# SLURM, one scheme: a training stage whose params `launch.launcher` is `slurm` (or
# `local`) submits its own submitit jobs (nodes x GPUs, DDP, requeue) and waits, so it is a local
# rule here and never a SLURM job that submits SLURM jobs; every other rule is a job of the
# executor (a SLURM job under workflow/profiles/slurm, with that profile's per-rule resources).
import contextlib
import fcntl
import os
import re
from pathlib import Path

from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
from dvc.stage import PipelineStage
from snakemake.utils import validate

ROOT = workflow.basedir


configfile: os.path.join(ROOT, "params.yaml")


# The schema is generated from the loader's own declarations (`deit-repro schema`).
validate(config, os.path.join(ROOT, "workflow", "schemas", "params.schema.yaml"))

from deit_repro.config import LAUNCHED_STAGES, params_from_dict  # noqa: E402

PARAMS = params_from_dict(config)  # the typed params: what each launched job asks for

LAUNCHER = config.get("launch", {}).get("launcher", "in-process")
# A GPU profile (its training jobs have GPUs: imagenet) evaluates and measures throughput on one
# GPU as well; a CPU profile asks for none.
GPU_PROFILE = any(
    config.get("launch", {}).get(stage, {}).get("gpus_per_node", 0) > 0 for stage in LAUNCHED_STAGES
)
ON_ONE_GPU = ("evaluate", "throughput")


def _rel(path):
    return os.path.relpath(path, ROOT)


@contextlib.contextmanager
def _shared(fh):
    fcntl.flock(fh, fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


def load_dvc_stages(root):
    """Every stage of dvc.yaml as DVC resolves it (foreach/matrix, ${} interpolation).

    Read under a shared lock on the file that each finishing rule holds while its `dvc commit`
    rewrites dvc.lock (below): a job that starts then (every job parses this file) would otherwise
    read a half-written dvc.lock ("'./dvc.lock' validation failed")."""
    lock = Path(root) / ".snakemake" / "dvc-commit.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "a") as held, _shared(held), Repo(root) as repo:
        stages = []
        for st in repo.index.stages:
            if not isinstance(st, PipelineStage) or not st.cmd:
                continue
            deps, params = [], {}
            for d in st.deps:
                if isinstance(d, ParamsDependency):
                    params.update(d.read_params())
                else:
                    deps.append(_rel(d.fs_path))
            meta = (st.meta or {}).get("snakemake", {})
            stages.append(
                dict(
                    stage=st.addressing,
                    family=st.addressing.split("@")[0],
                    name=re.sub(r"\W", "_", st.addressing),  # pretrain@deit -> pretrain_deit
                    cmd=st.cmd if isinstance(st.cmd, str) else " && ".join(st.cmd),
                    deps=list(dict.fromkeys(deps)),
                    outs=[_rel(o.fs_path) for o in st.outs],
                    params=params,
                    resources=meta.get("resources", {}),
                    threads=meta.get("threads", 1),
                )
            )
        return stages


def link_deps(stages):
    """DVC links a dep to an out that contains it or that it contains (the `models/pretrain`
    gather); Snakemake links exact paths only: rewrite deps to the producing outs."""
    outs = [o for s in stages for o in s["outs"]]
    for s in stages:
        linked = []
        for d in s["deps"]:
            inner = [o for o in outs if Path(o).is_relative_to(d)]
            outer = [o for o in outs if o != d and Path(d).is_relative_to(o)]
            linked += inner or outer or [d]
        s["deps"] = [d for d in dict.fromkeys(linked) if d not in s["outs"]]
    return stages


DVC_STAGES = link_deps(load_dvc_stages(ROOT))
PARAMS_GATE = "metrics/params_checked.txt"


def _local(stage):
    """Whether a stage runs on the submit host: a training stage that submits its own jobs
    (the command, not the stage's name, says so: transfer_scratch runs `deit-repro transfer`),
    and check_params, which only loads params.yaml (no cluster queue for that)."""
    launches = LAUNCHER != "in-process" and stage["cmd"].split()[1] in LAUNCHED_STAGES
    return launches or stage["family"] == "check_params"


def _message(stage):
    """What `snakemake -n` (and the run's log) prints for a local rule instead of its resources:
    that it runs on this host and, for a training stage, the jobs it submits itself, sized by
    params launch.<stage> (the profile's set-resources do not apply to it). None: the default
    listing of an executor job."""
    if not _local(stage):
        return None
    sub = stage["cmd"].split()[1]
    if sub not in LAUNCHED_STAGES:
        return f"{stage['name']} (local rule): loads params.yaml on this host, no job submitted"
    # released teacher weights are only evaluated: one GPU (LaunchCfg.resources)
    only_evaluated = (
        sub == "teacher" and PARAMS.teacher.weights and "--arch vit" not in stage["cmd"]
    )
    r = PARAMS.launch.resources(sub, evaluate_only=bool(only_evaluated))
    jobs = "one job" if only_evaluated else "one job per seed"
    return (
        f"{stage['name']} (local rule): runs on this host and waits on the {LAUNCHER} jobs it "
        f"submits itself through submitit, {jobs} of {r.nodes} node(s) x {r.gpus_per_node} "
        f"GPU(s), {r.tasks_per_node} task(s) x {r.cpus_per_task} CPU(s) per node, "
        f"{r.mem_gb:g} GB per node, {r.timeout_min} min (params launch.{sub}); the profile's "
        "resources for this rule do not apply"
    )


# Outputs without a file extension are directories (data/<name>, models/...).
def _out(path):
    return directory(path) if os.path.splitext(path)[1] == "" else path


# `snakemake --report report.html`: the paper's tables and figures as the `tables` stage writes them
# into results/, each with a caption (workflow/report/<name>.rst) naming what of the paper it
# mirrors. report() on a directory gives all its files one caption, so each file is declared as an
# output of the rule whose DVC out holds it, beside that out: a run that stops writing one fails.
report: "workflow/report/workflow.rst"


TABLES, FIGURES, CLAIMS, OVERVIEW = "Tables", "Figures", "Claims", "Overview"
REPORT_ITEMS = {
    # results/<stem>.<ext> for each extension: category, subcategory; caption
    # workflow/report/<stem, lower case>.rst. Under results/, the `tables` stage's one DVC out.
    "results/table1_variants": ("md csv", TABLES, "Table 1: DeiT variants"),
    "results/table2_teacher": ("md csv", TABLES, "Table 2: convnet vs transformer teacher"),
    "results/table3_distillation": ("md csv", TABLES, "Table 3: distillation variants"),
    "results/table4_disagreement": ("md csv", TABLES, "Table 4: disagreement between classifiers"),
    "results/table5_throughput_accuracy": ("md csv", TABLES, "Table 5: throughput and top-1"),
    "results/table7_transfer": ("md csv", TABLES, "Table 7: transfer learning"),
    "results/table10_finetune_resolution": ("md csv", TABLES, "Table 10: fine-tuning resolution"),
    "results/figure1_throughput_accuracy": ("png", FIGURES, "Figure 1: throughput vs top-1"),
    "results/figure3_epochs": ("png md csv", FIGURES, "Figure 3: top-1 vs training epochs"),
    "results/claims": ("md csv", CLAIMS, "The paper's claims at this scale"),
    "results/README": ("md", OVERVIEW, "All results on one page"),
    "results/provenance": ("json", OVERVIEW, "The source of every number"),
}


def report_items(outs):
    """The report items inside these outputs, flagged for the report."""
    items = []
    for stem, (exts, category, subcategory) in REPORT_ITEMS.items():
        if not any(Path(stem).is_relative_to(o) for o in outs):
            continue
        caption = f"workflow/report/{Path(stem).name.lower()}.rst"
        for ext in exts.split():
            # (not at the start of a line: snakefmt would read `report` as the directive)
            items.append(report(f"{stem}.{ext}", caption, category, subcategory))
    return items


rule all:
    default_target: True
    input:
        [o for s in DVC_STAGES for o in s["outs"]],


for _s in DVC_STAGES:

    rule:
        name:
            _s["name"]
        input:
            # The params gate (dvc.yaml's check_params) is rewritten with the same bytes when
            # params change: ancient(), or its new mtime would re-run every rule.
            [ancient(d) if d == PARAMS_GATE else d for d in _s["deps"]],
        output:
            [_out(o) for o in _s["outs"]] + report_items(_s["outs"]),
        log:
            f"logs/{_s['name']}.log",
        localrule: _local(_s)
        # The pinned environment of scripts/setup.sh, used under `--sdm conda` (otherwise the rules
        # run in Snakemake's own environment); `snakemake --lint` asks every rule to name one.
        conda:
            "workflow/envs/deit-repro.yaml"
        threads: _s["threads"]
        resources:
            **_s["resources"],
            **({"gpu": 1} if GPU_PROFILE and _s["family"] in ON_ONE_GPU else {}),
        params:
            cmd=_s["cmd"],
            stage=_s["stage"],
            dvc_params=_s["params"],
        message:
            _message(_s)
        shell:
            # flock: DVC takes its repository lock without waiting; jobs finishing together
            # commit one after the other.
            "( {params.cmd} ) > {log} 2>&1"
            " && flock .snakemake/dvc-commit.lock dvc commit -f -q {params.stage:q} >> {log} 2>&1"
