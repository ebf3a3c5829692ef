"""The main window: task tabs on the left, the shared volume viewer on the right.

Menus open stacks and label stacks into the viewer (read in the worker
thread, so a large file never freezes the window); the status bar shows the
device (CPU or the GPU's name) and the memory this process uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtWidgets import (QFileDialog, QLabel, QMainWindow, QMessageBox, QSplitter,
                               QTabWidget, QWidget)

from app.tabs.predict_tab import PredictTab
from app.tabs.train_tab import TrainTab
from app.viewer import VolumeViewer
from app.widgets import STACK_FILTER
from app.worker import Job
from core import __version__
from core.volume import Volume


def load_for_view(image_spec: str, labels_spec: Optional[str] = None, *, progress=None,
                  cancel=None) -> Tuple[Volume, Optional[Volume]]:
    """Read a stack (and its labels) for the viewer; a job function (runs in the worker)."""
    from core.io import read_labels, read_volume

    image = read_volume(image_spec)
    labels = read_labels(labels_spec) if labels_spec else None
    return image, labels


def export_labels(path: str, labels, voxel_size, *, progress=None, cancel=None) -> str:
    """Write a label stack as TIFF, .mat or .h5 (by the extension), voxel size kept."""
    from core.io import write_volume

    fmt = Path(path).suffix.lower()
    vol = Volume(labels, voxel_size, Path(path).stem)
    return str(write_volume(path, vol, labels=True,
                            mat_variable="labels" if fmt == ".mat" else None))


def device_text() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}"
    except Exception:  # torch missing or broken CUDA: the CPU still works
        pass
    return f"CPU ({os.cpu_count()} cores)"


def memory_text() -> str:
    """Resident memory of this process (Linux /proc; elsewhere the peak from resource)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return f"memory {pages * os.sysconf('SC_PAGE_SIZE') / 2 ** 30:.2f} GiB"
    except (OSError, ValueError, AttributeError):
        return ""


class MainWindow(QMainWindow):
    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.setWindowTitle(f"EpiSeg {__version__}")
        self.settings = QSettings("EpiSeg", "EpiSeg")
        self.viewer = VolumeViewer()
        self.tabs = QTabWidget()
        self.train_tab = TrainTab()
        self.predict_tab = PredictTab()
        self.tabs.addTab(self.train_tab, "Train")
        self.tabs.addTab(self.predict_tab, "Predict")
        self.predict_tab.show_result.connect(self.open_in_viewer)
        self.predict_tab.highlight_cell.connect(lambda c: self.viewer.highlight(c))
        splitter = QSplitter(Qt.Horizontal)
        splitter.addWidget(self.tabs)
        splitter.addWidget(self.viewer)
        splitter.setStretchFactor(0, 2)
        splitter.setStretchFactor(1, 3)
        self.setCentralWidget(splitter)
        self._load_job: Optional[Job] = None
        self.last_error = ""

        file_menu = self.menuBar().addMenu("&File")
        file_menu.addAction("Open stack...", self.choose_stack)
        file_menu.addAction("Open labels over the stack...", self.choose_labels)
        file_menu.addAction("Export labels...", self.choose_export)
        file_menu.addSeparator()
        file_menu.addAction("Quit", self.close)
        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction("About EpiSeg", self.about)

        self.device_label = QLabel(device_text())
        self.memory_label = QLabel(memory_text())
        self.statusBar().addPermanentWidget(self.device_label)
        self.statusBar().addPermanentWidget(self.memory_label)
        self._timer = QTimer(self)
        self._timer.timeout.connect(lambda: self.memory_label.setText(memory_text()))
        self._timer.start(2000)
        self.resize(1500, 900)

    # ------------------------------------------------------------- files
    def choose_stack(self) -> None:
        start = self.settings.value("last_folder", str(Path.home()))
        path, _ = QFileDialog.getOpenFileName(self, "Open stack", start, STACK_FILTER)
        if path:
            self.settings.setValue("last_folder", str(Path(path).parent))
            self.open_in_viewer(path, "")

    def choose_labels(self) -> None:
        if self.viewer.image is None:
            self.show_error("Open a stack first; labels are drawn over it.")
            return
        start = self.settings.value("last_folder", str(Path.home()))
        path, _ = QFileDialog.getOpenFileName(self, "Open labels", start, STACK_FILTER)
        if path:
            self._start_load(load_for_view, image_spec=self._image_spec, labels_spec=path)

    def open_in_viewer(self, image_spec: str, labels_spec: str = "") -> None:
        """Read a stack (and labels) in the worker thread, then show them."""
        self._image_spec = image_spec
        self._start_load(load_for_view, image_spec=image_spec, labels_spec=labels_spec or None)

    def _start_load(self, fn, **kwargs) -> None:
        if self._load_job is not None and self._load_job.is_running():
            self._load_job.cancel()
        job = Job(fn, parent=self, **kwargs)
        job.finished.connect(self._show_loaded)
        job.failed.connect(self.show_error)
        self.statusBar().showMessage(f"reading {kwargs.get('image_spec', '')}...")
        self._load_job = job
        job.start()

    def _show_loaded(self, result) -> None:
        image, labels = result
        self.viewer.set_image(image.data, image.voxel_size)
        if labels is not None:
            self.viewer.set_labels(labels.data)
        self.statusBar().showMessage(f"{image.name}: {image.shape} {image.data.dtype}, voxel "
                                     f"{image.voxel_size or 'unknown'} um", 10000)

    def choose_export(self) -> None:
        if self.viewer.labels is None:
            self.show_error("There are no labels in the viewer to export: predict a stack or "
                            "open a label stack first.")
            return
        start = self.settings.value("last_folder", str(Path.home()))
        path, _ = QFileDialog.getSaveFileName(
            self, "Export labels", start,
            "TIFF (*.tif);;MATLAB (*.mat);;HDF5 (*.h5)")
        if path:
            self.export_to(path)

    def export_to(self, path: str) -> Job:
        """Write the viewer's labels to ``path`` in the worker thread."""
        job = Job(export_labels, parent=self, path=path, labels=self.viewer.labels,
                  voxel_size=self.viewer.voxel_size)
        job.finished.connect(lambda p: self.statusBar().showMessage(f"wrote {p}", 10000))
        job.failed.connect(self.show_error)
        job.start()
        return job

    # ------------------------------------------------------------- messages
    def show_error(self, message: str) -> None:
        self.last_error = message
        box = QMessageBox(QMessageBox.Critical, "EpiSeg", message, QMessageBox.Ok, self)
        box.open()

    def about(self) -> None:
        import numpy
        import PySide6

        try:
            import torch
            torch_text = f"PyTorch {torch.__version__}"
        except ImportError:
            torch_text = "PyTorch missing"
        QMessageBox.about(self, "About EpiSeg",
                          f"EpiSeg {__version__}\n3D cell segmentation of epithelial tissue.\n\n"
                          f"{torch_text}, PySide6 {PySide6.__version__}, NumPy {numpy.__version__}\n"
                          f"Device: {device_text()}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        for job in self.findChildren(Job):
            if job.is_running():
                job.cancel()
                job.wait(10000)
        super().closeEvent(event)


def main(argv=None) -> int:
    """Open the main window (``episeg gui`` / ``python -m app``); FILES open in the viewer."""
    import sys

    from PySide6.QtWidgets import QApplication

    argv = list(sys.argv[1:] if argv is None else argv)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    window = MainWindow()
    window.show()
    if argv:
        window.open_in_viewer(argv[0], argv[1] if len(argv) > 1 else "")
    return app.exec()
