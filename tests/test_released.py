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


def _import(path, pin: str, data, out, url: str | None = None) -> int:
    return cli.main(
        [
            "--log-level",
            "WARNING",
            "import-weights",
            "--model",
            "deit_tiny_distilled_patch16_224",
            "--weights",
            url or str(path),
            "--sha256",
            pin,
            "--data",
            str(data),
            "--img-size",
            "32",
            "--out",
            str(out),
        ]
    )


def test_released_weights_are_evaluated_like_a_trained_model(
    released, fashion_small, smoke_params, tmp_path
):
    path, digest, net = released
    assert _import(path, digest, fashion_small, tmp_path / "ti") == 0
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
    code = _import(path, wrong, fashion_small, tmp_path / "x")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"has sha256 {digest}, not the pinned {wrong}" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("cut", ["", "4", "9", "63", "nonhex"])
def test_a_pin_that_pins_nothing_is_refused(released, fashion_small, tmp_path, capsys, cut):
    """Only the full digest or a release name's 8 digits pin: an empty, 4-, 9- or 63-digit or
    non-hex --sha256 is refused before anything is read or written."""
    path, digest, _ = released
    pin = "xyz" + digest[:8] if cut == "nonhex" else digest[: int(cut or 0)]
    code = _import(path, pin, fashion_small, tmp_path / "x")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"--sha256 {pin!r} is not a sha256 pin" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("form", ["upper", "prefix8", "prefix8-upper"])
def test_a_pin_in_either_case_or_as_a_release_prefix_is_accepted(
    released, fashion_small, tmp_path, form
):
    path, digest, _ = released
    pin = {"upper": digest.upper(), "prefix8": digest[:8], "prefix8-upper": digest[:8].upper()}
    assert _import(path, pin[form], fashion_small, tmp_path / "x") == 0
    assert torch.load(tmp_path / "x" / "model.pt", weights_only=True)


def test_a_file_url_and_a_missing_student_file_say_released_weights(
    released, fashion_small, tmp_path, capsys
):
    """file:// reads the pre-placed file (compute nodes without internet); a missing file is
    named as the released weights it is, not as a teacher's."""
    path, digest, _ = released
    assert _import(path, digest, fashion_small, tmp_path / "x", url=path.as_uri()) == 0
    code = _import(path, digest, fashion_small, tmp_path / "y", url=str(tmp_path / "nope.pth"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"released weights file {tmp_path / 'nope.pth'} not found" in err, err
