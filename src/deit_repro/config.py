"""The one experiment config: ``params.yaml`` loaded once into frozen, typed objects.

Unknown keys, wrong types and out-of-range values are refused with a message that names the key.
Derived values (the effective learning rate) are computed by properties and logged, never written
back. Cluster settings (partition, GPUs, time) are the ``launch`` section, which no stage reads as a
DVC param: where a run happens does not change what it computes.

Every field is documented by a ``#:`` comment; units are stated where a number has one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

from deit_repro.errors import ConfigError
from deit_repro.typed_yaml import (
    bounded,
    build,
    check,
    dataclass_schema,
    overlay,
    read_yaml,
)

#: the distillation modes (paper Table 3): declared once, read by the params, the loss, the
#: pretrain stage and the CLI
DistillKind = Literal["none", "soft", "hard"]
DISTILL_MODES: tuple[str, ...] = get_args(DistillKind)


_POSITIVE = dict(expect="a positive integer", exclusiveMinimum=0)
_POSITIVE_OR_NULL = dict(expect="a positive integer or null", exclusiveMinimum=0)
_UNIT = dict(expect="in [0, 1]", minimum=0, maximum=1)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


#: the dataset sources ``deit_repro.data.sources.load_source`` knows: the contract between
#: params.yaml's ``datasets.<name>.source`` and the data layer
SOURCES = (
    "fashion_mnist",
    "digits",
    "imagefolder",
    "cifar10",
    "cifar100",
    "flowers102",
    "stanford_cars",
    "inat2018",
    "inat2019",
)
#: what the prepare stage does with an unreadable image of an image tree
ON_BAD_IMAGE = ("error", "skip")


@dataclass(frozen=True)
class DatasetCfg:
    """One dataset of the profile, as ``deit-repro prepare`` materialises it."""

    #: fashion_mnist | digits | imagefolder | cifar10 | cifar100 | flowers102 | stanford_cars |
    #: inat2018 | inat2019
    source: str = bounded(expect="one of " + str(sorted(SOURCES)), enum=sorted(SOURCES))
    #: where the raw data lies (ImageNet's ImageFolder root, torchvision's root); null = the
    #: source's usual place (Fashion-MNIST: the Debian package). `--source-dir` overrides it.
    root: Optional[str] = None
    #: class-balanced subset of the training split (images per class); null = all
    train_per_class: Optional[int] = bounded(None, **_POSITIVE_OR_NULL)
    #: class-balanced subset of the test split; null = all
    test_per_class: Optional[int] = bounded(None, **_POSITIVE_OR_NULL)
    #: resize (shorter side + centre crop, bicubic) when preparing; null = native size
    image_size: Optional[int] = bounded(None, **_POSITIVE_OR_NULL)
    #: an unreadable image in an image tree: refuse ("error") or skip and count it ("skip")
    on_bad_image: Literal[ON_BAD_IMAGE] = "error"
    #: held-out fraction for sources without an official test split (digits)
    test_fraction: float = bounded(0.2, expect="in (0, 1)", exclusiveMinimum=0, exclusiveMaximum=1)
    #: seed of the subset / split draw
    seed: int = 0
    #: let torchvision download the data where a network exists
    download: bool = False


@dataclass(frozen=True)
class ModelCfg:
    """A student or teacher architecture: an exact timm name, or a small custom size built
    through the same timm classes (small profiles)."""

    #: exact timm model name (e.g. deit_small_distilled_patch16_224, regnety_160); null = custom
    name: Optional[str] = None
    #: custom teachers only: resnet_small | regnety_small | vit
    arch: str = "vit"
    #: training resolution in pixels (square); input channels come from the dataset
    img_size: int = bounded(224, **_POSITIVE)
    patch_size: int = bounded(16, **_POSITIVE)
    embed_dim: int = bounded(192, **_POSITIVE)
    depth: int = bounded(12, **_POSITIVE)
    num_heads: int = bounded(3, **_POSITIVE)
    mlp_ratio: float = bounded(4.0, expect="positive", exclusiveMinimum=0)
    #: custom convnet teachers: channels and blocks per stage
    channels: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (1, 1, 1)

    def __post_init__(self) -> None:
        if self.name is None and self.arch == "vit":
            check(
                self.img_size % self.patch_size == 0,
                "patch_size",
                self.patch_size,
                f"a divisor of img_size={self.img_size}",
            )
            check(
                self.embed_dim % self.num_heads == 0,
                "num_heads",
                self.num_heads,
                f"a divisor of embed_dim={self.embed_dim}",
            )
        check(
            len(self.channels) == len(self.depths),
            "depths",
            self.depths,
            f"one entry per stage of channels={self.channels}",
        )


@dataclass(frozen=True)
class AugCfg:
    """Training-time augmentation (paper Table 9 / official main.py defaults)."""

    #: "tensor": batched on in-memory uint8 tensors (small datasets, no per-image Python work);
    #: "timm": per-image timm create_transform (PIL) in the loader's CPU workers;
    #: "device": the same recipe with JPEG decode and augmentation batched on the training device
    #: (nvJPEG on a GPU; the workers only read bytes); "auto": device on CUDA, timm elsewhere
    pipeline: Literal["tensor", "timm", "device", "auto"] = "timm"
    #: random-resized-crop area range
    scale: tuple[float, float] = bounded(
        (0.08, 1.0), expect="0 < min <= max <= 1", items={"exclusiveMinimum": 0, "maximum": 1}
    )
    ratio: tuple[float, float] = bounded(
        (0.75, 4.0 / 3.0), expect="0 < min <= max", items={"exclusiveMinimum": 0}
    )
    hflip: float = bounded(0.5, **_UNIT)
    #: timm RandAugment string (paper: rand-m9-mstd0.5-inc1); null = off; timm pipeline only
    rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    #: random erasing probability (paper: 0.25) and mode
    reprob: float = bounded(0.25, **_UNIT)
    remode: Literal["pixel", "rand", "const"] = "pixel"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        check(self.scale[0] <= self.scale[1], "scale", self.scale, "0 < min <= max <= 1")
        check(self.ratio[0] <= self.ratio[1], "ratio", self.ratio, "0 < min <= max")
        if self.pipeline in ("device", "auto"):
            check(
                self.rand_augment is None or self.rand_augment.startswith("rand"),
                "rand_augment",
                self.rand_augment,
                f"a rand-... policy (paper: rand-m9-mstd0.5-inc1) or null for pipeline "
                f"{self.pipeline!r} (AutoAugment/AugMix need the 'timm' pipeline)",
            )
            check(
                self.rand_augment is not None or self.color_jitter == 0.0,
                "color_jitter",
                self.color_jitter,
                f"0 without RandAugment for pipeline {self.pipeline!r} (timm ignores it under "
                f"RandAugment; colour jitter alone needs the 'timm' pipeline)",
            )
        if self.pipeline == "tensor":
            check(
                self.rand_augment is None and self.color_jitter == 0.0,
                "rand_augment",
                self.rand_augment,
                "null with color_jitter 0 for pipeline 'tensor' "
                "(RandAugment/colour jitter need the per-image 'timm' pipeline)",
            )

    def pipeline_on(self, gpu: bool) -> str:
        """The pipeline this recipe runs where training is (``gpu``) or is not on a GPU:
        ``auto`` is ``device`` on a GPU (decode and augmentation there, bench/loader_bench.py)
        and ``timm`` elsewhere; every other value is itself."""
        if self.pipeline == "auto":
            return "device" if gpu else "timm"
        return self.pipeline


@dataclass(frozen=True)
class TrainCfg:
    """One training recipe (paper Table 9; official main.py defaults)."""

    epochs: int = bounded(300, **_POSITIVE)
    #: global batch over all processes (images per optimizer step)
    batch_size: int = bounded(1024, **_POSITIVE)
    #: learning rate per 512 images: the effective lr is lr_per_512 * batch_size / 512 (paper §6)
    lr_per_512: float = bounded(5e-4, expect="positive", exclusiveMinimum=0)
    min_lr: float = bounded(1e-5, expect=">= 0", minimum=0)
    warmup_lr: float = bounded(1e-6, expect=">= 0", minimum=0)
    warmup_epochs: int = bounded(5, expect=">= 0", minimum=0)
    weight_decay: float = bounded(0.05, expect=">= 0", minimum=0)
    opt: str = "adamw"
    opt_eps: float = 1e-8
    momentum: float = 0.9
    #: gradient-norm clip; null = none (paper)
    clip_grad: Optional[float] = None
    sched: str = "cosine"
    label_smoothing: float = bounded(0.1, expect="in [0, 1)", minimum=0, exclusiveMaximum=1)
    drop_path: float = bounded(0.1, expect="in [0, 1)", minimum=0, exclusiveMaximum=1)
    #: Mixup / CutMix alphas (0 = off), probability and switch probability
    mixup: float = bounded(0.8, expect=">= 0 (0 = off)", minimum=0)
    cutmix: float = bounded(1.0, expect=">= 0 (0 = off)", minimum=0)
    mixup_prob: float = bounded(1.0, **_UNIT)
    mixup_switch_prob: float = bounded(0.5, **_UNIT)
    #: repeated augmentation: copies of each image per epoch (paper: 3; 1 = off)
    repeated_aug: int = bounded(3, expect=">= 1 (1 = off)", minimum=1)
    ema: bool = False
    ema_decay: float = bounded(0.99996, expect="in (0, 1)", exclusiveMinimum=0, exclusiveMaximum=1)
    #: mixed precision on CUDA: auto (bf16 where supported) | bf16 | fp16 | off; CPU runs fp32
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    #: evaluate on the test split every n epochs for the accuracy-vs-epoch curve (0 = final only)
    eval_every: int = bounded(1, expect=">= 0", minimum=0)
    #: dataloader workers for the per-image 'timm' pipeline
    num_workers: int = bounded(0, expect=">= 0", minimum=0)
    #: torch.compile of the student and the teacher: auto = on CUDA, off on a CPU (where
    #: inductor's compile time is not repaid, bench/README.md); on | off
    compile: Literal["auto", "on", "off"] = "off"
    #: steps between the host's looks at the loss (the running mean, the non-finite check that
    #: stops the run, the progress line): the only per-step syncs of a GPU run; 0 = about 10 an
    #: epoch, at least one every 50 steps
    check_every: int = bounded(0, expect=">= 0 (0 = about 10 an epoch)", minimum=0)
    aug: AugCfg = field(default_factory=AugCfg)

    def __post_init__(self) -> None:
        check(
            self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
            "warmup_epochs",
            self.warmup_epochs,
            f"in [0, epochs={self.epochs})",
        )

    def effective_lr(self) -> float:
        """The paper's linear scaling rule, lr = lr_per_512 x global batch / 512 (§6)."""
        return self.lr_per_512 * self.batch_size / 512.0

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass(frozen=True)
class EvalCfg:
    """Test-time preprocessing (official: resize to size/0.875, centre crop, bicubic)."""

    crop_pct: float = bounded(0.875, expect="in (0, 1]", exclusiveMinimum=0, maximum=1)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    #: per process: a DDP job evaluates its shard of the test split on every rank
    batch_size: int = bounded(256, **_POSITIVE)
    #: dataloader workers decoding the test images of an image tree (in-memory splits need none)
    num_workers: int = bounded(0, expect=">= 0", minimum=0)


#: a sha256 pin of released weights (params.yaml's teacher.weights.sha256, import-weights
#: --sha256): the full digest, or a release file name's 8-digit prefix
SHA256_PIN = "^([0-9a-fA-F]{8}|[0-9a-fA-F]{64})$"
SHA256_PIN_RULE = "64 hex digits (the full digest), or the 8 in a release's file name"


def check_sha256_pin(pin: str, what: str) -> str:
    """``pin``, lower-cased, if it is a sha256 pin (:data:`SHA256_PIN`); else a ConfigError
    naming ``what`` (the option or key that gave it)."""
    import re

    if re.fullmatch(SHA256_PIN, pin or "") is None:
        raise ConfigError(
            f"{what} {pin!r} is not a sha256 pin",
            f"give {SHA256_PIN_RULE} (sha256sum FILE prints the full digest)",
        )
    return pin.lower()


@dataclass(frozen=True)
class WeightsCfg:
    """Released weights: a URL (or local file) and the sha256 they must have."""

    #: an http(s):// or file:// URL, or a path to a file already on this machine
    url: str
    #: the full sha256 (64 hex digits, either case), or the 8 hex digits torch.hub's check_hash
    #: reads from a release's file name (regnety_160-a5fe301d.pth): nothing shorter, nothing
    #: in between, so that a pin always pins
    sha256: str = bounded(expect=f"a sha256 pin: {SHA256_PIN_RULE}", pattern=SHA256_PIN)


@dataclass(frozen=True)
class TransformerTeacherCfg:
    """The transformer teacher that paper Table 2 compares with the convnet (DeiT-B there)."""

    model: ModelCfg
    train: TrainCfg


@dataclass(frozen=True)
class TeacherCfg:
    dataset: str
    #: the convnet teacher (paper §5.2: RegNetY-16GF)
    model: ModelCfg
    train: TrainCfg
    #: Table 2's transformer teacher (trained here, same dataset)
    vit: TransformerTeacherCfg
    #: download the convnet instead of training it (paper profile: regnety_160.deit_in1k);
    #: null = train here
    weights: Optional[WeightsCfg] = None


@dataclass(frozen=True)
class StudentCfg:
    dataset: str
    model: ModelCfg
    train: TrainCfg


@dataclass(frozen=True)
class SoftCfg:
    #: weight of the distillation term (paper §5.1 text: λ = 0.1)
    alpha: float = bounded(0.1, **_UNIT)
    #: softmax temperature (paper §5.1 text: τ = 3.0)
    tau: float = bounded(3.0, expect="positive", exclusiveMinimum=0)


@dataclass(frozen=True)
class HardCfg:
    #: weight of the hard-label term (paper eq. 2: 1/2)
    alpha: float = bounded(0.5, **_UNIT)


@dataclass(frozen=True)
class DistillationCfg:
    soft: SoftCfg = field(default_factory=SoftCfg)
    hard: HardCfg = field(default_factory=HardCfg)

    def weights(self, kind: DistillKind) -> tuple[float, float]:
        """(alpha, tau) for a distillation kind; 'none' has weight 0."""
        if kind == "soft":
            return self.soft.alpha, self.soft.tau
        if kind == "hard":
            return self.hard.alpha, 1.0
        return 0.0, 1.0


@dataclass(frozen=True)
class FinetuneCfg:
    """Fine-tuning at a higher resolution (paper §6, 224 -> 384)."""

    img_size: int = bounded(expect="a positive integer", exclusiveMinimum=0)
    train: TrainCfg
    #: positional-embedding resampling: bicubic (paper) or bilinear (ablation, Table 10)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@dataclass(frozen=True)
class Figure3Cfg:
    """Paper Figure 3, top-1 against the number of training epochs, measured as the paper did:
    one run per budget with its own whole schedule (warmup, then the cosine decay ending at the
    budget's last epoch), for no distillation and for DeiT⚗. Intermediate evaluations of one long
    schedule would read models whose learning rate is still high."""

    #: epoch budgets trained besides ``student.train.epochs`` (that budget is the pretrain
    #: stage's own runs, pretrain@none and pretrain@deit, also when it is listed here)
    budgets: tuple[int, ...] = bounded(
        (), expect="a list of positive epoch counts", items={"minimum": 1}
    )


@dataclass(frozen=True)
class TransferCfg:
    """Fine-tuning a pretrained student on downstream datasets (paper §5.3, Table 7).

    The paper gives no transfer recipe; the authors' answers differ per dataset (CIFAR-10 and
    Cars: SGD, facebookresearch/deit#45; iNaturalist: AdamW, 360 epochs, deit#105 and #141), so a
    dataset may have its own recipe under ``recipes``.
    """

    datasets: tuple[str, ...]
    #: the recipe of every dataset without an entry in ``recipes``
    train: TrainCfg
    #: per-dataset recipes, by dataset name (a subset of ``datasets``)
    recipes: dict[str, TrainCfg] = field(default_factory=dict)
    #: datasets that also get a from-scratch baseline (paper §5.4: CIFAR-10 only)
    scratch: tuple[str, ...] = ()
    #: the from-scratch baseline's recipe (the dataset's recipe when null)
    scratch_train: Optional[TrainCfg] = None

    def __post_init__(self) -> None:
        for key, names in (("recipes", sorted(self.recipes)), ("scratch", self.scratch)):
            for name in names:
                check(
                    name in self.datasets,
                    key,
                    name,
                    f"one of transfer.datasets: {list(self.datasets)}",
                )

    def recipe(self, dataset: str, init: str = "pretrained") -> TrainCfg:
        """The recipe of ``dataset``'s transfer run (``init``: pretrained | scratch)."""
        if init == "scratch" and self.scratch_train is not None:
            return self.scratch_train
        return self.recipes.get(dataset, self.train)


@dataclass(frozen=True)
class ThroughputCfg:
    """Inference throughput measured the paper's way (largest batch that fits, mean of repeats)."""

    batch_sizes: tuple[int, ...] = bounded(
        (1024, 512, 256, 128, 64),
        expect="a non-empty list of positive integers",
        minItems=1,
        items={"exclusiveMinimum": 0},
    )
    warmup: int = bounded(3, expect=">= 0", minimum=0)
    repeats: int = bounded(10, **_POSITIVE)


@dataclass(frozen=True)
class JobResources:
    """What one training job of a stage gets from the cluster (submitit launchers only)."""

    nodes: int = bounded(1, **_POSITIVE)
    #: GPUs per node; 0 = a CPU job (DDP over gloo instead of NCCL)
    gpus_per_node: int = bounded(0, expect=">= 0", minimum=0)
    #: processes per node: one per GPU on GPU nodes (official run_with_submitit.py)
    tasks_per_node: int = bounded(1, **_POSITIVE)
    cpus_per_task: int = bounded(1, **_POSITIVE)
    #: memory per node in GB
    mem_gb: float = bounded(4.0, expect="positive", exclusiveMinimum=0)
    #: wall-clock limit of one allocation; a longer run is checkpointed and requeued
    timeout_min: int = bounded(60, **_POSITIVE)

    def __post_init__(self) -> None:
        check(
            self.gpus_per_node in (0, self.tasks_per_node),
            "tasks_per_node",
            self.tasks_per_node,
            f"gpus_per_node={self.gpus_per_node} (one task per GPU)",
        )

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass(frozen=True)
class SlurmCfg:
    """A user's cluster: these are the only site-specific settings (none is hard-coded)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    #: node features, e.g. volta32gb (official run_with_submitit.py --use_volta32)
    constraint: Optional[str] = None
    #: any other sbatch option, e.g. {exclude: node[1-2], mail-type: END}; an option without a
    #: value (--exclusive, --requeue) is `true`, and `false` leaves it out
    additional: dict[str, Union[bool, int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchCfg:
    """How the training stages (teacher, pretrain, finetune, transfer) run: where, not what.

    Not a DVC param of any stage: where a run happens does not change what it computes (the global
    batch is ``train.batch_size`` whatever the process count). ``dvc repro`` and Snakemake call the
    same command; with ``submitit`` launchers the stage submits its jobs and waits for them.
    """

    #: in-process | local (submitit's local executor: processes on this machine) | slurm
    launcher: Literal["in-process", "local", "slurm"] = "in-process"
    #: seconds between SLURM's USR2 warning and the kill: time to finish the checkpoint
    signal_delay_s: int = bounded(120, expect=">= 0", minimum=0)
    #: how many times a timed-out or preempted job is requeued (submitit max_num_timeout)
    max_requeues: int = bounded(30, expect=">= 0", minimum=0)
    #: the teachers' training (teacher.vit always, the convnet unless teacher.weights); released
    #: weights, only downloaded and evaluated, get one task of it (:meth:`resources`)
    teacher: JobResources = field(default_factory=JobResources)
    pretrain: JobResources = field(default_factory=JobResources)
    finetune: JobResources = field(default_factory=JobResources)
    transfer: JobResources = field(default_factory=JobResources)
    slurm: SlurmCfg = field(default_factory=SlurmCfg)

    def __post_init__(self) -> None:
        if self.launcher == "local":
            for stage in LAUNCHED_STAGES:
                res = getattr(self, stage)
                check(
                    res.nodes == 1,
                    f"{stage}.nodes",
                    res.nodes,
                    "1 with launcher 'local' (one machine)",
                )

    def resources(self, stage: str, evaluate_only: bool = False) -> JobResources:
        """What one job of ``stage`` asks for. ``evaluate_only`` (released teacher weights:
        a download and one pass over the test split) gets one node, one task (one GPU) and
        that task's share of the memory, for at most an hour, not the 2 x 8 GPUs x 2800 min
        a 300-epoch teacher training needs."""
        res: JobResources = getattr(self, stage)
        if not evaluate_only:
            return res
        return dataclasses.replace(
            res,
            nodes=1,
            tasks_per_node=1,
            gpus_per_node=min(res.gpus_per_node, 1),
            mem_gb=res.mem_gb / res.tasks_per_node,
            timeout_min=min(res.timeout_min, 60),
        )


#: the stages a submitit launcher runs, one job per seed (the teacher: one job): those with
#: resources in LaunchCfg (evaluate, throughput and tables are one-process jobs of the engine)
LAUNCHED_STAGES = tuple(
    f.name for f in dataclasses.fields(LaunchCfg) if f.type in (JobResources, "JobResources")
)


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    profile: str
    #: distillation of the headline DeiT⚗ model: none | soft | hard
    distill: DistillKind
    datasets: dict[str, DatasetCfg]
    teacher: TeacherCfg
    student: StudentCfg
    finetune: FinetuneCfg
    transfer: TransferCfg
    #: seeds of the repeated runs (mean ± std)
    seeds: tuple[int, ...] = bounded((0,), expect="a non-empty list", minItems=1)
    #: torch intra-op threads per run on CPU (fixed: results depend on it); the seeds of a
    #: training stage run side by side, and the one-process stages (teacher, evaluate) get
    #: threads x len(seeds)
    threads: int = bounded(1, **_POSITIVE)
    distillation: DistillationCfg = field(default_factory=DistillationCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    throughput: ThroughputCfg = field(default_factory=ThroughputCfg)
    #: torch threads of a stage that runs one process where a training stage runs one per seed
    #: (the teacher, evaluate); null: threads x len(seeds)
    process_threads: Optional[int] = bounded(None, **_POSITIVE_OR_NULL)
    figure3: Figure3Cfg = field(default_factory=Figure3Cfg)
    #: where the training stages run (not a DVC param: see LaunchCfg)
    launch: LaunchCfg = field(default_factory=LaunchCfg)

    @property
    def one_process_threads(self) -> int:
        """torch threads of a stage that runs one process where a training stage runs one per
        seed (evaluate, released teacher weights): ``process_threads``, else the whole budget,
        ``threads x len(seeds)``. Results on a CPU depend on it, so it is a param, never the
        machine's core count."""
        return self.process_threads or self.threads * len(self.seeds)

    def budget_epochs(self) -> list[int]:
        """Figure 3's budgets, the pretrain stage's own schedule among them, ascending."""
        return sorted({*self.figure3.budgets, self.student.train.epochs})

    def recipe(self, stage: str) -> TrainCfg:
        """The training recipe of a launched stage (the teacher's: the one trained here, Table
        2's transformer when the convnet's weights are downloaded; transfer: the default)."""
        teacher = self.teacher.train if self.teacher.weights is None else self.teacher.vit.train
        return {
            "teacher": teacher,
            "pretrain": self.student.train,
            "finetune": self.finetune.train,
            "transfer": self.transfer.train,
        }[stage]

    def __post_init__(self) -> None:
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            # One run counted twice shrinks the reported ± std without any new evidence.
            raise ConfigError(
                f"params key 'seeds' = {list(self.seeds)} repeats {', '.join(map(str, repeated))}",
                "give each run its own seed",
            )
        for where, name in (
            ("teacher.dataset", self.teacher.dataset),
            ("student.dataset", self.student.dataset),
            *(("transfer.datasets", d) for d in self.transfer.datasets),
        ):
            check(name in self.datasets, where, name, f"one of datasets: {sorted(self.datasets)}")
        budgets, warmup = self.figure3.budgets, self.student.train.warmup_epochs
        for b in budgets:
            check(
                b > warmup,
                "figure3.budgets",
                list(budgets),
                f"budgets longer than student.train.warmup_epochs={warmup}",
            )
        # A budget equal to student.train.epochs is allowed (an experiment on the schedule must
        # not need an edit of the budgets): the figure then reads the pretrain stage's runs.
        check(
            len(set(budgets)) == len(budgets), "figure3.budgets", list(budgets), "distinct budgets"
        )


# --------------------------------------------------------------------------------------------------
# Loading (the generic machinery is deit_repro.typed_yaml)
# --------------------------------------------------------------------------------------------------


def params_schema() -> dict[str, Any]:
    """The JSON schema of params.yaml, generated from these dataclasses (keys, types, enums and
    ranges). Checks across fields (a patch size dividing the image size, warmup < epochs, dataset
    names that exist) are the loader's alone: a JSON schema cannot state them."""
    defs: dict[str, Any] = {}
    top = dataclass_schema(Params, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by `deit-repro schema` from src/deit_repro/config.py; "
        "tests/test_schema.py keeps it identical.",
        "title": "deit-repro params.yaml",
        **top,
        "$defs": defs,
    }


def params_from_dict(data: dict) -> Params:
    """Build and validate :class:`Params` from a parsed params.yaml."""
    if not isinstance(data, dict):
        raise ConfigError(
            "params.yaml must be a mapping at the top level",
            "see the project's params.yaml for the layout",
        )
    return build(Params, data)


def compose_params(base: Path, *overlays: Path) -> dict:
    """A profile with overlays laid on it in order (e.g. profiles/imagenet.yaml +
    profiles/rehearsal.yaml), validated as a whole; the plain dict to write as params.yaml."""
    data = read_yaml(Path(base), missing="pass an existing file")
    for path in overlays:
        over = read_yaml(Path(path), missing="pass an existing file")
        if not isinstance(over, dict):
            raise ConfigError(f"overlay {path} is not a mapping", "see profiles/rehearsal.yaml")
        data = overlay(data, over)
    try:
        params_from_dict(data)
    except ConfigError as err:
        names = " + ".join(str(p) for p in (base, *overlays))
        raise ConfigError(f"{err.what} in {names}", err.fix) from None
    return data


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load params.yaml once into frozen typed objects (a ConfigError names any bad key)."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"params file {path} is {'empty' if data is None else 'not a mapping'}",
            "see profiles/smoke.yaml for the layout",
        )
    try:
        return params_from_dict(data)
    except ConfigError as err:  # name the file too: --params may point anywhere
        raise ConfigError(f"{err.what} in {path}", err.fix) from None
