"""The classical baseline finds cells on a clean synthetic stack and refuses bad input."""

from __future__ import annotations

import numpy as np
import pytest

from core.classical import ClassicalParams, classical_cells
from core.errors import ConfigError, VolumeDataError
from core.metrics import evaluate
from core.synth import SynthParams, make_epithelium


def test_classical_baseline_finds_most_cells_of_a_clean_stack():
    params = SynthParams.for_difficulty("easy", shape=(24, 128, 128))
    raw, gt = make_epithelium(params, seed=4)
    labels = classical_cells(raw.data, params.voxel_size_um,
                             ClassicalParams(smoothing_um=0.3, seed_h_um=0.3, threshold_factor=0.8))
    assert labels.dtype.kind == "u" and labels.max() > 10
    m = evaluate(gt.data, labels, components=False)
    assert m.ap > 0.2  # a real segmentation, if a poor one: what a network must beat


def test_bad_parameters_and_shapes_are_refused():
    with pytest.raises(ConfigError, match="smoothing_um"):
        classical_cells(np.zeros((4, 8, 8)), (1, 1, 1), ClassicalParams(smoothing_um=-1))
    with pytest.raises(VolumeDataError, match="3D"):
        classical_cells(np.zeros((8, 8)), (1, 1, 1))


def test_a_bright_spot_does_not_merge_every_cell():
    """A saturated nucleus or debris (~1 % of the stack) must not lift Otsu above the membranes."""
    params = SynthParams.for_difficulty("easy", shape=(24, 128, 128))
    raw, gt = make_epithelium(params, seed=4)
    image = raw.data.astype(np.float32)
    zz, yy, xx = np.ogrid[:24, :128, :128]
    spot = (zz - 12) ** 2 / 25 + (yy - 24) ** 2 / 100 + (xx - 24) ** 2 / 100 <= 1
    assert 0.005 < spot.mean() < 0.015
    image[spot] = image.max() * 20
    chosen = dict(smoothing_um=0.3, seed_h_um=0.3, threshold_factor=0.8)
    plain = classical_cells(image, params.voxel_size_um, ClassicalParams(**chosen, saturated_percent=0))
    clipped = classical_cells(image, params.voxel_size_um, ClassicalParams(**chosen))
    ap_plain = evaluate(gt.data, plain, components=False).ap
    ap_clipped = evaluate(gt.data, clipped, components=False).ap
    assert ap_clipped > 0.2 and ap_clipped > ap_plain + 0.1
    with pytest.raises(ConfigError, match="saturated_percent"):
        classical_cells(image, (1, 1, 1), ClassicalParams(saturated_percent=60))
