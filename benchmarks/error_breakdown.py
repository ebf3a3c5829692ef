"""What kind of errors a segmentation makes, from benchmarks/quality.py's outputs (not a test).

Example (after ``benchmarks/quality.py --out OUT --variants default``)::

    .venv/bin/python benchmarks/error_breakdown.py --out OUT --variant default

For every held-out synthetic stack it matches the predicted cells
(``OUT/cells/synthetic/VARIANT/*_cells.tif``) to the ground truth
(``OUT/data/test``) at IoU 0.5 and sorts what AP50 counts as errors:

* missed ground-truth cells that are **face slivers**: cells cut by the stack's
  faces so that less than ``--sliver-um3`` um3 of them lies inside the stack;
* other missed ground-truth cells (merged behind a faint wall, split, or badly
  outlined);
* predicted cells matched to nothing that lie mostly (``> 50 %``) in the ground
  truth's background (**tissue false positives**), and the other unmatched
  predicted cells (extra pieces of split cells).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from core.io import read_labels
from core.metrics import contingency_table, face_sliver_ids, match_cells


def breakdown(gt: np.ndarray, pred: np.ndarray, voxel_size, sliver_um3: float) -> dict:
    """Counts of the error kinds above for one stack (ZYX label arrays)."""
    table = contingency_table(gt, pred)
    matched = match_cells(table)
    gid, pid = table.pair_ids()
    got_gt = set(int(g) for g in gid[matched])
    got_pred = set(int(p) for p in pid[matched])
    slivers = set(face_sliver_ids(gt, voxel_size, sliver_um3).tolist())
    sliver = other = 0
    for g in table.gt_ids:
        g = int(g)
        if g == 0 or g in got_gt:
            continue
        if g in slivers:
            sliver += 1
        else:
            other += 1
    in_background = {int(p): 0 for p in table.pred_ids}
    for g, p, c in zip(gid, pid, table.counts):
        if g == 0:
            in_background[int(p)] = int(c)
    background_fp = split_fp = 0
    for p, size in zip(table.pred_ids, table.pred_sizes):
        p = int(p)
        if p == 0 or p in got_pred:
            continue
        if in_background[p] > 0.5 * size:
            background_fp += 1
        else:
            split_fp += 1
    n_gt = int((table.gt_ids > 0).sum())
    return {"gt_cells": n_gt, "matched": len(matched), "missed_slivers": sliver,
            "missed_other": other, "fp_background": background_fp, "fp_other": split_fp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="benchmarks/quality.py's --out folder")
    ap.add_argument("--variant", default="default")
    ap.add_argument("--sliver-um3", type=float, default=150.0)
    args = ap.parse_args()
    cells = args.out / "cells" / "synthetic" / args.variant
    files = sorted(cells.glob("*_cells.tif"))
    if not files:
        raise SystemExit(f"No *_cells.tif in {cells}: run benchmarks/quality.py with "
                         f"--out {args.out} --variants {args.variant} first.")
    keys = ("gt_cells", "matched", "missed_slivers", "missed_other", "fp_background", "fp_other")
    total = dict.fromkeys(keys, 0)
    print(f"{args.variant}: face slivers are GT cells touching a face with < {args.sliver_um3:g} um3")
    print(f"{'stack':12s} " + " ".join(f"{k:>14s}" for k in keys)
          + "   AP50   AP50 without the missed slivers")
    for f in files:
        stem = f.name[: -len("_cells.tif")]
        gt = read_labels(args.out / "data" / "test" / f"test_{stem}_000_labels.tif")
        pred = read_labels(f)
        row = breakdown(gt.data, pred.data, gt.voxel_size or (1.0, 1.0, 1.0), args.sliver_um3)
        errors = row["missed_slivers"] + row["missed_other"] + row["fp_background"] + row["fp_other"]
        for k in keys:
            total[k] += row[k]
        print(f"{stem:12s} " + " ".join(f"{row[k]:14d}" for k in keys)
              + f"   {row['matched'] / (row['matched'] + errors):.3f}"
              + f"   {row['matched'] / (row['matched'] + errors - row['missed_slivers']):.3f}")
    print(f"{'all':12s} " + " ".join(f"{total[k]:14d}" for k in keys))
    missed = total["missed_slivers"] + total["missed_other"]
    if missed:
        print(f"face slivers: {total['missed_slivers']} of {missed} missed GT cells "
              f"({total['missed_slivers'] / missed:.0%})")


if __name__ == "__main__":
    main()
