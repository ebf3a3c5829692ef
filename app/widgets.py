"""Small form widgets shared by the tabs: file pickers, a file list with drag-and-drop,
and (z, y, x) text fields."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QFormLayout, QGroupBox,
                               QHBoxLayout, QHeaderView, QLabel, QLineEdit, QListWidget, QPushButton,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

#: File dialog filter for every stack format EpiSeg reads.
STACK_FILTER = ("Stacks (*.tif *.tiff *.h5 *.hdf5 *.mat *.npy *.npz);;TIFF (*.tif *.tiff);;"
                "HDF5 (*.h5 *.hdf5);;MATLAB (*.mat);;All files (*)")


class PathField(QWidget):
    """A line edit with a Browse button: a file to open, a file to save, or a folder."""

    changed = Signal(str)

    def __init__(self, mode: str = "open", file_filter: str = "All files (*)",
                 placeholder: str = "", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.mode, self.file_filter = mode, file_filter
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        self.edit.textChanged.connect(self.changed)
        browse = QPushButton("Browse...")
        browse.clicked.connect(self.browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit, 1)
        layout.addWidget(browse)

    def add_choice(self, label: str, path: str, tooltip: str = "") -> QPushButton:
        """A button after Browse that fills in ``path`` (e.g. the bundled default model)."""
        button = QPushButton(label)
        button.setToolTip(tooltip or path)
        button.clicked.connect(lambda: self.setText(path))
        self.layout().addWidget(button)
        return button

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 (Qt style)
        self.edit.setText(str(text))

    def browse(self) -> None:
        start = self.text() or str(Path.home())
        if self.mode == "folder":
            path = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        elif self.mode == "save":
            path, _ = QFileDialog.getSaveFileName(self, "Save as", start, self.file_filter)
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Open", start, self.file_filter)
        if path:
            self.setText(path)


class _DropsFiles(QWidget):
    """A widget that takes local files dropped on it: subclasses define ``add_dropped(paths)``."""

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.add_dropped([u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()])
        event.acceptProposedAction()


class FileList(_DropsFiles):
    """Several stacks: Add (file dialog), Remove, and drag-and-drop of files.

    Signals: ``changed()``, ``selected(spec)`` when the user selects an entry.
    """

    changed = Signal()
    selected = Signal(str)

    def __init__(self, title: str = "", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.title = title
        self.list = QListWidget()
        self.list.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.list.setTextElideMode(Qt.ElideLeft)  # the file name stays visible
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.list.currentTextChanged.connect(lambda t: t and self.selected.emit(t))
        self.setAcceptDrops(True)
        add = QPushButton("Add stacks...")
        add.clicked.connect(self.browse)
        remove = QPushButton("Remove")
        remove.clicked.connect(self.remove_selected)
        buttons = QHBoxLayout()
        buttons.addWidget(add)
        buttons.addWidget(remove)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        if title:
            layout.addWidget(QLabel(title))
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)

    def paths(self) -> List[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def add(self, paths) -> None:
        have = set(self.paths())
        for p in paths:
            if p and p not in have:
                self.list.addItem(str(p))
                self.list.item(self.list.count() - 1).setToolTip(str(p))
                have.add(p)
        self.changed.emit()

    def replace(self, old: str, new: str) -> None:
        """Use ``new`` where ``old`` was (e.g. 'file.h5' -> 'file.h5:raw')."""
        for i in range(self.list.count()):
            if self.list.item(i).text() == old:
                self.list.item(i).setText(new)
        self.changed.emit()

    def clear(self) -> None:
        self.list.clear()
        self.changed.emit()

    def remove_selected(self) -> None:
        for item in self.list.selectedItems():
            self.list.takeItem(self.list.row(item))
        self.changed.emit()

    def browse(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add stacks", str(Path.home()), STACK_FILTER)
        self.add(paths)

    def add_dropped(self, paths) -> None:
        self.add(paths)


def form_box(title: str, rows, *more_columns) -> QGroupBox:
    """A titled group of labelled rows: ``rows`` are (label, widget or layout) pairs;
    each of ``more_columns`` (more such lists) is a column beside the first."""
    columns = QHBoxLayout()
    for column in (rows,) + more_columns:
        form = QFormLayout()
        for label, field in column:
            form.addRow(label, field)
        columns.addLayout(form, 1)
    box = QGroupBox(title)
    box.setLayout(columns)
    return box


def vec3_text(values) -> str:
    """(z, y, x) values as a field shows them ("1, 0.3, 0.3"); "" for None."""
    return "" if values is None else ", ".join(f"{v:g}" for v in values)


def vec3_field(placeholder: str, tooltip: str = "") -> QLineEdit:
    """A text field for (z, y, x) values; the config parses and checks what is typed."""
    field = QLineEdit()
    field.setPlaceholderText(placeholder)
    field.setToolTip(tooltip)
    return field


def looks_like_labels(path: str) -> bool:
    """A file name that says 'labels' (label, labels, mask, gt, seg), for pairing dropped files."""
    stem = Path(path.split(":")[0] if not Path(path).exists() else path).stem.lower()
    return any(w in stem.replace("-", "_").split("_") for w in
               ("label", "labels", "mask", "masks", "gt", "seg", "segmentation", "cells"))


class DataTable(_DropsFiles):
    """Training or validation volumes: rows of (raw stack, label stack) or a preprocessed .h5.

    Add pairs with a file dialog (raw stacks, then their labels), preprocessed
    files from the Preprocess tab, or drop files: ``*_preprocessed.h5`` become
    preprocessed rows, names saying labels/mask/gt pair with the raw stacks in
    name order. Cells are editable (e.g. to add ``:dataset``). The third column
    holds a stack's voxel size (z, y, x) um where its file records none or is
    wrong; blank: the file's, else the tab's "Stacks' voxel size".
    """

    changed = Signal()

    def __init__(self, title: str, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["raw stack or preprocessed .h5", "label stack",
                                              "voxel size z, y, x um"])
        self.table.horizontalHeaderItem(2).setToolTip(
            "Only where the stack's file records no voxel size, or a wrong one: "
            "z, y, x in micrometres, e.g. 1, 0.3, 0.3. Blank: the file's, else "
            "\"Stacks' voxel size\".")
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.table.setTextElideMode(Qt.ElideLeft)
        self.table.setWordWrap(False)
        self.table.setMinimumHeight(110)
        self.setAcceptDrops(True)
        add = QPushButton("Add stacks + labels...")
        add.clicked.connect(self.browse_pairs)
        prep = QPushButton("Add preprocessed...")
        prep.clicked.connect(self.browse_preprocessed)
        remove = QPushButton("Remove")
        remove.clicked.connect(self.remove_selected)
        buttons = QHBoxLayout()
        for b in (add, prep, remove):
            buttons.addWidget(b)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel(title))
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)

    def _add_row(self, first: str, second: str, voxel_size_um=None) -> None:
        r = self.table.rowCount()
        self.table.insertRow(r)
        self.table.setItem(r, 0, QTableWidgetItem(first))
        self.table.setItem(r, 1, QTableWidgetItem(second))
        self.table.setItem(r, 2, QTableWidgetItem(vec3_text(voxel_size_um)))
        self.changed.emit()

    def add_pair(self, raw: str, labels: str, voxel_size_um=None) -> None:
        self._add_row(str(raw), str(labels), voxel_size_um)

    def add_preprocessed(self, h5: str, voxel_size_um=None) -> None:
        self._add_row(str(h5), PREPROCESSED, voxel_size_um)

    def add_files(self, paths) -> List[str]:
        """Pair dropped files; returns those that could not be paired (said in a tooltip)."""
        paths = sorted(str(p) for p in paths)
        prep = [p for p in paths if p.lower().endswith(("_preprocessed.h5", "_preprocessed.hdf5"))]
        rest = [p for p in paths if p not in prep]
        labels = [p for p in rest if looks_like_labels(p)]
        raws = [p for p in rest if p not in labels]
        for p in prep:
            self.add_preprocessed(p)
        for raw, lab in zip(raws, labels):
            self.add_pair(raw, lab)
        unpaired = raws[len(labels):] + labels[len(raws):]
        self.setToolTip(("Not paired: " + ", ".join(Path(p).name for p in unpaired)) if unpaired else "")
        return unpaired

    def _cells(self) -> List[Tuple[str, str, str]]:
        """Each row's three cells, stripped; rows without a first cell left out."""
        out = []
        for r in range(self.table.rowCount()):
            items = [self.table.item(r, c) for c in range(3)]
            out.append(tuple((i.text() if i else "").strip() for i in items))
        return [row for row in out if row[0]]

    def rows(self) -> List[Tuple[str, str]]:
        """(raw stack or preprocessed file, label stack) per row."""
        return [(a, b) for a, b, _ in self._cells()]

    def sources(self) -> List[dict]:
        """Rows as DataSource mappings: {"h5": ...} or {"raw": ..., "labels": ...}, with
        "voxel_size_um" where the row gives one (as typed; the config checks it)."""
        out = []
        for a, b, vs in self._cells():
            src = {"h5": a} if b == PREPROCESSED else {"raw": a, "labels": b or None}
            if vs:
                src["voxel_size_um"] = vs
            out.append(src)
        return out

    def set_sources(self, sources) -> None:
        """Show DataSource entries, each with its own voxel size if it has one."""
        self.table.setRowCount(0)
        for s in sources:
            if s.h5 is not None:
                self.add_preprocessed(s.h5, s.voxel_size_um)
            else:
                self.add_pair(s.raw, s.labels, s.voxel_size_um)

    def remove_selected(self) -> None:
        for r in sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True):
            self.table.removeRow(r)
        self.changed.emit()

    def browse_pairs(self) -> None:
        raws, _ = QFileDialog.getOpenFileNames(self, "Raw stacks", str(Path.home()), STACK_FILTER)
        if not raws:
            return
        labels, _ = QFileDialog.getOpenFileNames(
            self, f"Their label stacks ({len(raws)}, same order)", str(Path(raws[0]).parent),
            STACK_FILTER)
        for raw, lab in zip(sorted(raws), sorted(labels)):
            self.add_pair(raw, lab)

    def browse_preprocessed(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Preprocessed files", str(Path.home()),
                                                "Preprocessed (*.h5 *.hdf5)")
        for p in paths:
            self.add_preprocessed(p)

    def add_dropped(self, paths) -> None:
        self.add_files(paths)


#: What the label column says for a preprocessed file (its labels are inside).
PREPROCESSED = "(inside the preprocessed file)"
