"""Speed and peak memory of sliding-window prediction on this machine (not a test).

Examples (from the repository root)::

    .venv/bin/python benchmarks/predict_speed.py                      # 64x256x256, small preset
    .venv/bin/python benchmarks/predict_speed.py --cpu-paths          # CPU kernel choices
    .venv/bin/python benchmarks/predict_speed.py --shape 234x1024x1024 --memmap /tmp/bench
    .venv/bin/python benchmarks/predict_speed.py --compare --model MODEL.pt   # vs MONAI, 4 sizes

``--compare`` runs ``benchmarks/predict_compare.py`` (the side-by-side comparison
with MONAI's sliding window, a whole-volume pass and ``episeg predict`` end to
end; its other options pass through).
Prints the tile chosen, threads, throughput (input voxels per second of wall
time, and per CPU second, which is steadier on a shared machine) and the peak
resident memory of the process (ru_maxrss, includes memory-mapped pages).
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from core.model import build_model, count_parameters, fuse_batchnorm, preset_config, required_divisor
from core.precision import cpu_has_native_bf16
from core.predict import DEFAULT_OVERLAP, _MkldnnConv3d, predict_probabilities, prepare_model
from core.tiling import make_grid


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler(threading.Thread):
    """Largest anonymous (heap) and file-backed (memory-mapped) resident memory seen."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.every_s, self.stop, self.anon, self.file, self.total = every_s, threading.Event(), 0, 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            vals = {}
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("RssAnon", "RssFile", "RssShmem")):
                        k, v = line.split(":")
                        vals[k] = int(v.split()[0]) / 1024
            self.anon = max(self.anon, vals.get("RssAnon", 0))
            self.file = max(self.file, vals.get("RssFile", 0) + vals.get("RssShmem", 0))
            self.total = max(self.total, sum(vals.values()))
            time.sleep(self.every_s)


def smooth_volume(shape, out=None, seed=0):
    """A smooth random membrane-like volume, z-scored, written slab by slab (bounded memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty(shape, np.float32) if out is None else out
    for z0 in range(0, shape[0], 16):
        z1 = min(shape[0], z0 + 16)
        slab = ndi.gaussian_filter(rng.normal(size=(z1 - z0,) + tuple(shape[1:])).astype(np.float32), 1.5)
        out[z0:z1] = slab / slab.std()
    return out


def cpu_paths(preset: str, norm: str, shape) -> None:
    """Forward speed of one tile with the CPU kernel choices the predictor makes."""
    torch.manual_seed(0)
    model = build_model(preset_config(preset, norm=norm)).eval()
    x = torch.randn(1, 1, *shape)

    def rate(net, inp, autocast=False):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            net(inp)
            c, w = time.process_time(), time.perf_counter()
            net(inp)
            c, w = time.process_time() - c, time.perf_counter() - w
        n = inp.numel()
        return f"{n / w / 1e6:5.2f} Mvox/s wall, {n / c / 1e6:5.2f} Mvox/CPU-s"

    plain = fuse_batchnorm(model)
    print(f"  {norm:5s} plain (PyTorch's default kernels, contiguous): {rate(plain, x)}")
    cl = plain.to(memory_format=torch.channels_last_3d)
    print(f"  {norm:5s} channels_last_3d only:                      {rate(cl, x.contiguous(memory_format=torch.channels_last_3d))}")
    fast = prepare_model(model, torch.device("cpu"))
    n_mk = sum(isinstance(m, _MkldnnConv3d) for m in fast.modules())
    print(f"  {norm:5s} predictor (channels_last_3d + oneDNN x{n_mk}):      {rate(fast, x)}")
    bf16 = prepare_model(model, torch.device("cpu"), dtype=torch.bfloat16)
    print(f"  {norm:5s} predictor, bf16 network (CPUs with native bf16): "
          f"{rate(bf16, x.to(torch.bfloat16))}  (native bf16 here: {cpu_has_native_bf16()})")
    small = tuple(max(8, s // 4) for s in shape)
    xs = torch.randn(1, 1, *small)
    print(f"  {norm:5s} bf16 autocast on {small}: {rate(plain, xs, autocast=True)}  vs fp32 {rate(plain, xs)}")


def main() -> None:
    import sys

    if "--compare" in sys.argv[1:]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.predict_compare import main as compare

        raise SystemExit(compare([a for a in sys.argv[1:] if a != "--compare"]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset (small, standard)")
    ap.add_argument("--norm", default=None, help="override the preset's norm (group, batch, ...)")
    ap.add_argument("--shape", default="64x256x256", help="volume Z x Y x X")
    ap.add_argument("--tile", default=None, help="tile Z x Y x X (default: automatic)")
    ap.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, help="overlap fraction")
    ap.add_argument("--tta", action="store_true", help="8-flip test-time augmentation")
    ap.add_argument("--fp32", action="store_true",
                    help="float32 even on a CPU with native bf16 (predict_probabilities amp=False)")
    ap.add_argument("--memmap", default=None, help="folder for np.memmap input and output (big volumes)")
    ap.add_argument("--cpu-paths", action="store_true", help="compare CPU kernel paths on one tile")
    ap.add_argument("--compare", action="store_true",
                    help="run benchmarks/predict_compare.py (against MONAI; needs --model)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    kw = {} if args.norm is None else {"norm": args.norm}
    cfg = preset_config(args.preset, **kw)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset} "
          f"(norm {cfg.norm}, {count_parameters(build_model(cfg))} parameters), precision "
          f"{'bf16' if cpu_has_native_bf16() and not args.fp32 else 'fp32'}")
    if args.cpu_paths:
        for norm in ("group", "batch"):
            cpu_paths(args.preset, norm, (64, 128, 128))
        return
    model = build_model(cfg).eval()
    if args.memmap:
        folder = Path(args.memmap)
        folder.mkdir(parents=True, exist_ok=True)
        image = np.lib.format.open_memmap(folder / "input.npy", mode="w+", dtype=np.float32, shape=shape)
        smooth_volume(shape, image)
        image.flush()
        del image
        image = np.load(folder / "input.npy", mmap_mode="r")
        out = np.lib.format.open_memmap(folder / "prob.npy", mode="w+", dtype=np.float16, shape=(1,) + shape)
    else:
        image = smooth_volume(shape)
        out = None
    rss0 = peak_rss_mib()
    tile = tuple(int(v) for v in args.tile.split("x")) if args.tile else None
    events = []
    sampler = RssSampler()
    sampler.start()
    c0, t0 = time.process_time(), time.perf_counter()
    res = predict_probabilities(model, image, tile_shape=tile, overlap=args.overlap, tta=args.tta,
                                out=out, progress=events.append, amp=not args.fp32)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    first = events[0].message
    grid_tile = tuple(int(v) for v in first.split(" of ")[1].split()[0].split("x"))
    grid = make_grid(shape, grid_tile, args.overlap, required_divisor(cfg))
    n = int(np.prod(shape))
    print(f"volume {shape}: {first}; network processed {grid.computed_voxels() / n:.2f}x the volume")
    print(f"time {wall:.1f} s wall, {cpu:.1f} s CPU: {n / wall / 1e6:.2f} Mvox/s wall, "
          f"{n / cpu / 1e6:.2f} Mvox/CPU-s")
    sampler.stop.set()
    sampler.join()
    print(f"peak RSS {peak_rss_mib():.0f} MiB (before predicting: {rss0:.0f} MiB); sampled peaks: "
          f"heap (RssAnon) {sampler.anon:.0f} MiB, memory-mapped files (RssFile) {sampler.file:.0f} MiB")
    if hasattr(res, "flush"):
        res.flush()


if __name__ == "__main__":
    main()
