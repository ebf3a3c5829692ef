"""Small form widgets shared by the tabs: file pickers and a file list with drag-and-drop."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QFormLayout, QGroupBox,
                               QHBoxLayout, QLineEdit, QListWidget, QPushButton, QVBoxLayout,
                               QWidget)

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


class FileList(QWidget):
    """Several stacks: Add (file dialog), Remove, and drag-and-drop of files."""

    changed = Signal()

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.list = QListWidget()
        self.list.setSelectionMode(QAbstractItemView.ExtendedSelection)
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
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)

    def paths(self) -> List[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def add(self, paths) -> None:
        have = set(self.paths())
        for p in paths:
            if p and p not in have:
                self.list.addItem(str(p))
                have.add(p)
        self.changed.emit()

    def remove_selected(self) -> None:
        for item in self.list.selectedItems():
            self.list.takeItem(self.list.row(item))
        self.changed.emit()

    def browse(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add stacks", str(Path.home()), STACK_FILTER)
        self.add(paths)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.add([u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()])
        event.acceptProposedAction()


def set_checked(widget, value: bool) -> None:
    widget.setCheckState(Qt.Checked if value else Qt.Unchecked)


def form_box(title: str, rows) -> QGroupBox:
    """A titled group of labelled rows: ``rows`` are (label, widget or layout) pairs."""
    form = QFormLayout()
    for label, field in rows:
        form.addRow(label, field)
    box = QGroupBox(title)
    box.setLayout(form)
    return box
