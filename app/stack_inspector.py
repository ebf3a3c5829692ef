"""A file panel: what is inside the selected stack, and which dataset / variable to use.

Shows :func:`core.io.describe.inspect_stack` (read in the worker thread) for
one file spec; where the file holds several volumes (HDF5 datasets, .mat
variables) a combo box lets the user pick one, and ``picked(old, new)`` tells
the owner to use ``file:entry`` instead of the old spec.
"""

from __future__ import annotations

from typing import Optional

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPlainTextEdit, QVBoxLayout, QWidget

from app.worker import Job
from core.io import split_spec
from core.io.describe import StackInfo, inspect_stack


class StackInspector(QWidget):
    """Signals ``picked(old_spec, new_spec)`` and ``described(StackInfo)``."""

    picked = Signal(str, str)
    described = Signal(object)

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.spec = ""
        self.info: Optional[StackInfo] = None
        self._job: Optional[Job] = None
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setPlaceholderText("Select a file to see its shape, data type and voxel size.")
        self.entry = QComboBox()
        self.entry.setToolTip("HDF5 files and .mat files can hold several stacks: pick one.")
        self.entry.setEnabled(False)
        self.entry.activated.connect(self._entry_chosen)
        row = QHBoxLayout()
        row.addWidget(QLabel("Dataset / variable"))
        row.addWidget(self.entry, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.text, 1)

    def show_spec(self, spec: str) -> Job:
        """Describe ``spec`` (read in the worker thread)."""
        self.spec = spec
        self.text.setPlainText(f"reading {spec} ...")
        if self._job is not None and self._job.is_running():
            self._job.cancel()
        job = Job(inspect_stack, parent=self, spec=spec)
        job.finished.connect(self._show)
        job.failed.connect(lambda message: self.text.setPlainText(message))
        self._job = job
        job.start()
        return job

    def _show(self, info: StackInfo) -> None:
        if info.spec != self.spec:
            return  # an older request
        self.info = info
        text = "\n".join(info.lines)
        if info.error:
            text += ("\n\n" if text else "") + info.error
        self.text.setPlainText(text)
        path, inner = split_spec(info.spec)
        self.entry.clear()
        self.entry.addItems(info.entries)
        self.entry.setEnabled(bool(info.entries))
        if inner in info.entries:
            self.entry.setCurrentText(inner)
        else:
            self.entry.setCurrentIndex(-1)
        self.described.emit(info)

    def _entry_chosen(self, index: int) -> None:
        if index < 0 or not self.spec:
            return
        path, _ = split_spec(self.spec)
        new = f"{path}:{self.entry.itemText(index)}"
        if new != self.spec:
            old, self.spec = self.spec, new
            self.picked.emit(old, new)
            self.show_spec(new)
