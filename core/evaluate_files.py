"""Evaluate a predicted label stack file against its ground-truth file; save the tables.

Shared by ``episeg evaluate`` and the GUI's Evaluate tab: read both stacks
(and optionally the raw image to look at), run :func:`core.metrics.evaluate`,
check the prediction's flags CSV against the wrong cells (core.flags_check),
write the figures as JSON and the per-cell table as CSV (atomically).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from core.errors import VolumeDataError
from core.flags_check import FlagCheck, check_flags, flags_beside
from core.jobs import CancelFlag, ProgressFn
from core.metrics import CELL_COLUMNS, EvaluationResult, evaluate
from core.volume import Volume


@dataclass
class EvaluatedFiles:
    """The scores, and the stacks they were computed from (ZYX)."""

    result: EvaluationResult
    gt: Volume
    pred: Volume
    image: Optional[Volume] = None
    #: the flags CSV's ranking against the wrong cells, when one was checked
    flags: Optional[FlagCheck] = None
    #: why the flags CSV found beside the prediction was not checked ("" if it was, or none was there)
    flags_note: str = ""


#: ``evaluate_files(flags=AUTO)``: check ``STEM_cells_flags.csv`` beside the prediction if it is there
AUTO = "auto"


def evaluate_files(gt_spec: str, pred_spec: str, image_spec: Optional[str] = None, *,
                   flags: Optional[str] = AUTO, progress: ProgressFn = None,
                   cancel: CancelFlag = None, **options) -> EvaluatedFiles:
    """Read ground truth and prediction (file specs) and score the prediction.

    ``image_spec``: the raw stack, read only to be shown with the labels; it
    must have their shape. ``flags``: the prediction's flags CSV to check
    against the wrong cells; :data:`AUTO` takes the one ``episeg predict``
    wrote beside it, if any (one of another stack is then only noted), None
    checks none. ``options``: :func:`core.metrics.evaluate`'s (iou_threshold,
    connectivity, split_merge_fraction, components).
    Raises VolumeDataError when shapes differ, or when a flags CSV given by
    name is missing or lists cells the prediction does not hold.
    """
    from core.io import check_same_shape, read_labels, read_volume

    gt = read_labels(gt_spec)
    pred = read_labels(pred_spec)
    image = read_volume(image_spec) if image_spec else None
    if image is not None:
        check_same_shape(image, gt)
    flags_path = flags_beside(pred_spec) if flags == AUTO else flags
    if flags_path and flags != AUTO and not Path(flags_path).is_file():
        raise VolumeDataError(f"The flags CSV {flags_path} does not exist: choose the "
                              f"STEM_cells_flags.csv that episeg predict wrote, or none.")
    result = evaluate(gt.data, pred.data, names=(f"ground truth {gt_spec}", f"prediction {pred_spec}"),
                      progress=progress, cancel=cancel, **options)
    evaluated = EvaluatedFiles(result, gt, pred, image)
    if flags_path and Path(flags_path).is_file():
        try:
            evaluated.flags = check_flags(flags_path, result, gt.data, pred.data,
                                          voxel_size=gt.voxel_size or pred.voxel_size)
        except VolumeDataError as exc:
            if flags != AUTO:
                raise
            evaluated.flags_note = f"flags not checked: {exc}"
    return evaluated


def summary_line(r: EvaluationResult) -> str:
    """The evaluation in one sentence (counts of matched, split, merged, missed cells...)."""
    return (f"{r.n_gt_cells} cells in the ground truth, {r.n_pred_cells} predicted: "
            f"{r.n_matched} matched at IoU >= {r.iou_threshold:g}, {r.n_split} split, "
            f"{r.n_merged} merged, {r.n_missed} missed, {r.n_false_positive} false positives; "
            f"cell IoU {r.cell_iou:.3f}, AP{r.iou_threshold * 100:g} {r.ap:.3f}, "
            f"adapted Rand error {r.adapted_rand_error:.3f}")


def write_figures_json(path: Union[str, Path], result: EvaluationResult,
                       extra: Optional[Dict[str, Any]] = None) -> Path:
    """Every figure of ``result`` (plain names: cell_iou, ap50, ...) as JSON, atomically."""
    from core.io.atomic import atomic_path

    figures: Dict[str, Any] = dict(extra or {})
    figures.update(result.to_dict())
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)
            fh.write("\n")
    return Path(path)


def flag_rank(row: Dict[str, Any], ranks: Optional[Mapping[int, int]]) -> Optional[int]:
    """The flags' rank of a per-cell row's predicted cell (None: no flags, no
    predicted cell, or a cell the flags do not list)."""
    pred_id = row.get("pred_id")
    return ranks.get(int(pred_id)) if ranks and pred_id else None


def write_cells_csv(path: Union[str, Path], result: EvaluationResult,
                    flag_ranks: Optional[Mapping[int, int]] = None) -> Path:
    """The per-cell table (one row per GT cell, one per unmatched predicted cell), atomically.

    flag_ranks: predicted cell id -> its rank in the prediction's flags CSV
    (:attr:`core.flags_check.FlagCheck.ranks`); given, a ``flag_rank`` column
    says where the flags ranked each row's predicted cell.
    """
    from core.io.atomic import atomic_path

    columns = list(CELL_COLUMNS) + (["flag_rank"] if flag_ranks is not None else [])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in result.cells:
                out = {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}
                if flag_ranks is not None:
                    out["flag_rank"] = flag_rank(row, flag_ranks)
                writer.writerow(out)
    return Path(path)
