"""Segmentation scores: the figures a user reads after `episeg evaluate`."""

from __future__ import annotations

import csv
import json
import threading

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from skimage.measure import label as sk_label
from skimage.metrics import adapted_rand_error, variation_of_information
from skimage.segmentation import find_boundaries

from core.errors import ConfigError, JobCancelled, VolumeDataError
from core.metrics import (CELL_COLUMNS, contingency_table, count_components, evaluate,
                          match_cells)

SCALAR_KEYS = [
    "background_iou", "cell_iou", "n_gt_cells", "n_pred_cells", "wrong_cells",
    "n_gt_components", "n_pred_components", "wrong_components", "adapted_rand_error",
    "rand_precision", "rand_recall", "voi_split", "voi_merge", "voi", "ap50", "f1_50",
    "precision_50", "recall_50", "mean_matched_iou", "n_matched", "n_split", "n_merged",
    "n_missed", "n_false_positive",
]


def voronoi(shape=(12, 40, 40), n=14, seed=0, scale=1000):
    """Touching cells (no gaps), background above and below, ids n*scale shuffled."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (n, 3)) * shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    nearest = ((grid[..., None, :] - pts) ** 2).sum(-1).argmin(-1)
    ids = (rng.permutation(n) + 1) * scale + 7
    lab = ids[nearest].astype(np.int64)
    lab[:2] = 0
    lab[-1] = 0
    return lab


def relabel(lab, rng, dtype=np.uint32):
    """Same partition, other (non-consecutive, shuffled) ids; 0 stays 0."""
    ids = np.unique(lab[lab > 0])
    new = rng.choice(np.arange(1, 10 * len(ids) + 1000), len(ids), replace=False) * 31
    out = np.zeros(lab.shape, dtype)
    for a, b in zip(ids, new):
        out[lab == a] = b
    return out


def scalars(result):
    d = result.to_dict()
    return {k: d[k] for k in SCALAR_KEYS}


def two_neighbours(gt):
    """Two different cells that touch along X."""
    a, b = gt[:, :, :-1], gt[:, :, 1:]
    k = np.flatnonzero(((a != b) & (a > 0) & (b > 0)).ravel())[0]
    return int(a.ravel()[k]), int(b.ravel()[k])


def test_identical_volumes_score_perfectly():
    gt = voronoi()
    r = evaluate(gt, gt.copy())
    assert r.cell_iou == r.background_iou == 1.0
    assert r.ap == r.f1 == r.mean_matched_iou == 1.0
    assert r.adapted_rand_error == 0.0 and r.voi_split == 0.0 and r.voi_merge == 0.0
    assert r.wrong_cells == 0 and r.wrong_components == 0
    assert r.n_matched == r.n_gt_cells == 14
    assert {c["status"] for c in r.cells} == {"ok"}
    assert r.confusion["fp"] == r.confusion["fn"] == 0


def test_a_split_cell_is_flagged():
    gt = voronoi()
    pred = gt.copy()
    victim = int(np.bincount(gt[gt > 0] // 1000).argmax()) * 1000 + 7  # the biggest cell
    zz, yy, xx = np.nonzero(gt == victim)
    half = xx >= np.median(xx)
    pred[zz[half], yy[half], xx[half]] = 999_999
    r = evaluate(gt, pred)
    row = next(c for c in r.cells if c["gt_id"] == victim)
    assert row["split"] and row["status"] == "split" and row["n_covering"] == 2
    assert r.n_split == 1 and r.n_merged == 0
    assert r.voi_split > 0 and r.voi_merge == pytest.approx(0, abs=1e-12)
    assert r.rand_precision == pytest.approx(1.0) and r.rand_recall < 1
    assert r.wrong_cells == 1 and r.wrong_components == 1
    assert r.ap < 1 and r.cell_iou == 1.0


def test_two_merged_cells_are_flagged():
    gt = voronoi()
    a, b = two_neighbours(gt)
    pred = gt.copy()
    pred[pred == b] = a
    r = evaluate(gt, pred)
    flagged = {c["gt_id"] for c in r.cells if c["merged"]}
    assert flagged == {a, b} and r.n_merged == 2 and r.n_split == 0
    assert r.voi_merge > 0 and r.voi_split == pytest.approx(0, abs=1e-12)
    assert r.rand_recall == pytest.approx(1.0) and r.rand_precision < 1
    assert r.wrong_cells == 1
    assert r.n_matched <= r.n_gt_cells - 1


def test_missed_cell_and_false_positive():
    gt = voronoi()
    pred = gt.copy()
    gone = int(gt[6, 20, 20])
    pred[gt == gone] = 0
    pred[0, :4, :4] = 5  # a small cell in the background
    r = evaluate(gt, pred)
    rows = {c["gt_id"]: c for c in r.cells if c["status"] != "false_positive"}
    assert rows[gone]["status"] == "missed" and rows[gone]["pred_id"] == 0
    fps = [c for c in r.cells if c["status"] == "false_positive"]
    assert [c["pred_id"] for c in fps] == [5] and fps[0]["gt_id"] == 0
    assert r.n_missed == 1 and r.n_false_positive == 1
    assert r.ap == pytest.approx(13 / 15) and r.f1 == pytest.approx(26 / 28)
    assert r.precision == pytest.approx(13 / 14) and r.recall == pytest.approx(13 / 14)


def test_confusion_matrix_and_class_iou_by_hand():
    gt = np.array([[[0, 0, 1, 1, 2, 2]]])
    pred = np.array([[[0, 3, 3, 0, 4, 4]]])
    r = evaluate(gt, pred)
    assert r.confusion == {"tn": 1, "fp": 1, "fn": 1, "tp": 3}
    assert r.cell_iou == pytest.approx(3 / 5) and r.background_iou == pytest.approx(1 / 3)
    # cell 2 == cell 4 (IoU 1); cell 1 vs cell 3: IoU 1/3 -> not matched at 0.5
    assert r.n_matched == 1 and r.mean_matched_iou == 1.0
    assert r.to_dict()["ap50"] == pytest.approx(1 / 3)


def test_permuted_non_consecutive_ids_give_the_same_scores(rng):
    gt = voronoi()
    pred = voronoi(seed=1, n=16)
    base = evaluate(gt, pred)
    again = evaluate(relabel(gt, rng), relabel(pred, rng, np.uint64))
    assert scalars(again) == pytest.approx(scalars(base), abs=1e-12)
    assert sorted(c["status"] for c in again.cells) == sorted(c["status"] for c in base.cells)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scikit_image(seed):
    rng = np.random.default_rng(seed)
    shape = (5, 13, 11)
    gt = rng.integers(0, 6, shape)
    gt = np.array([0, 3000, 17000, 5000, 999, 123456])[gt]  # 0 stays background
    pred = voronoi(shape, n=9, seed=seed, scale=77)
    pred[rng.random(shape) < 0.1] = 0
    r = evaluate(gt, pred, chunk_voxels=150)
    are, prec, rec = adapted_rand_error(gt, pred)
    assert r.adapted_rand_error == pytest.approx(are, abs=1e-10)
    # scikit-image returns precision and recall swapped (its issue #6485)
    assert r.rand_precision == pytest.approx(rec, abs=1e-10)
    assert r.rand_recall == pytest.approx(prec, abs=1e-10)
    split, merge = variation_of_information(gt, pred)
    assert r.voi_split == pytest.approx(split, abs=1e-10)
    assert r.voi_merge == pytest.approx(merge, abs=1e-10)
    for conn in (1, 2, 3):
        for lab in (gt, pred, pred > 0):
            expected = sk_label(lab, connectivity=conn, return_num=True)[1]
            assert count_components(lab, connectivity=conn, chunk_voxels=2 * 13 * 11) == expected


def _brute_force_matches(gt, pred, thr):
    """Dense IoU matrix + the StarDist/Cellpose assignment, for comparison."""
    g_ids, p_ids = np.unique(gt[gt > 0]), np.unique(pred[pred > 0])
    iou = np.zeros((len(g_ids), len(p_ids)))
    for i, a in enumerate(g_ids):
        for j, b in enumerate(p_ids):
            inter = np.count_nonzero((gt == a) & (pred == b))
            iou[i, j] = inter / np.count_nonzero((gt == a) | (pred == b))
    n_min = min(iou.shape)
    cost = -(iou >= thr).astype(float) - iou / (2 * n_min)
    ti, pj = linear_sum_assignment(cost)
    ok = iou[ti, pj] >= thr
    return set(zip(g_ids[ti[ok]].tolist(), p_ids[pj[ok]].tolist()))


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.75])
def test_matching_is_one_to_one_and_optimal(thr):
    gt = voronoi((6, 24, 24), n=10, seed=3)
    pred = voronoi((6, 24, 24), n=12, seed=4, scale=13)
    table = contingency_table(gt, pred)
    k = match_cells(table, thr)
    g, p = table.pair_ids()
    got = set(zip(g[k].tolist(), p[k].tolist()))
    want = _brute_force_matches(gt, pred, thr)
    assert len(got) == len(want)
    assert len({a for a, _ in got}) == len(got) == len({b for _, b in got})
    if thr > 0.5:
        assert got == want


def test_chunked_equals_unchunked_and_lazy_arrays_work(tmp_path):
    gt = voronoi()
    pred = voronoi(seed=5, n=17, scale=3)
    whole = evaluate(gt, pred, chunk_voxels=10**9).to_dict(include_cells=True)
    for chunk in (1, 40 * 40, 3 * 40 * 40 + 5):
        assert evaluate(gt, pred, chunk_voxels=chunk).to_dict(include_cells=True) == whole
    np.save(tmp_path / "g.npy", gt)
    np.save(tmp_path / "p.npy", pred)
    lazy = evaluate(np.load(tmp_path / "g.npy", mmap_mode="r"),
                    np.load(tmp_path / "p.npy", mmap_mode="r"), chunk_voxels=2 * 40 * 40)
    assert lazy.to_dict(include_cells=True) == whole


def test_contingency_table_counts_every_voxel_once():
    gt = voronoi()
    pred = voronoi(seed=6, n=9, scale=1)
    t = contingency_table(gt, pred, chunk_voxels=1000)
    g, p = t.pair_ids()
    pairs, counts = np.unique(np.stack([gt.ravel(), pred.ravel()]), axis=1, return_counts=True)
    assert np.array_equal(np.stack([g, p]).astype(np.int64), pairs)
    assert np.array_equal(t.counts, counts)
    assert t.n_voxels == gt.size
    assert t.to_sparse().sum() == gt.size


def test_binary_prediction_gives_the_thesis_wrong_cells():
    """Thesis: wrongCells = |components(GT) - components(binary prediction)|."""
    gt = voronoi()
    gaps = gt.copy()
    gaps[find_boundaries(gt, connectivity=3, mode="outer")] = 0  # the thesis' target
    binary = (gaps > 0).astype(np.uint8)
    r = evaluate(gt, binary)
    assert r.n_pred_components == sk_label(binary, connectivity=3, return_num=True)[1]
    assert r.n_gt_components == 14 and r.n_pred_cells == 1
    assert r.wrong_components == abs(14 - r.n_pred_components)


def test_wrong_shape_and_bad_values_are_clear_errors():
    gt = voronoi()
    with pytest.raises(VolumeDataError, match=r"\(12, 40, 40\).*\(12, 40, 39\)"):
        evaluate(gt, gt[:, :, :-1])
    with pytest.raises(VolumeDataError, match="negative"):
        evaluate(gt, -gt)
    with pytest.raises(VolumeDataError, match="fractional"):
        evaluate(gt, gt * 0.5)
    with pytest.raises(ConfigError, match="iou_threshold"):
        evaluate(gt, gt, iou_threshold=0)
    with pytest.raises(ConfigError, match="connectivity"):
        evaluate(gt, gt, connectivity=4)


def test_progress_and_cancel():
    gt = voronoi()
    events = []
    evaluate(gt, gt, chunk_voxels=40 * 40 * 3, progress=events.append)
    assert events[-1].stage == "evaluate" and events[-1].done == events[-1].total == 4
    stop = threading.Event()
    stop.set()
    with pytest.raises(JobCancelled):
        evaluate(gt, gt, cancel=stop)


def test_real_sample_label_against_its_coarser_labelling(shared_data):
    h5py = pytest.importorskip("h5py")
    with h5py.File(shared_data / "sample_patch.h5", "r") as f:
        label, big = f["label"][:], f["big_label"][:]
        lazy = evaluate(f["label"], f["big_label"], chunk_voxels=200 * 200 * 5)
    r = evaluate(label, big)
    assert lazy.to_dict() == r.to_dict()
    d = r.to_dict()
    assert d["n_gt_cells"] > 100 and d["n_pred_cells"] == len(np.unique(big)) - 1
    # big_label keeps a third of the cells as they are and lumps the rest into 0:
    # pure merging, nothing split.
    assert d["voi_merge"] > 0.1 > d["voi_split"]
    assert d["rand_recall"] == pytest.approx(1.0) and d["rand_precision"] < 0.9
    assert d["n_matched"] == d["n_pred_cells"] and d["mean_matched_iou"] == pytest.approx(1.0)
    assert d["n_missed"] == d["n_gt_cells"] - d["n_matched"] and d["n_false_positive"] == 0
    assert 0 < d["ap50"] < 0.5 and d["wrong_cells"] == d["n_gt_cells"] - d["n_pred_cells"]
    # about half of the GT ids come in several pieces in this crop
    assert d["n_gt_components"] > d["n_gt_cells"]
    are, _, _ = adapted_rand_error(label, big)
    assert d["adapted_rand_error"] == pytest.approx(are, abs=1e-10)


@pytest.fixture
def episeg(monkeypatch):
    """`episeg` main() with only this subcommand registered (others may be in progress)."""
    pytest.importorskip("core.io")
    import core.cli.main as cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["core.cli.cmd_evaluate"])
    return cli.main


def test_cli_writes_json_and_cells_csv(tmp_path, capsys, episeg):

    gt = voronoi().astype(np.uint32)
    pred = gt.copy()
    a, b = two_neighbours(gt)
    pred[pred == b] = a
    np.save(tmp_path / "gt.npy", gt)
    np.save(tmp_path / "pred.npy", pred)
    out, cells = tmp_path / "out" / "scores.json", tmp_path / "cells.csv"
    code = episeg(["evaluate", str(tmp_path / "gt.npy"), str(tmp_path / "pred.npy"),
                 "--json", str(out), "--cells-csv", str(cells), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrong_cells" in printed and "AP50" in printed and "adapted Rand error" in printed
    d = json.loads(out.read_text())
    assert set(SCALAR_KEYS) <= set(d) and d["confusion_matrix"]["fp"] == 0
    assert d["wrong_cells"] == 1 and d["n_merged"] == 2 and d["ap50"] < 1
    assert d["gt"].endswith("gt.npy")
    with open(cells, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CELL_COLUMNS and len(rows) == d["n_gt_cells"]
    assert sum(r["status"] == "merged" for r in rows) == 2
    assert not list(tmp_path.glob("out/.*")), "no temporary files left behind"


def test_cli_shape_mismatch_exits_2(tmp_path, capsys, episeg):

    np.save(tmp_path / "gt.npy", voronoi().astype(np.uint16))
    np.save(tmp_path / "pred.npy", voronoi((12, 40, 38)).astype(np.uint16))
    code = episeg(["evaluate", str(tmp_path / "gt.npy"), str(tmp_path / "pred.npy"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "gt.npy" in err and "pred.npy" in err and "40" in err


def test_components_can_be_skipped_and_everything_else_is_unchanged():
    gt = voronoi()
    pred = voronoi(seed=2)
    full, quick = evaluate(gt, pred).to_dict(), evaluate(gt, pred, components=False).to_dict()
    assert quick["wrong_components"] is None and quick["n_gt_components"] is None
    assert json.loads(json.dumps(quick))["n_pred_components"] is None
    for key in ("n_gt_components", "n_pred_components", "wrong_components"):
        del full[key], quick[key]
    assert quick == full
