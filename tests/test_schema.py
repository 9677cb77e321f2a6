"""workflow/schemas/params.schema.yaml (what Snakemake validates its config with) is generated from
the same declarations the Python loader enforces, and both accept and refuse the same params."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from conftest import ROOT, smoke_dict
from deit_repro.config import params_from_dict, params_schema
from deit_repro.errors import ConfigError

SCHEMA_FILE = ROOT / "workflow" / "schemas" / "params.schema.yaml"
PROFILES = sorted((ROOT / "profiles").glob("*.yaml")) + [ROOT / "params.yaml"]


def _schema() -> dict:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def test_committed_schema_is_the_generated_one():
    assert _schema() == yaml.safe_load(yaml.safe_dump(params_schema())), (
        "workflow/schemas/params.schema.yaml is stale: run `deit-repro schema`"
    )


#: overlays are not profiles: each is checked laid on the profile it is written for
OVERLAYS = {"rehearsal.yaml": "imagenet.yaml"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_passes_both(path):
    from deit_repro.config import compose_params

    if path.name in OVERLAYS:
        data = compose_params(path.parent / OVERLAYS[path.name], path)
    else:
        data = yaml.safe_load(path.read_text())
    jsonschema.validate(data, _schema())
    params_from_dict(data)


# Single-field faults: each must be refused by the loader AND by the schema, at the same key.
BAD = [
    ("student.train.epochs", -1),
    ("teacher.train.epochs", 0),
    ("student.train.epochs", "ten"),
    ("student.train.lr_per_512", "5e-4"),  # YAML 1.1 reads this as a string
    ("student.train.lr_per_512", 0.0),
    ("threads", 0),
    ("threads", 1.5),
    ("seeds", []),
    ("seeds", [0, "one"]),
    ("distill", "medium"),
    ("distillation.hard.alpha", 1.5),
    ("distillation.soft.alpha", -0.1),
    ("distillation.soft.tau", 0.0),
    ("student.train.ema", 1),
    ("teacher.train.batch_size", True),
    ("student.train.aug.scale", [0.0, 1.0]),
    ("student.train.aug.scale", [0.5]),
    ("student.train.aug.pipeline", "dali"),
    ("student.train.drop_path", 1.0),
    ("student.train.repeated_aug", 0),
    ("eval.crop_pct", 1.5),
    ("datasets.fashion_mnist.test_fraction", 1.0),
    ("datasets.fashion_mnist.source", "mnist"),
    ("datasets.fashion_mnist.train_per_class", 0),
    ("student.model.patch_size", 0),
    ("teacher.weights", {"url": "x", "sha256": "XYZ"}),
    ("throughput.batch_sizes", []),
    ("launch.launcher", "pbs"),
    ("launch.pretrain.nodes", 0),
    ("launch.pretrain.gpus_per_node", -1),
    ("launch.slurm.additional", {"exclude": [3]}),
    ("student.train.epohcs", 3),  # unknown key
    ("launch.pretrain.gpus", 8),  # unknown key
]


@pytest.mark.parametrize("dotted, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_schema_and_loader_refuse_the_same_value(dotted, value):
    data = _set(smoke_dict(), dotted, value)
    with pytest.raises(ConfigError) as info:
        params_from_dict(data)
    key = dotted.rsplit(".", 1)[0] if dotted.endswith(("epohcs", "gpus")) else dotted
    assert key.split(".")[-1] in str(info.value)
    errors = list(jsonschema.Draft202012Validator(_schema()).iter_errors(data))
    assert errors, f"the schema accepts {dotted}={value!r}, the loader does not"
    paths = {".".join(str(p) for p in e.absolute_path) for e in errors}
    # the error sits at the key (or, for an unknown key / a wrong item, at its parent or item)
    assert any(
        p == key or p.startswith(key + ".") or key.startswith(p + ".") and p for p in paths
    ), paths


# Checks across fields: only the loader can make them (documented in params_schema()).
CROSS = [
    ("student.model.patch_size", 6),
    ("student.model.num_heads", 3),
    ("student.train.aug.scale", [0.5, 0.2]),
    ("teacher.dataset", "cifar10"),
    ("launch.pretrain.tasks_per_node", 3),
]


@pytest.mark.parametrize("dotted, value", CROSS, ids=[f"{k}={v!r}" for k, v in CROSS])
def test_cross_field_checks_are_the_loaders(dotted, value):
    data = _set(smoke_dict(), dotted, value)
    if dotted == "launch.pretrain.tasks_per_node":
        _set(data, "launch.pretrain.gpus_per_node", 8)
    with pytest.raises(ConfigError, match=dotted.split(".")[-1]):
        params_from_dict(data)
    jsonschema.validate(data, _schema())  # accepted: the schema cannot say it
