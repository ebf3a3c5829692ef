"""Evaluate tab: a prediction against its ground truth, figures and a per-cell table.

Runs :func:`core.evaluate_files.evaluate_files` through the job panel. The
figures fill a table (with what each means); the per-cell table (one row per
ground-truth cell, one per unmatched predicted cell) sorts by any column, and
a click on a row moves the viewer to that cell and highlights it. The overlay
shows the prediction or the ground truth (toggle), over the raw stack when one
is given. When ``episeg predict`` wrote flags beside the prediction
(``STEM_cells_flags.csv``), the figures also say how many of the wrong cells
the first rows of that CSV hold (core.flags_check), and the per-cell table
where it ranked each row's predicted cell (``flag_rank``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QHBoxLayout,
                               QLabel, QPushButton, QSplitter, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from app.job_panel import JobPanel
from app.widgets import STACK_FILTER, PathField, form_box
from core.evaluate_files import (EvaluatedFiles, evaluate_files, flag_rank, summary_line,
                                 write_cells_csv, write_figures_json)
from core.io import split_spec
from core.metrics import CELL_COLUMNS

#: (key of EvaluationResult.to_dict(), label, what it means)
FIGURES = (
    ("cell_iou", "cell IoU", "cell voxels in both / in either (the thesis' figure)"),
    ("ap50", "AP50", "cells matched one-to-one at IoU >= 0.5: TP / (TP + FP + FN)"),
    ("f1_50", "F1", "harmonic mean of precision and recall of the matched cells"),
    ("adapted_rand_error", "adapted Rand error", "0 = perfect; merges and splits raise it"),
    ("voi_split", "VOI split", "bits; > 0 when cells are cut into pieces"),
    ("voi_merge", "VOI merge", "bits; > 0 when cells are lumped together"),
    ("wrong_cells", "wrongCells", "|GT cells - predicted cells| (thesis' definition)"),
    ("n_gt_cells", "GT cells", "cells in the ground truth"),
    ("n_pred_cells", "predicted cells", "cells in the prediction"),
    ("n_split", "GT cells split", "covered by two or more predicted cells"),
    ("n_merged", "GT cells merged", "share their predicted cell with another GT cell"),
    ("n_missed", "GT cells missed", "no predicted cell covers them"),
    ("n_false_positive", "false positives", "predicted cells matched to no GT cell"),
    ("mean_matched_iou", "mean matched IoU", "IoU of the matched cells, averaged"),
)
OVERLAYS = ("prediction", "ground truth")
#: Per-cell table columns, in the order shown: all of core.metrics.CELL_COLUMNS, and
#: where the prediction's flags ranked the row's predicted cell (empty without flags).
SHOWN_COLUMNS = ("gt_id", "status", "iou", "pred_id", "flag_rank", "gt_size", "pred_size",
                 "overlap", "n_covering", "matched", "split", "merged")
assert sorted(set(SHOWN_COLUMNS) - {"flag_rank"}) == sorted(CELL_COLUMNS)


class EvaluateTab(QWidget):
    """Signals: ``show_arrays(image, labels, voxel_size)``, ``overlay(labels)`` (toggle),
    ``highlight_cell(int)`` (an id of the labels shown)."""

    show_arrays = Signal(object, object, object)
    overlay = Signal(object)
    highlight_cell = Signal(int)

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.evaluated: Optional[EvaluatedFiles] = None
        self.gt = PathField("open", STACK_FILTER, "ground-truth label stack")
        self.pred = PathField("open", STACK_FILTER, "predicted label stack (same shape)")
        self.image = PathField("open", STACK_FILTER, "optional: the raw stack, to look at")
        self.iou = QDoubleSpinBox()
        self.iou.setRange(0.05, 1.0)
        self.iou.setSingleStep(0.05)
        self.iou.setValue(0.5)
        self.iou.setToolTip("IoU a GT cell and a predicted cell need to count as the same cell")
        self.components = QCheckBox("Also count connected pieces (slow on large stacks)")
        form = form_box("Evaluate a segmentation", [
            ("Ground truth", self.gt), ("Prediction", self.pred), ("Raw stack", self.image),
            ("Match at IoU", self.iou), ("", self.components)])

        self.panel = JobPanel("Evaluate")
        self.panel.log.setMaximumHeight(90)  # one summary line: room for the tables
        self.panel.run_button.clicked.connect(self.run)
        self.panel.finished.connect(self._finished)

        self.figures = QTableWidget(0, 3)
        self.figures.setHorizontalHeaderLabels(["figure", "value", "meaning"])
        self.figures.setEditTriggers(QTableWidget.NoEditTriggers)
        self.figures.horizontalHeader().setStretchLastSection(True)
        self.cells = QTableWidget(0, len(SHOWN_COLUMNS))
        self.cells.setHorizontalHeaderLabels(list(SHOWN_COLUMNS))
        self.cells.setSortingEnabled(True)
        self.cells.setEditTriggers(QTableWidget.NoEditTriggers)
        self.cells.setSelectionBehavior(QTableWidget.SelectRows)
        self.cells.cellClicked.connect(self._cell_clicked)
        self.show_overlay = QComboBox()
        self.show_overlay.addItems(OVERLAYS)
        self.show_overlay.currentIndexChanged.connect(self._overlay_changed)
        self.save_button = QPushButton("Save tables...")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self.choose_save)
        row = QHBoxLayout()
        row.addWidget(QLabel("Overlay"))
        row.addWidget(self.show_overlay)
        row.addStretch(1)
        row.addWidget(self.save_button)
        cells = QWidget()
        cells_layout = QVBoxLayout(cells)
        cells_layout.setContentsMargins(0, 0, 0, 0)
        cells_layout.addWidget(QLabel("Per cell (click a row to go to the cell; click a heading "
                                      "to sort)"))
        cells_layout.addWidget(self.cells)
        tables = QSplitter(Qt.Vertical)
        tables.addWidget(self.figures)
        tables.addWidget(cells)

        layout = QVBoxLayout(self)
        layout.addWidget(form)
        layout.addWidget(self.panel, 1)
        layout.addLayout(row)
        layout.addWidget(tables, 4)

    def problems(self):
        out = []
        for field, what in ((self.gt, "a ground-truth label stack"), (self.pred, "a predicted label stack")):
            if not field.text():
                out.append(f"Choose {what}.")
            elif not split_spec(field.text())[0].exists():
                out.append(f"{field.text()} does not exist.")
        return out

    def run(self) -> None:
        if self.panel.refuse(self.problems()):
            return
        self.panel.start(evaluate_files, gt_spec=self.gt.text(), pred_spec=self.pred.text(),
                         image_spec=self.image.text() or None, iou_threshold=self.iou.value(),
                         components=self.components.isChecked())

    def _finished(self, ev: EvaluatedFiles) -> None:
        self.evaluated = ev
        self.panel.append_log(summary_line(ev.result))
        if ev.flags is not None:
            self.panel.append_log("Flags: " + "; ".join(ev.flags.lines()) + ".")
        elif ev.flags_note:
            self.panel.append_log(ev.flags_note)
        d = ev.result.to_dict()
        rows = [(label, f"{d.get(key):.4f}" if isinstance(d.get(key), float) else str(d.get(key)),
                 meaning) for key, label, meaning in FIGURES]
        if ev.flags is not None and ev.flags.n_wrong:
            for share, recall in sorted(ev.flags.recall.items()):
                rows.append((f"flags, first {100 * share:g} %", f"{recall:.2f}",
                             f"share of the {ev.flags.n_wrong} wrong cells in the first "
                             f"{ev.flags.rows_checked[share]} rows of {ev.flags.path.name}"))
        self.figures.setRowCount(len(rows))
        for i, texts in enumerate(rows):
            for j, t in enumerate(texts):
                self.figures.setItem(i, j, QTableWidgetItem(t))
        self.figures.resizeColumnsToContents()
        self.cells.setSortingEnabled(False)
        self.cells.setRowCount(len(ev.result.cells))
        ranks = ev.flags.ranks if ev.flags is not None else None
        for i, row in enumerate(ev.result.cells):
            for j, key in enumerate(SHOWN_COLUMNS):
                value = flag_rank(row, ranks) if key == "flag_rank" else row.get(key)
                item = QTableWidgetItem()
                if isinstance(value, (bool, np.bool_)):
                    item.setData(Qt.DisplayRole, "yes" if value else "")
                elif isinstance(value, (int, float, np.integer, np.floating)):
                    item.setData(Qt.DisplayRole, round(float(value), 4) if isinstance(
                        value, (float, np.floating)) else int(value))
                else:
                    item.setData(Qt.DisplayRole, "" if value is None else str(value))
                self.cells.setItem(i, j, item)
        self.cells.setSortingEnabled(True)
        self.cells.sortItems(SHOWN_COLUMNS.index("iou"), Qt.AscendingOrder)  # worst cells first
        self.save_button.setEnabled(True)
        image = ev.image.data if ev.image is not None else (np.asarray(ev.gt.data) > 0).astype(np.uint8)
        voxel = (ev.image.voxel_size if ev.image is not None and ev.image.voxel_size
                 else ev.gt.voxel_size or ev.pred.voxel_size)
        self.show_arrays.emit(image, self.shown_labels(), voxel)

    def shown_labels(self):
        if self.evaluated is None:
            return None
        ev = self.evaluated
        return ev.gt.data if self.show_overlay.currentText() == "ground truth" else ev.pred.data

    def _overlay_changed(self, _index: int) -> None:
        if self.evaluated is not None:
            self.overlay.emit(self.shown_labels())

    def _cell_clicked(self, row: int, _col: int) -> None:
        """Go to the cell of this row in the labels shown (GT id, or the predicted id)."""
        key = "gt_id" if self.show_overlay.currentText() == "ground truth" else "pred_id"
        item = self.cells.item(row, SHOWN_COLUMNS.index(key))
        other = self.cells.item(row, SHOWN_COLUMNS.index("pred_id" if key == "gt_id" else "gt_id"))
        for it in (item, other):
            value = it.data(Qt.DisplayRole) if it is not None else None
            if isinstance(value, int) and value > 0:
                if it is other:  # this row has no cell in the labels shown: switch overlay
                    self.show_overlay.setCurrentIndex(1 - self.show_overlay.currentIndex())
                self.highlight_cell.emit(value)
                return

    def choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the per-cell table", "cells.csv",
                                              "CSV (*.csv)")
        if path:
            self.save_tables(path)

    def save_tables(self, csv_path: str) -> None:
        """Per-cell CSV at ``csv_path`` and every figure beside it as .json."""
        if self.evaluated is None:
            return
        flags = self.evaluated.flags
        write_cells_csv(csv_path, self.evaluated.result, flags.ranks if flags is not None else None)
        write_figures_json(Path(csv_path).with_suffix(".json"), self.evaluated.result,
                           {"gt": self.gt.text(), "pred": self.pred.text(),
                            **(flags.to_dict() if flags is not None else {})})
        self.panel.append_log(f"wrote {csv_path} and {Path(csv_path).with_suffix('.json').name}")
