"""The training engine: resume equals an uninterrupted run, training learns, the recipe's parts
are wired as the paper says, a non-finite loss stops with the step and the last checkpoint."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from deit_repro import atomic
from deit_repro.core.batches import epoch_indices
from deit_repro.config import TrainCfg
from deit_repro.core.engine import Runtime, base_criterion, fit, load_checkpoint
from deit_repro.errors import CheckpointError, ConfigError, TrainingError
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.models import create_student, set_training_outputs
from deit_repro.core.datasets import open_dataset, train_batches
from deit_repro.stages.pretrain import PretrainRun
from deit_repro.stages.teacher import TeacherRun
from deit_repro.stages.trainer import RunSpec

CPU = Runtime(torch.device("cpu"))


def _tiny_student(num_classes: int = 10, distilled: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return create_student(
        distilled=distilled,
        num_classes=num_classes,
        img_size=28,
        in_chans=1,
        patch_size=7,
        embed_dim=32,
        depth=2,
        num_heads=2,
        drop_path_rate=0.1,
    )


def _recipe(smoke_params, **kw) -> TrainCfg:
    return dataclasses.replace(smoke_params.student.train, **kw)


class _Stop(Exception):
    pass


def _fit(
    ds,
    recipe,
    ckpt: Path | None,
    *,
    stop_after: int | None = None,
    distilled=False,
    fingerprint: str = "test",
    **fit_kw,
):
    model = _tiny_student(distilled=distilled)
    set_training_outputs(model, distilled)

    def on_epoch_end(history):
        if stop_after is not None and len(history) == stop_after:
            raise _Stop  # simulate a kill right after the epoch-k checkpoint was written

    loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
    res = fit(
        model=model,
        loss_fn=loss,
        train_batches=train_batches(ds, recipe, img_size=28, seed=3),
        recipe=recipe,
        num_classes=ds.num_classes,
        seed=3,
        rt=CPU,
        checkpoint_path=ckpt,
        fingerprint=fingerprint,
        on_epoch_end=on_epoch_end,
        **fit_kw,
    )
    return model, res


def test_resume_from_epoch_k_ends_with_the_same_weights(fashion_small, smoke_params, tmp_path):
    ds = open_dataset(fashion_small)
    # Mixup/CutMix, random erasing, drop-path, warmup and repeated augmentation all draw random
    # numbers: the resumed run must reproduce every one of them.
    recipe = _recipe(
        smoke_params,
        epochs=3,
        warmup_epochs=1,
        mixup=0.8,
        cutmix=1.0,
        repeated_aug=3,
        ema=True,
        ema_decay=0.9,
    )
    straight, res_a = _fit(ds, recipe, tmp_path / "a.pth")
    with pytest.raises(_Stop):
        _fit(ds, recipe, tmp_path / "b.pth", stop_after=2)
    assert load_checkpoint(tmp_path / "b.pth")["epoch"] == 1
    resumed, res_b = _fit(ds, recipe, tmp_path / "b.pth")
    assert res_b.resumed_from_epoch == 1
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert [r["train_loss"] for r in res_a.history] == [r["train_loss"] for r in res_b.history]
    ckpt = load_checkpoint(tmp_path / "b.pth")
    # no RNG state: every epoch reseeds from (seed, epoch, rank), which the equal weights show
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "epoch"} <= set(ckpt)
    assert ckpt["ema"] is not None and ckpt["epoch"] == 2


def test_an_unfinished_checkpoint_of_another_configuration_stops_the_run(
    fashion_small, smoke_params, tmp_path
):
    """Params or computing code changed between two requeues: the checkpoint (possibly days of
    a run) is kept untouched and the run stops, naming both fingerprints and the way out."""
    ds = open_dataset(fashion_small)
    recipe = _recipe(smoke_params, epochs=2)
    ckpt = tmp_path / "c.pth"
    with pytest.raises(_Stop):
        _fit(ds, recipe, ckpt, stop_after=1)  # killed after epoch 1 of 2
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError) as err:
        _fit(ds, recipe, ckpt, fingerprint="other")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"checkpoint {ckpt} (epoch 1, fingerprint test)" in msg
    assert "this run (fingerprint other" in msg
    assert "delete it or move it away to start over, or pass --restart" in msg
    assert "c.replaced-test.pth" in msg
    assert ckpt.read_bytes() == before and sorted(tmp_path.iterdir()) == [ckpt]

    # --restart: the old checkpoint is moved aside whole, and the run starts over.
    _, res = _fit(ds, recipe, ckpt, fingerprint="other", restart=True)
    assert res.resumed_from_epoch is None and [r["epoch"] for r in res.history] == [1, 2]
    assert (tmp_path / "c.replaced-test.pth").read_bytes() == before
    assert load_checkpoint(ckpt)["fingerprint"] == "other"
    # A requeued job that keeps the flag resumes its own checkpoint.
    _, res = _fit(ds, recipe, ckpt, fingerprint="other", restart=True)
    assert res.resumed_from_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "c.replaced-test.pth"]


def test_a_finished_checkpoint_of_another_configuration_is_moved_aside(
    fashion_small, smoke_params, tmp_path
):
    """A complete run's checkpoint (``dvc exp run -S ...`` after a finished run): its results
    were written, so the new configuration starts over without a flag; the old file is kept."""
    ds = open_dataset(fashion_small)
    recipe = _recipe(smoke_params, epochs=1)
    ckpt = tmp_path / "c.pth"
    _fit(ds, recipe, ckpt)
    before = ckpt.read_bytes()
    _, res = _fit(ds, recipe, ckpt, fingerprint="other")
    assert res.resumed_from_epoch is None and len(res.history) == 1
    assert (tmp_path / "c.replaced-test.pth").read_bytes() == before
    assert load_checkpoint(ckpt)["fingerprint"] == "other"
    # A checkpoint written before `num_epochs` was recorded: its cosine schedule's length.
    legacy = load_checkpoint(ckpt)
    del legacy["num_epochs"]
    atomic.torch_save(legacy, ckpt)
    _, res = _fit(ds, recipe, ckpt, fingerprint="third")
    assert res.resumed_from_epoch is None
    assert load_checkpoint(tmp_path / "c.replaced-other.pth")["fingerprint"] == "other"


def test_progress_is_logged_without_a_terminal(
    fashion_small, smoke_params, tmp_path, caplog, monkeypatch
):
    """tqdm is silent without a tty (a SLURM log): the main rank logs step, throughput, loss
    and the epoch's and run's ETA instead."""
    import io
    import logging
    import re
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal, even under `pytest -s`
    caplog.set_level(logging.INFO, logger="deit_repro.core.engine")
    ds = open_dataset(fashion_small)
    # 6 steps an epoch: by default a line every step (about 10 lines an epoch at most)
    _fit(ds, _recipe(smoke_params, epochs=2), None)
    line = re.compile(
        r"train epoch (\d)/2 step (\d)/6: (\S+) images/s, loss (\S+), "
        r"ETA epoch (\d+):(\d\d):(\d\d), run (\d+):(\d\d):(\d\d)$"
    )
    found = [m for r in caplog.records if (m := line.match(r.getMessage()))]
    assert [(int(m[1]), int(m[2])) for m in found] == [(e, k) for e in (1, 2) for k in range(1, 7)]
    for m in found:
        assert float(m[3]) > 0 and 0 < float(m[4]) < 10
        epoch_eta = int(m[5]) * 3600 + int(m[6]) * 60 + int(m[7])
        run_eta = int(m[8]) * 3600 + int(m[9]) * 60 + int(m[10])
        assert run_eta >= epoch_eta >= 0
    assert found[-1].group(5, 6, 7, 8, 9, 10) == ("0", "00", "00", "0", "00", "00")
    # About 10 lines an epoch, at least one every 50 steps; or every `check_every` steps and at
    # the epoch's end (the host's reads of the loss).
    from deit_repro.core.engine import _log_interval

    assert [_log_interval(n) for n in (6, 95, 300, 1251)] == [1, 10, 30, 50]
    caplog.clear()
    _fit(ds, _recipe(smoke_params, epochs=1, check_every=4), None)
    one = re.compile(r"train epoch 1/1 step (\d)/6: ")
    assert [m[1] for r in caplog.records if (m := one.match(r.getMessage()))] == ["4", "6"]


def test_one_epoch_on_real_fashion_mnist_is_far_above_chance(fashion_5k, smoke_params, tmp_path):
    light = dataclasses.replace(smoke_params.student.train.aug, scale=(1.0, 1.0), reprob=0.0)
    params = dataclasses.replace(
        smoke_params,
        student=dataclasses.replace(
            smoke_params.student,
            model=dataclasses.replace(
                smoke_params.student.model,
                img_size=28,
                patch_size=7,
                embed_dim=64,
                depth=4,
                num_heads=2,
            ),
            train=_recipe(smoke_params, batch_size=32, drop_path=0.0, aug=light),
        ),
    )
    m = PretrainRun(
        params=params, data=fashion_5k, teacher=None, distill="none", dist_token=False
    ).train(RunSpec(0, tmp_path / "out", None), rt=CPU)
    assert m["epochs"] == 1
    # 10 classes: chance is 10 %. One epoch of 156 steps reached 56.6 % here (a plain AdamW loop
    # over the same data: 57.3 %); 45 % leaves room for thread-count noise.
    assert m["heads"]["cls"]["top1"] > 45.0, m


def _diverge_at(call: int, how, fashion_small, smoke_params, tmp_path, check_every: int):
    """A 3-epoch run (6 steps an epoch) whose loss_fn call number ``call`` is changed by
    ``how(loss, model)``: (the TrainingError, loss calls made, the model, the checkpoint path,
    the checkpoint's bytes at each epoch end)."""
    ds = open_dataset(fashion_small)
    recipe = _recipe(smoke_params, epochs=3, check_every=check_every)
    model, base, calls = _tiny_student(), base_criterion(recipe), [0]
    ckpt, saved = tmp_path / "k.pth", []

    def loss_fn(x, out, y):
        calls[0] += 1
        loss = base(out, y)
        return how(loss, model) if calls[0] == call else loss

    with pytest.raises(TrainingError) as err:
        fit(
            model=model,
            loss_fn=loss_fn,
            train_batches=train_batches(ds, recipe, img_size=28, seed=0),
            recipe=recipe,
            num_classes=10,
            seed=0,
            rt=CPU,
            checkpoint_path=ckpt,
            fingerprint="x",
            on_epoch_end=lambda history: saved.append(ckpt.read_bytes()),
        )
    return err.value, calls[0], model, ckpt, saved


@pytest.mark.parametrize("check_every", [1, 5])
def test_a_nan_at_step_k_stops_the_run_with_the_last_good_checkpoint_intact(
    fashion_small, smoke_params, tmp_path, check_every
):
    """The loss turns NaN at epoch 2 step 2. The host reads the loss every ``check_every``
    steps, so the run goes on to that read (step 5) with diverged weights: it must stop there,
    name step 2, and leave epoch 1's checkpoint byte for byte as it was."""
    err, calls, model, ckpt, saved = _diverge_at(
        8, lambda loss, _: loss * float("nan"), fashion_small, smoke_params, tmp_path, check_every
    )
    stopped = 2 if check_every == 1 else 5
    assert str(err).startswith(
        f"loss is nan at epoch 2 step 2 (last good checkpoint: {ckpt}; stopped at step {stopped})"
    ), err
    assert calls == 6 + stopped  # no step after the read that saw it
    assert len(saved) == 1 and ckpt.read_bytes() == saved[0]  # epoch 1's, untouched
    kept = load_checkpoint(ckpt)
    assert kept["epoch"] == 0 and all(v.isfinite().all() for v in kept["model"].values())
    assert not math.isfinite(float(next(model.parameters()).detach().sum()))  # they diverged


def test_overflowed_gradients_under_a_finite_loss_never_reach_a_checkpoint(
    fashion_small, smoke_params, tmp_path
):
    """The last step of epoch 2 has a finite loss but NaN gradients (as a bf16 overflow gives,
    with no loss scaler to skip the step): the weights diverge after the loss was recorded. The
    epoch's closing read sees the weights and stops before the checkpoint is written."""

    def nan_gradients(loss, model):  # d sqrt(0 w)/dw = inf * 0 = NaN; the value is 0
        return loss + torch.sqrt(model.head.weight * 0.0).sum()

    err, _, _, ckpt, saved = _diverge_at(
        12, nan_gradients, fashion_small, smoke_params, tmp_path, check_every=4
    )
    assert str(err).startswith(
        f"the weights are not finite at epoch 2 step 6, though the loss is (last good "
        f"checkpoint: {ckpt})"
    ), err
    assert len(saved) == 1 and ckpt.read_bytes() == saved[0]
    assert load_checkpoint(ckpt)["epoch"] == 0


def test_the_sync_free_engine_trains_the_weights_of_a_per_step_loop(fashion_small, smoke_params):
    """``fit`` reads the loss every ``check_every`` steps only; the weights and the reported
    losses are those of the plain loop that reads it every step (``loss.item()``, the official
    engine.py), bit for bit, whatever ``check_every``: on a CPU (compile off) nothing moves."""
    from deit_repro.core.batches import epoch_seed, seed_everything
    from deit_repro.core.engine import mixup_fn, optimizer_and_scheduler

    ds = open_dataset(fashion_small)
    recipe = _recipe(smoke_params, epochs=2, warmup_epochs=1)

    def engine(check_every: int):
        r = dataclasses.replace(recipe, check_every=check_every)
        model = _tiny_student()
        res = fit(
            model=model,
            loss_fn=_plain_loss(r),
            train_batches=train_batches(ds, r, img_size=28, seed=3),
            recipe=r,
            num_classes=10,
            seed=3,
            rt=CPU,
            checkpoint_path=None,
            fingerprint="t",
        )
        return model.state_dict(), [row["train_loss"] for row in res.history]

    def per_step_loop():
        model = _tiny_student()
        batches = train_batches(ds, recipe, img_size=28, seed=3)
        opt, sched, epochs = optimizer_and_scheduler(model, recipe, len(batches))
        mix, loss_fn, losses = mixup_fn(recipe, 10), _plain_loss(recipe), []
        for epoch in range(epochs):
            seed_everything(epoch_seed(3, epoch))
            batches.set_epoch(epoch)
            model.train()
            total, n = 0.0, 0
            for x, y in batches:
                x, t = mix(x, y) if mix is not None else (x, y)
                loss = loss_fn(x, model(x), t)
                total, n = total + loss.item() * len(x), n + len(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(total / n)
            sched.step(epoch)
        return model.state_dict(), losses

    ref_weights, ref_losses = per_step_loop()
    for check_every in (0, 1, 4):
        weights, losses = engine(check_every)
        assert losses == ref_losses, (check_every, losses, ref_losses)
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights), check_every


def _plain_loss(recipe):
    return DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)


def test_a_compiled_run_checkpoints_the_uncompiled_state_dict(
    fashion_small, smoke_params, tmp_path
):
    """``compile: on`` (on a CPU too, when asked): the run trains through ``torch.compile``, and
    its checkpoint loads, strictly, into a plain model (no ``_orig_mod.`` prefixes); its losses
    are those of the eager run to float32 rounding."""
    ds = open_dataset(fashion_small)
    _, eager = _fit(ds, _recipe(smoke_params, epochs=1), tmp_path / "eager.pth")
    _, res = _fit(ds, _recipe(smoke_params, epochs=1, compile="on"), tmp_path / "c.pth")
    state = load_checkpoint(tmp_path / "c.pth")["model"]
    assert not [k for k in state if "_orig_mod" in k]
    _tiny_student().load_state_dict(state, strict=True)
    assert res.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)


def test_repeated_augmentation_matches_the_official_sampler():
    n = 600
    two = [epoch_indices(n, epoch=0, seed=1, repeats=3, world_size=2, rank=r) for r in range(2)]
    # Trimmed to n // 256 * 256 / world samples per rank (official RASampler).
    assert [len(r) for r in two] == [256, 256]
    # Each image is repeated 3 times and dealt round-robin: with 3 ranks, the three copies of an
    # image go to the three ranks at the same position (each rank augments its own copy).
    three = [epoch_indices(n, epoch=0, seed=1, repeats=3, world_size=3, rank=r) for r in range(3)]
    assert torch.equal(three[0], three[1]) and torch.equal(three[1], three[2])
    assert len(set(three[0].tolist())) == len(three[0]) == 512 // 3
    # In one process the copies are consecutive: every image appears 3 times in a row.
    one = epoch_indices(n, epoch=0, seed=1, repeats=3)
    assert len(one) == 512 and torch.equal(one[0::3][:170], one[1::3][:170])
    # Without repetition: a permutation of all images. Different epochs give different orders.
    assert sorted(epoch_indices(n, epoch=0, seed=1).tolist()) == list(range(n))
    assert not torch.equal(epoch_indices(n, epoch=0, seed=1), epoch_indices(n, epoch=1, seed=1))
    assert torch.equal(epoch_indices(n, epoch=4, seed=1), epoch_indices(n, epoch=4, seed=1))


def test_lr_is_scaled_by_the_global_batch(smoke_params):
    recipe = TrainCfg(batch_size=1024, lr_per_512=5e-4)
    assert recipe.effective_lr() == pytest.approx(1e-3)  # paper §6: 5e-4 x 1024 / 512
    assert _recipe(smoke_params).effective_lr() == pytest.approx(1e-3)  # 8e-3 x 64 / 512


def test_teacher_then_distilled_student_train_end_to_end(fashion_small, smoke_params, tmp_path):
    t = TeacherRun(params=smoke_params, data=fashion_small).train(
        RunSpec(0, tmp_path / "teacher", tmp_path / "ck"), rt=CPU
    )
    assert 0.0 <= t["top1"] <= 100.0 and t["heads"]["cls"]["top5"] >= t["top1"]
    assert t["arch"] == "resnet_small"
    # Table 2's transformer teacher, and a student distilled from it.
    v = TeacherRun(params=smoke_params, data=fashion_small, arch="vit").train(
        RunSpec(0, tmp_path / "teacher_vit", None), rt=CPU
    )
    assert v["arch"] == "vit" and v["heads"]["cls"]["top5"] >= v["top1"]
    m = PretrainRun(
        params=smoke_params,
        data=fashion_small,
        teacher=tmp_path / "teacher_vit",
        distill="soft",
        dist_token=True,
    ).train(RunSpec(0, tmp_path / "deit_vit", None), rt=CPU)
    assert m["distill"] == "soft" and set(m["heads"]) == {"cls", "dist", "joint"}
    m = PretrainRun(
        params=smoke_params,
        data=fashion_small,
        teacher=tmp_path / "teacher",
        distill="hard",
        dist_token=True,
    ).train(RunSpec(0, tmp_path / "deit", None), rt=CPU)
    assert set(m["heads"]) == {"cls", "dist", "joint"}
    assert m["distill"] == "hard" and m["dist_token"] is True and m["alpha"] == 0.5
    saved = torch.load(tmp_path / "deit" / "model.pt", weights_only=True)
    assert "dist_token" in saved and "head_dist.weight" in saved


def test_the_timm_per_image_pipeline_trains_deterministically(
    fashion_small, smoke_params, tmp_path
):
    """The paper's ImageNet pipeline (timm create_transform: RandAugment, colour jitter, random
    erasing) + Mixup/CutMix + repeated augmentation + EMA, on grayscale arrays: runs, and twice
    gives the same weights (every random draw is seeded per epoch)."""
    from deit_repro.core.batches import timm_train_transform
    from deit_repro.config import AugCfg

    aug = AugCfg(
        pipeline="timm",
        scale=(0.35, 1.0),
        rand_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.3,
        reprob=0.25,
    )
    names = repr(timm_train_transform(aug, 20, 1))
    # timm (as the official code) skips colour jitter when RandAugment is on.
    assert "RandAugment(n=2" in names and "RandomErasing(p=0.25, mode=pixel" in names
    recipe = _recipe(
        smoke_params, aug=aug, mixup=0.8, cutmix=1.0, repeated_aug=3, ema=True, ema_decay=0.9
    )
    params = dataclasses.replace(
        smoke_params, student=dataclasses.replace(smoke_params.student, train=recipe)
    )
    weights = []
    for run in ("a", "b"):
        m = PretrainRun(
            params=params, data=fashion_small, teacher=None, distill="none", dist_token=False
        ).train(RunSpec(0, tmp_path / run, None), rt=CPU)
        assert m["epochs"] == 1 and 0.0 <= m["top1"] <= 100.0
        weights.append(torch.load(tmp_path / run / "model.pt", weights_only=True))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_collectives_run_on_the_runtime_device(monkeypatch):
    """A collective's tensor lives on the runtime's device: NCCL refuses CPU tensors, so a
    CPU-built reduction killed every multi-GPU run after its first epoch."""

    class Stop(Exception):
        pass

    seen = []

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Stop

    monkeypatch.setattr(torch.distributed, "all_reduce", spy)
    rt = Runtime(torch.device("meta"), None, world_size=2, rank=0)
    with pytest.raises(Stop):
        rt.sum_over_ranks([1.5, 64])
    assert seen == [torch.device("meta")]
    assert Runtime(torch.device("cpu")).sum_over_ranks([1.5, 64]) == [1.5, 64.0]


def test_every_collective_goes_through_the_runtime():
    """No `torch.distributed.<collective>` call outside `Runtime`'s methods, where the device
    rule above is tested."""
    import ast

    import deit_repro

    collectives = {
        "all_reduce",
        "all_gather",
        "broadcast",
        "reduce",
        "barrier",
        "gather",
        "scatter",
        "all_gather_object",
        "broadcast_object_list",
        "reduce_scatter",
    }
    found = []
    for path in Path(deit_repro.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        allowed = {
            id(n)
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef) and c.name == "Runtime"
            for n in ast.walk(c)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in collectives
                and id(node) not in allowed
                and ast.unparse(node.func.value) in ("torch.distributed", "dist")
            ):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert found == []


def test_amp_auto_is_fp16_where_bf16_is_only_emulated(monkeypatch):
    """A V100 (pre-Ampere) runs bf16 only through emulation: `amp: auto` must pick fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    # emulated bf16 only: "supported" when emulation counts
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    assert Runtime.detect("auto").amp_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert Runtime.detect("auto").amp_dtype == torch.bfloat16
    assert Runtime.detect("off").amp_dtype is None


# ------------------------------------------------------------------------------ checkpoint writes


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_torch_save_serialises_straight_into_the_temporary_file(tmp_path, monkeypatch):
    """No in-memory copy of the archive (a DeiT-B checkpoint is about a gigabyte): torch.save
    writes into the temporary sibling, which is then renamed onto the target."""
    from deit_repro import atomic

    real = torch.save
    targets = []

    def spy(obj, f, *args, **kwargs):
        targets.append(f)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    path = tmp_path / "ck.pth"
    state = {"w": torch.arange(1000.0), "epoch": 3, "nested": {"b": torch.ones(2, 3)}}
    atomic.torch_save(state, path)
    assert len(targets) == 1
    name = Path(getattr(targets[0], "name", "")).name
    assert name.startswith(".ck.pth.") and name.endswith(".tmp"), targets[0]
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
    assert torch.equal(back["nested"]["b"], state["nested"]["b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


def test_a_failed_pickle_keeps_the_previous_file(tmp_path):
    """Pickling fails half-way: the previous file stays byte-identical, no temporary file is
    left."""
    from deit_repro import atomic

    path = tmp_path / "ck.pth"
    atomic.torch_save({"w": torch.arange(10.0)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic.torch_save({"w": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


def _enospc() -> OSError:
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write(2) gives: no file name


@pytest.mark.parametrize(
    "cut", [_enospc, KeyboardInterrupt, SystemExit], ids=["disk-full", "ctrl-c", "requeue-exit"]
)
def test_a_write_cut_short_raises_its_cause_and_keeps_the_previous_file(tmp_path, monkeypatch, cut):
    """A checkpoint write cut short by a full disk (ENOSPC), Ctrl-C (KeyboardInterrupt) or
    submitit's exit after a USR2 requeue (SystemExit): torch's zip writer then fails to close the
    archive ("unexpected pos ..."), and that RuntimeError must not replace the cause: the CLI
    turns ENOSPC into its own exit status and Ctrl-C into "interrupted" (130), not a traceback
    (1); a requeued SLURM job must not record a failure. The previous file stays byte-identical
    and no temporary file is left."""
    import io

    from deit_repro import atomic

    path = tmp_path / "ck.pth"
    atomic.torch_save({"w": torch.arange(10.0)}, path)
    before = path.read_bytes()

    class CutShort(io.FileIO):
        room = 700  # bytes written before the write that raises

        def write(self, b):
            n = memoryview(b).nbytes
            if n > CutShort.room:
                raise cut()
            CutShort.room -= n
            return super().write(b)

    monkeypatch.setattr(
        atomic,
        "open",
        lambda f, mode="r": CutShort(f, mode) if "w" in mode else open(f, mode),
        raising=False,
    )
    with pytest.raises(type(cut())) as err:
        atomic.torch_save({"w": torch.zeros(10_000)}, path)
    assert str(err.value) == str(cut())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


# ------------------------------------------------------------------------- per-image DataLoader


class _Pids(torch.utils.data.Dataset):
    """Which process produced each sample."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i):
        import os

        return torch.tensor(os.getpid()), i


def _image_batches(num_workers: int):
    from deit_repro.config import AugCfg
    from deit_repro.core.batches import ImageDataset, LoaderBatches, timm_train_transform

    images = torch.randint(0, 256, (16, 1, 12, 12), generator=torch.Generator().manual_seed(0))
    aug = AugCfg(pipeline="timm", scale=(0.3, 1.0), reprob=0.25)
    # The label is the image's index: each sample's augmentation can be compared across runs.
    data = ImageDataset(
        timm_train_transform(aug, 8, 1), images=images.to(torch.uint8), labels=torch.arange(16)
    )
    batches = LoaderBatches(data, batch_size=4, seed=5, num_workers=num_workers)
    return data, batches


def _epoch(batches, epoch: int) -> dict[int, torch.Tensor]:
    batches.set_epoch(epoch)
    return {int(i): x for xb, yb in batches for x, i in zip(xb, yb)}


def test_the_loader_pipeline_reseeds_its_persistent_workers_per_epoch():
    """With workers, epoch k's augmentations are those of a loader built for epoch k alone (as
    every epoch had before workers persisted): resuming at epoch k gives the same batches, and
    another epoch gives other augmentations."""
    data, straight = _image_batches(num_workers=2)
    _epoch(straight, 0)
    after_epoch_0 = _epoch(straight, 1)
    _, resumed = _image_batches(num_workers=2)
    alone = _epoch(resumed, 1)
    assert after_epoch_0.keys() == alone.keys() == set(range(16))
    assert all(torch.equal(after_epoch_0[i], alone[i]) for i in range(16))
    # ...and exactly what a fresh, non-persistent DataLoader seeded by the epoch gives.
    fresh = torch.utils.data.DataLoader(
        data,
        batch_size=4,
        sampler=resumed.indices().tolist(),
        drop_last=True,
        num_workers=2,
        generator=resumed._generator(),
    )
    reference = {int(i): x for xb, yb in fresh for x, i in zip(xb, yb)}
    assert all(torch.equal(reference[i], alone[i]) for i in range(16))
    epoch_2 = _epoch(straight, 2)
    assert sum(torch.equal(epoch_2[i], alone[i]) for i in range(16)) <= 2
    # Without workers the main process's generators, seeded per epoch by fit, draw as before.
    from deit_repro.core.batches import seed_everything

    _, inline = _image_batches(num_workers=0)
    seed_everything(1)
    first = _epoch(inline, 1)
    seed_everything(1)
    assert all(torch.equal(first[i], x) for i, x in _epoch(inline, 1).items())


def test_the_loader_pipeline_keeps_its_workers_across_epochs():
    from deit_repro.core.batches import LoaderBatches

    batches = LoaderBatches(_Pids(), batch_size=4, seed=0, num_workers=2)
    pids = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        pids.append({int(p) for xb, _ in batches for p in xb})
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]


# ------------------------------------------------------------------------------------ GPU speed


def test_a_cuda_runtime_turns_cudnn_benchmark_on(monkeypatch):
    """As the official main.py (`cudnn.benchmark = True`): cuDNN picks its fastest kernels."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert Runtime.detect("auto").device.type == "cpu" and not torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert Runtime.detect("auto").device.type == "cuda"
    assert torch.backends.cudnn.benchmark is True


def test_throughput_is_measured_in_fp32(fashion_small, smoke_params, tmp_path, monkeypatch):
    """The paper's throughput column is fp32: no autocast during the measurement, even when the
    runtime trains in bf16, and the output says so; the AMP figure is a separate field."""
    import json

    from deit_repro.stages.throughput import measure_throughput, run_throughput

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4 * 4, 3)
            self.autocast = []

        def forward(self, x):
            self.autocast.append(torch.is_autocast_enabled("cpu"))
            return self.lin(x.flatten(1))

    bf16 = Runtime(torch.device("cpu"), torch.bfloat16)  # a runtime that trains in bf16
    cfg = dataclasses.replace(smoke_params.throughput, batch_sizes=(8,), warmup=1, repeats=2)
    real_autocast = torch.autocast

    def no_autocast(*args, enabled=True, **kwargs):
        # (the classifiers turn autocast off around themselves, see classifiers_in_fp32)
        if enabled:
            raise AssertionError("autocast entered during the fp32 measurement")
        return real_autocast(*args, enabled=False, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "autocast", no_autocast)
        model = Spy()
        fp32 = measure_throughput(model, img_size=4, in_chans=1, cfg=cfg, rt=bf16)
        assert fp32["precision"] == "fp32" and fp32["dtype"] == "float32"
        assert fp32["images_per_s"] > 0 and model.autocast == [False] * 3

        params = dataclasses.replace(smoke_params, throughput=cfg)
        run_throughput(params, data=fashion_small, out=tmp_path / "throughput.json", rt=bf16)
        models = json.loads((tmp_path / "throughput.json").read_text())["models"]
        assert len(models) == 4
        for entry in models.values():
            assert entry["precision"] == "fp32" and entry["dtype"] == "float32"
            assert "amp" not in entry  # AMP is measured on CUDA only

    model = Spy()
    amp = measure_throughput(
        model, img_size=4, in_chans=1, cfg=cfg, rt=bf16, amp_dtype=bf16.amp_dtype
    )
    assert amp["precision"] == "bf16" and model.autocast == [True] * 3


def test_a_figure3_budget_is_a_run_with_its_own_whole_schedule():
    """Figure 3's 6-epoch run decays to min_lr at its own last epoch; epoch 6 of the 18-epoch
    schedule (what reading an intermediate evaluation would measure) is still near the peak."""
    from deit_repro.config import load_params
    from deit_repro.core.engine import optimizer_and_scheduler
    from deit_repro.stages.pretrain import PretrainRun

    params = load_params(Path(__file__).resolve().parents[1] / "profiles" / "fashion.yaml")
    run = PretrainRun(
        params=params, data=Path("data/x"), distill="none", dist_token=False, epochs=6
    )
    short, long = run.params.student.train, params.student.train
    assert (short.epochs, long.epochs) == (6, 18)
    assert dataclasses.replace(short, epochs=18) == long  # only the budget differs
    assert run.params.budget_epochs() == params.budget_epochs() == [6, 12, 18]

    def lr_at(recipe, epoch: int) -> float:
        model = torch.nn.Linear(2, 2)
        opt, sched, _ = optimizer_and_scheduler(model, recipe, steps_per_epoch=10)
        sched.step(epoch)
        return opt.param_groups[0]["lr"]

    peak = long.effective_lr()
    assert lr_at(short, 5) < 0.1 * peak  # the last epoch of the 6-epoch run: decayed
    assert lr_at(long, 5) > 0.8 * peak  # the same epoch of the 18-epoch run: near the peak
    with pytest.raises(ConfigError, match="warmup"):
        PretrainRun(params=params, data=Path("data/x"), distill="none", dist_token=False, epochs=2)


def test_a_finished_run_resumed_with_other_eval_settings_reports_one_evaluation(
    fashion_small, smoke_params, tmp_path
):
    """The checkpoint's fingerprint leaves out the eval settings (they change no weight), so a
    rerun after `dvc exp run -S eval.crop_pct=...` resumes the finished checkpoint: its metrics
    and its per-image predictions both come from the one new evaluation."""
    import json

    import numpy as np

    def pretrain_to(params, out):
        return PretrainRun(
            params=params, data=fashion_small, teacher=None, distill="none", dist_token=False
        ).train(RunSpec(0, out, tmp_path / "run"))

    first = pretrain_to(smoke_params, tmp_path / "a")
    cropped = dataclasses.replace(
        smoke_params, eval=dataclasses.replace(smoke_params.eval, crop_pct=0.6)
    )
    again = pretrain_to(cropped, tmp_path / "b")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from_epoch"] == 0
    assert again["eval"]["crop_pct"] == 0.6 and again["top1"] != first["top1"]
    for out, metrics in ((tmp_path / "a", first), (tmp_path / "b", again)):
        pred = np.load(out / "predictions.npy")
        assert 100.0 * float((pred["cls"] == pred["label"]).mean()) == pytest.approx(
            metrics["top1"], abs=1e-6
        )


def test_the_lr_schedule_is_timms_stepped_after_each_epoch_as_the_official_main_py(
    fashion_small, smoke_params
):
    """Each epoch's lr in fit's history is the lr the official loop trains that epoch with:
    timm's scheduler from main.py's args (create_scheduler), ``lr_scheduler.step(epoch)``
    after ``train_one_epoch``: warmup_lr twice, then the ramp one epoch late."""
    from types import SimpleNamespace

    from timm.scheduler import create_scheduler

    recipe = _recipe(smoke_params, epochs=6, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    _, res = _fit(open_dataset(fashion_small), recipe, None)
    ours = [row["lr"] for row in res.history]

    args = SimpleNamespace(  # main.py's scheduler arguments and defaults
        sched="cosine",
        epochs=recipe.epochs,
        lr=recipe.effective_lr(),
        min_lr=recipe.min_lr,
        warmup_lr=recipe.warmup_lr,
        warmup_epochs=recipe.warmup_epochs,
        cooldown_epochs=10,
        decay_epochs=30,
        decay_rate=0.1,
        lr_noise=None,
    )
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched, _ = create_scheduler(args, opt)
    official = []
    for epoch in range(args.epochs):  # main.py: for epoch in range(start_epoch, epochs)
        official.append(opt.param_groups[0]["lr"])  # train_one_epoch(...)
        sched.step(epoch)
    assert ours == pytest.approx(official, rel=1e-12), (ours, official)
    assert ours[0] == ours[1] == pytest.approx(1e-6)  # warmup_lr, used twice
    assert ours[2] < ours[3] == max(ours)  # the ramp's top one epoch late


@pytest.mark.parametrize(
    "local, rank, count, want",
    [("3", 3, 8, 3), ("3", 3, 1, 0), (None, 9, 8, 1), ("", 2, 4, 2), ("1", 5, 2, 1)],
)
def test_the_gpu_is_the_local_rank_modulo_the_gpus_this_process_sees(local, rank, count, want):
    """One GPU bound per task (device_count 1): cuda:0, not cuda:LOCAL_RANK (invalid device
    ordinal); official utils.py takes the rank modulo the device count."""
    from deit_repro.core.engine import gpu_index

    assert gpu_index(local, rank, count) == want


def test_a_throughput_batch_larger_than_the_machines_memory_falls_back_not_oom_killed():
    """On a CPU a batch that cannot fit (the imagenet profile's 1024 x DeiT-B at 384 px on a
    laptop) is refused by the allocator under the stage's memory bound and the next batch is
    measured, instead of the kernel's OOM killer ending the stage; none fitting is one line."""
    from deit_repro.config import ThroughputCfg
    from deit_repro.stages.throughput import _available_memory, measure_throughput

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    huge = int(2 * _available_memory() / (3 * 32 * 32 * 4))  # twice the available memory
    cfg = ThroughputCfg(batch_sizes=(huge, 16), warmup=1, repeats=2)
    got = measure_throughput(model, img_size=32, in_chans=3, cfg=cfg, rt=CPU)
    assert got["batch_size"] == 16 and got["images_per_s"] > 0
    with pytest.raises(ConfigError, match=rf"no batch size of throughput.batch_sizes \[{huge}\]"):
        measure_throughput(
            model,
            img_size=32,
            in_chans=3,
            cfg=dataclasses.replace(cfg, batch_sizes=(huge,)),
            rt=CPU,
        )
