"""`episeg selftest`: the bundled model segments the bundled sample, and a broken
installation is told apart from a working one; `episeg predict` without --model."""

from __future__ import annotations

import torch

from core.checkpoint import load_model_file, save_model_file
from core.cli.main import main
from core.io import read_labels
from core.resources import default_model, sample_stack
from core.selftest import SAMPLE_RAW, run_selftest


def test_bundled_model_passes_the_selftest_and_writes_tiff_and_mat(tmp_path):
    assert default_model() is not None, "resources/models/default.pt must ship with EpiSeg"
    report = run_selftest(tmp_path)
    assert report.passed, report.text()
    tif = tmp_path / "synthetic_epithelium_raw_cells.tif"
    mat = tmp_path / "synthetic_epithelium_raw_cells.mat"
    assert (read_labels(tif).data == read_labels(mat).data).all()
    assert read_labels(tif).data.max() > 20  # cells, not one blob


def test_a_model_that_finds_one_blob_fails_the_selftest_and_says_why(tmp_path):
    data = load_model_file(default_model())
    for key in ("model_state_dict", "best_model_state_dict"):
        if data.get(key):  # every voxel "cell" and "tissue", no boundary: one big cell
            data[key]["head.weight"].zero_()
            bias = [4.0, -4.0, 4.0] + [-4.0] * (len(data[key]["head.bias"]) - 3)  # no wall bands
            data[key]["head.bias"].copy_(torch.tensor(bias))
    blob = save_model_file(tmp_path / "blob.pt", data)
    report = run_selftest(tmp_path / "out", model=blob)
    assert not report.passed
    failed = [(what, detail) for what, ok, detail in report.checks if not ok]
    assert [what for what, _ in failed] == ["cells match the ground truth"]
    assert "AP50" in failed[0][1]
    assert "FAILED" in report.text()


def test_selftest_names_a_missing_default_model(monkeypatch, capsys):
    monkeypatch.setattr("core.selftest.default_model", lambda: None)
    assert main(["selftest"]) == 1
    out = capsys.readouterr().out
    assert "FAIL bundled default model: resources/models/default.pt is missing" in out


def test_predict_without_model_uses_the_bundled_default(tmp_path, capsys):
    assert main(["predict", str(sample_stack(SAMPLE_RAW)), "--out", str(tmp_path),
                 "--quiet", "--no-flags"]) == 0
    assert "bundled default model" in capsys.readouterr().err
    assert read_labels(tmp_path / "synthetic_epithelium_raw_cells.tif").data.max() > 20


def test_predict_without_model_and_without_a_bundled_one_says_what_to_do(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr("core.resources.default_model", lambda: None)
    assert main(["predict", str(sample_stack(SAMPLE_RAW)), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no --model given" in err and "--model FILE" in err
