"""Connected components slab by slab: the same pieces, with the same ids, as scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from core.components import label_components


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slab_by_slab_labels_equal_scipy_on_random_pieces(seed):
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.normal(size=(23, 31, 29)), 1.2) > 0.05
    expected, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    for slices in (1, 2, 5):
        labels, m = label_components(mask, block_voxels=slices * 31 * 29)
        assert m == n
        np.testing.assert_array_equal(labels, expected)


def test_pieces_joined_only_diagonally_across_a_slab_face_are_one():
    mask = np.zeros((4, 5, 5), bool)
    mask[1, 1, 1] = True  # last slice of the first slab
    mask[2, 2, 2] = True  # first slice of the second slab, touching by a corner
    mask[2, 4, 4] = True  # alone
    labels, n = label_components(mask, block_voxels=2 * 25)
    assert n == 2
    assert labels[1, 1, 1] == labels[2, 2, 2] == 1 and labels[2, 4, 4] == 2


def test_an_empty_mask_has_no_pieces():
    labels, n = label_components(np.zeros((6, 4, 4), bool), block_voxels=16)
    assert n == 0 and not labels.any()
