"""`episeg evaluate` tells a lab how many wrong cells the first rows of its flags CSV held."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from core.cli.main import main
from core.errors import VolumeDataError
from core.evaluate_files import evaluate_files
from core.flags import cell_flags, write_flags_csv
from core.flags_check import flags_beside, read_flags_csv
from core.io import write_volume
from core.volume import Volume
from tests.core.test_flags import grid_tissue, merged_and_split
from tests.core.test_segment import probabilities_from

VOXEL = (1.0, 0.5, 0.5)


@pytest.fixture()
def predicted(tmp_path):
    """Ground truth, a prediction with a merged pair and a split cell, written as
    episeg predict would (STEM_cells.tif + STEM_cells_flags.csv), and its flags."""
    gt = grid_tissue()
    cp, bp = probabilities_from(gt)
    pred = merged_and_split(gt)
    rows = cell_flags(pred, bp, cp, voxel_size=VOXEL)
    write_volume(tmp_path / "gt.tif", Volume(gt, VOXEL, "gt"), labels=True)
    write_volume(tmp_path / "stack_cells.tif", Volume(pred, VOXEL, "pred"), labels=True)
    write_flags_csv(tmp_path / "stack_cells_flags.csv", rows)
    return tmp_path, gt, pred, rows


def test_the_flags_beside_the_prediction_are_checked_against_its_wrong_cells(predicted):
    d, gt, pred, rows = predicted
    assert flags_beside(d / "stack_cells.tif") == d / "stack_cells_flags.csv"
    assert flags_beside(f"{d / 'stack_cells.h5'}:cells") == d / "stack_cells_flags.csv"
    ev = evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif"))
    check = ev.flags
    assert check is not None and ev.flags_note == ""
    assert check.n_rows == len(rows) and check.n_wrong >= 2  # the merged cell, the split pieces
    # the network's walls show both errors: the first 20 % of the rows hold all of them
    assert check.recall[0.2] == 1.0 and check.recall[0.1] > 0
    assert check.rows_checked[0.1] == max(1, round(0.1 * len(rows)))
    text = " ".join(check.lines())
    assert "stack_cells_flags.csv" in text and f"{check.n_wrong} of the {len(rows)}" in text
    assert check.n_face_sliver == 0 and check.recall_other is not None


def test_a_ranking_that_puts_the_wrong_cells_last_scores_zero(predicted):
    d, gt, pred, rows = predicted
    good = evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif")).flags
    reversed_rows = [dict(r, rank=len(rows) - i) for i, r in enumerate(rows)]
    write_flags_csv(d / "stack_cells_flags.csv", sorted(reversed_rows, key=lambda r: r["rank"]))
    bad = evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif")).flags
    assert bad.n_wrong == good.n_wrong
    assert bad.recall[0.1] == 0.0 and bad.recall[0.2] < good.recall[0.2]


def test_flags_of_another_stack_are_noted_or_refused(predicted, tmp_path):
    d, gt, pred, rows = predicted
    stranger = int(pred.max()) + 100
    write_flags_csv(d / "stack_cells_flags.csv", rows + [dict(rows[0], cell_id=stranger,
                                                             rank=len(rows) + 1)])
    ev = evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif"))  # found beside it: a note
    assert ev.flags is None and "another label stack" in ev.flags_note
    assert ev.result.ap > 0  # the evaluation itself stands
    with pytest.raises(VolumeDataError, match="stack_cells_flags.csv.*another label stack"):
        evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif"),
                       flags=str(d / "stack_cells_flags.csv"))
    with pytest.raises(VolumeDataError, match="missing.csv does not exist"):
        evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif"), flags=str(d / "missing.csv"))
    write_flags_csv(d / "empty.csv", [])
    with pytest.raises(VolumeDataError, match="empty.csv lists no cells"):
        evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif"), flags=str(d / "empty.csv"))
    (d / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(VolumeDataError, match="table.csv is not a flags CSV.*cell_id, rank"):
        read_flags_csv(d / "table.csv")
    assert evaluate_files(str(d / "gt.tif"), str(d / "stack_cells.tif"), flags=None).flags is None


def test_episeg_evaluate_prints_and_saves_the_flags_check(predicted, capsys):
    d, gt, pred, rows = predicted
    assert main(["evaluate", str(d / "gt.tif"), str(d / "stack_cells.tif"), "--json",
                 str(d / "scores.json"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Per-cell flags" in printed
    first = max(1, round(0.1 * len(rows)))
    assert f"of the first {first} rows of stack_cells_flags.csv (10 %)" in printed
    figures = json.loads((d / "scores.json").read_text())
    assert figures["flags_csv"].endswith("stack_cells_flags.csv")
    assert figures["flags_recall_top20pct"] == 1.0 and "ap50" in figures
    assert main(["evaluate", str(d / "gt.tif"), str(d / "stack_cells.tif"), "--cells-csv",
                 str(d / "cells.csv"), "--quiet"]) == 0
    with open(d / "cells.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    rank_of = {r["cell_id"]: int(r["rank"]) for r in rows}
    listed = [r for r in table if r["pred_id"] not in ("", "0")]
    assert listed and all(int(r["flag_rank"]) == rank_of[int(r["pred_id"])] for r in listed)
    capsys.readouterr()
    assert main(["evaluate", str(d / "gt.tif"), str(d / "stack_cells.tif"), "--no-flags",
                 "--cells-csv", str(d / "plain.csv"), "--quiet"]) == 0
    assert "Per-cell flags" not in capsys.readouterr().out
    assert "flag_rank" not in (d / "plain.csv").read_text().splitlines()[0]
    assert np.array_equal(pred, merged_and_split(gt))  # nothing here changes the inputs


def test_face_sliver_merges_are_told_apart_when_the_voxel_size_is_known(tmp_path):
    gt = np.zeros((12, 24, 40), np.uint16)  # as tests/core/test_flags.py: cell 6 (55 um^3) a face sliver
    for cell, (x0, x1) in enumerate([(0, 10), (10, 12), (12, 24), (24, 36), (36, 38), (38, 40)], 1):
        gt[1:11, 1:23, x0:x1] = cell
    pred = gt.copy()
    pred[gt == 2] = 1                       # a real merge
    pred[gt == 6] = 4                       # cell 4 only took in the face sliver
    ranking = [{"rank": i, "cell_id": c} for i, c in enumerate((1, 3, 4, 5), start=1)]
    write_volume(tmp_path / "gt.tif", Volume(gt, (0.5, 0.5, 0.5), "gt"), labels=True)
    write_volume(tmp_path / "s_cells.tif", Volume(pred, (0.5, 0.5, 0.5), "pred"), labels=True)
    write_flags_csv(tmp_path / "s_cells_flags.csv", ranking)
    check = evaluate_files(str(tmp_path / "gt.tif"), str(tmp_path / "s_cells.tif")).flags
    assert check.n_wrong == 2 and check.n_face_sliver == 1
    assert check.recall[0.1] == 0.5 and check.recall_other[0.1] == 1.0  # the first row: cell 1
    assert "1 of the wrong cells only took in a thin cap" in " ".join(check.lines())
    assert "the first 10 % hold 1 of the other 1 (1.00)" in " ".join(check.lines())
