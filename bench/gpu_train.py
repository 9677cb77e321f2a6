"""GPU benchmarks: run wherever a CUDA GPU is; `--smoke` checks the code on a CPU.

1. **Training images/s of DeiT-S/16 at 224** on synthetic data, three ways in one process,
   interleaved round by round (A B C, C B A, ...):

   * ``fp32``: the same timm model, fp32, eager, ``torch.optim.AdamW``;
   * ``official``: the official recipe's loop (facebookresearch/deit main.py at the paper's timm
     0.3.2): fp16 autocast + GradScaler, eager, explicit softmax attention (timm ``fused_attn``
     off, as there), AdamW;
   * ``ours``: bf16 autocast, fused SDPA attention (timm's default), ``AdamW(fused=True)``,
     ``torch.compile``.

2. **Inference throughput the paper's way** (Tables 1 and 5): the largest batch of 1024, 512, …
   that fits, eval mode, mean of ``--repeats`` timed passes after warm-up
   (``deit_repro.stages.throughput.measure_throughput``), for DeiT-Ti/S/B(⚗) at 224 and DeiT-B⚗ at
   384, fp32 and AMP.

3. **JPEG decoding for ImageNet-scale data**, images/s per CPU core: PIL decode + the training
   crop on one core, against ``torchvision.io.decode_jpeg(device="cuda")`` (batched) + the crop on
   the GPU driven by one core, on synthetic ImageNet-sized JPEGs (500x375, quality 90).

    python bench/gpu_train.py --json bench/results/gpu_h100.json     # on a GPU machine
    python bench/gpu_train.py --smoke                                # CPU, tiny: the code runs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# 1. training
# --------------------------------------------------------------------------------------------------


def make_variant(
    kind: str, model_name: str, img_size: int, device: torch.device, compile_model: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step ``step(x, y)`` of ``kind`` (fp32 | official | ours)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=img_size, num_classes=1000).to(device)
    model.train()
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    cuda = device.type == "cuda"
    if kind == "fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)

        def step(x, y):
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step
    if kind == "official":
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False  # timm 0.3.2 (the official pin): explicit softmax attention
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
        scaler = torch.amp.GradScaler(device.type, enabled=cuda)

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.float16 if cuda else torch.bfloat16):
                loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        return step
    if kind == "ours":
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05, fused=cuda or None)
        fwd = torch.compile(model) if compile_model else model

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = crit(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step
    raise ValueError(kind)


def bench_training(args, device: torch.device) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(1000, (args.batch,), generator=g).to(device)
    kinds = ["fp32", "official", "ours"]
    steps = {
        k: make_variant(k, args.model, args.img_size, device, not args.no_compile) for k in kinds
    }
    for k in kinds:  # warm-up (and compilation) outside the timing
        for _ in range(args.warmup):
            steps[k](x, y)
        _sync(device)
    rounds = []
    for r in range(args.rounds):
        row = {}
        for k in kinds if r % 2 == 0 else kinds[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[k](x, y)
            _sync(device)
            row[k] = args.batch * args.steps / (time.perf_counter() - t0)
        rounds.append(row)
    out = {
        k: {
            "images_per_s": statistics.fmean(r[k] for r in rounds),
            "std": statistics.stdev(r[k] for r in rounds) if len(rounds) > 1 else 0.0,
        }
        for k in kinds
    }
    out["ours_over_fp32"] = statistics.median(r["ours"] / r["fp32"] for r in rounds)
    out["ours_over_official"] = statistics.median(r["ours"] / r["official"] for r in rounds)
    out["rounds"] = rounds
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# --------------------------------------------------------------------------------------------------
# 2. inference throughput, the paper's way
# --------------------------------------------------------------------------------------------------


def bench_inference(args, device: torch.device) -> list[dict[str, Any]]:
    import timm

    from deit_repro.config import ThroughputCfg
    from deit_repro.core.engine import Runtime
    from deit_repro.stages.throughput import measure_throughput

    cfg = ThroughputCfg(
        batch_sizes=tuple(args.inference_batches), warmup=args.warmup, repeats=args.repeats
    )
    rows = []
    for name, size in args.inference_models:
        model = timm.create_model(name, img_size=size, num_classes=1000).to(device)
        for amp in ("fp32", "amp"):
            dtype = (
                None
                if amp == "fp32"
                else (torch.float16 if device.type == "cuda" else torch.bfloat16)
            )
            rt = Runtime(device, dtype)
            # fp32 unless amp_dtype is given (the paper's column is fp32, deit#38)
            res = measure_throughput(
                model, img_size=size, in_chans=3, cfg=cfg, rt=rt, amp_dtype=dtype
            )
            rows.append({"model": name, "img_size": size, **res, "precision": amp})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# 3. JPEG decoding
# --------------------------------------------------------------------------------------------------


def synthetic_jpegs(n: int, h: int = 375, w: int = 500) -> list[bytes]:
    """ImageNet-sized JPEGs with smooth content (random noise would not compress like photos)."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        low = torch.rand(3, 12, 16, generator=g)
        img = F.interpolate(low[None], size=(h, w), mode="bicubic", align_corners=False)[0]
        img = (img.clamp(0, 1) * 255).to(torch.uint8)
        out.append(encode_jpeg(img, quality=90).numpy().tobytes())
    return out


def bench_decode(args, device: torch.device) -> dict[str, Any]:
    from PIL import Image
    from torchvision import transforms
    from torchvision.io import decode_jpeg

    files = synthetic_jpegs(args.jpegs)
    crop = transforms.RandomResizedCrop(args.img_size, antialias=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for data in files:
        with Image.open(io.BytesIO(data)) as im:
            crop(im.convert("RGB"))
    cpu_rate = len(files) / (time.perf_counter() - t0)
    res: dict[str, Any] = {
        "jpegs": len(files),
        "size": "500x375",
        "cpu_pil_images_per_s_per_core": cpu_rate,
    }
    if device.type == "cuda":
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in files]
        decode_jpeg(tensors[:8], device=device)  # warm-up (nvjpeg handles)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(tensors), args.decode_batch):
            imgs = decode_jpeg(tensors[i : i + args.decode_batch], device=device)
            for img in imgs:
                crop(img)
        _sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        res["gpu_nvjpeg_images_per_s"] = len(files) / wall
        res["gpu_nvjpeg_images_per_cpu_core_s"] = len(files) / max(cpu, 1e-9)
        res["gpu_over_cpu_per_core"] = res["gpu_nvjpeg_images_per_cpu_core_s"] / cpu_rate
    return res


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="training batch (one GPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30, help="inference: timed passes (paper: 30)")
    p.add_argument("--jpegs", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on whatever device there is: checks that the script runs",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.inference_models = [
        ("deit_tiny_patch16_224", 224),
        ("deit_small_patch16_224", 224),
        ("deit_base_patch16_224", 224),
        ("deit_base_distilled_patch16_224", 224),
        ("deit_base_distilled_patch16_384", 384),
    ]
    args.inference_batches = [1024, 512, 256, 128, 64, 32]
    if args.smoke:
        args.model, args.img_size, args.batch, args.steps, args.rounds = (
            "deit_tiny_patch16_224",
            32,
            8,
            2,
            2,
        )
        args.warmup, args.repeats, args.jpegs, args.no_compile = 1, 2, 8, True
        args.inference_models = [("deit_tiny_patch16_224", 32)]
        args.inference_batches = [16]
    elif device.type != "cuda":
        sys.exit("no CUDA GPU here: run this on a GPU machine, or pass --smoke")

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "args": {k: v for k, v in vars(args).items() if k not in ("json",)},
    }
    t0 = time.perf_counter()
    train = bench_training(args, device)
    infer = bench_inference(args, device)
    decode = bench_decode(args, device)
    print(f"device {info['device']}, torch {info['torch']}; {time.perf_counter() - t0:.0f} s")
    print(
        f"\ntraining {args.model} at {args.img_size}, batch {args.batch}, synthetic data "
        f"(images/s, mean ± std over {args.rounds} rounds x {args.steps} steps)"
    )
    for k in ("fp32", "official", "ours"):
        print(f"  {k:9s} {train[k]['images_per_s']:9.1f} ± {train[k]['std']:.1f}")
    print(
        f"  ours / fp32 eager {train['ours_over_fp32']:.2f}x, ours / official fp16-AMP eager "
        f"{train['ours_over_official']:.2f}x (paired medians)"
    )
    print("\ninference (largest batch that fits, mean of timed passes)")
    for r in infer:
        print(
            f"  {r['model']:34s} {r['img_size']:4d} {r['precision']:5s} "
            f"{r['images_per_s']:9.1f} img/s (batch {r['batch_size']})"
        )
    print(
        f"\nJPEG decode + crop, {decode['jpegs']} images {decode['size']}: CPU PIL "
        f"{decode['cpu_pil_images_per_s_per_core']:.0f} img/s per core"
        + (
            f"; GPU nvjpeg {decode['gpu_nvjpeg_images_per_s']:.0f} img/s, "
            f"{decode['gpu_nvjpeg_images_per_cpu_core_s']:.0f} per CPU core-second "
            f"({decode['gpu_over_cpu_per_core']:.1f}x)"
            if "gpu_nvjpeg_images_per_s" in decode
            else ""
        )
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": info, "training": train, "inference": infer, "decode": decode}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
