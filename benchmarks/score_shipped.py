"""Score trained models with the shipped prediction defaults on held-out synthetic stacks.

What docs/accuracy.md's steps 15-18 compare: each model predicts the six
held-out stacks of a seed (``quality.test_stacks``: two per level, medium,
hard and shifted) with ``episeg predict``'s defaults, nothing tuned, and the
cells are scored against the ground truth. Seeds 700 and 800 are the
development sets on which choices are made; 900 holds the test stacks, scored
once after a choice. Prints one line per stack and the mean per model, and
writes ``--out/score_<model>_<seed>[_tta].json``.

With ``--stress`` the stacks are quality.py's generalisation stress stacks
instead (``quality.STRESS_CONDITIONS``, one per condition: other voxel sizes,
noise, optics, shapes, a wide or narrow lumen, a thin stack; docs/accuracy.md
steps 19 and 20), and the JSON is ``score_<model>_stress<seed>[_tta].json``.

Examples (from the repository root)::

    .venv/bin/python benchmarks/score_shipped.py /tmp/q/models/synthetic_default.pt --seeds 700,800
    .venv/bin/python benchmarks/score_shipped.py A.pt B.pt --seeds 900 --tta
    .venv/bin/python benchmarks/score_shipped.py A.pt --stress --seeds 5000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("quality", HERE / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)  # also puts the repository on sys.path

#: (column, key in quality's metrics) printed per stack and averaged
COLUMNS = (("AP50", "ap50"), ("ARE", "adapted_rand_error"), ("wrongCells", "wrong_cells_share"),
           ("cell IoU", "cell_iou"), ("VOI split", "voi_split"), ("VOI merge", "voi_merge"),
           ("predict s", "predict_seconds"))


def score(models: Sequence[Path], seeds: Sequence[int], out: Path, *, tta: bool = False,
          levels: Sequence[str] = tuple(quality.TEST_LEVELS), n_test: int = 2,
          cells_around: float = 11.0, shape=None,
          stress: Sequence[str] = ()) -> Dict[str, Any]:
    """Mean and per-stack figures of every model on every seed's stacks:
    {model name: {seed: {"rows": [...], "mean": {column: value}}}}. ``stress``:
    names of quality.STRESS_CONDITIONS to score instead of the test levels
    (each at its own shape unless ``shape`` is given)."""
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {}
    for seed in seeds:
        if stress:
            tests = quality.stress_stacks(out / "data" / f"stress{seed}", seed, stress, shape)
        else:
            tests = quality.test_stacks(out / "data" / f"seed{seed}", seed, levels, n_test,
                                        cells_around, shape or (64, 256, 256))
        tag = f"{'stress' if stress else ''}{seed}{'_tta' if tta else ''}"
        for model in models:
            cells_dir = out / "cells" / f"{model.stem}_{tag}"
            cells_dir.mkdir(parents=True, exist_ok=True)
            rows = quality.score_model(model, tests, {}, tta, cells_dir)
            mean = {col: float(np.mean([r[key] for r in rows])) for col, key in COLUMNS}
            for r in rows:
                print(f"{model.stem} seed {seed} {r['stack']:10s} " + _line(r), flush=True)
            print(f"{model.stem} seed {seed} MEAN       " + _line(mean, by_column=True)
                  + f"  AP50 - ARE {mean['AP50'] - mean['ARE']:.4f}", flush=True)
            flags = pooled_flag_recall(rows)
            print(f"{model.stem} seed {seed} FLAGS      " + ", ".join(
                f"{k} {v:.2f}" for k, v in flags.items()), flush=True)
            entry = {"model": str(model), "seed": seed, "tta": tta,
                     "rows": [{k: r[k] for k in ["stack"] + [key for _, key in COLUMNS]
                               + sorted(k for k in r if k.startswith("flag_"))}
                              for r in rows], "mean": mean, "flags_pooled": flags}
            name = f"score_{model.stem}_{tag}.json"
            (out / name).write_text(json.dumps(entry, indent=2, default=float))
            results.setdefault(model.stem, {})[seed] = entry
    return results


#: pooled flag recall: (name, recall key, which wrong cells it counts)
FLAG_RECALLS = (("top n, all", "flag_recall_top_n_wrong", "all"),
                ("top n, not face slivers", "flag_recall_top_n_other", "other"),
                ("first 10 %, all", "flag_recall_top10pct", "all"),
                ("first 10 %, not face slivers", "flag_recall_top10pct_other", "other"))


def pooled_flag_recall(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Share of the wrong cells of all ``rows`` (stacks) that the flags rank
    within the top *n* and within the first 10 % of the rows, for all wrong
    cells and for those that are not only face-sliver merges: counts summed
    over the stacks, so that a stack with one or two wrong cells weighs little."""
    out: Dict[str, float] = {}
    for name, key, which in FLAG_RECALLS:
        found = wrong = 0.0
        for r in rows:
            n = r.get("flag_n_wrong", 0)
            if which == "other":
                n -= r.get("flag_n_face_sliver", 0)
            if n and np.isfinite(r.get(key, float("nan"))):
                found += r[key] * n
                wrong += n
        out[name] = found / wrong if wrong else float("nan")
    return out


def _line(row: Dict[str, Any], by_column: bool = False) -> str:
    parts = []
    for col, key in COLUMNS:
        v = row[col if by_column else key]
        parts.append(f"{col} {100 * v:.1f} %" if col == "wrongCells" else f"{col} {v:.3f}")
    return ", ".join(parts)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help="model files (.pt)")
    ap.add_argument("--seeds", default="700,800",
                    help="held-out stack seeds, comma-separated (700, 800: development; 900: test)")
    ap.add_argument("--tta", action="store_true", help="predict with the 8 flips (episeg predict --tta)")
    ap.add_argument("--out", type=Path, default=Path("benchmark_scores"),
                    help="folder for the stacks (made once), the cells and the JSON files")
    ap.add_argument("--levels", default=",".join(quality.TEST_LEVELS))
    ap.add_argument("--n-test", type=int, default=2, help="stacks per level")
    ap.add_argument("--shape", type=quality._shape, default=None,
                    help="stack shape z,y,x (default 64,256,256; with --stress each condition's own)")
    ap.add_argument("--stress", nargs="?", const=",".join(quality.STRESS_CONDITIONS), default="",
                    help="score the generalisation stress stacks instead (optionally: which "
                         f"conditions, comma-separated: {', '.join(quality.STRESS_CONDITIONS)})")
    args = ap.parse_args(argv)
    missing = [str(m) for m in args.models if not m.is_file()]
    if missing:
        ap.error(f"no such model file: {', '.join(missing)}")
    stress = [n.strip() for n in args.stress.split(",") if n.strip()]
    unknown = quality.unknown_stress_conditions(stress)
    if unknown:
        ap.error(f"unknown stress condition(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(quality.STRESS_CONDITIONS)}")
    score(args.models, [int(s) for s in args.seeds.split(",")], args.out, tta=args.tta,
          levels=args.levels.split(","), n_test=args.n_test, shape=args.shape,
          stress=stress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
