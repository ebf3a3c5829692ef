"""Predict tab: a model, one or many stacks, an output folder and format; run; look.

Runs :func:`core.pipeline.predict_files` through the job panel. Each finished
stack appears in the results list; selecting it shows the stack with its cells
in the viewer and its flagged cells (the ranked ``STEM_cells_flags.csv``) in a
table: a click on a flagged cell moves the viewer to it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QLabel, QListWidget,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from app.job_panel import JobPanel
from app.widgets import FileList, PathField, form_box, vec3_field, vec3_text
from core.config import apply_overrides
from core.pipeline import FileResult, PredictConfig, predict_files
from core.resources import default_model

FLAG_COLUMNS = ("rank", "cell_id", "score", "reason", "volume_um3")


class PredictTab(QWidget):
    """Signal ``show_result(spec, labels_path)``: the main window loads them into the viewer;
    ``highlight_cell(int)``: a flagged cell was chosen."""

    show_result = Signal(str, str)
    highlight_cell = Signal(int)

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.base = PredictConfig()
        self.device = "auto"  # the main window's Settings > Device
        self.results: List[FileResult] = []
        self.model = PathField("open", "EpiSeg models (*.pt);;All files (*)",
                               "a model file written by training")
        if default_model() is not None:
            self.model.setText(str(default_model()))
        self.inputs = FileList()
        self.inputs.list.setMaximumHeight(110)
        self.out_dir = PathField("folder", placeholder="folder for the label stacks")
        self.format = QComboBox()
        self.format.addItems(["tif", "mat", "h5"])
        self.format.setToolTip("tif: Fiji / ImageJ; mat: MATLAB; h5: HDF5")
        self.voxel_size = vec3_field(
            "z, y, x um; only for stacks whose files record none",
            "The voxel size of stacks whose files record none (most .mat files, .npy, "
            "some TIFFs). Empty: that of the model's training stacks is assumed. A wrong one makes "
            "the network see cells at the wrong scale: give the microscope's.")
        self.tta = QCheckBox("Test-time augmentation (average over flips; slower)")
        self.tta.setToolTip(PredictConfig.__dataclass_fields__["tta"].metadata["help"])
        self.flags = QCheckBox("Rank the cells most likely wrong (flags)")
        self.flags.setChecked(True)
        self.probabilities = QCheckBox("Also save the probability maps")
        self.model_post = QCheckBox("Seeds and merging as the model chose them in training")
        self.model_post.setToolTip(
            PredictConfig.__dataclass_fields__["post_processing"].metadata["help"])
        self.model_post.setChecked(True)

        settings = form_box("Predict cells", [
            ("Model", self.model), ("Stacks", self.inputs), ("Output folder", self.out_dir),
            ("Format", self.format), ("Voxel size", self.voxel_size), ("", self.tta),
            ("", self.flags), ("", self.model_post),
            ("", self.probabilities)])

        self.panel = JobPanel("Predict")
        self.panel.run_button.clicked.connect(self.run)
        self.panel.finished.connect(self._finished)

        self.result_list = QListWidget()
        self.result_list.currentRowChanged.connect(self._select_result)
        self.flag_table = QTableWidget(0, len(FLAG_COLUMNS))
        self.flag_table.setHorizontalHeaderLabels(["rank", "cell", "score", "why", "volume um3"])
        self.flag_table.setSortingEnabled(True)
        self.flag_table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.flag_table.setSelectionBehavior(QTableWidget.SelectRows)
        self.flag_table.cellClicked.connect(self._flag_clicked)
        self.flag_table.horizontalHeader().setStretchLastSection(True)
        self.flag_table.setWordWrap(False)
        self.result_list.setMaximumHeight(90)
        layout = QVBoxLayout(self)
        layout.addWidget(settings)
        layout.addWidget(self.panel, 1)
        layout.addWidget(QLabel("Results (select one to view it)"))
        layout.addWidget(self.result_list)
        layout.addWidget(QLabel("Cells most likely wrong, most suspicious first (click one to "
                                "go to it)"))
        layout.addWidget(self.flag_table, 3)

    def set_config(self, cfg: PredictConfig) -> None:
        """Show a config in the form (settings the form lacks are kept for the run)."""
        self.base = copy.deepcopy(cfg)
        self.format.setCurrentText(cfg.format)
        self.tta.setChecked(cfg.tta)
        self.flags.setChecked(cfg.flags)
        self.probabilities.setChecked(cfg.save_probabilities)
        self.model_post.setChecked(cfg.post_processing == "model")
        self.voxel_size.setText(vec3_text(cfg.input_voxel_size_um))

    def config(self) -> PredictConfig:
        """The form's settings on top of the loaded config (ConfigError names the field)."""
        cfg = copy.deepcopy(self.base)
        cfg.input_voxel_size_um = None  # the form decides it
        return apply_overrides(cfg, {
            "input_voxel_size_um": self.voxel_size.text().strip() or None,
            "format": self.format.currentText(), "tta": self.tta.isChecked(),
            "flags": self.flags.isChecked(), "device": self.device,
            "save_probabilities": self.probabilities.isChecked(),
            "post_processing": "model" if self.model_post.isChecked() else "shipped"},
            where="Predict tab")

    def problems(self) -> List[str]:
        """What is missing before a run can start, in words."""
        out = []
        if not self.model.text():
            out.append("Choose a model file.")
        elif not Path(self.model.text()).exists():
            out.append(f"The model file {self.model.text()} does not exist.")
        if not self.inputs.paths():
            out.append("Add at least one stack.")
        if not self.out_dir.text():
            out.append("Choose an output folder.")
        return out

    def run(self) -> None:
        cfg = self.panel.config_or_refuse(self.problems(), self.config)
        if cfg is None:
            return
        self.result_list.clear()
        self.flag_table.setRowCount(0)
        self.results = []
        self.panel.start(predict_files, model_path=self.model.text(),
                         inputs=self.inputs.paths(), out_dir=Path(self.out_dir.text()),
                         config=cfg)

    def _finished(self, results: List[FileResult]) -> None:
        self.results = list(results)
        for r in self.results:
            text = (f"{Path(r.spec).name}: error: {r.error}" if r.error
                    else f"{Path(r.spec).name}: {r.n_cells} cells")
            self.result_list.addItem(text)
        if self.results:
            self.result_list.setCurrentRow(0)

    def _select_result(self, row: int) -> None:
        if not 0 <= row < len(self.results):
            return
        r = self.results[row]
        self._fill_flags(r.flags or [])
        if not r.error and r.outputs:
            self.show_result.emit(r.spec, str(r.outputs[0]))

    def _fill_flags(self, rows: List[Dict[str, Any]]) -> None:
        self.flag_table.setSortingEnabled(False)
        self.flag_table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, key in enumerate(FLAG_COLUMNS):
                item = QTableWidgetItem()
                value = row.get(key)
                item.setData(Qt.DisplayRole, value if isinstance(value, (int, float)) else str(value))
                self.flag_table.setItem(i, j, item)
        self.flag_table.setSortingEnabled(True)
        self.flag_table.sortItems(0, Qt.AscendingOrder)  # most suspicious first
        self.flag_table.resizeColumnsToContents()  # after the sort arrow takes its room

    def _flag_clicked(self, row: int, _col: int) -> None:
        item = self.flag_table.item(row, 1)
        if item is not None:
            self.highlight_cell.emit(int(item.data(Qt.DisplayRole)))
