"""End-to-end `episeg predict` on stacks up to a full lab stack: seconds and peak memory.

For each size, a realistic 12-bit stack is made by tiling one synthetic
epithelium stack (core.synth) and written as a TIFF; then `episeg predict`
runs in a fresh process (file -> normalise -> network -> blend -> cells ->
TIFF), and its wall time and peak resident memory (ru_maxrss of the child) are
printed.

    .venv/bin/python benchmarks/predict_stack.py --model MODEL.pt \\
        --sizes 58,256,256 117,512,512 234,1024,1024
    python3 benchmarks/predict_stack.py --model MODEL.pt --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.io import write_volume  # noqa: E402
from core.synth import SynthParams, make_epithelium  # noqa: E402
from core.volume import Volume  # noqa: E402


def make_stack(shape, seed=0) -> Volume:
    """A ``shape`` stack tiled from one 64 x 256 x 256 synthetic stack (mirrored, no seams)."""
    raw, _ = make_epithelium(SynthParams(shape=(64, 256, 256)), seed)
    tile = raw.data
    reps = [int(np.ceil(s / t)) for s, t in zip(shape, tile.shape)]
    out = np.empty(shape, dtype=tile.dtype)
    for iz in range(reps[0]):
        for iy in range(reps[1]):
            for ix in range(reps[2]):
                block = tile[:: (-1 if iz % 2 else 1), :: (-1 if iy % 2 else 1), :: (-1 if ix % 2 else 1)]
                z0, y0, x0 = iz * tile.shape[0], iy * tile.shape[1], ix * tile.shape[2]
                dz = min(tile.shape[0], shape[0] - z0)
                dy = min(tile.shape[1], shape[1] - y0)
                dx = min(tile.shape[2], shape[2] - x0)
                out[z0:z0 + dz, y0:y0 + dy, x0:x0 + dx] = block[:dz, :dy, :dx]
    return Volume(out, raw.voxel_size, "stack")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", nargs="+", default=["58,256,256", "117,512,512", "234,1024,1024"])
    ap.add_argument("--work", type=Path, default=Path("benchmark_predict_stack"))
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the network runs (episeg predict --device)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("episeg")  # else the module, where episeg is not installed
    exe = [str(exe)] if exe.exists() else [sys.executable, "-m", "core.cli.main"]
    print(f"{'stack (Z,Y,X)':>18s} {'Mvox':>8s} {'seconds':>9s} {'Mvox/s':>8s} {'peak MiB':>9s} {'cells':>7s}")
    for text in args.sizes:
        shape = tuple(int(v) for v in text.split(","))
        src = args.work / f"stack_{'x'.join(map(str, shape))}.tif"
        if not src.exists():
            write_volume(src, make_stack(shape))
        out = args.work / "out"
        t0 = time.monotonic()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([*exe, "predict", "--model", str(Path(args.model).resolve()),
                               "--device", args.device, "--out", str(out.resolve()), "--quiet",
                               str(src.resolve())],
                              capture_output=True, text=True, cwd=REPO)
        seconds = time.monotonic() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            print(proc.stderr)
            return 1
        line = next((l for l in proc.stdout.splitlines() if " cells (" in l), "")
        cells = line.rsplit(": ", 1)[-1].split(" cells")[0] if line else "?"
        mvox = np.prod(shape) / 1e6
        note = "" if peak > before else " (peak not above an earlier size)"
        print(f"{text:>18s} {mvox:8.1f} {seconds:9.1f} {mvox / seconds:8.2f} {peak / 1024:9.0f} "
              f"{cells:>7s}{note}")
        print("    (" + line.split(" cells (", 1)[-1])
    print(f"machine: {os.cpu_count()} CPUs; torch threads as episeg chooses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
