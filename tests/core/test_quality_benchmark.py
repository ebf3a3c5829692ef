"""The accuracy benchmark's ground-truth repair and classical grid do what docs/accuracy.md says."""

from __future__ import annotations

import importlib.util
import json
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


def test_the_real_sample_is_tuned_in_context_and_scored_on_its_validation_part(
        quality, shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SHARED", shared_data)
    data = quality.real_data(tmp_path)
    (raw, gt, region), = quality.tune_cases(data["tune"])
    assert raw.shape == (64, 200, 100)          # train + validation parts, segmented whole
    assert gt[region].shape == (64, 200, 25)    # only x = 75..99 is scored
    # A segmentation right on the scored part scores the same whatever it does elsewhere.
    wrong_elsewhere = gt.copy()
    wrong_elsewhere[:, :, :75] = 1
    assert quality.region_objective(gt, wrong_elsewhere, region) == pytest.approx(
        quality.region_objective(gt, gt, region))
    merged = gt.copy()
    merged[:, :, 75:] = 1
    assert quality.region_objective(gt, merged, region) < quality.region_objective(gt, gt, region)
    assert data["tune_classical"] == [data["val"]]   # the baseline's global threshold: val alone
    test_name, test_raw, _ = data["tests"][0]
    assert quality.read_volume(test_raw).shape == (64, 200, 100)   # x >= 100, never tuned on


def test_the_classical_grid_is_in_voxels_of_the_finest_axis(quality):
    params = quality._classical_params({"smoothing_um": 2.0, "seed_h_um": 1.0,
                                        "threshold_factor": 0.8}, (1.0, 0.3, 0.3))
    assert params.smoothing_um == pytest.approx(0.6) and params.seed_h_um == pytest.approx(0.3)
    assert params.threshold_factor == 0.8


def test_the_error_breakdown_tells_face_slivers_from_other_misses():
    spec = importlib.util.spec_from_file_location(
        "error_breakdown", REPO / "benchmarks" / "error_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gt = np.zeros((10, 20, 20), np.uint16)  # every cell spans Z: all touch a face
    gt[:, :14, :10] = 1                      # 1400 voxels
    gt[:, 14:, :10] = 4                      # 600 voxels, will be merged into cell 1
    gt[:, :, 10:18] = 2                      # 1600 voxels
    gt[:, :, 18:] = 3                        # 400 voxels: a sliver the X face cuts off
    pred = gt.copy()
    pred[pred == 3] = 2                      # the sliver is absorbed by its neighbour
    pred[pred == 4] = 1                      # a merge behind a faint wall: cell 4 is lost
    pred[:, 15:, 10:18] = 7                  # cell 2 loses a corner (IoU 0.6: still matched)
    background = np.zeros((4, 20, 20), np.uint16)
    gt = np.concatenate([gt, background])
    pred = np.concatenate([pred, background])
    pred[12:, :5, :5] = 9                    # a cell where the ground truth has none
    row = module.breakdown(gt, pred, (1.0, 1.0, 1.0), sliver_um3=500)
    assert row == {"gt_cells": 4, "matched": 2, "missed_slivers": 1, "missed_other": 1,
                   "fp_background": 1, "fp_other": 1}


def test_every_variant_is_a_valid_training_config(quality, tmp_path):
    # A misspelt key in a variant would only fail after a benchmark's earlier
    # 15-minute runs; the model a variant fine-tunes must exist.
    data = {"train": [(tmp_path / "r.tif", tmp_path / "l.tif")],
            "val": (tmp_path / "vr.tif", tmp_path / "vl.tif")}
    for name in quality.VARIANTS:
        cfg, init = quality.variant_config(name, data, 15.0, seed=3)
        assert cfg.max_minutes == 15.0 and cfg.seed == 3
        assert init is None or init.is_file(), (name, init)
    cfg, init = quality.variant_config("lr_0.0025", data, 15.0, seed=0)
    assert cfg.optimizer.lr == 0.0025 and init is None
    cfg, init = quality.variant_config("finetune_bundled", data, 15.0, seed=0)
    assert init.name == "default.pt" and tuple(cfg.data.target_voxel_size_um) == (1.0, 1.0, 1.0)


def test_models_are_scored_with_the_shipped_defaults_on_one_seeds_stacks(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "score_shipped", REPO / "benchmarks" / "score_shipped.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = REPO / "resources" / "models" / "default.pt"
    module.main([str(model), "--seeds", "700", "--levels", "medium,hard", "--n-test", "1",
                 "--shape", "16,64,64", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "seed 700 medium 0" in printed and "seed 700 hard 0" in printed
    assert "seed 700 MEAN" in printed and "AP50 - ARE" in printed
    saved = json.loads((tmp_path / "score_default_700.json").read_text())
    assert [r["stack"] for r in saved["rows"]] == ["medium 0", "hard 0"]
    assert 0.0 <= saved["mean"]["AP50"] <= 1.0 and saved["mean"]["cell IoU"] > 0.5
    # the flags' recall, pooled over the stacks, is printed and kept
    assert "seed 700 FLAGS" in printed and "first 10 %, not face slivers" in printed
    assert set(saved["flags_pooled"]) == {name for name, _, _ in module.FLAG_RECALLS}
    assert all("flag_recall_top10pct" in r for r in saved["rows"])
    # the stacks are quality.py's held-out stacks of that seed: level k, stack j from seed + 10 k + j
    stacks = module.quality.test_stacks(tmp_path / "data" / "seed700", 700, ["medium", "hard"], 1,
                                        11.0, (16, 64, 64))
    assert [name for name, _, _ in stacks] == ["medium 0", "hard 0"]
    assert all(r.is_file() and l.is_file() for _, r, l in stacks)
    with pytest.raises(SystemExit):
        module.main([str(tmp_path / "missing.pt")])


def test_flag_recall_is_pooled_over_stacks_by_their_wrong_cells():
    spec = importlib.util.spec_from_file_location(
        "score_shipped", REPO / "benchmarks" / "score_shipped.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"flag_n_wrong": 8, "flag_n_face_sliver": 6, "flag_recall_top_n_wrong": 0.25,
             "flag_recall_top_n_other": 1.0, "flag_recall_top10pct": 0.5,
             "flag_recall_top10pct_other": 0.5},
            {"flag_n_wrong": 2, "flag_n_face_sliver": 0, "flag_recall_top_n_wrong": 1.0,
             "flag_recall_top_n_other": 1.0, "flag_recall_top10pct": 0.0,
             "flag_recall_top10pct_other": 0.0},
            {"flag_n_wrong": 0, "flag_n_face_sliver": 0, "flag_recall_top_n_wrong": float("nan")}]
    pooled = module.pooled_flag_recall(rows)
    assert pooled["top n, all"] == pytest.approx(4 / 10)       # 2 of 8 and 2 of 2
    assert pooled["top n, not face slivers"] == pytest.approx(1.0)
    assert pooled["first 10 %, all"] == pytest.approx(4 / 10)
    assert pooled["first 10 %, not face slivers"] == pytest.approx(1 / 4)


def test_stress_stacks_differ_from_the_benchmark_and_are_scored_by_name(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "score_shipped", REPO / "benchmarks" / "score_shipped.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    quality = module.quality
    from core.io import read_volume

    stacks = quality.stress_stacks(tmp_path / "s", 5000, ["coarse z", "easy optics"],
                                   shape=(16, 64, 64))
    assert [n for n, _, _ in stacks] == ["coarse z", "easy optics"]
    assert tuple(read_volume(stacks[0][1]).voxel_size) == (2.0, 0.3, 0.3)
    assert tuple(read_volume(stacks[1][1]).voxel_size) == (1.0, 0.3, 0.3)
    # every condition differs from the benchmark's own levels in at least one parameter
    for name, cond in quality.STRESS_CONDITIONS.items():
        assert cond["shape"] != (64, 256, 256) or len(cond) > 1, name
    with pytest.raises(ValueError, match="no such"):
        quality.stress_stacks(tmp_path / "s", 5000, ["no such"])

    model = REPO / "resources" / "models" / "default.pt"
    module.main([str(model), "--stress", "coarse z,easy optics", "--seeds", "5000",
                 "--shape", "16,64,64", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "seed 5000 coarse z" in printed and "seed 5000 easy optics" in printed
    saved = json.loads((tmp_path / "score_default_stress5000.json").read_text())
    assert [r["stack"] for r in saved["rows"]] == ["coarse z", "easy optics"]
    assert saved["mean"]["cell IoU"] > 0.5
    with pytest.raises(SystemExit):  # a misspelt condition is refused before any work
        module.main([str(model), "--stress", "coarse zz"])
    assert "unknown stress condition(s) coarse zz" in capsys.readouterr().err


def test_training_stacks_can_take_tube_sizes_in_turn(quality, tmp_path):
    from types import SimpleNamespace

    from core.io import read_labels

    assert quality._tubes("fit,16,fit,22.5") == [None, 16.0, None, 22.5]
    args = SimpleNamespace(n_train=2, train_difficulties=["medium"], train_cells_around=None,
                           cells_around=11.0, train_tubes=[None, 6.0], train_seed=100,
                           shape=(32, 96, 96), levels=["medium"], n_test=1, test_seed=900)
    data = quality.make_data(args, tmp_path)
    (fit_raw, fit_lab), (thin_raw, thin_lab) = data["train"]
    assert (fit_raw.name, thin_raw.name) == ("train0_medium_000_raw.tif",
                                             "train1_medium_r6_000_raw.tif")
    # a tube of 6 um radius in a stack ~30 um deep holds far less tissue than a fitted one
    share = [float(np.mean(read_labels(p).data > 0)) for p in (fit_lab, thin_lab)]
    assert share[1] < 0.6 * share[0]
    # the validation and test stacks keep the fitted tube
    assert data["val"][0].name == "train2_medium_000_raw.tif"
    assert all("_r6" not in r.name for _, r, _ in data["tests"])


def test_training_stacks_can_take_brighter_media(quality, tmp_path):
    """--train-medium brightens the training stacks' media; their cells stay, and the
    validation and test stacks keep the dark medium they are scored on."""
    from types import SimpleNamespace

    from core.io import read_labels, read_volume

    assert quality._medium("0.02,0.3") == (0.02, 0.3)
    base = dict(n_train=1, train_difficulties=["medium"], train_cells_around=None,
                cells_around=11.0, train_tubes=None, train_seed=100, shape=(32, 96, 96),
                levels=["medium"], n_test=1, test_seed=900)
    dark = quality.make_data(SimpleNamespace(**base), tmp_path / "dark")
    lit = quality.make_data(SimpleNamespace(**base, train_medium=(0.25, 0.3)), tmp_path / "lit")
    (dark_raw, dark_lab), = dark["train"]
    (lit_raw, lit_lab), = lit["train"]
    assert lit_raw.name == "train0_medium_m0.25-0.3_000_raw.tif"
    labels = read_labels(lit_lab).data
    np.testing.assert_array_equal(labels, read_labels(dark_lab).data)
    outside = labels == 0
    assert (np.median(read_volume(lit_raw).data[outside])
            > np.median(read_volume(dark_raw).data[outside]) + 100)
    assert lit["val"][0].name == dark["val"][0].name == "train1_medium_000_raw.tif"
    np.testing.assert_array_equal(read_volume(lit["tests"][0][1]).data,
                                  read_volume(dark["tests"][0][1]).data)


def test_the_table_says_how_many_wrong_cells_the_first_rows_of_the_flags_hold(quality):
    from tests.core.test_flags import grid_tissue, merged_and_split
    from tests.core.test_segment import probabilities_from

    gt = grid_tissue()
    cp, bp = probabilities_from(gt)
    pred = merged_and_split(gt)  # one merged pair, one split cell
    row = {"stack": "grid", "predict_seconds": 1.0,
           **quality._metrics(gt, pred, {"cell": cp, "boundary": bp}, (1.0, 0.5, 0.5))}
    # the first 10 % of the rows hold the merged cell, which is not a face sliver
    assert row["flag_recall_top10pct"] > 0 and row["flag_recall_top10pct_other"] > 0
    table = quality.markdown({"default": {"rows": [row], "mean": quality.summarise([row]),
                                          "train_minutes": 1.0}}, "t")
    head, rule, first = table.splitlines()[2:5]
    assert "first 10 % of rows" in head
    assert head.count("|") == rule.count("|") == first.count("|") == 15
    cell = first.split("|")[12].strip()
    assert cell == f"{row['flag_recall_top10pct']:.2f} / {row['flag_recall_top10pct_other']:.2f}"


def test_the_default_models_card_says_what_it_was_trained_on():
    """The bundled model's card is written by its training script: a grid coarser than
    the training stacks', media from darker to brighter and the bright-medium figures
    appear in it when the model has them, and not otherwise."""
    spec = importlib.util.spec_from_file_location(
        "train_default_model", REPO / "benchmarks" / "train_default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    facts = {"size_mb": 7.1, "sha256": "ab" * 32, "levels": 4, "base_features": 8,
             "parameters": 345590, "channels": ["cell", "boundary", "tissue"],
             "voxel_size_um": [1.0, 0.45, 0.45], "stack_voxel_size_um": [1.0, 0.3, 0.3],
             "normalisation": "zscore", "n_train": 8, "epochs": 30, "iterations_per_epoch": 70,
             "patch": [36, 80, 80], "best_epoch": 30, "best_valid_loss": 0.28,
             "best_valid_ap50": 0.9, "train_minutes": 7.0, "machine": "a 2-core CPU",
             "episeg_version": "0.1.0", "torch": "2.13.0", "medium": [0.02, 0.3]}
    row = {"stack": "medium 0", "cell_iou": 0.98, "ap50": 0.95, "f1_50": 0.97,
           "adapted_rand_error": 0.05, "voi_split": 0.2, "voi_merge": 0.2, "wrong_cells": 1,
           "wrong_cells_share": 0.01, "n_gt_cells": 100, "predict_seconds": 2.0,
           "flag_precision_top10": 0.1, "flag_recall_top_n_wrong": 0.5,
           "flag_recall_top_n_other": 0.5, "flag_recall_top10pct": 0.5,
           "flag_recall_top10pct_other": 0.5}
    mean = {k: v for k, v in row.items() if k != "stack"}
    scores = {"rows": [row], "mean": mean, "train_minutes": 7.0, "celegans_cells": 50,
              "bright": {"seeds": [5009, 6009], "rows": [row], "mean": dict(mean, ap50=0.956)}}
    card = module.model_card(facts, scores, "python benchmarks/train_default_model.py")
    assert "taken to have 1 x 0.3 x 0.3 um (that of its training stacks" in card
    assert "medium and lumen from 0.02 to 0.3" in card
    assert "seeds 5009, 6009): AP50 0.956" in card
    assert "Background outside the tissue was dark" not in card
    dark = module.model_card(dict(facts, medium=None, stack_voxel_size_um=None,
                                  voxel_size_um=[1.0, 0.3, 0.3]),
                             {k: v for k, v in scores.items() if k != "bright"}, "cmd")
    assert "taken to have 1 x 0.3 x 0.3 um:" in dark
    assert "Background outside the tissue was dark" in dark and "seeds 5009" not in dark
