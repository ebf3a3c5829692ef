"""Our predictor against MONAI's sliding window and a plain forward pass, side by side.

One run on this machine, the same network weights and the same inputs, for
stacks of growing size (default 4 sizes up to 234 x 1024 x 1024):

* ``ours``: :func:`core.predict.predict_probabilities` (tiles from the
  memory budget, overlap 0.125, Gaussian blending, oneDNN + channels_last_3d,
  probabilities streamed to a uint8 memory map);
* ``monai``: ``monai.inferers.sliding_window_inference`` with the field's usual
  settings (overlap 0.25, Gaussian blending, the same tile size, the model in
  eval mode as PyTorch builds it), then the sigmoid;
* ``monai_fast``: the same MONAI call given our prepared network (folded batch
  norm, oneDNN), to separate the engine from the kernels (smaller sizes);
* ``whole``: one forward pass over the whole stack, where it fits in memory;
* ``end_to_end``: ``episeg predict`` on a 12-bit TIFF in a fresh process: read,
  normalise, network, blend, cells, flags, write (the defaults).

Each measurement runs in its own process, so its peak memory is its own (the
maximum resident set, memory-mapped pages included; and the heap alone,
sampled). Also printed: the network's FLOPs per voxel (PyTorch's FLOP counter
on one tile) and the share of this CPU's peak (a large float32 matrix
product) the network reaches. Results accumulate in ``--work/results.json``
(a re-run skips what is there), the table goes to stdout.

    .venv/bin/python benchmarks/predict_compare.py --model MODEL.pt
    .venv/bin/python benchmarks/predict_compare.py --model MODEL.pt --sizes 58,256,256 --methods ours,monai
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = ["29,128,128", "58,256,256", "117,512,512", "234,1024,1024"]
METHODS = ["ours", "monai", "monai_fast", "whole", "end_to_end"]
#: Largest stack (voxels) for a whole-volume forward pass / for monai_fast.
WHOLE_MAX = 8_000_000
MONAI_FAST_MAX = 40_000_000


# ------------------------------------------------------------------ in a child process
def child(method: str, model_path: str, image_path: str, work: Path) -> dict:
    import torch

    from core.checkpoint import load_model_for_inference
    from core.predict import plan_grid, predict_probabilities, prepare_model

    from benchmarks.predict_speed import RssSampler

    model, info = load_model_for_inference(model_path, "cpu")
    image = np.load(image_path, mmap_mode="r")
    shape = image.shape
    grid = plan_grid(model, shape)
    tile = tuple(int(t) for t in grid.tile_shape)
    heap = RssSampler(every_s=0.1)  # its ``anon``: the largest heap seen
    heap.start()
    t0 = time.perf_counter()
    if method == "ours":
        out = np.lib.format.open_memmap(work / "out_ours.npy", "w+", np.uint8,
                                        (len(info.channels),) + shape)
        predict_probabilities(model, image, out=out)
        out.flush()
    elif method in ("monai", "monai_fast"):
        from monai.inferers import sliding_window_inference

        net = prepare_model(model, torch.device("cpu")) if method == "monai_fast" else model.eval()
        x = torch.from_numpy(np.ascontiguousarray(image))[None, None]
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi_size=tile, sw_batch_size=1, predictor=net,
                                              overlap=0.25, mode="gaussian")
            torch.sigmoid_(logits)
    elif method == "whole":
        from core.model import required_divisor

        net = prepare_model(model, torch.device("cpu"))
        d = required_divisor(model.cfg)
        padded = [-(-s // q) * q for s, q in zip(shape, d)]
        x = np.pad(np.asarray(image), [(0, p - s) for p, s in zip(padded, shape)], mode="reflect")
        with torch.inference_mode():
            xt = torch.from_numpy(x)[None, None].contiguous(memory_format=torch.channels_last_3d)
            torch.sigmoid(net(xt))
    seconds = time.perf_counter() - t0
    heap.stop.set()
    return {"seconds": seconds, "heap_mib": heap.anon, "tile": list(tile),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------ the parent
def flops_per_voxel(model_path: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from core.checkpoint import load_model_for_inference

    model, _ = load_model_for_inference(model_path, "cpu")
    x = torch.zeros(1, 1, 32, 128, 128)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() / x.numel()


def cpu_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def prepare_inputs(shape, work: Path, model_path: str) -> tuple:
    """The 12-bit TIFF (end to end) and the normalised float32 .npy (network runs)."""
    from benchmarks.predict_stack import make_stack
    from core.checkpoint import load_model_for_inference
    from core.io import write_volume
    from core.pipeline import normalised_view

    tag = "x".join(map(str, shape))
    tif, npy = work / f"stack_{tag}.tif", work / f"stack_{tag}_normalised.npy"
    if not (tif.exists() and npy.exists()):
        vol = make_stack(shape)
        write_volume(tif, vol)
        _, info = load_model_for_inference(model_path, "cpu")
        view = normalised_view(vol.data, info.normalisation)
        out = np.lib.format.open_memmap(npy, "w+", np.float32, shape)
        for z0 in range(0, shape[0], 16):
            out[z0:z0 + 16] = view[z0:z0 + 16]
        out.flush()
    return tif, npy


def run_end_to_end(model_path: str, tif: Path, work: Path) -> dict:
    """``episeg predict`` in a fresh process: its time, and its memory sampled from /proc
    (heap = anonymous pages; mapped files = the memory-mapped probabilities and inputs)."""
    exe = Path(sys.executable).with_name("episeg")
    cmd = [str(exe), "predict", "--model", model_path, "--out", str(work / "out_e2e"),
           "--quiet", str(tif)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trace = []  # (seconds, heap MiB, mapped-file MiB)
    while proc.poll() is None:
        try:
            vals = {}
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith(("RssAnon", "RssFile", "RssShmem")):
                        k, v = line.split(":")
                        vals[k] = int(v.split()[0]) / 1024
            trace.append((time.perf_counter() - t0, vals.get("RssAnon", 0.0),
                          vals.get("RssFile", 0.0) + vals.get("RssShmem", 0.0)))
        except OSError:
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"episeg predict failed: {err[-2000:]}")
    line = next((l for l in out.splitlines() if " cells (" in l), "")
    total = max((a + f for _, a, f in trace), default=0.0)
    return {"seconds": seconds, "peak_mib": total,
            "heap_mib": max((a for _, a, _ in trace), default=0.0),
            "file_mib_at_peak": next((f for _, a, f in trace if a + f == total), 0.0),
            "cells": line.rsplit(": ", 1)[-1].split(" cells")[0] if line else "?",
            "steps": line.split(" cells (", 1)[-1].rstrip(")") if line else "",
            "trace": trace[::5]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", type=Path, default=Path("benchmark_predict_compare"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.image, args.work)))
        return 0

    import torch

    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "machine" not in results:
        results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(),
                              "peak_gflops": cpu_peak_gflops(),
                              "flops_per_voxel": flops_per_voxel(args.model)}
        results_path.write_text(json.dumps(results, indent=2))
    m = results["machine"]
    print(f"{m['cpus']} CPUs, torch {m['torch']} ({m['threads']} threads): float32 matrix product "
          f"{m['peak_gflops']:.0f} GFLOP/s; network {m['flops_per_voxel'] / 1e3:.1f} kFLOP per voxel")
    methods = args.methods.split(",")
    for text in args.sizes:
        shape = tuple(int(v) for v in text.split(","))
        n = int(np.prod(shape))
        tif, npy = prepare_inputs(shape, args.work, args.model)
        for method in methods:
            key = f"{text} {method}"
            if key in results:
                continue
            if (method == "whole" and n > WHOLE_MAX) or (method == "monai_fast" and n > MONAI_FAST_MAX):
                continue
            print(f"  running {key} ...", flush=True)
            if method == "end_to_end":
                res = run_end_to_end(args.model, tif, args.work)
            else:
                proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--work",
                                       str(args.work), "--child", method, "--image", str(npy)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:])
                    res = {"error": proc.stderr.strip().splitlines()[-1][:300]}
                else:
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["mvox"] = n / 1e6
            results[key] = res
            results_path.write_text(json.dumps(results, indent=2))
    print_table(results, args.sizes, methods)
    return 0


def print_table(results: dict, sizes, methods) -> None:
    m = results["machine"]
    print(f"\n| stack (Z, Y, X) | method | seconds | network Mvox/s | peak memory MiB | heap MiB | "
          f"share of CPU peak | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for text in sizes:
        ours = results.get(f"{text} ours", {}).get("seconds")
        for method in methods:
            r = results.get(f"{text} {method}")
            if not r or "seconds" not in r:
                if r:
                    print(f"| {text} | {method} | failed: {r.get('error', '')} | | | | | |")
                continue
            rate = r["mvox"] / r["seconds"]
            share = rate * 1e6 * m["flops_per_voxel"] / (m["peak_gflops"] * 1e9)
            note = ""
            if method.startswith("monai") and ours:
                note = f"ours is {r['seconds'] / ours:.2f}x faster"
            if method == "end_to_end":
                note = f"{r.get('cells', '?')} cells; {r.get('steps', '')}"
                if ours:
                    note += f"; {1 - ours / r['seconds']:.0%} outside the network"
            heap = f"{r['heap_mib']:.0f}" if "heap_mib" in r else ""
            net_rate = "" if method == "end_to_end" else f"{rate:.2f}"
            share_txt = "" if method == "end_to_end" else f"{share:.1%}"
            print(f"| {text.replace(',', ' x ')} | {method} | {r['seconds']:.1f} | {net_rate} | "
                  f"{r['peak_mib']:.0f} | {heap} | {share_txt} | {note} |")


if __name__ == "__main__":
    sys.exit(main())
