"""Preprocess tab: raw stacks and their labels -> one HDF5 per volume, ready for training.

Runs :func:`core.preprocess_files.preprocess_files` through the job panel.
Selecting a file shows what is inside it (shape, dtype, voxel size) and, for
HDF5 / .mat files, lets the user pick the dataset or variable. Each written
file appears in the results list; selecting it shows the preprocessed image
with its labels in the viewer. The form edits a :class:`PreprocessConfig`:
settings a loaded YAML file holds beyond the form are kept.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Optional

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel,
                               QLineEdit, QListWidget, QVBoxLayout, QWidget)

from app.job_panel import JobPanel
from app.stack_inspector import StackInspector
from app.widgets import FileList, PathField, form_box, vec3_field, vec3_text
from core.config import apply_overrides
from core.preprocess import PreprocessConfig
from core.preprocess_files import PreprocessedFile, preprocess_files

RESAMPLE_CHOICES = ("keep the voxel size", "to a voxel size (um)", "by zoom factors")


class PreprocessTab(QWidget):
    """Signal ``show_result(image_spec, labels_spec)``: the main window shows them."""

    show_result = Signal(str, str)

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.base = PreprocessConfig()
        self.results: List[PreprocessedFile] = []
        self.raws = FileList("Raw stacks")
        self.labels = FileList("Label stacks (optional; same order)")
        self.inspector = StackInspector()
        self._inspected_list: Optional[FileList] = None
        for lst in (self.raws, self.labels):
            lst.selected.connect(lambda spec, lst=lst: self._inspect(lst, spec))
        self.inspector.picked.connect(
            lambda old, new: self._inspected_list and self._inspected_list.replace(old, new))

        self.resample = QComboBox()
        self.resample.addItems(RESAMPLE_CHOICES)
        self.resample_values = QLineEdit()
        self.resample_values.setPlaceholderText("z, y, x  e.g. 1, 0.5, 0.5")
        self.resample.currentIndexChanged.connect(
            lambda i: self.resample_values.setEnabled(i > 0))
        self.resample_values.setEnabled(False)
        resample = QHBoxLayout()
        resample.addWidget(self.resample)
        resample.addWidget(self.resample_values, 1)
        self.input_voxel = vec3_field("z, y, x um; only when the file records none")
        self.anti_aliasing = QCheckBox("Smooth before shrinking (anti-aliasing)")
        self.normalise = QComboBox()
        self.normalise.addItems(["zscore", "robust", "percentile", "none"])
        self.normalise.setToolTip("zscore: (x - mean) / std per stack (thesis, default); "
                                  "robust: (x - median) / (1.4826 MAD), unchanged by a bright "
                                  "spot; percentile: (x - low) / (high - low)")
        self.low, self.high = QDoubleSpinBox(), QDoubleSpinBox()
        for box in (self.low, self.high):
            box.setRange(0, 100)
            box.setDecimals(2)
        pct = QHBoxLayout()
        pct.addWidget(QLabel("low"))
        pct.addWidget(self.low)
        pct.addWidget(QLabel("high"))
        pct.addWidget(self.high)
        pct.addStretch(1)
        self.normalise.currentTextChanged.connect(self._percentiles_apply)
        self._percentiles_apply(self.normalise.currentText())
        self.gaps = QCheckBox("Cells separated by gaps (thesis target)")
        self.boundaries = QCheckBox("Cell boundaries (PlantSeg target)")
        self.out_dir = PathField("folder", placeholder="folder for the preprocessed .h5 files")

        files = QHBoxLayout()
        files.addWidget(self.raws)
        files.addWidget(self.labels)
        form = form_box("Preprocess stacks for training", [
            ("Resample", resample), ("Input voxel size", self.input_voxel),
            ("", self.anti_aliasing), ("Normalise", self.normalise), ("Percentiles", pct),
            ("Targets", self.gaps), ("", self.boundaries), ("Output folder", self.out_dir)])

        self.panel = JobPanel("Preprocess")
        self.panel.run_button.clicked.connect(self.run)
        self.panel.finished.connect(self._finished)
        self.result_list = QListWidget()
        self.result_list.currentRowChanged.connect(self._select_result)

        top = QHBoxLayout()
        top.addLayout(files, 3)
        top.addWidget(self.inspector, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(top, 2)
        layout.addWidget(form)
        layout.addWidget(self.panel, 1)
        layout.addWidget(QLabel("Written files (select one to view it)"))
        layout.addWidget(self.result_list, 1)
        self.set_config(self.base)

    # ------------------------------------------------------------- config
    def _percentiles_apply(self, mode: str) -> None:
        """The low/high percentiles matter only in percentile mode."""
        for box in (self.low, self.high):
            box.setEnabled(mode == "percentile")

    def set_config(self, cfg: PreprocessConfig) -> None:
        """Show a config in the form (settings the form lacks are kept for the run)."""
        self.base = copy.deepcopy(cfg)
        r = cfg.resample
        if r.target_voxel_size_um is not None:
            self.resample.setCurrentIndex(1)
            self.resample_values.setText(vec3_text(r.target_voxel_size_um))
        elif r.factors is not None:
            self.resample.setCurrentIndex(2)
            self.resample_values.setText(vec3_text(r.factors))
        else:
            self.resample.setCurrentIndex(0)
            self.resample_values.setText("")
        self.input_voxel.setText(vec3_text(r.input_voxel_size_um))
        self.anti_aliasing.setChecked(r.anti_aliasing)
        self.normalise.setCurrentText(cfg.normalisation.mode)
        self.low.setValue(cfg.normalisation.low)
        self.high.setValue(cfg.normalisation.high)
        self.gaps.setChecked(cfg.targets.cells_with_gaps)
        self.boundaries.setChecked(cfg.targets.boundaries)

    def config(self) -> PreprocessConfig:
        """The form's settings on top of the loaded config (ConfigError names the field)."""
        choice = self.resample.currentIndex()
        values = self.resample_values.text().strip() or None
        if choice > 0 and values is None:
            from core.errors import ConfigError
            raise ConfigError(f"Preprocess tab: resampling '{RESAMPLE_CHOICES[choice]}' needs "
                              "three numbers z, y, x (e.g. 1, 0.5, 0.5).")
        cfg = copy.deepcopy(self.base)
        cfg.resample.factors = None
        cfg.resample.target_voxel_size_um = None
        cfg.resample.input_voxel_size_um = None  # the form decides these three
        return apply_overrides(cfg, {
            "resample.target_voxel_size_um": values if choice == 1 else None,
            "resample.factors": values if choice == 2 else None,
            "resample.input_voxel_size_um": self.input_voxel.text().strip() or None,
            "resample.anti_aliasing": self.anti_aliasing.isChecked(),
            "normalisation.mode": self.normalise.currentText(),
            "normalisation.low": self.low.value(),
            "normalisation.high": self.high.value(),
            "targets.cells_with_gaps": self.gaps.isChecked(),
            "targets.boundaries": self.boundaries.isChecked(),
        }, where="Preprocess tab")

    # ------------------------------------------------------------- run
    def pairs(self):
        labels = self.labels.paths()
        return [(raw, labels[i] if i < len(labels) else None)
                for i, raw in enumerate(self.raws.paths())]

    def problems(self) -> List[str]:
        out = []
        if not self.raws.paths():
            out.append("Add at least one raw stack.")
        n_raw, n_lab = len(self.raws.paths()), len(self.labels.paths())
        if n_lab and n_lab != n_raw:
            out.append(f"{n_raw} raw stacks but {n_lab} label stacks: give one label stack per "
                       "raw stack, in the same order (or none).")
        if not self.out_dir.text():
            out.append("Choose an output folder.")
        return out

    def run(self) -> None:
        from core.errors import EpiSegError

        problems = self.problems()
        try:
            cfg = self.config()
        except EpiSegError as err:
            problems.append(str(err))
        if self.panel.refuse(problems):
            return
        self.result_list.clear()
        self.results = []
        self.panel.start(preprocess_files, pairs=self.pairs(), config=cfg,
                         out_dir=Path(self.out_dir.text()))

    def _inspect(self, lst: FileList, spec: str) -> None:
        self._inspected_list = lst
        self.inspector.show_spec(spec)

    def _finished(self, results: List[PreprocessedFile]) -> None:
        self.results = list(results)
        for r in self.results:
            name = Path(r.raw).name
            self.result_list.addItem(f"{name}: error: {r.error}" if r.error else
                                     f"{name} -> {r.output.name}: " + "; ".join(r.summary[:2]))
        if self.results:
            self.result_list.setCurrentRow(0)

    def _select_result(self, row: int) -> None:
        if 0 <= row < len(self.results) and self.results[row].output is not None:
            r = self.results[row]
            self.show_result.emit(f"{r.output}:raw", f"{r.output}:label" if r.labels else "")
