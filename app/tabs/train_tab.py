"""Train tab: stacks and their labels, model and budget; train in 3D with live curves.

Runs :func:`core.train.train` through the job panel. The plot shows the
smoothed training loss per iteration as it arrives, and the training and
validation loss and the validation AP50 per epoch. Cancel stops within a
batch and keeps the model of the last finished epoch; Resume continues it.
"Choose seeds and merging again" runs :func:`core.tune.tune_model` instead:
no training, the model in "Save model as" is tuned on the validation data
and written beside it as ``NAME_tuned.pt``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Optional, Tuple

import pyqtgraph as pg
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QHBoxLayout,
                               QPushButton, QSpinBox, QVBoxLayout, QWidget)

from app.job_panel import JobPanel
from app.widgets import PREPROCESSED, DataTable, PathField, form_box, vec3_field, vec3_text
from core.config import apply_overrides
from core.jobs import ProgressEvent
from core.pipeline import PredictConfig
from core.resources import default_model
from core.train import DEFAULT_TARGET, TrainConfig, train
from core.tune import tune_model


class TrainTab(QWidget):
    """Signal-free: the model file is written where the user chose (``out``).

    The form edits a :class:`TrainConfig` (``set_config`` / ``config``); settings a
    loaded YAML file holds beyond the form are kept for the run.
    """

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.base = TrainConfig()
        self.device = "auto"  # the main window's Settings > Device
        self.train_data = DataTable("Training data")
        self.val_data = DataTable("Validation data (optional: else a share of the training data)")
        self.preset = QComboBox()
        self.preset.addItems(["small", "standard"])
        self.preset.setToolTip("small: fast on a CPU; standard: 4 levels, 32 features (GPU)")
        self.target = QComboBox()
        self.target.addItems(["all_walls", "all", "both", "cells_with_gaps", "boundaries"])
        self.target.setToolTip("all_walls (default): cells, walls, tissue and a wall band per "
                               "axis; all: without the bands; both: cells and walls")
        self.loss = QComboBox()
        self.loss.addItems(["bce_dice", "dice", "bce", "weighted_bce", "weighted_bce_dice"])
        self.augment = QComboBox()
        self.augment.addItems(["default", "light", "strong", "flips", "off"])
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 100000)
        self.epochs.setValue(40)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100000)
        self.iterations.setValue(100)
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0, 100000)
        self.minutes.setDecimals(1)
        self.minutes.setSpecialValueText("no limit")
        self.minutes.setSuffix(" min")
        self.amp = QComboBox()
        self.amp.addItems(["auto", "on", "off"])
        self.amp.setToolTip("Mixed precision (auto: on with CUDA, and on a CPU that computes "
                            "bf16 in hardware; off elsewhere on the CPU. 'on' forces it even "
                            "where the CPU emulates bf16: about 35x slower there)")
        self.patch = vec3_field("automatic (from the memory); or z, y, x voxels")
        self.stack_voxel_size = vec3_field(
            "as the files record; or z, y, x um",
            "The voxel size of the training and validation stacks whose files record none "
            "(most .mat files, .npy): the microscope's. Stacks whose files record one keep "
            "theirs.")
        self.voxel_size = vec3_field(
            "automatic (from the stacks); or z, y, x um",
            "The voxel size the model trains at; stacks with another one are resampled to it, "
            "and stacks whose voxel size is known nowhere (neither in their files nor in "
            "Stacks' voxel size) are taken to have it. "
            "Empty: the first stack's; on a CPU with Y and X up to 1.5x coarser where they are "
            "far finer than Z (1 x 0.3 x 0.3 um trains at 1 x 0.45 x 0.45): more training per "
            "minute, cells still found at full resolution; a fine-tuned model keeps its own. "
            "Without any, the model has none and prediction measures cells in 1 um voxels.")
        self.init = PathField("open", "EpiSeg models (*.pt)", "optional: a model to fine-tune")
        if default_model() is not None:
            self.init.add_choice("Default model", str(default_model()),
                                 "fine-tune the bundled default model (resources/models/default.md)")
        self.out = PathField("save", "EpiSeg models (*.pt)", "where the model is saved")
        self.resume = QCheckBox("Resume the run saved in this model file")
        self.tune_button = QPushButton("Choose seeds and merging again (no training)")
        self.tune_button.setToolTip(
            "Predict the Validation data stacks with the model in 'Save model as' and keep the "
            "seeds and merging that score best on their labels, in a copy NAME_tuned.pt. Use "
            "it after annotating a whole stack: a choice made on a part held out of one stack "
            "rests on few cells.")
        self.tune_button.clicked.connect(self.tune)

        data = QHBoxLayout()
        data.addWidget(self.train_data, 3)
        data.addWidget(self.val_data, 2)
        box = form_box("Train a 3D U-Net", [
            ("Model size", self.preset), ("Target", self.target), ("Loss", self.loss),
            ("Augmentation", self.augment), ("Mixed precision", self.amp),
        ], [
            ("Epochs", self.epochs), ("Batches per epoch", self.iterations),
            ("Time budget", self.minutes), ("Patch size", self.patch),
            ("Stacks' voxel size", self.stack_voxel_size),
            ("Training voxel size", self.voxel_size),
        ])
        files = form_box("Model file", [
            ("Fine-tune", self.init), ("Save model as", self.out), ("", self.resume),
            ("", self.tune_button)])

        self.plot = pg.PlotWidget(title="loss")
        self.plot.setBackground("w")
        self.plot.addLegend(offset=(-10, 10))  # top right, clear of the falling curves
        self.plot.setLabel("bottom", "epoch")
        self.iter_curve = self.plot.plot([], [], pen=pg.mkPen((150, 150, 150), width=1),
                                         name="training (smoothed, per iteration)")
        self.train_curve = self.plot.plot([], [], pen=pg.mkPen((0, 114, 178), width=2),
                                          symbol="o", symbolSize=5, name="training")
        self.val_curve = self.plot.plot([], [], pen=pg.mkPen((213, 94, 0), width=2),
                                        symbol="o", symbolSize=5, name="validation")
        self.metric_plot = pg.PlotWidget(title="validation AP50")
        self.metric_plot.setBackground("w")
        self.metric_plot.setLabel("bottom", "epoch")
        self.ap_curve = self.metric_plot.plot([], [], pen=pg.mkPen((0, 158, 115), width=2),
                                              symbol="o", symbolSize=5)
        plots = QHBoxLayout()
        plots.addWidget(self.plot, 3)
        plots.addWidget(self.metric_plot, 2)

        self.panel = JobPanel("Train")
        self.panel.run_button.clicked.connect(self.run)
        self.panel.progress.connect(self.on_progress)
        self.panel.stopped.connect(lambda: self.tune_button.setEnabled(True))

        layout = QVBoxLayout(self)
        layout.addLayout(data, 1)
        layout.addWidget(box)
        layout.addWidget(files)
        layout.addLayout(plots, 2)
        layout.addWidget(self.panel, 1)
        self.reset_curves()

    def reset_curves(self) -> None:
        self.iters: List[float] = []
        self.iter_losses: List[float] = []
        self.epoch_train: List[float] = []
        self.epoch_val: List[float] = []
        self.epoch_ap: List[float] = []
        self.epoch_ap_x: List[float] = []   # cell metrics come every few epochs
        self.epoch_x: List[float] = []
        for c in (self.iter_curve, self.train_curve, self.val_curve, self.ap_curve):
            c.setData([], [])

    def set_config(self, cfg: TrainConfig) -> None:
        """Show a config in the form (settings the form lacks are kept for the run)."""
        self.base = copy.deepcopy(cfg)
        self.train_data.set_sources(cfg.data.train)
        self.val_data.set_sources(cfg.data.val)
        self.preset.setCurrentText(cfg.model.preset)
        self.target.setCurrentText(cfg.target or DEFAULT_TARGET)
        self.loss.setCurrentText(cfg.loss.name)
        self.augment.setCurrentText(cfg.augment.level)
        self.patch.setText(", ".join(str(v) for v in cfg.patch_size) if cfg.patch_size else "")
        self.epochs.setValue(cfg.epochs)
        self.iterations.setValue(cfg.iterations_per_epoch)
        self.minutes.setValue(cfg.max_minutes or 0)
        self.amp.setCurrentText(cfg.amp)
        self.voxel_size.setText(vec3_text(cfg.data.target_voxel_size_um))
        self.stack_voxel_size.setText(vec3_text(cfg.data.stack_voxel_size_um))

    def config(self) -> TrainConfig:
        """The form's settings on top of the loaded config (ConfigError names the field)."""
        cfg = copy.deepcopy(self.base)
        cfg.data.train, cfg.data.val = [], []
        cfg.patch_size = cfg.max_minutes = cfg.data.target_voxel_size_um = None
        cfg.data.stack_voxel_size_um = None
        return apply_overrides(cfg, {
            "data.target_voxel_size_um": self.voxel_size.text().strip() or None,
            "data.stack_voxel_size_um": self.stack_voxel_size.text().strip() or None,
            "data.train": self.train_data.sources(),
            "data.val": self.val_data.sources(),
            "model.preset": self.preset.currentText(),
            "target": None if self.init.text() else self.target.currentText(),
            "loss.name": self.loss.currentText(),
            "augment.level": self.augment.currentText(),
            "patch_size": self.patch.text().strip() or None,
            "epochs": self.epochs.value(),
            "iterations_per_epoch": self.iterations.value(),
            "max_minutes": self.minutes.value() or None,
            "amp": self.amp.currentText(),
            "device": self.device,
        }, where="Train tab")

    def problems(self) -> List[str]:
        out = []
        rows = self.train_data.rows()
        if not rows:
            out.append("Add training data: raw stacks with their label stacks, or files from "
                       "the Preprocess tab.")
        for raw, lab in rows + self.val_data.rows():
            if not lab:
                out.append(f"{raw} has no label stack: add one in its row.")
        if not self.out.text():
            out.append("Choose where to save the model.")
        if self.resume.isChecked() and self.out.text() and not Path(self.out.text()).exists():
            out.append(f"Nothing to resume: {self.out.text()} does not exist yet.")
        return out

    def run(self) -> None:
        cfg = self.panel.config_or_refuse(self.problems(), self.config)
        if cfg is None:
            return
        if not self.resume.isChecked():
            self.reset_curves()
        self.panel.start(train, config=cfg, out_path=Path(self.out.text()),
                         resume=self.resume.isChecked(), init=self.init.text() or None)

    def tune_problems(self) -> List[str]:
        out = []
        model = self.out.text()
        if not model or not Path(model).exists():
            out.append("Choose the model to tune in 'Save model as' (an existing model file).")
        rows = self.val_data.rows()
        if not rows:
            out.append("Add the annotated stacks to tune on to 'Validation data'.")
        for raw, lab in rows:
            if not lab or lab == PREPROCESSED:
                out.append(f"{raw}: tuning needs the raw stack and its label stack.")
        return out

    def tune_inputs(self) -> Tuple[List[tuple], PredictConfig]:
        """(raw, labels, own voxel size or None) per validation row, and the run's
        config with the tab's "Stacks' voxel size" (ConfigError names the field)."""
        cfg = apply_overrides(TrainConfig(), {
            "data.val": self.val_data.sources(),
            "data.stack_voxel_size_um": self.stack_voxel_size.text().strip() or None,
        }, where="Train tab")
        pairs = [(s.raw, s.labels, s.voxel_size_um) for s in cfg.data.val]
        return pairs, PredictConfig(device=self.device,
                                    input_voxel_size_um=cfg.data.stack_voxel_size_um)

    def tune(self) -> None:
        """Choose the seeds and merging of the model in 'Save model as' on the
        validation data, without training; the copy goes beside it."""
        if self.panel.is_running():
            return
        inputs = self.panel.config_or_refuse(self.tune_problems(), self.tune_inputs)
        if inputs is None:
            return
        pairs, config = inputs
        model = Path(self.out.text())
        out = model.with_name(f"{model.stem}_tuned.pt")
        n = 2
        while out.exists():  # never overwrite an earlier copy
            out = model.with_name(f"{model.stem}_tuned_{n}.pt")
            n += 1
        self.panel.append_log(f"choosing the seeds and merging of {model} on "
                              f"{len(self.val_data.rows())} annotated stack(s); writing {out}")
        self.panel.start(tune_model, model_path=model, pairs=pairs, out_path=out, config=config)
        self.tune_button.setEnabled(False)

    def on_progress(self, event: ProgressEvent) -> None:
        """Live curves: per-iteration loss (smoothed by the core) and per-epoch figures."""
        d = event.data
        if event.stage == "train" and "loss" in d:
            self.iters.append(event.done / self.iterations.value())
            self.iter_losses.append(float(d["loss"]))
            self.iter_curve.setData(self.iters, self.iter_losses)
        elif event.stage == "epoch" and "train_loss" in d:
            self.epoch_x.append(float(d["epoch"]))
            self.epoch_train.append(float(d["train_loss"]))
            self.epoch_val.append(float(d.get("val_loss", float("nan"))))
            self.train_curve.setData(self.epoch_x, self.epoch_train)
            self.val_curve.setData(self.epoch_x, self.epoch_val)
            if "ap50" in d:
                self.epoch_ap_x.append(float(d["epoch"]))
                self.epoch_ap.append(float(d["ap50"]))
                self.ap_curve.setData(self.epoch_ap_x, self.epoch_ap)
