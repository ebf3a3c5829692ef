"""``episeg demo``: the whole job on data the project makes or ships, in minutes on a CPU.

1. make a small synthetic epithelium dataset (training + unseen test stacks);
2. train a 3D U-Net on it for a few minutes (fine-tuning the bundled default
   model when one is installed);
3. predict the unseen stacks and a real confocal stack (C. elegans membranes,
   shipped in resources/samples), turn probabilities into cells;
4. evaluate against the ground truth where it exists (metrics.json);
5. export the label stacks as TIFF and MATLAB .mat;
6. draw a figure (slices with cell overlays, loss curves) as demo.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.resources import default_model, sample_stack

REAL_SAMPLE = sample_stack("celegans_membrane_raw.tif")


@dataclass
class DemoSettings:
    """Knobs of the demo; the defaults finish in about ``minutes`` + 1-2 minutes."""

    minutes: float = 4.0
    n_train: int = 4
    n_test: int = 2
    shape: Tuple[int, int, int] = (40, 160, 160)
    seed: int = 2020
    preset: str = "small"
    real_sample: Optional[Path] = None
    init_model: Optional[Path] = None
    #: medium and lumen brightness range of the training stacks (relative; cytoplasm
    #: 0.12 at medium difficulty); None: the dark medium (0.03) and lumen (0.05)
    medium_brightness: Optional[Tuple[float, float]] = (0.02, 0.3)


@dataclass
class DemoSummary:
    out_dir: Path
    model: Path
    figure: Path
    metrics: Path
    label_files: List[Path]
    test_metrics: List[Dict[str, Any]]
    train_seconds: float
    epochs: int
    cells_real: Optional[int]
    outputs: List[Path] = field(default_factory=list)
    #: cells the fine-tuned model started from (the bundled one) finds on the real stack
    cells_real_before: Optional[int] = None


def _write_json(path: Path, data: Any) -> Path:
    from core.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=float), encoding="utf-8")
    return path


def run_demo(out_dir: Path, settings: Optional[DemoSettings] = None, *,
             progress: ProgressFn = None, cancel: CancelFlag = None) -> DemoSummary:
    """Run the demo into ``out_dir`` (created; existing demo files are replaced)."""
    from core.checkpoint import load_model_for_inference
    from core.config import from_dict
    from core.io import read_labels, read_volume, write_volume
    from core.metrics import evaluate
    from core.pipeline import PredictConfig, segment_stack
    from core.synth import write_synthetic_dataset
    from core.train import TrainConfig, train

    s = settings or DemoSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = ProgressReporter(progress, "demo")

    # 1. data
    log.message(f"1/5 making {s.n_train + s.n_test} synthetic stacks {s.shape} in {out / 'data'}")
    # training stacks with a medium and lumen from darker to brighter than the cytoplasm
    # (a real sample's medium can outshine its cells, as around the C. elegans embryo)
    train_pairs = write_synthetic_dataset(out / "data", s.n_train, s.shape, seed=s.seed,
                                          overwrite=True, medium_brightness=s.medium_brightness,
                                          progress=progress, cancel=cancel)
    test_pairs = write_synthetic_dataset(out / "data", s.n_test, s.shape, seed=s.seed,
                                         first=s.n_train, overwrite=True, progress=progress,
                                         cancel=cancel)
    check_cancelled(cancel, "The demo")

    # 2. training (the last training stack validates; test stacks stay unseen)
    init = s.init_model or default_model()
    model_path = out / "model.pt"
    cfg = from_dict(TrainConfig, {
        "data": {
            "train": [{"raw": str(r), "labels": str(l)} for r, l in train_pairs[:-1]],
            "val": [{"raw": str(r), "labels": str(l)} for r, l in train_pairs[-1:]],
        },
        "model": {"preset": s.preset},
        "epochs": 1000,
        "iterations_per_epoch": 40,
        "max_minutes": s.minutes,
        "seed": s.seed,
    }, where="demo settings")
    what = f"fine-tuning {init}" if init else f"training a new '{s.preset}' U-Net"
    log.message(f"2/5 {what} for {s.minutes:g} minutes on {len(train_pairs)} stacks")
    result = train(cfg, model_path, init=str(init) if init else None, progress=progress,
                   cancel=cancel)
    train_seconds = result.seconds  # the post-processing search after it is not training

    # 3. + 4. predict, cells, evaluate, export
    log.message("3/5 predicting cells on unseen stacks")
    model, info = load_model_for_inference(model_path, "cpu")
    pconf = from_dict(PredictConfig, {})
    cells_dir = out / "cells"
    label_files: List[Path] = []
    rows: List[Dict[str, Any]] = []
    shown: Dict[str, Any] = {}
    for raw_path, lab_path in test_pairs:
        check_cancelled(cancel, "The demo")
        raw = read_volume(raw_path)
        res = segment_stack(raw, model, info, config=pconf, work_dir=out, cancel=cancel)
        gt = read_labels(lab_path)
        metrics = evaluate(gt.data, res.labels.data).to_dict()
        stem = raw_path.stem.replace("_raw", "")
        rows.append({"stack": stem, **metrics})
        for ext in (".tif", ".mat"):
            label_files.append(write_volume(cells_dir / f"{stem}_cells{ext}", res.labels,
                                            labels=True))
        shown.setdefault("synthetic", (raw, gt, res.labels, stem, None))

    real = s.real_sample or REAL_SAMPLE
    cells_real = cells_before = None
    if real.exists():
        log.message(f"4/5 predicting cells on a real stack: {real.name}")
        vol = read_volume(real)
        res = segment_stack(vol, model, info, config=pconf, work_dir=out, cancel=cancel)
        cells_real = res.n_cells
        for ext in (".tif", ".mat"):
            label_files.append(write_volume(cells_dir / f"{real.stem}_cells{ext}", res.labels,
                                            labels=True))
        before = None
        if init:  # the model fine-tuned from, on the same real stack: what training changed
            model0, info0 = load_model_for_inference(init, "cpu")
            res0 = segment_stack(vol, model0, info0, config=pconf, work_dir=out, cancel=cancel)
            cells_before = res0.n_cells
            before = (f"{Path(init).stem} model before fine-tuning", res0.labels)
        shown["real"] = (vol, None, res.labels, real.stem, before)

    summary_metrics = _mean_metrics(rows)
    metrics_path = _write_json(out / "metrics.json", {
        "test_stacks": rows, "mean": summary_metrics,
        "training": {"epochs": result.epochs, "best_epoch": result.best_epoch,
                     "minutes": train_seconds / 60, "stopped": result.stopped,
                     "train_losses": result.train_losses, "valid_losses": result.valid_losses},
        "real_stack": ({"file": str(real), "cells": cells_real,
                        "cells_before_fine_tuning": cells_before}
                       if cells_real is not None else None),
    })

    # 5. figure
    log.message("5/5 drawing the figure")
    figure = out / "demo.png"
    draw_demo_figure(figure, shown, result.train_losses, result.valid_losses,
                     [m.get("ap50", np.nan) for m in result.valid_metrics])
    return DemoSummary(out, model_path, figure, metrics_path, label_files, rows, train_seconds,
                       result.epochs, cells_real, cells_real_before=cells_before)


def _mean_metrics(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    keys = ("cell_iou", "ap50", "f1_50", "mean_matched_iou", "adapted_rand_error",
            "voi_split", "voi_merge", "wrong_cells", "n_gt_cells", "n_pred_cells")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys if rows and k in rows[0]}


def draw_demo_figure(path: Path, shown: Dict[str, Any], train_losses, valid_losses,
                     valid_ap50) -> Path:
    """XY and XZ slices with cell overlays for each shown stack, plus the loss curves.

    ``shown`` maps a key to (raw, ground truth or None, cells, name, other): ``other``
    is None or (title, cells) drawn beside the cells, e.g. the model before fine-tuning.
    """
    from core.figures import enlarge, line_plot, overlay, save_figure

    panels = []
    for key, (raw, gt, pred, stem, other) in shown.items():
        z = raw.shape[0] // 2
        y = raw.shape[1] // 2
        vz, vy, vx = raw.voxel_size_or()
        row = [(f"{stem}: raw, XY z={z}", overlay(raw.data[z]))]
        if gt is not None:
            row.append((f"ground truth, XY z={z}", overlay(raw.data[z], gt.data[z])))
        row.append((f"EpiSeg cells, XY z={z}", overlay(raw.data[z], pred.data[z])))
        if other is not None:
            row.append((f"{other[0]}, XY z={z}", overlay(raw.data[z], other[1].data[z])))
        if gt is not None:
            row.append((f"ground truth, XZ y={y}",
                        overlay(raw.data[:, y], gt.data[:, y], aspect=vz / vx)))
        row.append((f"EpiSeg cells, XZ y={y}",
                    overlay(raw.data[:, y], pred.data[:, y], aspect=vz / vx)))
        if other is not None:
            row.append((f"{other[0]}, XZ y={y}",
                        overlay(raw.data[:, y], other[1].data[:, y], aspect=vz / vx)))
        row += [("", np.full((1, 1, 3), 255, np.uint8))] * (5 - len(row))
        panels += [(name, enlarge(p, 300)) for name, p in row]
    panels.append(("loss per epoch", line_plot([
        ("training", list(train_losses), (0, 114, 178)),
        ("validation", list(valid_losses), (213, 94, 0)),
    ], log=True)))
    if any(np.isfinite(v) for v in valid_ap50):
        panels.append(("validation AP50 per epoch",
                       line_plot([("AP50", list(valid_ap50), (0, 158, 115))])))
    return save_figure(path, panels, columns=5, title="EpiSeg demo")
