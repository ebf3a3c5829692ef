"""Train tab: a real 3D training from the window, live curves, cancel and resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.tabs.train_tab import TrainTab
from core.checkpoint import read_model_summary


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    from core.cli.main import main

    d = tmp_path_factory.mktemp("train_tab")
    assert main(["synth", str(d), "--n", "2", "--shape", "16,64,64", "--seed", "5"]) == 0
    return [str(d / f"synth_{i:03d}_raw.tif") for i in range(2)], \
        [str(d / f"synth_{i:03d}_labels.tif") for i in range(2)], d


def setup_tab(qtbot, stacks, out):
    raws, labels, _ = stacks
    tab = TrainTab()
    qtbot.addWidget(tab)
    assert tab.train_data.add_files(labels + raws) == []  # paired by their names
    assert tab.train_data.rows() == list(zip(raws, labels))
    tab.out.setText(str(out))
    tab.epochs.setValue(2)
    tab.iterations.setValue(3)
    return tab


def test_training_from_the_tab_draws_live_curves_and_writes_the_model(qtbot, stacks):
    out = stacks[2] / "model.pt"
    tab = setup_tab(qtbot, stacks, out)
    with qtbot.waitSignal(tab.panel.stopped, timeout=180000):
        tab.panel.run_button.click()
    assert not tab.panel.last_error, tab.panel.last_error
    assert out.exists() and read_model_summary(out)["epochs"] == 2
    assert tab.epoch_x == [1.0, 2.0] and len(tab.epoch_val) == 2
    assert len(tab.iter_losses) == 6  # one point per batch, as they come
    assert tab.train_curve.getData()[1].tolist() == pytest.approx(tab.epoch_train)
    # resume: two more epochs on the same file, the curves go on
    tab.epochs.setValue(4)
    tab.resume.setChecked(True)
    with qtbot.waitSignal(tab.panel.stopped, timeout=180000):
        tab.panel.run_button.click()
    assert read_model_summary(out)["epochs"] == 4
    assert tab.epoch_x[-1] == 4.0


def test_cancel_mid_training_keeps_a_model_and_the_tab_lives_on(qtbot, stacks):
    out = stacks[2] / "cancelled.pt"
    tab = setup_tab(qtbot, stacks, out)
    tab.epochs.setValue(1000)
    tab.iterations.setValue(2)
    with qtbot.waitSignal(tab.panel.progress, timeout=120000,
                          check_params_cb=lambda e: e.stage == "epoch"):
        tab.panel.run_button.click()
    with qtbot.waitSignal(tab.panel.stopped, timeout=30000):
        tab.panel.cancel_button.click()
    assert tab.panel.status.text() == "cancelled"
    assert out.exists() and read_model_summary(out)["epochs"] >= 1
    assert tab.panel.run_button.isEnabled()


def test_missing_labels_and_bad_settings_are_explained_before_anything_runs(qtbot, stacks):
    tab = setup_tab(qtbot, stacks, Path(stacks[2]) / "x.pt")
    tab.train_data.table.item(0, 1).setText("")
    tab.panel.run_button.click()
    assert "has no label stack" in tab.panel.last_error and stacks[0][0] in tab.panel.last_error
    assert not tab.panel.is_running()
    tab.train_data.table.item(0, 1).setText(stacks[1][0])
    tab.patch.setText("16, 64")
    tab.panel.run_button.click()
    assert "patch_size" in tab.panel.last_error and not tab.panel.is_running()


def test_settings_round_trip_through_a_config(qtbot, stacks, tmp_path):
    from core.config import save_yaml
    from core.train import load_train_config

    tab = setup_tab(qtbot, stacks, tmp_path / "m.pt")
    tab.val_data.add_pair(stacks[0][1], stacks[1][1])
    tab.loss.setCurrentText("dice")
    tab.patch.setText("8, 32, 32")
    tab.voxel_size.setText("1, 0.3, 0.3")
    tab.stack_voxel_size.setText("1, 0.2, 0.2")
    cfg = tab.config()
    cfg.optimizer.lr = 0.001  # not on the form: kept through the tab
    save_yaml(tmp_path / "t.yaml", cfg)
    other = TrainTab()
    qtbot.addWidget(other)
    other.set_config(load_train_config(tmp_path / "t.yaml"))
    assert other.train_data.rows() == tab.train_data.rows()
    assert other.val_data.sources() == [{"raw": stacks[0][1], "labels": stacks[1][1]}]
    assert other.loss.currentText() == "dice" and other.patch.text() == "8, 32, 32"
    assert other.voxel_size.text() == "1, 0.3, 0.3"
    assert other.config().data.target_voxel_size_um == (1.0, 0.3, 0.3)
    assert other.stack_voxel_size.text() == "1, 0.2, 0.2"
    assert other.config().data.stack_voxel_size_um == (1.0, 0.2, 0.2)
    assert other.config().optimizer.lr == 0.001


def test_default_model_button_fills_in_the_bundled_model_to_fine_tune(qtbot):
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QPushButton

    from core.resources import default_model

    tab = TrainTab()
    qtbot.addWidget(tab)
    assert tab.init.text() == ""  # training from scratch unless the user chooses
    button = next(b for b in tab.init.findChildren(QPushButton) if b.text() == "Default model")
    qtbot.mouseClick(button, Qt.LeftButton)
    assert tab.init.text() == str(default_model())


def test_the_ap50_curve_puts_each_point_at_its_own_epoch(qtbot):
    """Cell metrics come every few epochs: each AP50 point stays at the epoch it was measured."""
    from core.jobs import ProgressEvent

    tab = TrainTab()
    qtbot.addWidget(tab)
    for epoch, extra in ((1, {"ap50": 0.5}), (2, {}), (3, {}), (4, {}), (5, {"ap50": 0.8})):
        tab.on_progress(ProgressEvent("epoch", epoch, 5, data={"epoch": epoch, "train_loss": 1.0 / epoch,
                                                                 "val_loss": 1.1 / epoch, **extra}))
    x, y = tab.ap_curve.getData()
    assert list(x) == [1.0, 5.0] and list(y) == [0.5, 0.8]
    assert len(tab.val_curve.getData()[0]) == 5


def test_stacks_without_voxel_size_train_at_the_one_typed_in(qtbot, stacks):
    """.npy stacks (like .mat) record no voxel size: without one typed in, the run warns
    that the model will have none; a training voxel size is the model's; the stacks' own
    voxel size (the microscope's) lets a CPU run choose its grid from it, and the model
    remembers it for stacks that record none."""
    import numpy as np

    from core.io import read_volume

    raws, labels, d = stacks
    bare = []
    for i, (r, l) in enumerate(zip(raws, labels)):
        for path, name in ((r, "raw"), (l, "labels")):
            np.save(d / f"bare_{i}_{name}.npy", read_volume(path).data)
        bare.append((str(d / f"bare_{i}_raw.npy"), str(d / f"bare_{i}_labels.npy")))
    cases = (("", "", "", None, None), ("0.5, 0.2, 0.2", "", "", [0.5, 0.2, 0.2], None),
             ("", "1, 0.3, 0.3", "", [1.0, 0.45, 0.45], [1.0, 0.3, 0.3]),
             ("", "", "1, 0.3, 0.3", [1.0, 0.45, 0.45], [1.0, 0.3, 0.3]))
    for typed, stacks_typed, row_typed, expected, expected_stacks in cases:
        tab = TrainTab()
        qtbot.addWidget(tab)
        for r, l in bare:
            tab.train_data.add_pair(r, l)
            tab.train_data.table.item(tab.train_data.table.rowCount() - 1, 2).setText(row_typed)
        out = d / f"bare_{bool(typed)}_{bool(stacks_typed)}_{bool(row_typed)}.pt"
        tab.out.setText(str(out))
        tab.epochs.setValue(1)
        tab.iterations.setValue(2)
        tab.patch.setText("8, 32, 32")
        tab.voxel_size.setText(typed)
        tab.stack_voxel_size.setText(stacks_typed)
        tab.device = "cpu"
        with qtbot.waitSignal(tab.panel.stopped, timeout=180000):
            tab.panel.run_button.click()
        assert not tab.panel.last_error, tab.panel.last_error
        summary = read_model_summary(out)
        if expected is None:
            assert summary["voxel_size_um"] is None
        else:
            assert summary["voxel_size_um"] == pytest.approx(expected)
        assert summary["stack_voxel_size_um"] == expected_stacks
        warned = "no training stack records a voxel size" in tab.panel.log.toPlainText()
        assert warned == (not typed and not stacks_typed and not row_typed)


def test_each_stacks_own_voxel_size_survives_the_tab(qtbot, tmp_path):
    """A config that gives one stack its own voxel size shows it in that stack's row and
    runs with it; a wrong one typed there is refused with the row's key named."""
    from core.config import ConfigError, save_yaml
    from core.train import DataSource, TrainConfig, load_train_config

    cfg = TrainConfig()
    cfg.data.train = [DataSource(raw="a.tif", labels="a_labels.tif", voxel_size_um=(2.0, 0.5, 0.5)),
                      DataSource(raw="b.tif", labels="b_labels.tif")]
    cfg.data.val = [DataSource(h5="c_preprocessed.h5", voxel_size_um=(1.0, 0.25, 0.25))]
    save_yaml(tmp_path / "t.yaml", cfg)
    tab = TrainTab()
    qtbot.addWidget(tab)
    tab.set_config(load_train_config(tmp_path / "t.yaml"))
    assert tab.train_data.table.item(0, 2).text() == "2, 0.5, 0.5"
    assert tab.train_data.table.item(1, 2).text() == ""
    got = tab.config()
    assert [s.voxel_size_um for s in got.data.train] == [(2.0, 0.5, 0.5), None]
    assert Path(got.data.val[0].h5).name == "c_preprocessed.h5"
    assert got.data.val[0].voxel_size_um == (1.0, 0.25, 0.25)
    tab.train_data.table.item(1, 2).setText("1, 0.3")
    with pytest.raises(ConfigError, match=r"data\.train\[1\]\.voxel_size_um"):
        tab.config()
    # choosing seeds and merging again measures each validation stack in its own size,
    # and stacks whose files record none in the tab's "Stacks' voxel size"
    tab.stack_voxel_size.setText("1, 0.3, 0.3")
    pairs, config = tab.tune_inputs()
    assert [p[2] for p in pairs] == [(1.0, 0.25, 0.25)]
    assert config.input_voxel_size_um == (1.0, 0.3, 0.3)


def test_seeds_and_merging_chosen_again_on_the_validation_data_without_training(qtbot, stacks):
    from core.resources import default_model

    raws, labels, d = stacks
    model = d / "to_tune.pt"
    model.write_bytes(default_model().read_bytes())
    tab = TrainTab()
    qtbot.addWidget(tab)
    tab.out.setText(str(model))
    tab.tune_button.click()  # no annotated stacks yet: explained, nothing runs
    assert "Validation data" in tab.panel.last_error and not tab.panel.is_running()
    assert tab.val_data.add_files([labels[1], raws[1]]) == []
    with qtbot.waitSignal(tab.panel.stopped, timeout=180000):
        tab.tune_button.click()
        assert not tab.tune_button.isEnabled() and not tab.panel.run_button.isEnabled()
    tuned = d / "to_tune_tuned.pt"
    assert tuned.exists() and model.read_bytes() == default_model().read_bytes()
    choice = read_model_summary(tuned)["segment_choice"]
    assert choice["tuned_on"] == [raws[1]] and choice["settings_tried"] > 20
    assert str(tuned) in tab.panel.log.toPlainText()
    assert "post-processing" in tab.panel.log.toPlainText()
    assert tab.tune_button.isEnabled() and tab.panel.run_button.isEnabled()
