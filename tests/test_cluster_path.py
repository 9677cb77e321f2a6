"""What the paper's configuration needs on a GPU cluster, shown on CPU where the fault can be.

* evaluation is sharded over the DDP ranks, exactly (real gloo processes);
* logits are float32 under a bf16 autocast (the teacher's hard label, top-k, the joint head);
* the 384 fine-tune without stochastic depth is the official eval-mode fine-tune;
* each transfer dataset trains with its own recipe, and only CIFAR-10 from scratch;
* the teacher is a launched stage with its own resources.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from conftest import ROOT
from deit_repro.config import LAUNCHED_STAGES, ConfigError, load_params, params_from_dict
from deit_repro.core.datasets import eval_batches, open_dataset
from deit_repro.core.engine import Runtime, accuracy_table, shard_evaluate
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.models import create_student, create_teacher, student_heads
from deit_repro.stages.prepare import run_prepare
from deit_repro.stages.teacher import TeacherRun
from deit_repro.stages.trainer import RunSpec
from deit_repro.stages.transfer import TransferRun

PROFILES = ROOT / "profiles"


# ----------------------------------------------------------------------------- sharded evaluation


def _logits(n: int = 7, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,), generator=g)


def _gloo_rank(rank: int, init: str, fn, args: tuple, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        queue.put((rank, fn(Runtime(torch.device("cpu"), None, world_size=2, rank=rank), *args)))
    finally:
        torch.distributed.destroy_process_group()


def _on_two_gloo_ranks(tmp_path: Path, fn, *args, timeout: float = 120) -> dict:
    """``fn(rt, *args)`` in 2 spawned processes of one real gloo group: ``{rank: result}``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_gloo_rank, args=(r, init, fn, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = dict(queue.get(timeout=timeout) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return got


def _shard_counts(rt: Runtime) -> tuple[int, dict]:
    logits, labels = _logits()
    mine = torch.arange(rt.rank, len(labels), rt.world_size)
    batches = [(logits[mine][i : i + 2], labels[mine][i : i + 2]) for i in range(0, len(mine), 2)]
    res = shard_evaluate(lambda x: {"cls": x, "joint": -x}, batches, rt)
    return len(mine), res.table, {h: c.tolist() for h, c in res.classes.items()}


def test_sharded_evaluation_is_exact_on_every_rank(tmp_path):
    """7 images over 2 real gloo ranks (4 + 3, no padding): every rank gets the one-process
    accuracy, to the last digit, and every image's top-1 class in its place in the split (the
    per-image paired tests of the claims table read them)."""
    logits, labels = _logits()
    reference = accuracy_table({"cls": logits, "joint": -logits, "labels": labels})
    classes = {"cls": logits.argmax(1).tolist(), "joint": (-logits).argmax(1).tolist()}
    assert classes["cls"] != classes["joint"]
    results = _on_two_gloo_ranks(tmp_path, _shard_counts)
    assert [results[r][0] for r in (0, 1)] == [4, 3]
    for _, table, per_image in results.values():
        assert table == reference
        assert per_image == classes


def _image_tree(root: Path, classes: int = 3, train: int = 4, val: int = 5) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40 + 7 * i, 30 + 5 * c)
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")


def test_each_rank_decodes_only_its_shard_of_an_image_tree(tmp_path, smoke_params):
    from deit_repro.config import DatasetCfg

    _image_tree(tmp_path / "tree")
    run_prepare(
        DatasetCfg(source="imagefolder", root=str(tmp_path / "tree")), out=tmp_path / "prepared"
    )
    ds = open_dataset(tmp_path / "prepared")
    ev = dataclasses.replace(smoke_params.eval, batch_size=4, num_workers=2)
    one = eval_batches(ds, ev, 16)
    assert one.num_workers == 2  # decoded by workers, not by the training process
    whole = torch.cat([y for _, y in one])
    shards = [
        torch.cat([y for _, y in eval_batches(ds, ev, 16, world_size=2, rank=r)]) for r in (0, 1)
    ]
    assert [len(s) for s in shards] == [8, 7]  # 15 images: no padding, no image twice
    assert torch.equal(shards[0], whole[0::2]) and torch.equal(shards[1], whole[1::2])
    # The in-memory path shards the same way.
    fake = dataclasses.replace(ds)
    fake.test = dataclasses.replace(
        ds.test, images=torch.zeros(15, 3, 16, 16, dtype=torch.uint8), files=None
    )
    mem = [
        torch.cat([y for _, y in eval_batches(fake, ev, 16, world_size=2, rank=r)]) for r in (0, 1)
    ]
    assert torch.equal(mem[0], whole[0::2]) and torch.equal(mem[1], whole[1::2])


# ----------------------------------------------------------------------------- fp32 logits


def test_logits_are_float32_under_a_bf16_autocast():
    """The heads, the joint mean and the teacher's logits (its argmax is the hard label) stay
    float32 inside a bf16 autocast; without autocast nothing changes."""
    torch.manual_seed(0)
    student = create_student(
        distilled=True,
        num_classes=10,
        img_size=16,
        in_chans=3,
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
    ).eval()
    teacher = create_teacher(arch="regnety_small", num_classes=10, in_chans=3, img_size=16).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heads = student_heads(student, x)
        tokens = student.forward_features(x)
        teacher_logits = teacher(x)
    assert {k: v.dtype for k, v in heads.items()} == dict.fromkeys(heads, torch.float32)
    assert teacher_logits.dtype == torch.float32
    # The head's product is the fp32 one of the (bf16) tokens: no rounding after it.
    expected = torch.nn.functional.linear(
        tokens[:, 0].float(), student.head.weight, student.head.bias
    )
    assert torch.equal(heads["cls"], expected)
    # No autocast: bit-identical to a plain nn.Linear.
    plain = torch.nn.Linear(32, 10)
    plain.load_state_dict(student.head.state_dict())
    feats = torch.randn(4, 32)
    assert torch.equal(student.head(feats), plain(feats))
    # The names of the weights are untouched (checkpoints and released weights still load).
    assert "head.weight" in student.state_dict() and "head_dist.weight" in student.state_dict()


def test_the_hard_label_comes_from_float32_teacher_logits():
    t = create_teacher(arch="regnety_small", num_classes=4, in_chans=3, img_size=16).eval()
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), t, distill="hard", alpha=0.5, tau=1.0)
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.randn(4, 4, requires_grad=True)
        total = loss(x, (logits, logits), torch.tensor([0, 1, 2, 3]))
        assert t(x).dtype == torch.float32
    assert total.dtype == torch.float32


# ----------------------------------------------------------------------------- 384 fine-tune


def test_the_fine_tune_without_stochastic_depth_is_the_official_eval_mode_fine_tune():
    """Official fine-tuning trains the model in eval mode (a8e9096, deit#177). For DeiT (no
    BatchNorm, dropout 0) eval mode differs from train mode only by stochastic depth, so the
    imagenet profile's drop_path 0 is that fine-tune: same outputs, same gradients."""
    torch.manual_seed(0)
    model = create_student(
        name="deit_tiny_distilled_patch16_224",
        distilled=True,
        num_classes=5,
        img_size=64,
        in_chans=3,
        drop_path_rate=0.0,
    )
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    evaluated = student_heads(model, x)["joint"]
    model.train()
    trained = student_heads(model, x)["joint"]
    assert torch.equal(evaluated, trained)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    p = load_params(PROFILES / "imagenet.yaml")
    ft = p.finetune.train
    assert (ft.drop_path, ft.warmup_epochs, ft.warmup_lr) == (0.0, 5, 1e-6)
    assert p.finetune.img_size == 384 and ft.lr_per_512 == 5e-6


# ----------------------------------------------------------------------------- transfer recipes


def test_each_transfer_dataset_has_its_recipe_and_only_cifar10_a_scratch_baseline():
    p = load_params(PROFILES / "imagenet.yaml")
    t = p.transfer
    for name in ("cifar10", "stanford_cars"):  # facebookresearch/deit#45
        r = t.recipe(name)
        assert (r.opt, r.epochs, r.batch_size, r.effective_lr(), r.weight_decay) == (
            "sgd",
            1000,
            768,
            pytest.approx(0.01),
            1e-4,
        )
        assert r.aug.reprob == 0.0 and r.drop_path == 0.0
    for name in ("inat2018", "inat2019"):  # deit#105, #141
        r = t.recipe(name)
        assert (r.opt, r.epochs, r.effective_lr(), r.drop_path, r.aug.reprob) == (
            "adamw",
            360,
            pytest.approx(7.5e-5),
            0.1,
            0.1,
        )
    assert t.scratch == ("cifar10",)
    scratch = t.recipe("cifar10", "scratch")
    assert scratch.opt == "adamw" and scratch.epochs == 7200
    assert t.recipe("flowers102") is t.train


def test_a_transfer_run_reads_its_datasets_recipe(tmp_path):
    from deit_repro.typed_yaml import to_dict

    d = to_dict(load_params(PROFILES / "smoke.yaml"))
    d["transfer"]["recipes"] = {"digits": {**d["transfer"]["train"], "epochs": 3}}
    p = params_from_dict(d)
    run = TransferRun(params=p, data=tmp_path / "digits", init="pretrained", student=tmp_path / "s")
    assert run.dataset == "digits"
    assert p.transfer.recipe("digits").epochs == 3 and p.transfer.train.epochs != 3
    with pytest.raises(ConfigError, match="not in transfer.datasets"):
        TransferRun(params=p, data=tmp_path / "cifar10", init="scratch")
    d["transfer"]["recipes"] = {"cifar10": d["transfer"]["train"]}
    with pytest.raises(ConfigError, match="transfer.recipes"):
        params_from_dict(d)


def test_the_imagenet_dag_trains_cifar10_alone_from_scratch(tmp_path):
    from dvc.repo import Repo

    from workflow_helpers import make_repo

    repo = make_repo(tmp_path / "repo", "profiles/imagenet.yaml")
    with Repo(str(repo)) as r:
        names = {s.name for s in r.index.stages}
    transfer = sorted(n for n in names if n.startswith("transfer"))
    assert transfer == sorted(
        [
            f"transfer@{d}"
            for d in ("cifar10", "cifar100", "flowers102", "stanford_cars", "inat2018", "inat2019")
        ]
        + ["transfer_scratch@cifar10"]
    )


# ----------------------------------------------------------------------------- the teacher


def test_the_teacher_is_a_launched_stage_with_its_own_resources():
    assert LAUNCHED_STAGES == ("teacher", "pretrain", "finetune", "transfer")
    p = load_params(PROFILES / "imagenet.yaml")
    assert p.launch.teacher.gpus_per_node == 8 and p.launch.teacher.world_size == 16

    def plan(*arch: str) -> str:
        return subprocess.run(
            [
                str(Path(sys.executable).parent / "deit-repro"),
                "launch-plan",
                "--stage",
                "teacher",
                *arch,
                "--params",
                "profiles/imagenet.yaml",
                "--folder",
                "/tmp/x/runs/teacher",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    # The teacher trained here (Table 2's DeiT-B) gets the stage's allocation and recipe ...
    out = plan("--arch", "vit")
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --nodes=2" in out
    assert "deit-repro-teacher" in out and "global batch 1024 = 64 per task" in out
    # ... the released RegNetY-16GF, only evaluated, one GPU (the default: the convnet).
    out = plan()
    assert "#SBATCH --gpus-per-node=1" in out and "#SBATCH --nodes=1" in out
    assert "released weights, downloaded and evaluated: one job for every seed" in out


# ----------------------------------------------------------------------------- RandAugment


def test_rand_augment_at_magnitude_10_does_not_crash_a_worker():
    """rand-m9-mstd0.5 reaches magnitude 10 (clipped) a few % of the time; timm then posterizes to
    0 bits, which the pinned Pillow refuses: the paper's training crashed at a random step (found
    by the rehearsal). The old Pillow's answer, a black image, is what the op gives now."""
    import random

    from timm.data.auto_augment import rand_augment_transform

    from deit_repro.config import AugCfg
    from deit_repro.core.batches import timm_train_transform

    timm_train_transform(AugCfg(), 32, 3)  # installs the op
    img = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    op = rand_augment_transform("rand-m10-n1-inc1", {"img_mean": (124, 116, 104)})
    posterize = next(o for o in op.ops if o.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    random.seed(0)
    out = posterize(img)
    assert np.asarray(out).max() == 0  # 0 bits kept: black, as Pillow < 13 gave
    # Fewer bits than 8 otherwise: the usual posterize.
    op4 = rand_augment_transform("rand-m5-n1-inc1", {"img_mean": (124, 116, 104)})
    p4 = next(o for o in op4.ops if o.name == "PosterizeIncreasing")
    p4.prob = 1.0
    assert np.asarray(p4(img)).max() == 200 & ~(2 ** (8 - 2) - 1)


def test_the_transfer_plan_scales_the_datasets_recipe():
    deit = str(Path(sys.executable).parent / "deit-repro")
    base = [deit, "launch-plan", "--params", "profiles/imagenet.yaml", "--stage", "transfer"]
    inat = subprocess.run(
        [*base, "--dataset", "inat2018"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "global batch 768 = 96 per task; effective lr 7.5e-05" in inat
    bad = subprocess.run([*base, "--dataset", "mnist"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("deit-repro launch-plan: error: --dataset 'mnist'")


def test_a_test_split_smaller_than_the_process_count_is_refused(tmp_path, smoke_params):
    """Every rank must hold images (the sharded counts are one collective of one shape)."""
    from deit_repro.config import DatasetCfg

    _image_tree(tmp_path / "tree", classes=1, train=2, val=1)
    run_prepare(
        DatasetCfg(source="imagefolder", root=str(tmp_path / "tree")), out=tmp_path / "prepared"
    )
    ds = open_dataset(tmp_path / "prepared")
    with pytest.raises(ConfigError, match="has 1 images, fewer than the 2 processes"):
        eval_batches(ds, smoke_params.eval, 16, world_size=2, rank=1)


def _rank_0s_buffers(rt: Runtime) -> list[float]:
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rt.rank + 1))
    rt.same_buffers(bn)
    return bn.running_mean.tolist()


def test_every_rank_evaluates_with_rank_0s_batchnorm_statistics(tmp_path):
    got = _on_two_gloo_ranks(tmp_path, _rank_0s_buffers)
    assert got == {0: [1.0, 1.0, 1.0], 1: [1.0, 1.0, 1.0]}


def _teacher_on_rank(rt: Runtime, params, data, weights, out) -> dict:
    return TeacherRun(params=params, data=data, weights=weights).train(RunSpec(0, out, None), rt=rt)


def test_released_teacher_weights_in_a_ddp_job_are_written_by_rank_0_alone(
    tmp_path, fashion_small, smoke_params
):
    """The teacher stage is launched like the others (16 ranks on the imagenet profile): every
    rank evaluates its shard of the released weights, rank 0 alone writes the model directory
    (16 ranks swapping one directory in collide)."""
    import hashlib

    from deit_repro.config import WeightsCfg
    from deit_repro.core.model_dirs import teacher_kwargs

    ds = open_dataset(fashion_small)
    p = smoke_params
    kwargs = teacher_kwargs(p.teacher.model, num_classes=10, in_chans=ds.in_chans, drop_path=0.0)
    torch.manual_seed(0)
    weights = tmp_path / "teacher.pth"
    torch.save(create_teacher(**kwargs).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    p = dataclasses.replace(
        p, teacher=dataclasses.replace(p.teacher, weights=WeightsCfg("file:///absent.pth", digest))
    )
    got = _on_two_gloo_ranks(
        tmp_path, _teacher_on_rank, p, fashion_small, weights, tmp_path / "teacher", timeout=300
    )
    assert got[1] == {}
    one = TeacherRun(params=p, data=fashion_small, weights=weights).train(
        RunSpec(0, tmp_path / "single", None), rt=Runtime(torch.device("cpu"))
    )
    assert got[0]["heads"] == one["heads"]  # the shards' counts add up to the whole split
    assert (tmp_path / "teacher" / "model.pt").is_file()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".teacher")]


# ------------------------------------------------------------------- one rank fails, all stop


def _failure(fn, *args) -> tuple[str, str, float]:
    """The error ``fn(*args)`` raised on this rank, and how long it took to raise it."""
    import time

    from deit_repro.errors import DeitReproError

    t0 = time.monotonic()
    try:
        fn(*args)
    except DeitReproError as err:
        return type(err).__name__, str(err), time.monotonic() - t0
    return "", "no error", time.monotonic() - t0


def _download_on_rank(rt: Runtime, params, data, out) -> tuple[str, str, float]:
    run_dir = out.parent / "run"
    return _failure(
        lambda: TeacherRun(params=params, data=data).train(RunSpec(0, out, run_dir), rt=rt)
    )


def _nan_on_rank_1(rt: Runtime, data, recipe) -> tuple[str, str, float]:
    from deit_repro.core.datasets import train_batches
    from deit_repro.core.engine import base_criterion, fit

    torch.manual_seed(0)
    model = create_student(
        distilled=False,
        num_classes=10,
        img_size=28,
        patch_size=7,
        embed_dim=16,
        depth=1,
        num_heads=2,
        in_chans=1,
        drop_path_rate=0.0,
    )
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    base, calls = base_criterion(recipe), [0]

    def loss_fn(x, out, y):
        calls[0] += 1
        loss = base(out, y)
        return loss * float("nan") if rt.rank == 1 and calls[0] == 2 else loss

    def train():
        fit(
            model=ddp,
            loss_fn=loss_fn,
            recipe=recipe,
            num_classes=10,
            seed=0,
            rt=rt,
            checkpoint_path=None,
            fingerprint="t",
            train_batches=train_batches(
                open_dataset(data), recipe, img_size=28, seed=0, world_size=2, rank=rt.rank
            ),
        )

    return _failure(train)


def test_a_failed_download_on_rank_0_stops_both_ranks_with_its_message(
    tmp_path, fashion_small, smoke_params
):
    """Rank 0's teacher download fails (a compute node without internet): both ranks raise
    the same one-line error within seconds, neither waits in a barrier for a timeout."""
    from deit_repro.config import WeightsCfg

    url = "http://127.0.0.1:9/regnety_160-a5fe301d.pth"  # nothing listens: refused at once
    p = dataclasses.replace(
        smoke_params,
        teacher=dataclasses.replace(smoke_params.teacher, weights=WeightsCfg(url, "a5fe301d")),
    )
    got = _on_two_gloo_ranks(
        tmp_path, _download_on_rank, p, fashion_small, tmp_path / "teacher", timeout=60
    )
    (kind0, msg0, s0), (kind1, msg1, s1) = got[0], got[1]
    print(f"rank 0 after {s0:.2f} s: {kind0}: {msg0}\nrank 1 after {s1:.2f} s: {kind1}: {msg1}")
    assert kind0 == kind1 == "CheckpointError" and msg0 == msg1, got
    assert msg0.startswith(f"cannot download teacher weights {url} ("), msg0
    assert s0 < 30 and s1 < 30, got
    assert not (tmp_path / "teacher").exists()


def test_a_nan_loss_on_one_rank_stops_both_ranks_at_the_same_step(
    tmp_path, fashion_small, smoke_params
):
    """Rank 1's loss turns NaN at its 2nd step: both ranks raise the same error before
    backward (no rank left in DDP's all-reduce until the collective times out)."""
    recipe = dataclasses.replace(smoke_params.student.train, epochs=2)
    got = _on_two_gloo_ranks(tmp_path, _nan_on_rank_1, fashion_small, recipe, timeout=60)
    (kind0, msg0, s0), (kind1, msg1, s1) = got[0], got[1]
    print(f"rank 0 after {s0:.2f} s: {kind0}: {msg0}\nrank 1 after {s1:.2f} s: {kind1}: {msg1}")
    assert kind0 == kind1 == "TrainingError" and msg0 == msg1, got
    assert msg0.startswith("loss is nan on rank 1 at epoch 1 step 2 (no checkpoint"), msg0
    assert s0 < 30 and s1 < 30, got


def test_released_teacher_weights_get_one_gpu_not_the_teachers_training_allocation():
    """The imagenet profile downloads RegNetY-16GF and only evaluates it: one node, one task,
    one GPU, that task's memory, an hour; Table 2's DeiT-B teacher still trains on 2 x 8 GPUs."""
    p = load_params(PROFILES / "imagenet.yaml")
    convnet = TeacherRun(params=p, data=Path("data/imagenet"), arch="convnet").resources
    vit = TeacherRun(params=p, data=Path("data/imagenet"), arch="vit").resources
    assert (convnet.nodes, convnet.tasks_per_node, convnet.gpus_per_node) == (1, 1, 1)
    assert convnet.mem_gb == 40 and convnet.timeout_min == 60
    assert convnet.cpus_per_task == p.launch.teacher.cpus_per_task
    assert vit == p.launch.teacher and vit.world_size == 16


def test_only_the_released_teacher_is_sized_down_not_the_stages_that_read_it():
    """A profile with teacher.weights: its pretrain, finetune and transfer jobs keep their whole
    allocation (2 DDP tasks in the rehearsal; 2 x 8 GPUs on the imagenet profile)."""
    from deit_repro.stages.finetune import FinetuneRun
    from deit_repro.stages.pretrain import PretrainRun

    p = load_params(PROFILES / "imagenet.yaml")
    assert p.teacher.weights is not None
    data = Path("data/imagenet")
    runs = {
        "pretrain": PretrainRun(params=p, data=data, distill="none", dist_token=False),
        "finetune": FinetuneRun(params=p, data=data, student=Path("models/pretrain/deit")),
        "transfer": TransferRun(params=p, data=Path("data/cifar10"), init="scratch"),
    }
    for stage, run in runs.items():
        assert run.resources == getattr(p.launch, stage), stage
