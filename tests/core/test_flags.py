"""Per-cell flags: the cells a biologist should check first are the wrong ones."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from core import flags as flags_mod
from core.flags import COLUMNS, cell_flags, flag_precision, wrong_predicted_cells, write_flags_csv
from core.metrics import evaluate
from tests.core.test_segment import probabilities_from, voronoi_tissue


def grid_tissue(shape=(16, 96, 96), k=4, seed=0):
    """Cells of similar size: Voronoi cells of a jittered k x k grid of columns."""
    rng = np.random.default_rng(seed)
    step = shape[1] / k
    yy, xx = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    pts = np.stack([(yy.ravel() + 0.5) * step, (xx.ravel() + 0.5) * step], 1)
    pts += rng.uniform(-0.15 * step, 0.15 * step, pts.shape)
    grid = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), -1)
    plane = ((grid[..., None, :] - pts) ** 2).sum(-1).argmin(-1) + 1
    labels = np.broadcast_to(plane, shape).astype(np.int32).copy()
    labels[:2] = 0
    labels[-2:] = 0
    return labels


def merged_and_split(gt):
    """A prediction with one merge (cells 1+2) and one split (cell 3 cut in two)."""
    pred = gt.copy()
    pred[pred == 2] = 1
    cell3 = np.argwhere(gt == 3)
    cut = np.median(cell3[:, 2])
    sel = (gt == 3) & (np.arange(gt.shape[2])[None, None, :] > cut)
    pred[sel] = gt.max() + 1
    return pred


def test_merged_and_split_cells_are_ranked_first():
    gt = grid_tissue()
    cp, bp = probabilities_from(gt)
    pred = merged_and_split(gt)
    rows = cell_flags(pred, bp, cp, voxel_size=(1.0, 0.5, 0.5))
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    top3 = {r["cell_id"] for r in rows[:3]}
    assert 1 in top3  # the merged pair: a wall runs through it
    assert {3, int(gt.max()) + 1} & top3  # a half of the split cell: its wall is not seen
    reasons = {r["cell_id"]: r["reason"] for r in rows}
    assert reasons[1].startswith("merged?")
    wrong = wrong_predicted_cells(evaluate(gt, pred).cells)
    assert 1 in wrong
    fp = flag_precision(rows, wrong, ks=(3,))
    assert fp["precision_top3"] >= 2 / 3 and fp["base_rate"] < 0.3


def test_slab_by_slab_flags_equal_whole_stack_flags(monkeypatch):
    gt = voronoi_tissue(shape=(20, 48, 48), n=10, seed=1)
    cp, bp = probabilities_from(gt)
    pred = merged_and_split(gt)
    whole = cell_flags(pred, bp, cp, voxel_size=(1.0, 0.5, 0.5))
    import core.segment
    monkeypatch.setattr(core.segment, "SLAB_VOXELS", 48 * 48 * 3)
    slabs = cell_flags(pred, bp, cp, voxel_size=(1.0, 0.5, 0.5))
    assert [r["cell_id"] for r in slabs] == [r["cell_id"] for r in whole]
    for a, b in zip(whole, slabs):
        for key in ("score", "inner_boundary", "weakest_wall", "volume_um3", "z", "y", "x"):
            assert a[key] == pytest.approx(b[key], abs=1e-3), key


def test_without_probabilities_only_size_counts_and_empty_stacks_give_nothing():
    gt = voronoi_tissue(shape=(12, 40, 40), n=6)
    rows = cell_flags(gt, None, None, voxel_size=(1, 1, 1))
    assert len(rows) == 6 and all(r["inner_boundary"] is None for r in rows)
    assert cell_flags(np.zeros((4, 8, 8), np.uint8), None) == []


def test_csv_has_a_header_and_one_ranked_row_per_cell(tmp_path):
    gt = voronoi_tissue(shape=(12, 40, 40), n=6)
    cp, bp = probabilities_from(gt)
    rows = cell_flags(gt, np.round(bp * 255).astype(np.uint8), cp, voxel_size=(1, 1, 1))
    path = write_flags_csv(tmp_path / "x_cells_flags.csv", rows)
    with open(path) as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0].keys()) == list(COLUMNS)
    assert [int(r["rank"]) for r in read] == list(range(1, 7))
    assert sorted(int(r["cell_id"]) for r in read) == list(range(1, 7))


def test_shape_mismatch_is_named():
    with pytest.raises(flags_mod.VolumeDataError, match="boundary probability"):
        cell_flags(np.ones((4, 8, 8), np.uint8), np.zeros((4, 8, 9), np.float32))


def test_a_cell_that_only_swallowed_a_face_sliver_is_told_apart_from_a_real_merge():
    gt = np.zeros((12, 24, 40), np.uint16)  # a background rim except at the X faces
    for cell, (x0, x1) in enumerate([(0, 10), (10, 12), (12, 24), (24, 36), (36, 38), (38, 40)], 1):
        gt[1:11, 1:23, x0:x1] = cell        # cells 2 and 5: thin, inside; 6: a face sliver
    pred = gt.copy()
    pred[gt == 2] = 1                       # cell 1 swallows a thin inner cell: a real merge
    pred[gt == 5] = 4                       # cell 4 swallows one too ...
    pred[gt == 6] = 4                       # ... and the face sliver
    wrong = wrong_predicted_cells(evaluate(gt, pred).cells)
    assert {1, 4} <= wrong
    kwargs = dict(voxel_size=(1.0, 1.0, 1.0), sliver_um3=500)  # cells 2, 5, 6: 440 voxels
    assert flags_mod.face_sliver_merges(gt, pred, wrong, **kwargs) == set()
    pred[gt == 5] = 5                       # now cell 4's only fault is the face sliver
    wrong = wrong_predicted_cells(evaluate(gt, pred).cells)
    slivers = flags_mod.face_sliver_merges(gt, pred, wrong, **kwargs)
    assert slivers == {4}
    # the table evaluate() already made gives the same answer
    assert flags_mod.face_sliver_merges(gt, pred, wrong, table=evaluate(gt, pred).table,
                                        **kwargs) == {4}
    # the recall of the other wrong cells (cell 1) within the top 1 of a ranking
    fp = flag_precision([{"cell_id": c} for c in (4, 1, 3, 5)], wrong, ks=(1,),
                        face_slivers=slivers)
    assert fp["n_face_sliver"] == 1 and fp["recall_top_n_other"] == 0.0
    fp = flag_precision([{"cell_id": c} for c in (1, 4, 3, 5)], wrong, ks=(1,),
                        face_slivers=slivers)
    assert fp["recall_top_n_other"] == 1.0
    # the first rows a biologist checks: a quarter of 4 rows is one row, half is two
    ranking = [{"cell_id": c} for c in (4, 3, 1, 5)]
    fp = flag_precision(ranking, wrong, ks=(1,), face_slivers=slivers, shares=(0.25, 0.5, 0.75))
    assert fp["recall_top25pct_other"] == 0.0 and fp["recall_top50pct_other"] == 0.0
    assert fp["recall_top75pct_other"] == 1.0
    assert fp["recall_top25pct"] == 0.5 and fp["recall_top75pct"] == 1.0
