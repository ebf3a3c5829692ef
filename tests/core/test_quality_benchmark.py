"""The accuracy benchmark's ground-truth repair and classical grid do what docs/accuracy.md says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_slice_of_ids_found_nowhere_else_takes_the_ids_below(quality):
    labels = np.zeros((6, 8, 8), np.int64)
    labels[:, :, :4], labels[:, :, 4:] = 5, 9
    labels[3, :, :4], labels[3, :, 4:] = 105, 109  # the annotation's lone slice
    original = labels.copy()
    fixed, slices = quality.repair_lone_slices(labels)
    assert slices == [3] and np.array_equal(labels, original)  # input untouched
    assert set(np.unique(fixed)) == {5, 9} and (fixed[3, :, :4] == 5).all()
    same, none = quality.repair_lone_slices(fixed)  # nothing else changes
    assert none == [] and np.array_equal(same, fixed)


def test_the_real_sample_loses_only_its_lone_slice(quality, shared_data):
    with h5py.File(shared_data / "sample_patch.h5", "r") as f:
        labels = f["label"][:]
    fixed, slices = quality.repair_lone_slices(labels)
    assert slices == [31]
    assert np.array_equal(np.delete(fixed, 31, axis=0), np.delete(labels, 31, axis=0))
    lone = set(np.unique(labels[31])) - set(np.unique(np.delete(labels, 31, axis=0))) - {0}
    assert len(lone) > 20 and not lone & set(np.unique(fixed))


def test_the_classical_grid_is_in_voxels_of_the_finest_axis(quality):
    params = quality._classical_params({"smoothing_um": 2.0, "seed_h_um": 1.0,
                                        "threshold_factor": 0.8}, (1.0, 0.3, 0.3))
    assert params.smoothing_um == pytest.approx(0.6) and params.seed_h_um == pytest.approx(0.3)
    assert params.threshold_factor == 0.8
