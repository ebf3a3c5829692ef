"""Merging across weak walls: cells cut in two where the network sees no wall
come back whole; real walls stay."""

from __future__ import annotations

import numpy as np
import pytest

from core.agglomerate import merge_weak_walls, wall_contacts
from core.errors import ConfigError
from core.segment import SegmentParams, cells_from_probabilities
from tests.core.test_segment import best_iou, n_cells, probabilities_from, voronoi_tissue


def _row_of_cells():
    """Cells 1 | 2 | 3 side by side along X, cell 4 below 2 and 3 (ZYX)."""
    labels = np.zeros((4, 6, 12), np.uint16)
    labels[:, :3, 0:4], labels[:, :3, 4:8], labels[:, :3, 8:12] = 1, 2, 3
    labels[:, 3:, 4:12] = 4
    return labels


def test_only_walls_weaker_than_the_threshold_are_merged():
    labels = _row_of_cells()
    relief = np.full(labels.shape, 0.9, np.float32)
    relief[:, :3, 7:9] = 0.1  # the wall between 2 and 3 is faint
    lut = merge_weak_walls(labels, lambda index: relief[index], below=0.5)
    assert lut[3] == lut[2] == 2  # merged, under the smaller id
    assert lut[1] == 1 and lut[4] == 4  # walls at 0.9 stay
    assert np.array_equal(merge_weak_walls(labels, lambda index: relief[index], below=0.05),
                          np.arange(5))  # nothing is below 0.05


def test_a_merged_cell_is_judged_by_the_mean_of_its_walls():
    """Average linkage: after 2 and 3 merge, their wall to cell 4 is faint under
    2 only (half of its voxel pairs), so the merged cell keeps its wall to 4."""
    labels = _row_of_cells()
    relief = np.full(labels.shape, 0.9, np.float32)
    relief[:, :3, 7:9] = 0.0          # 2 | 3: merged first
    relief[:, 2:4, 4:8] = 0.3         # 2 | 4 faint: alone it would merge
    lut = merge_weak_walls(labels, lambda index: relief[index], below=0.5)
    assert lut[2] == lut[3]
    # 2|4: 0.3 over 16 pairs; 3|4: about 0.79 over 16 -> about 0.54 once 2 and 3 are one
    assert lut[4] == 4
    single = merge_weak_walls(np.where(labels == 3, 0, labels), lambda index: relief[index],
                              below=0.5)
    assert single[4] == single[2]  # without cell 3, the faint wall alone merges 2 and 4


def test_walls_are_counted_the_same_slab_by_slab():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, (11, 9, 8)).astype(np.uint16)
    relief = rng.random(labels.shape).astype(np.float32)
    whole = wall_contacts(labels, lambda index: relief[index], slab_z=100)
    for slab_z in (1, 2, 5):
        parts = wall_contacts(labels, lambda index: relief[index], slab_z=slab_z)
        for a, b in zip(whole, parts):
            assert np.allclose(a, b)
    # one pair of 1 and 2 along X, relief 0.2 and 0.6: mean 0.4 over one pair
    two = np.array([[[1, 2]]], np.uint16)
    a, b, total, count = wall_contacts(two, lambda index: np.array([[[0.2, 0.6]]])[index])
    assert (a.tolist(), b.tolist(), count.tolist()) == ([1], [2], [1])
    assert total[0] == pytest.approx(0.4)


def test_a_cell_split_by_a_faint_wall_comes_back_whole(tmp_path, monkeypatch):
    gt = voronoi_tissue(shape=(20, 64, 64), n=6, seed=3)
    cp, bp = probabilities_from(gt)
    ids, sizes = np.unique(gt[gt > 0], return_counts=True)
    big = ids[np.argmax(sizes)]
    x_mid = int(np.median(np.nonzero(gt == big)[2]))
    cut = np.zeros(gt.shape, bool)
    cut[:, :, x_mid:x_mid + 2] = True
    cut &= gt == big
    cp[cut], bp[cut] = 0.45, 0.35  # the network half sees a wall: no seed there
    params = SegmentParams(min_cell_size_um3=10, merge_below=0)
    split = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1), params=params)
    assert n_cells(split) == n_cells(gt) + 1
    merged = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1),
                                      params=SegmentParams(min_cell_size_um3=10, merge_below=0.5))
    assert n_cells(merged) == n_cells(gt)
    assert best_iou(gt, merged).min() > 0.85
    assert set(np.unique(merged)) == set(range(n_cells(gt) + 1))  # ids 1..n
    import core.scratch as scratch  # a large stack: the same on disk (core.scratch)

    monkeypatch.setattr(scratch, "SCRATCH_ABOVE_BYTES", 0)
    on_disk = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1), work_dir=tmp_path,
                                       params=SegmentParams(min_cell_size_um3=10, merge_below=0.5))
    np.testing.assert_array_equal(np.asarray(on_disk), merged)


def test_merge_below_must_be_a_probability():
    with pytest.raises(ConfigError, match="merge_below"):
        SegmentParams(merge_below=1.0).validate()
