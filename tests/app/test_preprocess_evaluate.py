"""Preprocess and Evaluate tabs in the main window; settings files, recent files, persistence."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PySide6.QtCore import QSettings

from app.main_window import MainWindow
from core.io import read_labels, read_volume
from core.preprocess import read_preprocessed


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A synthetic stack, its labels, and both inside one HDF5 file (datasets to pick)."""
    from core.cli.main import main

    d = tmp_path_factory.mktemp("prep_eval")
    assert main(["synth", str(d), "--n", "1", "--shape", "16,64,64", "--seed", "9"]) == 0
    raw, lab = read_volume(str(d / "synth_000_raw.tif")), read_labels(str(d / "synth_000_labels.tif"))
    with h5py.File(d / "both.h5", "w") as f:
        f["raw"], f["label"] = raw.data, lab.data
        f["raw"].attrs["element_size_um"] = raw.voxel_size
    return d, raw, lab


def window(qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    w = MainWindow(settings=settings)
    qtbot.addWidget(w)
    return w


def test_preprocess_tab_picks_a_dataset_runs_and_shows_the_result(qtbot, stack, tmp_path):
    d, raw, lab = stack
    w = window(qtbot, tmp_path)
    tab = w.preprocess_tab
    assert tab.normalise.currentText() == "zscore" and not tab.low.isEnabled()
    tab.normalise.setCurrentText("percentile")  # the percentiles only matter there
    assert tab.low.isEnabled() and tab.high.isEnabled()
    tab.normalise.setCurrentText("zscore")
    assert not tab.high.isEnabled()
    before = (d / "both.h5").read_bytes()
    tab.raws.add([str(d / "both.h5")])
    with qtbot.waitSignal(tab.inspector.described, timeout=30000):
        tab.raws.list.setCurrentRow(0)
    assert "raw" in tab.inspector.info.entries and "label" in tab.inspector.info.entries
    assert "16x64x64" in tab.inspector.text.toPlainText()
    with qtbot.waitSignal(tab.inspector.described, timeout=30000):
        tab.inspector.entry.setCurrentText("raw")
        tab.inspector._entry_chosen(tab.inspector.entry.currentIndex())
    assert tab.raws.paths() == [f"{d / 'both.h5'}:raw"]
    assert "voxel size (z, y, x): 1 x 0.3 x 0.3" in tab.inspector.text.toPlainText().replace("um", "").strip() \
        or "1 x 0.3 x 0.3" in tab.inspector.text.toPlainText()
    tab.labels.add([f"{d / 'both.h5'}:label"])
    tab.resample.setCurrentIndex(2)
    tab.resample_values.setText("1, 0.5, 0.5")
    tab.out_dir.setText(str(tmp_path / "prepared"))
    with qtbot.waitSignal(tab.panel.stopped, timeout=60000):
        tab.panel.run_button.click()
    assert not tab.panel.last_error, tab.panel.last_error
    out = tmp_path / "prepared" / "both_raw_preprocessed.h5"
    back = read_preprocessed(out)
    assert back["raw"].shape == (16, 32, 32) and back["voxel_size_um"] == pytest.approx((1, 0.6, 0.6))
    assert (d / "both.h5").read_bytes() == before  # the input is never modified
    assert tab.result_list.count() == 1 and "cells in labels" in tab.result_list.item(0).text() \
        or "->" in tab.result_list.item(0).text()
    qtbot.waitUntil(lambda: w.viewer.labels is not None, timeout=30000)
    assert w.viewer.image.shape == (16, 32, 32) and w.viewer.labels.max() > 0
    # the preprocessed file trains directly: the Train tab takes it as one row
    w.train_tab.train_data.add_files([str(out)])
    assert w.train_tab.config().data.train[0].h5 == str(out)


def test_a_bad_file_gives_a_message_and_the_window_lives_on(qtbot, stack, tmp_path):
    d, raw, lab = stack
    w = window(qtbot, tmp_path)
    tab = w.preprocess_tab
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"this is not a TIFF file")
    tab.raws.add([str(bad)])
    tab.out_dir.setText(str(tmp_path / "p"))
    with qtbot.waitSignal(tab.panel.stopped, timeout=30000):
        tab.panel.run_button.click()
    assert str(bad) in tab.panel.last_error and tab.panel.error_box.isVisible()
    # nothing is left half-written, and the tab runs the next job
    assert not list((tmp_path / "p").glob("*.h5")) if (tmp_path / "p").exists() else True
    tab.raws.clear()
    tab.raws.add([str(d / "synth_000_raw.tif")])
    with qtbot.waitSignal(tab.panel.stopped, timeout=60000):
        tab.panel.run_button.click()
    assert tab.result_list.count() == 1 and "error" not in tab.result_list.item(0).text()


def test_evaluate_tab_tables_overlays_and_going_to_a_cell(qtbot, stack, tmp_path):
    d, raw, lab = stack
    gt = lab.data
    pred = gt.copy()
    a, b = 1, 2  # merge two cells in the "prediction"
    pred[pred == b] = a
    from core.io import write_volume
    from core.volume import Volume

    write_volume(str(tmp_path / "pred.tif"), Volume(pred, raw.voxel_size, "pred"), labels=True)
    # its flags, as episeg predict writes them beside it, from walls that show the merge
    from core.flags import cell_flags, write_flags_csv
    from tests.core.test_segment import probabilities_from

    cp, bp = probabilities_from(gt)
    write_flags_csv(tmp_path / "pred_flags.csv", cell_flags(pred, bp, cp, voxel_size=raw.voxel_size))
    w = window(qtbot, tmp_path)
    tab = w.evaluate_tab
    tab.gt.setText(str(d / "synth_000_labels.tif"))
    tab.pred.setText(str(tmp_path / "pred.tif"))
    tab.image.setText(str(d / "synth_000_raw.tif"))
    with qtbot.waitSignal(tab.panel.stopped, timeout=60000):
        tab.panel.run_button.click()
    assert not tab.panel.last_error, tab.panel.last_error
    figures = {tab.figures.item(r, 0).text(): tab.figures.item(r, 1).text()
               for r in range(tab.figures.rowCount())}
    assert figures["GT cells merged"] == "2" and figures["wrongCells"] == "1"
    # the flags beside the prediction were checked: how many wrong cells their first rows hold
    check = tab.evaluated.flags
    assert check is not None and check.n_wrong >= 1
    assert figures["flags, first 10 %"] == f"{check.recall[0.1]:.2f}"
    assert figures["flags, first 20 %"] == f"{check.recall[0.2]:.2f}"
    assert f"Flags: {check.n_wrong} of the {check.n_rows} predicted cells are wrong" in tab.panel.log.toPlainText()
    n_gt = int(figures["GT cells"])
    # the merged cell still matches the larger of the two (TP n-1, FN 1), or neither
    assert float(figures["AP50"]) in (pytest.approx((n_gt - 1) / n_gt, abs=1e-4),
                                      pytest.approx((n_gt - 2) / (n_gt + 1), abs=1e-4))
    assert tab.cells.rowCount() == n_gt
    np.testing.assert_array_equal(w.viewer.image, raw.data)
    np.testing.assert_array_equal(w.viewer.labels, pred)
    # sort by status and click the first merged cell: the viewer goes there
    col = list(tab.cells.horizontalHeaderItem(c).text() for c in range(tab.cells.columnCount()))
    rows = [r for r in range(tab.cells.rowCount())
            if tab.cells.item(r, col.index("status")).text() == "merged"]
    tab._cell_clicked(rows[0], 0)
    assert w.viewer.highlighted == a and w.viewer.labels[w.viewer.z, w.viewer.y, w.viewer.x] == a
    # where the flags ranked the merged cell
    assert tab.cells.item(rows[0], col.index("flag_rank")).data(0) == check.ranks[a]
    # ground-truth overlay: the same row now shows its GT cell
    tab.show_overlay.setCurrentText("ground truth")
    np.testing.assert_array_equal(w.viewer.labels, gt)
    tab._cell_clicked(rows[0], 0)
    gid = int(tab.cells.item(rows[0], col.index("gt_id")).data(0))
    assert gid in (a, b) and w.viewer.labels[w.viewer.z, w.viewer.y, w.viewer.x] == gid
    tab.save_tables(str(tmp_path / "cells.csv"))
    assert (tmp_path / "cells.csv").read_text().count("\n") == n_gt + 1
    assert "flag_rank" in (tmp_path / "cells.csv").read_text().splitlines()[0]
    assert '"ap50"' in (tmp_path / "cells.json").read_text()
    assert json.loads((tmp_path / "cells.json").read_text())["flags_recall_top10pct"] == check.recall[0.1]


def test_settings_files_recent_files_and_preferences_persist(qtbot, stack, tmp_path):
    d, raw, lab = stack
    w = window(qtbot, tmp_path)
    w.tabs.setCurrentWidget(w.preprocess_tab)
    w.preprocess_tab.normalise.setCurrentText("percentile")
    w.preprocess_tab.resample.setCurrentIndex(1)
    w.preprocess_tab.resample_values.setText("1, 0.6, 0.6")
    assert w.save_config(str(tmp_path / "prep.yaml"))
    # the command line reads the same file
    from core.cli.main import main

    assert main(["preprocess", "--raw", str(d / "synth_000_raw.tif"), "--out",
                 str(tmp_path / "cli.h5"), "--config", str(tmp_path / "prep.yaml"), "--quiet"]) == 0
    assert read_preprocessed(tmp_path / "cli.h5")["normalisation"]["mode"] == "percentile"
    w.tabs.setCurrentWidget(w.predict_tab)
    w.predict_tab.format.setCurrentText("mat")
    assert w.save_config(str(tmp_path / "predict.yaml"))
    assert "predict:" in (tmp_path / "predict.yaml").read_text()
    # a misspelt key: a message naming file and key, nothing changes, the window lives on
    (tmp_path / "bad.yaml").write_text("predict:\n  fromat: mat\n")
    w.predict_tab.format.setCurrentText("h5")
    assert not w.load_config(str(tmp_path / "bad.yaml"))
    assert "fromat" in w.last_error and "bad.yaml" in w.last_error
    assert w.predict_tab.format.currentText() == "h5"
    w.open_in_viewer(str(d / "synth_000_raw.tif"))
    qtbot.waitUntil(lambda: w.viewer.image is not None, timeout=30000)
    w.set_device("cpu")
    w.viewer.opacity.setValue(70)
    w.viewer.contours.setChecked(True)
    w.settings.sync()

    again = window(qtbot, tmp_path)  # a new session with the same settings file
    assert again.recent_files()[0] == str(d / "synth_000_raw.tif")
    assert [a.text() for a in again.recent_menu.actions()][0] == str(d / "synth_000_raw.tif")
    assert again.train_tab.device == "cpu" and again.predict_tab.config().device == "cpu"
    assert again.viewer.opacity.value() == 70 and again.viewer.contours.isChecked()
    assert not again.load_config(str(tmp_path / "predict.yaml"))  # Preprocess tab: wrong schema
    assert "predict" in again.last_error
    again.tabs.setCurrentWidget(again.predict_tab)
    assert again.load_config(str(tmp_path / "predict.yaml"))
    assert again.predict_tab.format.currentText() == "mat"
    again.tabs.setCurrentWidget(again.preprocess_tab)
    assert again.load_config(str(tmp_path / "prep.yaml"))
    assert again.preprocess_tab.normalise.currentText() == "percentile"
    assert again.preprocess_tab.config().resample.target_voxel_size_um == pytest.approx((1, 0.6, 0.6))


def test_examples_menu_makes_synthetic_stacks_and_opens_the_real_sample(qtbot, tmp_path):
    w = window(qtbot, tmp_path)
    job = w.make_synthetic(str(tmp_path / "synthetic"), n=2, shape=(12, 48, 48))
    with qtbot.waitSignal(job.done, timeout=60000):
        pass
    assert sorted(p.name for p in (tmp_path / "synthetic").glob("*.tif")) == [
        "synth_000_labels.tif", "synth_000_raw.tif", "synth_001_labels.tif", "synth_001_raw.tif"]
    qtbot.waitUntil(lambda: w.viewer.labels is not None, timeout=30000)
    assert w.viewer.image.shape == (12, 48, 48) and w.viewer.labels.max() > 1
    w.open_sample()
    qtbot.waitUntil(lambda: w.viewer.image is not None and w.viewer.image.shape[1] > 48,
                    timeout=30000)
    assert w.viewer.labels is None
