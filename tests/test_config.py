"""params.yaml loading: frozen typed objects, and every bad key, type or value
refused with a ConfigError whose message names the full dotted key and what is allowed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from conftest import ROOT, SMOKE, smoke_dict
from deit_repro.config import load_params, params_from_dict
from deit_repro.typed_yaml import config_hash
from deit_repro.errors import ConfigError


def set_key(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        params_from_dict(data)
    return str(info.value)


# ------------------------------------------------------------------------------------- valid input


def test_smoke_profile_loads_into_frozen_objects():
    p = load_params(SMOKE)
    assert p.profile == "smoke" and p.distill == "hard" and p.seeds == (0,) and p.threads == 1
    assert p.student.model.img_size == 20 and p.student.model.patch_size == 4
    assert p.teacher.model.channels == (8, 16, 32)  # YAML lists become tuples (hashable, frozen)
    assert p.datasets["fashion_mnist"].train_per_class == 40
    assert p.transfer.datasets == ("digits",)
    assert p.distillation.weights("soft") == (0.1, 3.0)
    assert p.distillation.weights("hard") == (0.5, 1.0)
    for obj, attr, value in (
        (p, "threads", 2),
        (p.student.train, "epochs", 5),
        (p.student.model, "patch_size", 2),
        (p.distillation.hard, "alpha", 0.1),
        (p.teacher.train.aug, "reprob", 0.0),
        (p.datasets["fashion_mnist"], "train_per_class", 1),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    assert p.threads == 1 and p.student.train.epochs == 1  # nothing changed


def test_effective_lr_is_lr_per_512_times_batch_over_512():
    p = load_params(SMOKE)
    recipe = p.student.train
    assert recipe.lr_per_512 == pytest.approx(8.0e-3) and recipe.batch_size == 64
    assert recipe.effective_lr() == pytest.approx(8.0e-3 * 64 / 512)  # 1e-3
    big = dataclasses.replace(recipe, batch_size=1024, lr_per_512=5.0e-4)
    assert big.effective_lr() == pytest.approx(1.0e-3)  # the paper's 5e-4 per 512 at batch 1024
    # Derived, never written back: the stored value is still the per-512 one.
    assert recipe.lr_per_512 == pytest.approx(8.0e-3)


def test_config_hash_is_stable_and_sees_every_value(tmp_path):
    a, b = load_params(SMOKE), load_params(SMOKE)
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16
    changed = tmp_path / "params.yaml"
    changed.write_text(yaml.safe_dump(set_key(smoke_dict(), "distillation.soft.tau", 2.0)))
    assert config_hash(load_params(changed)) != config_hash(a)
    assert config_hash(params_from_dict(smoke_dict())) == config_hash(a)


# ------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "dotted, wrong, suggestion",
    [
        ("", "thread", "threads"),
        ("student.train", "epochz", "student.train.epochs"),
        ("teacher.model", "chanels", "teacher.model.channels"),
        ("datasets.fashion_mnist", "train_per_clas", "datasets.fashion_mnist.train_per_class"),
        ("distillation.soft", "taus", "distillation.soft.tau"),
    ],
)
def test_unknown_key_names_full_path_and_suggests(dotted, wrong, suggestion):
    data = smoke_dict()
    node = data
    for part in filter(None, dotted.split(".")):
        node = node[part]
    node[wrong] = 1
    msg = error_of(data)
    full = f"{dotted}.{wrong}" if dotted else wrong
    assert f"unknown params key '{full}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_load_params_names_the_file_with_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    data = smoke_dict()
    data["student"]["train"]["epochz"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == (
        f"unknown params key 'student.train.epochz' in {path}; did you mean 'student.train.epochs'?"
    )


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    data = smoke_dict()
    data["distillation"]["hard"]["zzz"] = 1
    msg = error_of(data)
    assert "unknown params key 'distillation.hard.zzz'" in msg
    assert "valid keys here: alpha" in msg


def test_non_string_yaml_keys_are_a_config_error_not_a_crash(tmp_path):
    # `1:` and `on:` are an int and a bool to YAML 1.1; they used to crash sorted()/difflib.
    path = tmp_path / "params.yaml"
    path.write_text(SMOKE.read_text() + "\n1: x\non: y\nthreadz: 2\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "unknown params key '1'" in str(info.value)
    assert "valid keys here:" in str(info.value) and "threads" in str(info.value)


# ------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "dotted, value, expected",
    [
        ("student.train.epochs", "ten", "expected an integer"),
        ("threads", 1.5, "expected an integer"),
        ("seeds", 3, "expected a list"),
        ("teacher.train.batch_size", True, "expected an integer"),  # bool is not an int here
        ("student.train.lr_per_512", "fast", "expected a number"),
        ("student.train.ema", 1, "expected true/false"),
        ("student.model", "small", "expected a mapping"),
        ("datasets.fashion_mnist.train_per_class", 4.5, "expected an integer or null"),
        ("seeds", [0, "one"], "expected an integer"),
    ],
)
def test_wrong_type_names_key_and_expected_type(dotted, value, expected):
    msg = error_of(set_key(smoke_dict(), dotted, value))
    key, shown = (dotted, value) if not isinstance(value, list) else (f"{dotted}[1]", value[1])
    assert f"params key '{key}' = {shown!r} has the wrong type ({expected})" in msg
    assert msg.endswith("fix its value in params.yaml")


def test_exponent_without_dot_gets_the_yaml_hint():
    # PyYAML (YAML 1.1) reads 5e-4 as the string '5e-4'; the message says how to write it.
    data = yaml.safe_load(SMOKE.read_text().replace("lr_per_512: 8.0e-3", "lr_per_512: 8e-3"))
    msg = error_of(json.loads(json.dumps(data)))
    assert "params key 'teacher.train.lr_per_512' = '8e-3' is a string to YAML" in msg
    assert "5.0e-4, not 5e-4" in msg


# ------------------------------------------------------------------------------------ out of range


@pytest.mark.parametrize(
    "dotted, value, allowed",
    [
        ("student.train.epochs", -1, "expected a positive integer"),
        ("teacher.train.epochs", 0, "expected a positive integer"),
        ("distillation.hard.alpha", 1.5, "expected in [0, 1]"),
        ("distillation.soft.alpha", -0.1, "expected in [0, 1]"),
        ("distillation.soft.tau", 0.0, "expected positive"),
        ("distillation.soft.tau", -3.0, "expected positive"),
        ("student.model.patch_size", 6, "expected a divisor of img_size=20"),
        ("student.model.num_heads", 3, "expected a divisor of embed_dim=32"),
        ("student.train.aug.scale", [0.5, 0.2], "expected 0 < min <= max <= 1"),
        ("datasets.fashion_mnist.test_fraction", 1.0, "expected in (0, 1)"),
        ("threads", 0, "expected a positive integer"),
        ("seeds", [], "expected a non-empty list"),
        ("eval.crop_pct", 1.5, "expected in (0, 1]"),
    ],
)
def test_out_of_range_names_key_and_allowed_range(dotted, value, allowed):
    msg = error_of(set_key(smoke_dict(), dotted, value))
    shown = tuple(value) if isinstance(value, list) else value
    assert f"params key '{dotted}' = {shown!r} is out of range ({allowed})" in msg


def test_teacher_dataset_must_be_a_prepared_dataset_of_the_profile():
    msg = error_of(set_key(smoke_dict(), "teacher.dataset", "cifar10"))
    assert "params key 'teacher.dataset' = 'cifar10' is out of range" in msg
    assert "one of datasets: ['digits', 'fashion_mnist']" in msg
    msg = error_of(set_key(smoke_dict(), "transfer.datasets", ["digits", "flowers"]))
    assert "params key 'transfer.datasets' = 'flowers'" in msg


def test_unknown_distill_kind_lists_the_allowed_ones():
    msg = error_of(set_key(smoke_dict(), "distill", "medium"))
    assert "params key 'distill' = 'medium' is not one of 'none', 'soft', 'hard'" in msg


def test_unknown_dataset_source_lists_the_sources():
    msg = error_of(set_key(smoke_dict(), "datasets.digits.source", "mnist"))
    assert "params key 'datasets.digits.source' = 'mnist' is out of range" in msg
    assert "'fashion_mnist'" in msg and "'imagefolder'" in msg


@pytest.mark.parametrize("sha", ["0" * 65, "a" * 63, "a" * 9, "g" * 64, "abc", "a5fe301", ""])
def test_bad_sha256_pin_is_refused(sha):
    data = set_key(smoke_dict(), "teacher.weights", {"url": "https://x/w.pth", "sha256": sha})
    msg = error_of(data)
    assert f"params key 'teacher.weights.sha256' = {sha!r} is out of range" in msg
    assert "64 hex digits (the full digest), or the 8 in a release's file name" in msg


@pytest.mark.parametrize("sha", ["A" * 64, "a" * 64, "A5FE301D", "a5fe301d"])
def test_a_full_or_release_prefix_pin_in_either_case_is_accepted(sha):
    data = set_key(smoke_dict(), "teacher.weights", {"url": "https://x/w.pth", "sha256": sha})
    assert params_from_dict(data).teacher.weights.sha256 == sha


def test_error_inside_an_optional_section_keeps_the_inner_key():
    # transfer.scratch_train is Optional[TrainCfg]: a typo inside it is named, not reported as
    # "transfer.scratch_train has the wrong type".
    data = set_key(smoke_dict(), "transfer.scratch_train", {"epochz": 3})
    msg = error_of(data)
    assert "unknown params key 'transfer.scratch_train.epochz'" in msg
    assert "did you mean 'transfer.scratch_train.epochs'?" in msg
    msg = error_of(set_key(smoke_dict(), "transfer.scratch_train", "same"))
    assert (
        "params key 'transfer.scratch_train' = 'same' has the wrong type "
        "(expected a mapping or null)"
    ) in msg


@pytest.mark.parametrize("sha", ["0" * 64, "a5fe301d"])
def test_good_sha256_pin_is_kept(sha):
    # A full digest, or the release's file-name prefix (torch.hub's check_hash convention).
    data = set_key(smoke_dict(), "teacher.weights", {"url": "https://x/w.pth", "sha256": sha})
    assert params_from_dict(data).teacher.weights.sha256 == sha


# --------------------------------------------------------------------------------- missing / files


@pytest.mark.parametrize(
    "dotted", ["teacher", "student.model", "teacher.dataset", "finetune.img_size"]
)
def test_missing_required_key_is_named(dotted):
    data = smoke_dict()
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[last]
    msg = error_of(data)
    assert msg == f"params key '{dotted}' is missing; add it to params.yaml"


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("profile: smoke\nteacher:\n  dataset: x\n   model: y\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert f"params file {path} is not valid YAML at line 4" in msg
    assert msg.endswith("fix the YAML syntax")


@pytest.mark.parametrize("text, what", [("", "empty"), ("- a\n- b\n", "not a mapping")])
def test_empty_or_list_params_file_names_the_file(tmp_path, text, what):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(f"params file {path} is {what}")


def test_missing_params_file_mentions_the_flag(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "nope.yaml")
    msg = str(info.value)
    assert f"params file {tmp_path / 'nope.yaml'} not found" in msg
    assert "--params PATH" in msg


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        params_from_dict(["profile", "smoke"])  # type: ignore[arg-type]


@pytest.mark.parametrize("seeds, repeated", [([0, 0], "repeats 0"), ([3, 1, 3], "repeats 3")])
def test_repeated_seed_is_refused_naming_the_value(seeds, repeated):
    # One run counted twice would shrink the reported ± std: refused when params load.
    message = error_of(set_key(smoke_dict(), "seeds", seeds))
    assert f"params key 'seeds' = {seeds} {repeated}" in message, message
    assert "give each run its own seed" in message and "\n" not in message


def test_repeated_seed_in_a_params_file_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(set_key(smoke_dict(), "seeds", [0, 0])))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == (
        f"params key 'seeds' = [0, 0] repeats 0 in {path}; give each run its own seed"
    )


def test_distinct_seeds_are_accepted():
    assert params_from_dict(set_key(smoke_dict(), "seeds", [0, 1, 2])).seeds == (0, 1, 2)


@pytest.mark.parametrize(
    "budgets, why",
    [
        ([6, 6], "distinct budgets"),
        ([2], "longer than student.train.warmup_epochs=2"),
    ],
)
def test_figure3_budgets_are_checked(tmp_path, budgets, why):
    data = yaml.safe_load((ROOT / "profiles" / "fashion.yaml").read_text())
    data["figure3"] = {"budgets": budgets}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="figure3.budgets") as err:
        load_params(path)
    assert why in str(err.value)
    data["figure3"] = {"budgets": [6, 12]}
    path.write_text(yaml.safe_dump(data))
    assert load_params(path).budget_epochs() == [6, 12, 18]
    # The pretrain schedule among the budgets (an experiment on student.train.epochs): accepted,
    # the figure reads the pretrain stage's runs for it.
    data["student"]["train"]["epochs"] = 12
    path.write_text(yaml.safe_dump(data))
    assert load_params(path).budget_epochs() == [6, 12]
