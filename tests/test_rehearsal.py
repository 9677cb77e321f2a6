"""The rehearsal of the paper's configuration (profiles/imagenet.yaml + profiles/rehearsal.yaml).

* the overlay overrides only what must shrink to fit a CPU: any other change would make the
  rehearsal test something else than what runs on the cluster;
* `deit-repro compose` writes the composed params, refuses a bad overlay, and an overlay of one
  section never leaks into another through a YAML alias;
* (slow, on the local SLURM cluster) the whole rehearsal DAG runs under `dvc repro` and under
  `snakemake --profile slurm`, every training stage as submitit jobs (the teacher's included),
  pretraining as 2 DDP tasks, and both engines give the same metrics.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from deit_repro.config import compose_params, overlay, params_from_dict
from deit_repro.errors import ConfigError

PROFILES = ROOT / "profiles"

#: what the overlay may change (dotted paths, regular expressions): dataset roots (generated data;
#: CIFAR and Flowers as ImageFolder stand-ins, see the overlay), epochs, batch sizes, loader
#: workers and threads, evaluation/throughput sizes, the transformers' size (same timm classes),
#: the served weights, where jobs run, the profile's label
ALLOWED = [
    r"profile",
    r"threads",
    r"datasets\.\w+\.root",
    r"datasets\.(cifar10|cifar100|flowers102)\.source",
    r"(teacher|teacher\.vit|student|finetune|transfer)\.train\.(epochs|warmup_epochs|batch_size)",
    r"(teacher|teacher\.vit|student|finetune|transfer)\.train\.num_workers",
    r"transfer\.(recipes\.\w+|scratch_train)\.(epochs|warmup_epochs|batch_size|num_workers)",
    r"eval\.(batch_size|num_workers)",
    r"throughput\.(batch_sizes|warmup|repeats)",
    r"(student|teacher\.vit)\.model\.name",
    r"teacher\.weights\.(url|sha256)",
    r"launch\.(teacher|pretrain|finetune|transfer)\.\w+",
]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def test_the_overlay_changes_only_what_must_shrink():
    base = _leaves(yaml.safe_load((PROFILES / "imagenet.yaml").read_text()))
    composed = _leaves(compose_params(PROFILES / "imagenet.yaml", PROFILES / "rehearsal.yaml"))
    assert set(composed) == set(base), set(composed) ^ set(base)  # no key added or dropped
    changed = sorted(k for k in base if base[k] != composed[k])
    bad = [k for k in changed if not any(re.fullmatch(p, k) for p in ALLOWED)]
    assert not bad, f"the rehearsal overlay changes {bad}"
    # ... and what stays is the paper's path: the timm pipeline with RandAugment and workers,
    # repeated augmentation, the RegNetY-16GF teacher, DeiT⚗ by hard distillation, 224 -> 384
    # with crop 0.875, the six transfer datasets with their recipes, SLURM.
    p = params_from_dict(compose_params(PROFILES / "imagenet.yaml", PROFILES / "rehearsal.yaml"))
    assert p.student.train.aug.pipeline == "timm"
    assert p.student.train.aug.rand_augment == "rand-m9-mstd0.5-inc1"
    assert p.student.train.repeated_aug == 3 and p.student.train.num_workers > 0
    assert p.teacher.model.name == "regnety_160" and p.teacher.model.img_size == 224
    assert len(p.teacher.weights.sha256) == 64  # the full digest, not a prefix
    assert p.distill == "hard" and p.student.model.img_size == 224
    assert p.finetune.img_size == 384 and p.eval.crop_pct == 0.875
    assert p.transfer.datasets == (
        "cifar10",
        "cifar100",
        "flowers102",
        "stanford_cars",
        "inat2018",
        "inat2019",
    )
    assert (
        p.transfer.recipe("inat2018").opt == "adamw" and p.transfer.recipe("cifar10").opt == "sgd"
    )
    assert p.transfer.scratch == ("cifar10",)
    assert p.launch.launcher == "slurm" and p.launch.pretrain.world_size == 2
    assert p.datasets["imagenet"].source == "imagefolder"
    assert p.datasets["stanford_cars"].source == "stanford_cars"
    assert p.datasets["inat2018"].source == "inat2018"


def test_an_overlay_never_leaks_through_a_yaml_alias():
    base = yaml.safe_load("a: &r {epochs: 300, lr: 1}\nb: *r\n")
    assert base["a"] is base["b"]
    out = overlay(base, {"a": {"epochs": 1}})
    assert out == {"a": {"epochs": 1, "lr": 1}, "b": {"epochs": 300, "lr": 1}}
    assert base["a"]["epochs"] == 300  # the input is not modified


def test_compose_writes_the_params_and_refuses_a_bad_overlay(tmp_path):
    deit = str(Path(sys.executable).parent / "deit-repro")
    out = tmp_path / "params.yaml"
    proc = subprocess.run(
        [deit, "compose", "profiles/imagenet.yaml", "profiles/rehearsal.yaml", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("# Composed by `deit-repro compose`")
    assert yaml.safe_load(text)["profile"] == "imagenet-rehearsal"

    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  train: {epocs: 1}\n")
    proc = subprocess.run(
        [deit, "compose", "profiles/imagenet.yaml", str(bad), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "student.train.epocs" in lines[0] and "bad.yaml" in lines[0]
    assert out.read_text() == text  # the earlier file is intact
    with pytest.raises(ConfigError, match="not a mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        compose_params(PROFILES / "imagenet.yaml", tmp_path / "list.yaml")
