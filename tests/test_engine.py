"""The training engine: resume equals an uninterrupted run, training learns, the recipe's parts
are wired as the paper says, a non-finite loss stops with the step and the last checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from deit_repro.core.batches import epoch_indices
from deit_repro.config import TrainCfg
from deit_repro.core.engine import Runtime, base_criterion, fit, load_checkpoint
from deit_repro.errors import TrainingError
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.models import create_student, set_training_outputs
from deit_repro.core.datasets import open_dataset, train_batches
from deit_repro.stages.training import run_pretrain, run_teacher

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


def _fit(ds, recipe, ckpt: Path | None, *, stop_after: int | None = None, distilled=False):
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
        fingerprint="test",
        on_epoch_end=on_epoch_end,
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
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "rng"} <= set(ckpt)
    assert ckpt["ema"] is not None and ckpt["epoch"] == 2


def test_a_checkpoint_of_another_configuration_is_not_resumed(
    fashion_small, smoke_params, tmp_path
):
    ds = open_dataset(fashion_small)
    recipe = _recipe(smoke_params, epochs=1)
    _fit(ds, recipe, tmp_path / "c.pth")
    model = _tiny_student()
    loss = DistillationLoss(base_criterion(recipe), None, distill="none", alpha=0.0, tau=1.0)
    res = fit(
        model=model,
        loss_fn=loss,
        train_batches=train_batches(ds, recipe, img_size=28, seed=3),
        recipe=recipe,
        num_classes=10,
        seed=3,
        rt=CPU,
        checkpoint_path=tmp_path / "c.pth",
        fingerprint="other",
    )
    assert res.resumed_from_epoch is None and len(res.history) == 1


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
    m = run_pretrain(
        params,
        data=fashion_5k,
        teacher=None,
        out=tmp_path / "out",
        run_dir=None,
        distill="none",
        dist_token=False,
        seed=0,
        rt=CPU,
    )
    assert m["epochs"] == 1
    # 10 classes: chance is 10 %. One epoch of 156 steps reached 56.6 % here (a plain AdamW loop
    # over the same data: 57.3 %); 45 % leaves room for thread-count noise.
    assert m["heads"]["cls"]["top1"] > 45.0, m


def test_non_finite_loss_stops_with_step_and_last_checkpoint(fashion_small, smoke_params, tmp_path):
    ds = open_dataset(fashion_small)
    recipe = _recipe(smoke_params, epochs=2)
    model = _tiny_student()
    calls = {"n": 0}
    base = base_criterion(recipe)

    def loss_fn(x, out, y):
        calls["n"] += 1
        loss = base(out, y)
        return loss * float("nan") if calls["n"] == 8 else loss  # epoch 2, step 2 (6 steps/epoch)

    with pytest.raises(TrainingError) as err:
        fit(
            model=model,
            loss_fn=loss_fn,
            train_batches=train_batches(ds, recipe, img_size=28, seed=0),
            recipe=recipe,
            num_classes=10,
            seed=0,
            rt=CPU,
            checkpoint_path=tmp_path / "k.pth",
            fingerprint="x",
        )
    msg = str(err.value)
    assert "epoch 2 step 2" in msg and str(tmp_path / "k.pth") in msg and "nan" in msg


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
    t = run_teacher(
        smoke_params,
        data=fashion_small,
        out=tmp_path / "teacher",
        run_dir=tmp_path / "ck",
        seed=0,
        rt=CPU,
    )
    assert 0.0 <= t["top1"] <= 100.0 and t["heads"]["cls"]["top5"] >= t["top1"]
    assert t["arch"] == "resnet_small"
    # Table 2's transformer teacher, and a student distilled from it.
    v = run_teacher(
        smoke_params,
        data=fashion_small,
        out=tmp_path / "teacher_vit",
        run_dir=None,
        seed=0,
        arch="vit",
        rt=CPU,
    )
    assert v["arch"] == "vit" and v["heads"]["cls"]["top5"] >= v["top1"]
    m = run_pretrain(
        smoke_params,
        data=fashion_small,
        teacher=tmp_path / "teacher_vit",
        out=tmp_path / "deit_vit",
        run_dir=None,
        distill="soft",
        dist_token=True,
        seed=0,
        rt=CPU,
    )
    assert m["distill"] == "soft" and set(m["heads"]) == {"cls", "dist", "joint"}
    m = run_pretrain(
        smoke_params,
        data=fashion_small,
        teacher=tmp_path / "teacher",
        out=tmp_path / "deit",
        run_dir=None,
        distill="hard",
        dist_token=True,
        seed=0,
        rt=CPU,
    )
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
        m = run_pretrain(
            params,
            data=fashion_small,
            teacher=None,
            out=tmp_path / run,
            run_dir=None,
            distill="none",
            dist_token=False,
            seed=0,
            rt=CPU,
        )
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
