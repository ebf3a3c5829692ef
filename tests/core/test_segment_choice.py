"""The post-processing a model keeps: chosen on validation labels only when clearly better,
used by prediction unless the user set the value or asked for the shipped settings."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from core.metrics import evaluate
from core.pipeline import PredictConfig, segment_params, segment_stack
from core.segment import SegmentParams, cells_from_channels
from core.segment_choice import (CHOSEN_KEYS, SegmentChoice, ValidationCase, choose_segment_params,
                                 describe, with_model_choice)
from core.volume import Volume

VOXEL = (1.0, 1.0, 1.0)


def box_cells(shape=(10, 48, 48), side=12) -> np.ndarray:
    """A grid of box-shaped cells spanning Z (ZYX labels 1..n)."""
    _, y, x = shape
    yy, xx = np.mgrid[0:y, 0:x]
    plane = (yy // side) * (x // side) + xx // side + 1
    return np.broadcast_to(plane, shape).astype(np.uint16).copy()


def probabilities(labels: np.ndarray, wall_cell: float, wall_boundary: float):
    """What a network might say: cell interiors sure, the 2-voxel walls between cells
    with the given cell and boundary probabilities (faint walls: both middling)."""
    walls = find_boundaries(labels, mode="inner")
    cell = np.where(walls, wall_cell, 0.95).astype(np.float32)
    boundary = np.where(walls, wall_boundary, 0.02).astype(np.float32)
    return {"cell": cell, "boundary": boundary}


def test_faint_walls_choose_a_lower_merge_threshold_than_the_shipped_one():
    gt = box_cells()
    # the walls' relief (boundary + 1 - cell) / 2 = 0.425: below the shipped
    # merge threshold 0.5, so the shipped settings merge every cell with its neighbours
    probs = probabilities(gt, wall_cell=0.5, wall_boundary=0.35)
    shipped = cells_from_channels(probs, voxel_size=VOXEL, params=SegmentParams())
    assert shipped.max() < gt.max() // 2

    events = []
    choice = choose_segment_params([ValidationCase(probs, gt, VOXEL)], progress=events.append)
    assert choice.chosen and choice.chosen["merge_below"] < 0.425
    assert choice.best_score >= choice.shipped_score + choice.clear_gain
    assert set(choice.chosen) <= set(CHOSEN_KEYS)
    assert choice.settings_tried == len(events) > 20
    assert describe(choice.chosen) in choice.summary() and "against" in choice.summary()

    kept = cells_from_channels(probs, voxel_size=VOXEL,
                               params=with_model_choice(SegmentParams(), choice.chosen))
    assert evaluate(gt, kept).ap == 1.0


def test_clear_walls_keep_the_shipped_settings():
    gt = box_cells()
    probs = probabilities(gt, wall_cell=0.02, wall_boundary=0.98)
    choice = choose_segment_params([ValidationCase(probs, gt, VOXEL)])
    assert choice.chosen == {}
    assert choice.shipped_metrics["ap50"] == 1.0
    assert "shipped settings kept" in choice.summary()
    # the report survives the model file (a plain dict) and reads back the same
    again = SegmentChoice.from_dict(choice.to_dict())
    assert again.summary() == choice.summary()


def test_a_thin_held_out_part_is_scored_inside_its_region_only():
    gt = box_cells()
    probs = probabilities(gt, wall_cell=0.02, wall_boundary=0.98)
    region = (slice(None), slice(36, 48), slice(None))
    choice = choose_segment_params([ValidationCase(probs, gt[region], VOXEL, region)],
                                   seed_candidates=[], merge_candidates=[])
    assert choice.settings_tried == 1 and choice.shipped_metrics["ap50"] == 1.0


def test_a_value_the_user_set_wins_over_the_models_choice():
    chosen = {"seed_method": "distance", "seed_h_um": 3.0, "merge_below": 0.3,
              "some_future_key": 1}
    params = with_model_choice(SegmentParams(merge_below=0.6), chosen)
    assert params.seed_method == "distance" and params.seed_h_um == 3.0
    assert params.merge_below == 0.6  # set by the user: kept
    assert with_model_choice(SegmentParams(), {}) == SegmentParams()


@pytest.mark.parametrize("post_processing", ["model", "shipped"])
def test_prediction_uses_the_models_choice_unless_told_otherwise(post_processing):
    gt = box_cells()
    probs = probabilities(gt, wall_cell=0.5, wall_boundary=0.35)

    def network(model, image, *, out, channels=None, **kw):  # the network's output, as stored
        out[0], out[1] = (np.round(probs[n] * 255) for n in ("cell", "boundary"))

    info = SimpleNamespace(channels=("cell", "boundary"), normalisation={"mode": "zscore"},
                           voxel_size_um=VOXEL, segment={"merge_below": 0.0})
    config = PredictConfig(flags=False, post_processing=post_processing)
    result = segment_stack(Volume(gt.astype(np.float32), VOXEL, "stack"), None, info,
                           config=config, network=network)
    if post_processing == "model":
        assert segment_params(config, info).merge_below == 0.0
        assert result.n_cells == gt.max()
    else:
        assert segment_params(config, info) == SegmentParams()
        assert result.n_cells < gt.max() // 2
