"""The GPU figures in one short run (prepared for the few minutes a GPU machine is lent).

Prints, on the first CUDA device:

* the network alone (small and standard presets, autocast fp16, tiles sized
  from the free GPU memory): Mvox/s on a 234 x 1024 x 1024 stack, and the
  peak GPU memory;
* one training step (auto patch size, batch 2, autocast + GradScaler): seconds
  per iteration and peak GPU memory, for both presets;
* end to end, ``episeg predict`` on a 234 x 1024 x 1024 12-bit TIFF with a
  small model trained for a few iterations here: seconds and the split into
  network / cells.

    .venv/bin/python benchmarks/gpu_check.py            # about 3-4 minutes on one H100
    .venv/bin/python benchmarks/gpu_check.py --quick    # 117 x 512 x 512 only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def network(preset: str, shape, torch) -> None:
    from core.model import build_model, preset_config
    from core.predict import plan_grid, predict_probabilities

    model = build_model(preset_config(preset, target="all")).eval()
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape, dtype=np.float32)
    grid = plan_grid(model, shape, device="cuda")
    out = np.empty((3,) + tuple(shape), np.uint8)
    predict_probabilities(model, image[:64, :256, :256], device="cuda", out=np.empty(
        (3, 64, 256, 256), np.uint8))  # warm-up: kernels, cudnn autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    predict_probabilities(model, image, device="cuda", out=out)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    n = int(np.prod(shape))
    print(f"network {preset:8s} {shape}: {s:6.1f} s, {n / s / 1e6:7.1f} Mvox/s, tile "
          f"{grid.tile_shape}, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
          flush=True)


def training_step(preset: str, torch) -> None:
    from core.data import auto_patch_size
    from core.losses import make_loss
    from core.model import build_model, preset_config

    cfg = preset_config(preset, target="all", voxel_size_um=(1.0, 0.3, 0.3))
    model = build_model(cfg).cuda().train()
    patch = auto_patch_size(cfg, volume_shapes=[(234, 1024, 1024)], voxel_size=(1.0, 0.3, 0.3),
                            batch_size=2, device="cuda", amp=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    loss_fn = make_loss("bce_dice")
    x = torch.randn(2, 1, *patch, device="cuda")
    y = (torch.rand(2, 3, *patch, device="cuda") > 0.5).float()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(12):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x)
        loss = loss_fn(logits.float(), y, None)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(f"training {preset:8s} patch {patch} batch 2: {np.median(times):.3f} s per iteration, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


def end_to_end(shape) -> None:
    from benchmarks.predict_stack import make_stack
    from core.io import write_volume

    work = Path(tempfile.mkdtemp(prefix="episeg_gpu_"))
    exe = str(Path(sys.executable).with_name("episeg"))
    subprocess.run([exe, "synth", str(work / "data"), "--n", "1", "--shape", "32,128,128"],
                   check=True, capture_output=True)
    subprocess.run([exe, "train", "--pair", str(work / "data" / "synth_000_raw.tif"),
                    str(work / "data" / "synth_000_labels.tif"), "--out", str(work / "m.pt"),
                    "--epochs", "1", "--iterations", "20", "--quiet"], check=True,
                   capture_output=True)
    tif = work / "stack.tif"
    write_volume(tif, make_stack(shape))
    t0 = time.perf_counter()
    proc = subprocess.run([exe, "predict", "--model", str(work / "m.pt"), "--out",
                           str(work / "out"), "--quiet", str(tif)], capture_output=True, text=True)
    s = time.perf_counter() - t0
    line = next((l for l in proc.stdout.splitlines() if " cells (" in l), proc.stderr[-500:])
    print(f"end to end {shape}: {s:.1f} s (process start included); {line}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch: nothing to measure")
        return 1
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    shape = (117, 512, 512) if args.quick else (234, 1024, 1024)
    for preset in ("small", "standard"):
        network(preset, shape, torch)
        training_step(preset, torch)
    end_to_end(shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
