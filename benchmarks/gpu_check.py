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
    .venv/bin/python benchmarks/gpu_check.py --cpu-dry-run  # tiny shapes on the CPU: checks
                                                            # this script before a GPU lease
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


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(torch, device: str) -> str:
    if device != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def _reset_peak(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def network(preset: str, shape, torch, device: str = "cuda") -> None:
    from core.model import build_model, preset_config
    from core.predict import plan_grid, predict_probabilities

    model = build_model(preset_config(preset, target="all")).eval()
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape, dtype=np.float32)
    grid = plan_grid(model, shape, device=device)
    out = np.empty((3,) + tuple(shape), np.uint8)
    warm = tuple(min(a, b) for a, b in zip(shape, (64, 256, 256)))
    predict_probabilities(model, image[:warm[0], :warm[1], :warm[2]], device=device,
                          out=np.empty((3,) + warm, np.uint8))  # warm-up: kernels, cudnn autotune
    _sync(torch, device)
    _reset_peak(torch, device)
    t0 = time.perf_counter()
    predict_probabilities(model, image, device=device, out=out)
    _sync(torch, device)
    s = time.perf_counter() - t0
    n = int(np.prod(shape))
    print(f"network {preset:8s} {shape}: {s:6.1f} s, {n / s / 1e6:7.1f} Mvox/s, tile "
          f"{grid.tile_shape}, peak GPU memory {_peak_gib(torch, device)}",
          flush=True)


def training_step(preset: str, torch, device: str = "cuda", volume=(234, 1024, 1024)) -> None:
    from core.data import auto_patch_size
    from core.losses import make_loss
    from core.model import build_model, preset_config

    cfg = preset_config(preset, target="all", voxel_size_um=(1.0, 0.3, 0.3))
    model = build_model(cfg).to(device).train()
    cuda = device == "cuda"
    patch = auto_patch_size(cfg, volume_shapes=[volume], voxel_size=(1.0, 0.3, 0.3),
                            batch_size=2, device=device, amp=cuda)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loss_fn = make_loss("bce_dice")
    x = torch.randn(2, 1, *patch, device=device)
    y = (torch.rand(2, 3, *patch, device=device) > 0.5).float()
    _reset_peak(torch, device)
    times = []
    for i in range(12 if cuda else 3):
        _sync(torch, device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16 if cuda else torch.bfloat16, enabled=cuda):
            logits = model(x)
        loss = loss_fn(logits.float(), y, None)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(torch, device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(f"training {preset:8s} patch {patch} batch 2: {np.median(times):.3f} s per iteration, "
          f"peak GPU memory {_peak_gib(torch, device)}", flush=True)


def _episeg() -> list:
    """The ``episeg`` command: the installed script, else ``python -m core.cli.main``."""
    exe = Path(sys.executable).with_name("episeg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "core.cli.main"]


def end_to_end(shape, device: str = "cuda") -> None:
    from benchmarks.predict_stack import make_stack
    from core.io import write_volume

    exe = _episeg()
    with tempfile.TemporaryDirectory(prefix="episeg_gpu_") as tmp:  # the stack is ~0.5 GB
        work = Path(tmp)
        subprocess.run([*exe, "synth", str(work / "data"), "--n", "1", "--shape", "32,128,128"],
                       check=True, capture_output=True, cwd=REPO)
        subprocess.run([*exe, "train", "--device", device, "--pair",
                        str(work / "data" / "synth_000_raw.tif"),
                        str(work / "data" / "synth_000_labels.tif"), "--out", str(work / "m.pt"),
                        "--epochs", "1", "--iterations", "20", "--quiet"], check=True,
                       capture_output=True, cwd=REPO)
        tif = work / "stack.tif"
        write_volume(tif, make_stack(shape))
        t0 = time.perf_counter()
        proc = subprocess.run([*exe, "predict", "--device", device, "--model", str(work / "m.pt"),
                               "--out", str(work / "out"), "--quiet", str(tif)],
                              capture_output=True, text=True, cwd=REPO)
        s = time.perf_counter() - t0
    line = next((l for l in proc.stdout.splitlines() if " cells (" in l), proc.stderr[-500:])
    print(f"end to end {shape}: {s:.1f} s (process start included); "
          f"{line.replace(str(tif), 'stack.tif')}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny shapes on the CPU, to check this script without a GPU")
    args = ap.parse_args(argv)
    import torch

    if args.cpu_dry_run:
        device, shape, volume, e2e_shape = "cpu", (16, 64, 64), (16, 64, 64), (16, 128, 128)
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU visible to PyTorch: nothing to measure")
            return 1
        p = torch.cuda.get_device_properties(0)
        print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}", flush=True)
        device, volume = "cuda", (234, 1024, 1024)
        shape = e2e_shape = (117, 512, 512) if args.quick else volume
    for preset in ("small", "standard"):
        network(preset, shape, torch, device=device)
        training_step(preset, torch, device=device, volume=volume)
    end_to_end(e2e_shape, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
