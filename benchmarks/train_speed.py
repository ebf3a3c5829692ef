"""Speed of one training step on this machine, by memory layout (not a test).

Examples (from the repository root)::

    .venv/bin/python benchmarks/train_speed.py                    # small preset, 16x56x56, batch 2
    .venv/bin/python benchmarks/train_speed.py --patch 24,96,96 --rounds 4

One step = forward, BCE + Dice loss, backward and Adam, on random data of the
training patch size ``episeg train`` picks on a CPU for 1 x 0.3 x 0.3 um voxels.
``--bf16`` adds a third setup: channels_last_3d under bfloat16 autocast (what
``episeg train`` does on a CPU with native bf16, core.precision).
The layouts run in alternating rounds so that a busy neighbour on a shared
machine slows both alike; the median round is printed, with voxels per second.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from core.losses import make_loss
from core.model import build_model, count_parameters, preset_config


def _setup(channels_last: bool, patch, batch: int, preset: str):
    torch.manual_seed(0)
    cfg = preset_config(preset, target="all", voxel_size_um=(1.0, 0.3, 0.3))
    model = build_model(cfg)
    image = torch.randn(batch, 1, *patch)
    target = (torch.rand(batch, 3, *patch) > 0.5).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, image, target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", default="16,56,56", help="Z,Y,X voxels (default 16,56,56)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 autocast")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    patch = tuple(int(v) for v in args.patch.split(","))
    loss_fn = make_loss("bce_dice")
    layouts = {"contiguous (NCDHW)": (False, False),
               "channels_last_3d (episeg train on a CPU without native bf16)": (True, False)}
    if args.bf16:
        layouts["channels_last_3d + bf16 autocast (a CPU with native bf16)"] = (True, True)
    setups = {name: (*_setup(cl, patch, args.batch, args.preset), bf16)
              for name, (cl, bf16) in layouts.items()}

    def step(s) -> None:
        model, opt, image, target, bf16 = s
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(image)
        loss = loss_fn(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for s in setups.values():  # warm-up
        step(s)
        step(s)
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, s in setups.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(s)
            times[name].append((time.perf_counter() - t0) / args.steps)
    model = setups[next(iter(setups))][0]
    print(f"{args.preset} preset ({count_parameters(model):,} parameters), patch {patch}, batch "
          f"{args.batch}, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps")
    voxels = args.batch * int(np.prod(patch))
    base = None
    for name, t in times.items():
        med = float(np.median(t))
        base = base or med
        print(f"  {name}: {med * 1000:.0f} ms per step, {voxels / med / 1e6:.2f} Mvox/s, "
              f"x{base / med:.2f} (rounds {min(t) * 1000:.0f}-{max(t) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
