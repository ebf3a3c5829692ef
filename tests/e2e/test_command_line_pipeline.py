"""The lab's whole path on the command line: synth -> train -> predict -> evaluate.

Tiny stacks and a few training iterations: this checks that the commands fit
together and write what a user opens next (Fiji TIFF, MATLAB .mat, HDF5), not
accuracy (benchmarks/quality.py measures that).
"""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import scipy.io

from core.cli.main import main
from core.io import read_labels, read_volume

SHAPE = "12,64,64"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic stacks and a model trained for a few iterations by the CLI."""
    d = tmp_path_factory.mktemp("cli")
    assert main(["synth", str(d / "data"), "--n", "3", "--shape", SHAPE, "--seed", "4",
                 "--quiet"]) == 0
    raw = [d / "data" / f"synth_{i:03d}_raw.tif" for i in range(3)]
    lab = [d / "data" / f"synth_{i:03d}_labels.tif" for i in range(3)]
    assert main(["train", "--pair", str(raw[0]), str(lab[0]), "--val-pair", str(raw[1]),
                 str(lab[1]), "--out", str(d / "model.pt"), "--epochs", "1", "--iterations",
                 "3", "--patch-size", "8,32,32", "--quiet"]) == 0
    return d, raw, lab


@pytest.mark.parametrize("fmt", ["tif", "mat", "h5"])
def test_predict_writes_cells_named_after_the_input_in_each_format(run, fmt, capsys):
    d, raw, lab = run
    out = d / f"out_{fmt}"
    assert main(["predict", "--model", str(d / "model.pt"), "--out", str(out), "--format", fmt,
                 "--save-probabilities", "--quiet", str(raw[2])]) == 0
    cells = out / f"synth_002_raw_cells.{fmt}"
    assert cells.exists()
    labels = read_labels(str(cells))
    original = read_volume(str(raw[2]))
    assert labels.shape == original.shape
    assert labels.voxel_size == pytest.approx(original.voxel_size)
    assert labels.data.dtype.kind == "u"
    ids = np.unique(labels.data)
    assert np.array_equal(ids, np.arange(len(ids)))  # 0 background, cells 1..n
    for name in ("cell", "boundary"):
        prob = read_volume(str(out / f"synth_002_raw_{name}_probability.{fmt}"))
        assert prob.shape == original.shape and prob.data.max() <= 255
    if fmt == "mat":  # MATLAB sees I(row=y, col=x, slice=z)
        m = scipy.io.loadmat(cells)
        assert m["labels"].shape == (original.shape[1], original.shape[2], original.shape[0])
    if fmt == "h5":
        with h5py.File(cells, "r") as f:
            assert "element_size_um" in f[list(f.keys())[0]].attrs
    assert "cells" in capsys.readouterr().out
    # the cells to check first, ranked, one row per cell of the label stack
    with open(out / "synth_002_raw_cells_flags.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["cell_id"]) for r in rows) == list(range(1, len(ids)))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_no_flags_writes_no_flag_file(run):
    d, raw, lab = run
    out = d / "out_noflags"
    assert main(["predict", "--model", str(d / "model.pt"), "--out", str(out), "--no-flags",
                 "--quiet", str(raw[2])]) == 0
    assert (out / "synth_002_raw_cells.tif").exists()
    assert not (out / "synth_002_raw_cells_flags.csv").exists()


def test_evaluate_scores_the_prediction_against_ground_truth(run):
    d, raw, lab = run
    out = d / "out_eval"
    assert main(["predict", "--model", str(d / "model.pt"), "--out", str(out), "--quiet",
                 str(raw[2])]) == 0
    report = d / "metrics.json"
    assert main(["evaluate", str(lab[2]), str(out / "synth_002_raw_cells.tif"), "--json",
                 str(report), "--quiet"]) == 0
    figures = json.loads(report.read_text())
    for key in ("cell_iou", "ap50", "adapted_rand_error", "voi_split", "voi_merge",
                "wrong_cells"):
        assert key in figures
    # predict wrote the flags beside the cells: evaluate checked them
    assert figures["flags_csv"].endswith("synth_002_raw_cells_flags.csv")
    assert "flags_recall_top10pct" in figures


def test_input_with_another_voxel_size_comes_back_on_its_own_grid(run, tmp_path):
    d, raw, lab = run
    vol = read_volume(str(raw[2]))
    from core.io import write_volume
    from core.volume import Volume
    coarse = Volume(vol.data[:, ::2, ::2], (vol.voxel_size[0], vol.voxel_size[1] * 2,
                                              vol.voxel_size[2] * 2), "coarse")
    src = tmp_path / "coarse.tif"
    write_volume(src, coarse)
    assert main(["predict", "--model", str(d / "model.pt"), "--out", str(tmp_path), "--quiet",
                 str(src)]) == 0
    labels = read_labels(str(tmp_path / "coarse_cells.tif"))
    assert labels.shape == coarse.shape
    assert labels.voxel_size == pytest.approx(coarse.voxel_size)


def test_a_stack_without_voxel_size_is_resampled_from_the_one_given(run, tmp_path, capsys):
    """A .npy records no voxel size: without --voxel-size that of the model's training
    stacks is assumed (and said), though the model trains on a coarser grid; with it,
    the stack is resampled to the model's grid and keeps its own."""
    d, raw, lab = run
    vol = read_volume(str(raw[2]))
    src = tmp_path / "coarse.npy"
    np.save(src, vol.data[:, ::2, ::2])
    assert main(["predict", "--model", str(d / "model.pt"), "--out", str(tmp_path / "a"),
                 str(src)]) == 0
    said = capsys.readouterr().err  # log lines go to stderr, above the progress bars
    assert "no voxel size recorded; assuming that of the model's training stacks, " \
        "(1.0, 0.3, 0.3) um" in said and "--voxel-size" in said
    assert "to the model's (1.0, 0.45, 0.45) um" in said  # its grid (core.preprocess)
    assert read_labels(str(tmp_path / "a" / "coarse_cells.tif")).shape \
        == vol.data[:, ::2, ::2].shape
    assert main(["predict", "--model", str(d / "model.pt"), "--out", str(tmp_path / "b"),
                 "--voxel-size", "1,0.6,0.6", str(src)]) == 0
    assert "resampling from voxel size (1.0, 0.6, 0.6) um" in capsys.readouterr().err
    labels = read_labels(str(tmp_path / "b" / "coarse_cells.tif"))
    assert labels.shape == (vol.shape[0], vol.shape[1] // 2, vol.shape[2] // 2)
    assert labels.voxel_size == pytest.approx((1.0, 0.6, 0.6))


def test_no_voxel_size_anywhere_is_said_with_what_to_do(run):
    from dataclasses import replace

    from core.checkpoint import load_model_for_inference
    from core.pipeline import segment_stack
    from core.volume import Volume

    d, raw, lab = run
    model, info = load_model_for_inference(d / "model.pt", "cpu")
    said = []
    segment_stack(Volume(read_volume(str(raw[2])).data, None, "bare"), model,
                  replace(info, voxel_size_um=None, stack_voxel_size_um=None),
                  progress=lambda e: said.append(e.message or ""))
    text = " ".join(said)
    assert "neither the stack nor the model records a voxel size" in text
    assert "1 um" in text and "--voxel-size" in text and "Voxel size" in text


def test_a_bad_input_among_many_is_reported_and_the_others_are_done(run, tmp_path, capsys):
    d, raw, lab = run
    code = main(["predict", "--model", str(d / "model.pt"), "--out", str(tmp_path), "--quiet",
                 str(tmp_path / "missing.tif"), str(raw[2])])
    assert code == 2
    assert (tmp_path / "synth_002_raw_cells.tif").exists()
    assert "missing.tif" in capsys.readouterr().err


def test_a_file_that_is_not_a_model_is_refused_clearly(run, tmp_path, capsys):
    d, raw, lab = run
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not a model at all")
    assert main(["predict", "--model", str(fake), "--out", str(tmp_path), str(raw[2])]) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and "Traceback" not in err


def test_the_example_predict_config_shows_the_defaults():
    from pathlib import Path

    from core.config import from_dict, load_yaml, to_dict
    from core.pipeline import PredictConfig

    example = Path(__file__).resolve().parents[2] / "resources" / "configs" / "predict.yaml"
    assert to_dict(load_yaml(example, PredictConfig, section="predict")) == to_dict(
        from_dict(PredictConfig, {}))
