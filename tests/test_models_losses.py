"""Tests of models.py, pos_embed.py and losses.py on tiny CPU models.

Loss values are checked against formulas written out here with numpy loops (float64), independently
of ``torch.nn.functional``; the facts they pin are those of reference/official-deit.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from deit_repro.errors import CheckpointError, ConfigError
from deit_repro.core.losses import DistillationLoss
from deit_repro.core.models import (
    STUDENT_VARIANTS,
    count_params,
    create_student,
    create_teacher,
    load_state_dict_checked,
    set_training_outputs,
    student_heads,
)
from deit_repro.core.pos_embed import adapt_for_finetune, resample_student_state_dict

B, K = 4, 10  # batch, classes
TINY = dict(
    num_classes=K,
    img_size=28,
    in_chans=1,
    patch_size=7,
    embed_dim=32,
    depth=2,
    num_heads=2,
    drop_path_rate=0.0,
)


# ---------------------------------------------------------------- independent reference formulas


def _log_softmax_rows(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        m = max(z[i])
        lse = m + math.log(sum(math.exp(v - m) for v in z[i]))
        out[i] = [v - lse for v in z[i]]
    return out


def ref_ce(s: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> float:
    """Mean over the batch of (1-ε)·(-log p_y) + ε·mean_j(-log p_j) (timm's label smoothing)."""
    logp = _log_softmax_rows(s)
    total = 0.0
    for i in range(s.shape[0]):
        nll = -logp[i, y[i]]
        uniform = -sum(logp[i]) / s.shape[1]
        total += (1 - smoothing) * nll + smoothing * uniform
    return total / s.shape[0]


def ref_soft_target_ce(s: np.ndarray, targets: np.ndarray) -> float:
    logp = _log_softmax_rows(s)
    return (
        sum(-sum(targets[i, j] * logp[i, j] for j in range(s.shape[1])) for i in range(s.shape[0]))
        / s.shape[0]
    )


def ref_kl_sum(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """Σ_i Σ_j p_t(ij) · (log p_t(ij) − log p_s(ij)) at temperature τ (no normalisation)."""
    logp_s, logp_t = _log_softmax_rows(s / tau), _log_softmax_rows(t / tau)
    total = 0.0
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            total += math.exp(logp_t[i, j]) * (logp_t[i, j] - logp_s[i, j])
    return total


def ref_soft(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """Official DeiT: KL summed, × τ², divided by B·K (facebookresearch/deit#61)."""
    return ref_kl_sum(s, t, tau) * tau * tau / (s.shape[0] * s.shape[1])


def ref_hard(s: np.ndarray, t: np.ndarray) -> float:
    return ref_ce(s, np.array([int(np.argmax(row)) for row in t]), smoothing=0.0)


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---------------------------------------------------------------- fixtures


class RecordingTeacher(nn.Module):
    """Linear teacher on flattened pixels; remembers what it was called with."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1 * 28 * 28, K)
        self.bn = nn.BatchNorm1d(K)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x)
        return self.bn(self.fc(x.flatten(1))) * 3.0


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(B, 1, 28, 28, generator=g)
    labels = torch.randint(0, K, (B,), generator=g)
    cls = torch.randn(B, K, generator=g, requires_grad=True)
    dist = torch.randn(B, K, generator=g, requires_grad=True)
    return inputs, labels, cls, dist


@pytest.fixture
def teacher():
    torch.manual_seed(1)
    t = RecordingTeacher().eval()
    return t


def teacher_logits(teacher, inputs):
    with torch.no_grad():
        return np64(teacher(inputs))


# ---------------------------------------------------------------- DistillationLoss values


@pytest.mark.parametrize("token", ["class", "dist"])
def test_none_is_base_loss_on_class_head(batch, token):
    inputs, labels, cls, dist = batch
    loss_fn = DistillationLoss(
        LabelSmoothingCrossEntropy(0.1), None, distill="none", alpha=0.5, tau=3.0
    )
    outputs = cls if token == "class" else (cls, dist)
    loss = loss_fn(inputs, outputs, labels)
    assert loss.item() == pytest.approx(ref_ce(np64(cls), labels.numpy(), 0.1), rel=1e-6)
    assert float(loss_fn.last_parts["distill"]) == 0.0
    loss.backward()
    assert (
        dist.grad is None
    )  # official code: 'none' returns base(cls) only, the dist head is untouched


@pytest.mark.parametrize("alpha", [0.1, 0.5])
@pytest.mark.parametrize("token", ["class", "dist"])
def test_soft_matches_formula(batch, teacher, alpha, token):
    inputs, labels, cls, dist = batch
    tau = 3.0
    loss_fn = DistillationLoss(
        LabelSmoothingCrossEntropy(0.1), teacher, distill="soft", alpha=alpha, tau=tau
    )
    outputs = cls if token == "class" else (cls, dist)
    loss = loss_fn(inputs, outputs, labels)
    t = teacher_logits(teacher, inputs)
    student_for_kd = np64(cls) if token == "class" else np64(dist)
    base = ref_ce(np64(cls), labels.numpy(), 0.1)
    soft = ref_soft(student_for_kd, t, tau)
    assert loss.item() == pytest.approx((1 - alpha) * base + alpha * soft, rel=1e-6)
    assert float(loss_fn.last_parts["base"]) == pytest.approx(base, rel=1e-6)
    assert float(loss_fn.last_parts["distill"]) == pytest.approx(soft, rel=1e-6)


def test_soft_normalisation_is_sum_over_batch_times_classes(batch, teacher):
    inputs, labels, cls, dist = batch
    tau = 3.0
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, distill="soft", alpha=1.0, tau=tau)
    loss = loss_fn(inputs, (cls, dist), labels)
    t = teacher_logits(teacher, inputs)
    kl_sum = ref_kl_sum(np64(dist), t, tau)
    assert loss.item() == pytest.approx(kl_sum * tau**2 / (B * K), rel=1e-6)
    # timm's TokenDistillationTask: 'batchmean' (divide by B only) -> K times larger.
    batchmean = kl_sum * tau**2 / B
    assert batchmean / loss.item() == pytest.approx(K, rel=1e-6)
    timm_value = (
        F.kl_div(
            F.log_softmax(dist / tau, -1),
            torch.log_softmax(torch.tensor(t) / tau, -1).float(),
            reduction="batchmean",
            log_target=True,
        )
        * tau**2
    )
    assert timm_value.item() == pytest.approx(K * loss.item(), rel=1e-5)


@pytest.mark.parametrize("token", ["class", "dist"])
def test_hard_matches_formula_and_ignores_smoothing(batch, teacher, token):
    inputs, labels, cls, dist = batch
    alpha = 0.5
    loss_fn = DistillationLoss(
        LabelSmoothingCrossEntropy(0.1), teacher, distill="hard", alpha=alpha, tau=3.0
    )
    outputs = cls if token == "class" else (cls, dist)
    loss = loss_fn(inputs, outputs, labels)
    t = teacher_logits(teacher, inputs)
    s = np64(cls) if token == "class" else np64(dist)
    hard = ref_hard(s, t)
    assert float(loss_fn.last_parts["distill"]) == pytest.approx(hard, rel=1e-6)
    teacher_labels = t.argmax(1)
    assert hard != pytest.approx(
        ref_ce(s, teacher_labels, 0.1), rel=1e-3
    )  # smoothing would change it
    base = ref_ce(np64(cls), labels.numpy(), 0.1)
    assert loss.item() == pytest.approx((1 - alpha) * base + alpha * hard, rel=1e-6)


@pytest.mark.parametrize("distill", ["soft", "hard"])
def test_alpha_zero_is_base(batch, teacher, distill):
    inputs, labels, cls, dist = batch
    loss_fn = DistillationLoss(
        LabelSmoothingCrossEntropy(0.1), teacher, distill=distill, alpha=0.0, tau=3.0
    )
    assert loss_fn(inputs, (cls, dist), labels).item() == pytest.approx(
        ref_ce(np64(cls), labels.numpy(), 0.1), rel=1e-6
    )


def test_soft_targets_from_mixup_go_to_base_criterion(batch, teacher):
    inputs, _, cls, dist = batch
    targets = torch.softmax(torch.randn(B, K, generator=torch.Generator().manual_seed(5)), dim=1)
    loss_fn = DistillationLoss(
        SoftTargetCrossEntropy(), teacher, distill="hard", alpha=0.5, tau=1.0
    )
    loss = loss_fn(inputs, (cls, dist), targets)
    t = teacher_logits(teacher, inputs)
    expected = 0.5 * ref_soft_target_ce(np64(cls), np64(targets)) + 0.5 * ref_hard(np64(dist), t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_teacher_sees_same_inputs_and_gets_no_gradient(batch, teacher):
    inputs, labels, cls, dist = batch
    loss_fn = DistillationLoss(
        LabelSmoothingCrossEntropy(0.1), teacher, distill="soft", alpha=0.5, tau=3.0
    )
    loss = loss_fn(inputs, (cls, dist), labels)
    loss.backward()
    assert teacher.seen[-1] is inputs
    assert all(p.grad is None for p in teacher.parameters())
    assert cls.grad is not None and dist.grad is not None
    # the loss module keeps the teacher in eval mode, as timm's TokenDistillationTask does
    loss_fn.train()
    assert not teacher.training


def test_loss_rejects_bad_config(teacher):
    base = nn.CrossEntropyLoss()
    for kwargs in (
        dict(distill="soft", alpha=1.5, tau=1.0),
        dict(distill="soft", alpha=-0.1, tau=1.0),
        dict(distill="soft", alpha=0.5, tau=0.0),
        dict(distill="medium", alpha=0.5, tau=1.0),
    ):
        with pytest.raises(ConfigError):
            DistillationLoss(base, teacher, **kwargs)
    for distill in ("soft", "hard"):
        with pytest.raises(ConfigError, match="needs a teacher"):
            DistillationLoss(base, None, distill=distill, alpha=0.5, tau=1.0)


def test_distillation_through_real_student(teacher):
    """End to end: a DeiT⚗ student's pair goes through the loss and both heads get gradients."""
    torch.manual_seed(0)
    student = create_student(distilled=True, **TINY)
    set_training_outputs(student, True)
    student.train()
    x, y = torch.randn(B, 1, 28, 28), torch.randint(0, K, (B,))
    loss_fn = DistillationLoss(
        LabelSmoothingCrossEntropy(0.1), teacher, distill="hard", alpha=0.5, tau=1.0
    )
    loss_fn(x, student(x), y).backward()
    assert student.head.weight.grad is not None and student.head_dist.weight.grad is not None


# ---------------------------------------------------------------- students


def test_distilled_student_outputs_and_heads():
    torch.manual_seed(0)
    model = create_student(distilled=True, **TINY)
    assert isinstance(model, VisionTransformerDistilled)
    assert model.pos_embed.shape == (1, 2 + 16, 32)
    x = torch.randn(B, 1, 28, 28)

    set_training_outputs(model, True)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert all(o.shape == (B, K) for o in out)
    heads_train = student_heads(model, x)  # drop_path 0, dropout 0: deterministic in train mode too
    assert torch.allclose(out[0], heads_train["cls"], atol=1e-6)
    assert torch.allclose(out[1], heads_train["dist"], atol=1e-6)

    model.eval()
    with torch.no_grad():
        joint = model(x)
        heads = student_heads(model, x)
    assert isinstance(joint, torch.Tensor) and joint.shape == (B, K)
    assert set(heads) == {"cls", "dist", "joint"}
    assert torch.allclose(joint, (heads["cls"] + heads["dist"]) / 2, atol=1e-6)
    assert torch.allclose(joint, heads["joint"], atol=1e-6)
    assert not torch.allclose(heads["cls"], heads["dist"])

    set_training_outputs(model, False)
    model.train()
    assert isinstance(model(x), torch.Tensor)  # fine-tuning without teacher: averaged logits


def test_plain_student_has_no_distillation_head():
    model = create_student(distilled=False, **TINY)
    assert type(model) is VisionTransformer
    assert not any(k.startswith(("head_dist", "dist_token")) for k in model.state_dict())
    set_training_outputs(model, True)  # no-op
    model.train()
    x = torch.randn(B, 1, 28, 28)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (B, K)
    heads = student_heads(model.eval(), x)
    assert set(heads) == {"cls"} and heads["cls"].shape == (B, K)


def test_named_timm_student_structure():
    with torch.device("meta"):  # structure and counts only: no memory, no init time
        model = create_student(
            name="deit_tiny_distilled_patch16_224",
            distilled=True,
            num_classes=1000,
            img_size=224,
            in_chans=3,
        )
    assert isinstance(model, VisionTransformerDistilled)
    assert model.embed_dim == 192 and len(model.blocks) == 12
    assert model.blocks[0].attn.num_heads == 3
    # named models honour the dataset's sizes
    small = create_student(
        name="deit_tiny_patch16_224", distilled=False, num_classes=K, img_size=32, in_chans=1
    )
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, K)


@pytest.mark.parametrize("variant", sorted(STUDENT_VARIANTS))
def test_table1_variants(variant):
    spec = STUDENT_VARIANTS[variant]
    with torch.device("meta"):
        model = create_student(
            name=spec.timm_name, distilled=False, num_classes=1000, img_size=224, in_chans=3
        )
    assert (model.embed_dim, model.blocks[0].attn.num_heads, len(model.blocks)) == (
        spec.embed_dim,
        spec.num_heads,
        spec.depth,
    )
    n = count_params(model)
    # Table 1 truncates: DeiT-Ti has 5.72 M parameters and is printed "5M"
    # (S 22.05 -> 22, B 86.57 -> 86).
    assert math.floor(n / 1e6) == spec.paper_params_m
    if spec.paper_params_m >= 10:
        assert abs(n / 1e6 - spec.paper_params_m) / spec.paper_params_m < 0.02


def test_student_config_errors():
    with pytest.raises(ConfigError, match="distillation token"):
        create_student(
            name="deit_tiny_patch16_224", distilled=True, num_classes=K, img_size=224, in_chans=3
        )
    with pytest.raises(ConfigError, match="distillation token"):
        create_student(
            name="deit_tiny_distilled_patch16_224",
            distilled=False,
            num_classes=K,
            img_size=224,
            in_chans=3,
        )
    with pytest.raises(ConfigError, match="not a timm model"):
        create_student(name="deit_nano", distilled=False, num_classes=K, img_size=224, in_chans=3)
    with pytest.raises(ConfigError, match=r"img_size 30 .*patch_size 7"):
        create_student(distilled=False, **{**TINY, "img_size": 30})
    with pytest.raises(ConfigError, match="num_heads"):
        create_student(distilled=False, **{**TINY, "num_heads": 3})


# ---------------------------------------------------------------- positional embedding resampling


def _distilled_20px():
    torch.manual_seed(0)
    return create_student(distilled=True, **{**TINY, "img_size": 20, "patch_size": 4})


def test_resample_keeps_prefix_and_matches_official_interpolation():
    sd = _distilled_20px().state_dict()
    old = sd["pos_embed"]
    assert old.shape == (1, 2 + 25, 32)
    out = {
        mode: resample_student_state_dict(
            sd, new_img_size=28, patch_size=4, num_prefix_tokens=2, interpolation=mode
        )["pos_embed"]
        for mode in ("bicubic", "bilinear")
    }
    for pe in out.values():
        assert pe.shape == (1, 2 + 49, 32)
        assert torch.equal(pe[:, :2], old[:, :2])
    assert not torch.allclose(out["bicubic"], out["bilinear"])
    # official main.py: F.interpolate(mode='bicubic', align_corners=False), no antialiasing
    grid = old[:, 2:].reshape(1, 5, 5, 32).permute(0, 3, 1, 2)
    official = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    assert torch.allclose(
        out["bicubic"][:, 2:], official.permute(0, 2, 3, 1).reshape(1, 49, 32), atol=1e-6
    )
    # timm's default (antialias=True) would NOT match it, even when upsampling
    antialiased = F.interpolate(
        grid, size=(7, 7), mode="bicubic", align_corners=False, antialias=True
    )
    assert not torch.allclose(official, antialiased, atol=1e-3)
    # other tensors are passed through untouched
    assert (
        resample_student_state_dict(sd, new_img_size=28, patch_size=4, num_prefix_tokens=2)[
            "cls_token"
        ]
        is sd["cls_token"]
    )


@pytest.mark.parametrize("seed", range(5))
def test_bilinear_lowers_the_norm_more_than_bicubic(seed):
    """Paper §6: bilinear interpolation lowers the vectors' L2 norm (and costs accuracy)."""
    g = torch.Generator().manual_seed(seed)
    dim = 64
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 5), torch.linspace(0, 1, 5), indexing="ij")
    freq, phase = torch.rand(dim, 2, generator=g) * 2, torch.rand(dim, generator=g) * 2 * math.pi
    smooth = torch.sin(
        math.pi * (freq[:, :1, None] * xs + freq[:, 1:, None] * ys) + phase[:, None, None]
    )
    pos = torch.cat(
        [torch.randn(1, 2, dim, generator=g), smooth.permute(1, 2, 0).reshape(1, 25, dim)], dim=1
    )

    def mean_norm(mode):
        pe = resample_student_state_dict(
            {"pos_embed": pos},
            new_img_size=28,
            patch_size=4,
            num_prefix_tokens=2,
            interpolation=mode,
        )["pos_embed"]
        return pe[0, 2:].norm(dim=-1).mean().item()

    assert mean_norm("bilinear") < mean_norm("bicubic")
    assert mean_norm("bilinear") < pos[0, 2:].norm(dim=-1).mean().item()


def test_adapt_for_finetune_loads_and_runs_at_new_resolution():
    old_model = _distilled_20px()
    sd = old_model.state_dict()
    new_model = create_student(distilled=True, **{**TINY, "img_size": 28, "patch_size": 4})
    reinit = adapt_for_finetune(new_model, sd, interpolation="bicubic", drop_heads=False)
    assert reinit == []
    new_sd = new_model.state_dict()
    assert torch.equal(new_sd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(new_sd["head_dist.weight"], sd["head_dist.weight"])
    assert torch.equal(new_sd["pos_embed"][:, :2], sd["pos_embed"][:, :2])
    assert new_model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, K)

    # another class count: mismatching heads are dropped and left at their fresh init
    other = create_student(
        distilled=True, **{**TINY, "img_size": 28, "patch_size": 4, "num_classes": 5}
    )
    fresh_head = other.head.weight.detach().clone()
    reinit = adapt_for_finetune(other, sd, interpolation="bilinear", drop_heads=False)
    assert reinit == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    assert torch.equal(other.head.weight, fresh_head)
    assert other(torch.randn(2, 1, 28, 28)).shape == (2, 5)

    # drop_heads re-initialises heads even when their shape matches (transfer)
    again = create_student(distilled=True, **{**TINY, "img_size": 28, "patch_size": 4})
    assert len(adapt_for_finetune(again, sd, drop_heads=True)) == 4


def test_adapt_for_finetune_rejects_other_architecture():
    sd = _distilled_20px().state_dict()
    plain = create_student(distilled=False, **{**TINY, "img_size": 28, "patch_size": 4})
    with pytest.raises(CheckpointError):
        adapt_for_finetune(plain, sd, drop_heads=True)


def test_bad_interpolation_is_config_error():
    sd = _distilled_20px().state_dict()
    with pytest.raises(ConfigError, match="nearest"):
        resample_student_state_dict(
            sd, new_img_size=28, patch_size=4, num_prefix_tokens=2, interpolation="nearest"
        )
    model = create_student(distilled=True, **{**TINY, "img_size": 28, "patch_size": 4})
    with pytest.raises(ConfigError):
        adapt_for_finetune(model, sd, interpolation="area", drop_heads=False)
    with pytest.raises(ConfigError, match="patch_size"):
        resample_student_state_dict(sd, new_img_size=30, patch_size=4, num_prefix_tokens=2)


# ---------------------------------------------------------------- checked loading


def test_load_state_dict_checked_class_count_mismatch():
    sd = create_student(distilled=False, **TINY).state_dict()
    model = create_student(distilled=False, **{**TINY, "num_classes": 100})
    with pytest.raises(CheckpointError) as err:
        load_state_dict_checked(model, sd, what="student checkpoint")
    msg = str(err.value)
    assert (
        "head.weight" in msg and "[10, 32]" in msg and "[100, 32]" in msg and "class count" in msg
    )


def test_load_state_dict_checked_wrong_architecture_and_success():
    vit = create_student(distilled=False, **TINY)
    resnet_sd = create_teacher(
        arch="resnet_small", num_classes=K, in_chans=1, img_size=28
    ).state_dict()
    with pytest.raises(CheckpointError, match="wrong architecture"):
        load_state_dict_checked(vit, resnet_sd, what="teacher checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint\\['model'\\]"):
        load_state_dict_checked(vit, {"model": vit.state_dict(), "epoch": 3}, what="checkpoint")

    other = create_student(distilled=False, **TINY)
    load_state_dict_checked(other, vit.state_dict(), what="student checkpoint")
    assert all(
        torch.equal(a, b) for a, b in zip(other.state_dict().values(), vit.state_dict().values())
    )


# ---------------------------------------------------------------- teachers


@pytest.mark.parametrize(
    "arch, lo, hi",
    [
        ("resnet_small", 50_000, 150_000),
        ("regnety_small", 50_000, 150_000),
        ("vit", 100_000, 2_000_000),
    ],
)
def test_small_teachers(arch, lo, hi):
    torch.manual_seed(0)
    model = create_teacher(arch=arch, num_classes=K, in_chans=1, img_size=28)
    assert lo <= count_params(model) <= hi
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(4, 1, 28, 28)).shape == (4, K)
    if arch != "vit":
        with torch.no_grad():
            assert model.forward_features(torch.randn(1, 1, 28, 28)).shape[-2:] == (
                4,
                4,
            )  # output stride 8


def test_resnet_small_is_the_78k_reference_teacher():
    model = create_teacher(arch="resnet_small", num_classes=K, in_chans=1, img_size=28)
    assert count_params(model) == 77_754


def test_teacher_config_errors():
    with pytest.raises(ConfigError, match="unknown"):
        create_teacher(arch="vgg", num_classes=K, in_chans=1, img_size=28)
    with pytest.raises(ConfigError, match="same non-zero length"):
        create_teacher(num_classes=K, in_chans=1, img_size=28, channels=(16, 32), depths=(1, 1, 1))
    with pytest.raises(ConfigError, match="1×1 feature map"):
        create_teacher(
            num_classes=K,
            in_chans=1,
            img_size=28,
            strides=(2, 2, 2, 2),
            channels=(8,) * 4,
            depths=(1,) * 4,
        )
    with pytest.raises(ConfigError, match="not a timm model"):
        create_teacher(name="regnety_9000", num_classes=K, in_chans=1)


def test_paper_teacher_structure():
    with torch.device("meta"):
        model = create_teacher(name="regnety_160", num_classes=1000, in_chans=3)
    assert 83e6 < count_params(model) < 84.5e6  # RegNetY-16GF, 83.6 M


@pytest.mark.slow
def test_paper_teacher_builds_on_cpu():
    model = create_teacher(name="regnety_160", num_classes=1000, in_chans=3)
    assert 83e6 < count_params(model) < 84.5e6
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_base_criterion_is_the_official_label_smoothed_loss():
    """engine.base_criterion uses torch's fused CE with label smoothing (faster on CPU):
    the same loss as the official timm LabelSmoothingCrossEntropy, and as the formula."""
    from deit_repro.config import TrainCfg
    from deit_repro.core.engine import base_criterion

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(32, 10, generator=g), torch.randint(10, (32,), generator=g)
    crit = base_criterion(TrainCfg(mixup=0.0, cutmix=0.0, label_smoothing=0.1))
    logp = torch.log_softmax(logits.double(), dim=1)
    formula = (0.9 * -logp[torch.arange(32), y] + 0.1 * -logp.mean(dim=1)).mean()
    assert torch.allclose(crit(logits, y).double(), formula, atol=1e-6)
    assert torch.allclose(crit(logits, y), LabelSmoothingCrossEntropy(0.1)(logits, y), atol=1e-6)
    assert isinstance(base_criterion(TrainCfg()), SoftTargetCrossEntropy)  # Mixup on


def test_a_named_timm_teacher_keeps_stochastic_depth():
    """Table 2's DeiT-B teacher trains with drop_path 0.1 (official main.py passes --drop-path to
    every model); a timm name must not drop it on the way to timm.create_model."""
    from deit_repro.config import ModelCfg
    from deit_repro.core.model_dirs import teacher_kwargs

    cfg = ModelCfg(name="deit_tiny_patch16_224", img_size=32)
    kw = teacher_kwargs(cfg, num_classes=10, in_chans=3, drop_path=0.1)
    assert kw["drop_path_rate"] == 0.1
    model = create_teacher(**{**kw, "name": "vit_tiny_patch16_224"})
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)  # linear decay to 0.1 in the last block
    model0 = create_teacher(**teacher_kwargs(cfg, num_classes=10, in_chans=3, drop_path=0.0))
    assert not [m for m in model0.modules() if type(m).__name__ == "DropPath"]
