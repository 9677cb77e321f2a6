"""The profiles: all load, the default is `fashion`, and `imagenet` is the paper's Table 9."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from deit_repro.config import load_params
from deit_repro.core.model_dirs import student_kwargs

PROFILES = ROOT / "profiles"


@pytest.mark.parametrize("name", ["smoke", "fashion", "imagenet"])
def test_every_profile_loads(name):
    p = load_params(PROFILES / f"{name}.yaml")
    assert p.profile == name


def test_the_default_params_are_the_fashion_profile():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load(
        (PROFILES / "fashion.yaml").read_text()
    )


def test_imagenet_profile_is_table9():
    """Every DeiT-B ingredient of the paper's Table 9, compared with the reference CSV."""
    ref = pd.read_csv(ROOT / "reference" / "paper" / "table9_hyperparameters.csv")
    paper = dict(zip(ref["ingredient"], ref["DeiT-B_paper"]))
    p = load_params(PROFILES / "imagenet.yaml")
    t = p.student.train
    assert t.epochs == int(paper["Epochs"]) == 300
    assert t.batch_size == int(paper["Batch size"]) == 1024
    assert t.opt == paper["Optimizer"].lower() == "adamw"
    assert paper["learning rate"] == "0.0005 x batchsize/512"
    assert t.lr_per_512 == 5e-4 and t.effective_lr() == pytest.approx(1e-3)
    assert t.sched == paper["Learning rate decay"] == "cosine"
    assert t.weight_decay == float(paper["Weight decay"]) == 0.05
    assert t.warmup_epochs == int(paper["Warmup epochs"]) == 5
    assert t.label_smoothing == float(paper["Label smoothing eps"]) == 0.1
    assert paper["Dropout"] == "no"  # the students are built with drop_rate 0 (models.py)
    assert t.drop_path == float(paper["Stoch. Depth"]) == 0.1
    assert paper["Repeated Aug"] == "yes" and t.repeated_aug == 3
    assert paper["Gradient Clip."] == "no" and t.clip_grad is None
    assert paper["Rand Augment"] == "9/0.5" and t.aug.rand_augment == "rand-m9-mstd0.5-inc1"
    assert t.mixup == float(paper["Mixup prob. (code: alpha)"]) == 0.8
    assert t.cutmix == float(paper["Cutmix prob. (code: alpha)"]) == 1.0
    assert t.aug.reprob == float(paper["Erasing prob."]) == 0.25
    # timm's transform: in the loader's workers on a CPU, decoded and augmented on a GPU
    assert t.aug.pipeline == "auto" and t.aug.interpolation == "bicubic"
    assert t.compile == "auto"  # torch.compile on a GPU only
    # Table 1 / §5.2: DeiT-B students at 224, the RegNetY-16GF teacher, 384 fine-tuning.
    assert (
        student_kwargs(p.student.model, distilled=True, num_classes=1000, in_chans=3)["name"]
        == "deit_base_distilled_patch16_224"
    )
    assert (
        student_kwargs(p.student.model, distilled=False, num_classes=1000, in_chans=3)["name"]
        == "deit_base_patch16_224"
    )
    assert p.teacher.model.name == "regnety_160" and p.teacher.weights is not None
    assert p.finetune.img_size == 384 and p.finetune.interpolation == "bicubic"
    assert (p.distillation.hard.alpha, p.distillation.soft.alpha, p.distillation.soft.tau) == (
        0.5,
        0.1,
        3.0,
    )
    assert set(p.transfer.datasets) == {
        "cifar10",
        "cifar100",
        "flowers102",
        "stanford_cars",
        "inat2018",
        "inat2019",
    }
    assert p.eval.crop_pct == 0.875
