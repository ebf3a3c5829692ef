"""Accuracy after a fixed CPU training budget, on stacks the model has never seen.

Prints a table (and writes quality.json into --out):

* synthetic: train on ``--n-train`` stacks made with ``--train-seed``, test on
  stacks made with another seed at each difficulty level;
* real: ``../shared/data/sample_patch.h5`` (plant tissue, imperfect ground
  truth) split along X into a training half and a test half.

Figures per test stack and on average: cell IoU, AP50, F1, adapted Rand error,
VOI split/merge, wrongCells (and as a share of the cells), training minutes and
prediction seconds.

Example (the issue's figures)::

    .venv/bin/python benchmarks/quality.py --minutes 15 --real-minutes 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.checkpoint import load_model_for_inference  # noqa: E402
from core.config import from_dict  # noqa: E402
from core.io import read_labels, read_volume, write_volume  # noqa: E402
from core.metrics import evaluate  # noqa: E402
from core.pipeline import PredictConfig, segment_stack  # noqa: E402
from core.synth import SynthParams, write_synthetic_dataset  # noqa: E402
from core.train import TrainConfig, train  # noqa: E402
from core.volume import Volume  # noqa: E402

COLUMNS = ("cell_iou", "ap50", "f1_50", "adapted_rand_error", "voi_split", "voi_merge",
           "wrong_cells", "n_gt_cells", "n_pred_cells")
SHARED = REPO.parent / "shared" / "data"


def _shape(text: str) -> Tuple[int, int, int]:
    return tuple(int(v) for v in text.split(","))  # type: ignore[return-value]


def train_model(pairs: Sequence[Tuple[Path, Path]], val: Sequence[Tuple[Path, Path]],
                out: Path, minutes: float, args, voxel_size=None) -> Tuple[Path, float, Any]:
    source = lambda r, l: {"raw": str(r), "labels": str(l),  # noqa: E731
                           **({"voxel_size_um": list(voxel_size)} if voxel_size else {})}
    cfg = from_dict(TrainConfig, {
        "data": {"train": [source(r, l) for r, l in pairs],
                 "val": [source(r, l) for r, l in val]},
        "model": {"preset": args.preset},
        "epochs": 100000,
        "max_minutes": minutes,
        "seed": args.seed,
    }, where="benchmark")
    t0 = time.monotonic()
    result = train(cfg, out)
    return out, (time.monotonic() - t0) / 60, result


def score(model_path: Path, tests: Sequence[Tuple[str, Volume, Volume]], out_dir: Path,
          tta: bool = False) -> List[Dict[str, Any]]:
    model, info = load_model_for_inference(model_path, "cpu")
    pconf = from_dict(PredictConfig, {"tta": tta})
    rows = []
    for name, raw, gt in tests:
        t0 = time.monotonic()
        res = segment_stack(raw, model, info, config=pconf, work_dir=out_dir)
        seconds = time.monotonic() - t0
        m = evaluate(gt.data, res.labels.data, components=False).to_dict()
        m["wrong_cells_share"] = m["wrong_cells"] / max(1, m["n_gt_cells"])
        rows.append({"stack": name, "predict_seconds": seconds, **m})
        write_volume(out_dir / f"{name}_cells.tif", res.labels, labels=True)
    return rows


def print_table(title: str, rows: List[Dict[str, Any]], train_minutes: float) -> None:
    print(f"\n{title} (training {train_minutes:.1f} min)")
    head = f"{'stack':28s}" + "".join(f"{c:>20s}" for c in COLUMNS) + f"{'predict s':>12s}"
    print(head)
    for r in rows:
        print(f"{r['stack']:28s}" + "".join(f"{r[c]:20.4g}" for c in COLUMNS)
              + f"{r['predict_seconds']:12.1f}")
    mean = {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS}
    print(f"{'mean':28s}" + "".join(f"{mean[c]:20.4g}" for c in COLUMNS))


def synthetic_benchmark(args, out: Path) -> Dict[str, Any]:
    data = out / "synthetic"
    train_pairs = []  # difficulty levels take turns, so the model sees clean and noisy stacks
    for i in range(args.n_train + 1):
        level = args.train_difficulties[i % len(args.train_difficulties)]
        train_pairs += write_synthetic_dataset(
            data / "train", 1, args.shape, seed=args.train_seed + i,
            params=SynthParams.for_difficulty(level), overwrite=True, prefix=f"train{i}_{level}")
    tests = []
    for k, level in enumerate(args.difficulties):
        params = SynthParams.for_difficulty(level)
        pairs = write_synthetic_dataset(data / f"test_{level}", args.n_test, args.shape,
                                        seed=args.test_seed + k, params=params, overwrite=True,
                                        prefix=f"test_{level}")
        for r, l in pairs:
            tests.append((r.stem.replace("_raw", ""), read_volume(r), read_labels(l)))
    model, minutes, result = train_model(train_pairs[:-1], train_pairs[-1:], out / "synthetic.pt",
                                         args.minutes, args)
    rows = score(model, tests, out / "synthetic_cells", tta=args.tta)
    print_table("Held-out synthetic stacks", rows, minutes)
    return {"train_minutes": minutes, "epochs": result.epochs, "rows": rows}


def real_benchmark(args, out: Path) -> Dict[str, Any]:
    """sample_patch.h5 split along X: x < half trains (with its last quarter validating)."""
    src = SHARED / "sample_patch.h5"
    if not src.exists():
        print(f"\n(real data skipped: {src} not found)")
        return {}
    raw = read_volume(f"{src}:raw")
    lab = read_labels(f"{src}:label")
    half = raw.shape[2] // 2
    folder = out / "real"
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train": (slice(None), slice(None), slice(0, half * 3 // 4)),
        "val": (slice(None), slice(None), slice(half * 3 // 4, half)),
        "test": (slice(None), slice(None), slice(half, None)),
    }
    files = {}
    for name, sl in parts.items():
        r = folder / f"sample_patch_{name}_raw.tif"
        l = folder / f"sample_patch_{name}_labels.tif"
        write_volume(r, Volume(raw.data[sl], (1.0, 1.0, 1.0), r.stem))
        write_volume(l, Volume(lab.data[sl], (1.0, 1.0, 1.0), l.stem), labels=True)
        files[name] = (r, l)
    model, minutes, result = train_model([files["train"]], [files["val"]], out / "real.pt",
                                         args.real_minutes, args)
    test_raw, test_lab = read_volume(files["test"][0]), read_labels(files["test"][1])
    rows = score(model, [("sample_patch_test_half", test_raw, test_lab)], folder, tta=args.tta)
    print_table("Real sample_patch.h5, test half", rows, minutes)
    return {"train_minutes": minutes, "epochs": result.epochs, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmark_quality"))
    ap.add_argument("--minutes", type=float, default=15.0, help="synthetic training budget")
    ap.add_argument("--real-minutes", type=float, default=5.0, help="real-data training budget (0: skip)")
    ap.add_argument("--n-train", type=int, default=4)
    ap.add_argument("--n-test", type=int, default=2, help="test stacks per difficulty")
    ap.add_argument("--shape", type=_shape, default=(48, 192, 192))
    ap.add_argument("--difficulties", type=lambda s: s.split(","), default=["medium", "hard"],
                    help="difficulty levels of the test stacks")
    ap.add_argument("--train-difficulties", type=lambda s: s.split(","),
                    default=["medium", "hard"], help="levels the training stacks take in turn")
    ap.add_argument("--train-seed", type=int, default=100)
    ap.add_argument("--test-seed", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tta", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()}}
    report["synthetic"] = synthetic_benchmark(args, args.out)
    if args.real_minutes > 0:
        report["real"] = real_benchmark(args, args.out)
    (args.out / "quality.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {args.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
