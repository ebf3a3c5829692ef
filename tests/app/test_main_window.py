"""The main window: a real prediction from the Predict tab, shown in the viewer, flags clickable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from app.main_window import MainWindow
from core.io import read_labels

#: Set EPISEG_SCREENSHOTS=docs/screenshots to refresh the README's pictures.
SCREENSHOTS = os.environ.get("EPISEG_SCREENSHOTS")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic stack and a model trained on it for a few iterations."""
    from core.cli.main import main

    d = tmp_path_factory.mktemp("gui")
    assert main(["synth", str(d / "data"), "--n", "2", "--shape", "16,96,96", "--seed", "3"]) == 0
    raw = [d / "data" / f"synth_{i:03d}_raw.tif" for i in range(2)]
    lab = [d / "data" / f"synth_{i:03d}_labels.tif" for i in range(2)]
    assert main(["train", "--pair", str(raw[0]), str(lab[0]), "--val-pair", str(raw[1]),
                 str(lab[1]), "--out", str(d / "model.pt"), "--epochs", "1", "--iterations",
                 "3", "--patch-size", "8,32,32", "--quiet"]) == 0
    # a few iterations do not find cells yet: give the head a fixed answer instead
    # ("cell", "tissue" everywhere, no boundary), so the GUI has one cell to show
    from core.checkpoint import load_model_file, save_model_file

    data = load_model_file(d / "model.pt")
    for key in ("model_state_dict", "best_model_state_dict"):
        state = data.get(key)
        if state:
            state["head.weight"].zero_()
            # cell and tissue everywhere; no boundary, no wall bands (all_walls)
            bias = [4.0, -4.0, 4.0] + [-4.0] * (len(state["head.bias"]) - 3)
            state["head.bias"].copy_(torch.tensor(bias))
    save_model_file(d / "model.pt", data)
    return d, raw, lab


def predict_from_the_tab(qtbot, model, stack, out_dir, **fields):
    """A main window whose Predict tab ran ``stack`` (text fields set by name first)."""
    w = MainWindow()
    qtbot.addWidget(w)
    tab = w.predict_tab
    tab.model.setText(str(model))
    tab.inputs.add([str(stack)])
    tab.out_dir.setText(str(out_dir))
    for name, text in fields.items():
        field = getattr(tab, name)
        if isinstance(text, bool):  # a check box
            field.setChecked(text)
        elif hasattr(field, "setCurrentText"):  # a choice
            field.setCurrentText(text)
        else:
            field.setText(text)
    with qtbot.waitSignal(tab.panel.stopped, timeout=120000):
        tab.panel.run_button.click()
    assert not tab.panel.last_error
    return w, tab


@pytest.mark.parametrize("use_it", [True, False])
def test_predict_tab_uses_the_post_processing_the_model_chose_unless_unticked(
        qtbot, trained, use_it):
    from core.checkpoint import load_model_file, save_model_file

    d, raw, lab = trained
    chose = d / "chose.pt"
    if not chose.exists():
        data = load_model_file(d / "model.pt")
        data["segment"] = {"merge_below": 0.0}
        save_model_file(chose, data)
    w, tab = predict_from_the_tab(qtbot, chose, raw[1], d / f"chose_{use_it}", model_post=use_it)
    assert tab.config().post_processing == ("model" if use_it else "shipped")
    said = "post-processing chosen when the model was trained: no merging"
    assert (said in tab.panel.log.toPlainText()) == use_it


def test_predict_tab_runs_shows_cells_and_flags(qtbot, trained):
    d, raw, lab = trained
    w, tab = predict_from_the_tab(qtbot, d / "model.pt", raw[1], d / "gui_out", format="mat")
    written = d / "gui_out" / "synth_001_raw_cells.mat"
    assert written.exists()
    assert tab.result_list.count() == 1 and "cells" in tab.result_list.item(0).text()
    # the result opens in the viewer (read in the worker thread)
    qtbot.waitUntil(lambda: w.viewer.labels is not None, timeout=30000)
    labels = read_labels(str(written)).data
    np.testing.assert_array_equal(w.viewer.labels, labels)
    assert w.viewer.image.shape == labels.shape
    assert labels.max() >= 1
    assert tab.flag_table.rowCount() == int(labels.max())
    tab._flag_clicked(0, 0)
    cell = int(tab.flag_table.item(0, 1).data(0))
    assert w.viewer.highlighted == cell and labels[w.viewer.z, w.viewer.y, w.viewer.x] == cell
    # export what the viewer shows, as .mat and .tif, voxel size kept
    for ext in ("mat", "tif"):
        job = w.export_to(str(d / f"exported.{ext}"))
        with qtbot.waitSignal(job.done, timeout=30000):
            pass
        back = read_labels(str(d / f"exported.{ext}"))
        np.testing.assert_array_equal(back.data, labels)
        assert back.voxel_size == pytest.approx((1.0, 0.3, 0.3))
    w.resize(1400, 850)
    folder = Path(SCREENSHOTS) if SCREENSHOTS else d
    folder.mkdir(parents=True, exist_ok=True)
    assert w.grab().save(str(folder / "predict.png"))


def test_the_voxel_size_typed_in_is_used_for_a_stack_that_records_none(qtbot, trained):
    """A .npy (as a .mat) records no voxel size: the Predict tab's Voxel size resamples it
    to the model's grid, and the labels come back on the stack's own grid with it."""
    d, raw, lab = trained
    stack = d / "no_voxel_size.npy"
    np.save(stack, read_labels(str(raw[1])).data[:, ::2, ::2])  # any array will do
    w, tab = predict_from_the_tab(qtbot, d / "model.pt", stack, d / "gui_voxel",
                                  voxel_size="1, 0.6, 0.6")
    assert "resampling from voxel size (1.0, 0.6, 0.6) um" in tab.panel.log.toPlainText()
    labels = read_labels(str(d / "gui_voxel" / "no_voxel_size_cells.tif"))
    assert labels.shape == (16, 48, 48)
    assert labels.voxel_size == pytest.approx((1.0, 0.6, 0.6))


def test_a_malformed_voxel_size_is_refused_and_the_window_lives_on(qtbot, trained, tmp_path):
    d, raw, lab = trained
    w = MainWindow()
    qtbot.addWidget(w)
    tab = w.predict_tab
    tab.model.setText(str(d / "model.pt"))
    tab.inputs.add([str(raw[1])])
    tab.out_dir.setText(str(tmp_path))
    tab.voxel_size.setText("1, 0.3")
    tab.panel.run_button.click()
    assert "input_voxel_size_um" in tab.panel.last_error
    assert "3 values" in tab.panel.last_error
    assert tab.panel.run_button.isEnabled() and not list(tmp_path.iterdir())


def test_a_missing_model_gives_a_message_and_the_window_lives_on(qtbot, tmp_path):
    w = MainWindow()
    qtbot.addWidget(w)
    tab = w.predict_tab
    tab.model.setText(str(tmp_path / "nope.pt"))
    tab.inputs.add([str(tmp_path / "stack.tif")])
    tab.out_dir.setText(str(tmp_path))
    tab.panel.run_button.click()
    assert "does not exist" in tab.panel.last_error
    assert tab.panel.run_button.isEnabled()


def test_a_bad_file_gives_a_dialog_message(qtbot, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    w = MainWindow()
    qtbot.addWidget(w)
    w.open_in_viewer(str(bad))
    qtbot.waitUntil(lambda: bool(w.last_error), timeout=10000)
    assert "broken.tif" in w.last_error
    assert w.isEnabled()
