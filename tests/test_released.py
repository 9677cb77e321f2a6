"""The evaluate-only path: released weights (pinned sha256, weights_only) -> model directory ->
the evaluate stage, as a user with ImageNet but no cluster would fill the tables."""

from __future__ import annotations

import pytest
import torch

from deit_repro import atomic
from deit_repro.run import cli
from deit_repro.core.engine import Runtime
from deit_repro.stages.evaluate import run_evaluate
from deit_repro.core.models import create_student


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A 'released' DeiT-Ti⚗ checkpoint in the official layout ({"model": state_dict})."""
    torch.manual_seed(0)
    net = create_student(
        name="deit_tiny_distilled_patch16_224",
        distilled=True,
        num_classes=10,
        img_size=32,
        in_chans=1,
        drop_path_rate=0.0,
    )
    path = tmp_path_factory.mktemp("release") / "deit_tiny_distilled_patch16_224-abcd.pth"
    torch.save({"model": net.state_dict()}, path)
    return path, atomic.sha256_file(path), net


def test_released_weights_are_evaluated_like_a_trained_model(
    released, fashion_small, smoke_params, tmp_path
):
    path, digest, net = released
    argv = [
        "--log-level",
        "WARNING",
        "import-weights",
        "--model",
        "deit_tiny_distilled_patch16_224",
        "--weights",
        str(path),
        "--sha256",
        digest,
        "--data",
        str(fashion_small),
        "--img-size",
        "32",
        "--out",
        str(tmp_path / "ti"),
    ]
    assert cli.main(argv) == 0
    saved = torch.load(tmp_path / "ti" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    res = run_evaluate(
        smoke_params,
        data=fashion_small,
        models={"ti": tmp_path / "ti"},
        teacher=None,
        out=tmp_path / "eval.json",
        rt=Runtime(torch.device("cpu")),
    )
    heads = res["models"]["ti"]["heads"]
    assert set(heads) == {"cls", "dist", "joint"} and res["models"]["ti"]["img_size"] == 32


def test_a_released_file_with_another_sha256_is_refused(released, fashion_small, tmp_path, capsys):
    path, digest, _ = released
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    code = cli.main(
        [
            "import-weights",
            "--model",
            "deit_tiny_distilled_patch16_224",
            "--weights",
            str(path),
            "--sha256",
            wrong,
            "--data",
            str(fashion_small),
            "--img-size",
            "32",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"has sha256 {digest}, not the pinned {wrong}" in err
    assert not (tmp_path / "x").exists()
