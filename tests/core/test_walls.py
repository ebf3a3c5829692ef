"""Cells re-grown across per-axis wall bands (target all_walls, core.walls)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core.errors import VolumeDataError
from core.preprocess import axis_wall_target
from core.segment import SegmentParams, cells_from_probabilities
from core.walls import regrow_at_walls, wall_strength

VS = (1.0, 0.3, 0.3)


def two_cells(wall_x: int, shape=(6, 12, 24)) -> np.ndarray:
    """Cells 1 | 2 side by side along X, the wall between x = wall_x - 1 and wall_x,
    background in the outer Y rows."""
    lab = np.zeros(shape, np.uint8)
    lab[:, 2:10, 1:wall_x] = 1
    lab[:, 2:10, wall_x:23] = 2
    return lab


def bands_of(labels):
    return [axis_wall_target(labels, axis).astype(np.float32) for axis in range(3)]


def regrow(labels, bands, **kw):
    return np.asarray(regrow_at_walls(labels, lambda axis, index: bands[axis][index],
                                      voxel_size=VS, **kw))


def test_the_wall_strength_is_high_only_between_the_marked_pair():
    band = np.zeros((1, 1, 6), np.float32)
    band[0, 0, 2:4] = 1.0
    s = wall_strength(band, 2)
    assert s[0, 0].tolist() == [0, 0, 1, 0, 0, np.inf]
    assert wall_strength((band * 255).astype(np.uint8), 2)[0, 0, 2] == 1.0


@pytest.mark.parametrize("off", [-2, -1, 1, 2])
def test_a_wall_a_voxel_or_two_off_moves_to_where_the_bands_put_it(off):
    truth = two_cells(12)
    moved = two_cells(12 + off)
    out = regrow(moved, bands_of(truth))
    np.testing.assert_array_equal(out, truth)
    assert out.dtype == moved.dtype and np.array_equal(moved, two_cells(12 + off))  # input kept


def test_background_and_cells_are_kept_and_slabs_agree_with_the_whole():
    rng = np.random.default_rng(0)
    truth = two_cells(12, shape=(20, 12, 24))
    truth[10:, 2:10, 1:23] = np.where(truth[10:, 2:10, 1:23] == 1, 3, 4)  # a wall across Z
    moved = two_cells(13, shape=(20, 12, 24))
    moved[11:, 2:10, 1:23] = np.where(moved[11:, 2:10, 1:23] == 1, 3, 4)
    bands = [np.clip(b + 0.2 * rng.random(b.shape, np.float32), 0, 1) for b in bands_of(truth)]
    whole = regrow(moved, bands)
    np.testing.assert_array_equal(whole, truth)
    np.testing.assert_array_equal(regrow(moved, bands, slab_z=3), whole)
    assert set(np.unique(whole)) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(whole == 0, moved == 0)


def test_a_cell_too_thin_for_a_core_keeps_its_voxels():
    lab = two_cells(12)
    lab[:, 2:10, 12] = 3  # one voxel thick: no voxel is 2 voxels from another label
    out = regrow(lab, bands_of(two_cells(12)))
    assert (out == 3).sum() == (lab == 3).sum()


def test_cells_from_probabilities_uses_the_bands_and_checks_them():
    truth = two_cells(12)
    # the network's ridge one voxel off: it puts the wall between x = 12 and 13
    boundary = np.zeros(truth.shape, np.float32)
    boundary[:, 2:10, 12:14] = 1.0
    cell = ((truth > 0) & (boundary == 0)).astype(np.float32)
    tissue = (truth > 0).astype(np.float32)
    params = SegmentParams(seed_erosion_um=0.0, min_seed_size_um3=0.0, min_cell_size_um3=0.0,
                           merge_below=0.0)
    plain = cells_from_probabilities(cell, boundary, tissue_prob=tissue, voxel_size=VS,
                                     params=params)
    walls = cells_from_probabilities(cell, boundary, tissue_prob=tissue,
                                     wall_probs=bands_of(truth), voxel_size=VS,
                                     params=replace(params, wall_core_um=0.6))
    wrong = lambda lab: int(sum(((lab == a) & (truth == b)).sum() for a, b in ((1, 2), (2, 1))))
    assert wrong(walls) == 0 and wrong(plain) > 0
    # off by default (docs/accuracy.md step 15): the bands change nothing then
    off = cells_from_probabilities(cell, boundary, tissue_prob=tissue,
                                   wall_probs=bands_of(truth), voxel_size=VS, params=params)
    np.testing.assert_array_equal(off, plain)
    with pytest.raises(VolumeDataError, match="wall_probs"):
        cells_from_probabilities(cell, boundary, wall_probs=bands_of(truth)[:2], voxel_size=VS)
