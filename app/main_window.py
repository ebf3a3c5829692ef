"""The main window: task tabs on the left, the shared volume viewer on the right.

Tabs Preprocess, Train, Predict and Evaluate each run their core job through
the one worker pattern (:class:`app.job_panel.JobPanel`). Menus open stacks
and label stacks into the viewer (read in the worker thread, so a large file
never freezes the window), load and save the current tab's settings as YAML
(the command line's schema), list recent files, pick the device and show the
versions. The status bar shows the device and the memory this process uses.
Last folders, recent files, the device and the viewer's overlay settings
persist between sessions (QSettings).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup
from PySide6.QtWidgets import (QFileDialog, QLabel, QMainWindow, QMessageBox, QSplitter,
                               QTabWidget, QWidget)

from app.tabs.evaluate_tab import EvaluateTab
from app.tabs.predict_tab import PredictTab
from app.tabs.preprocess_tab import PreprocessTab
from app.tabs.train_tab import TrainTab
from app.viewer import VolumeViewer
from app.widgets import STACK_FILTER
from app.worker import Job
from core import __version__
from core.errors import ConfigError
from core.io import split_spec
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


#: How many files File > Recent files remembers.
MAX_RECENT = 10


def config_schema(tab) -> Tuple[type, Optional[str]]:
    """(config class, YAML section or None) of a tab's settings; (None, None) if it has none."""
    from core.pipeline import PredictConfig
    from core.preprocess import PreprocessConfig
    from core.train import TrainConfig

    if isinstance(tab, PreprocessTab):
        return PreprocessConfig, None
    if isinstance(tab, TrainTab):
        return TrainConfig, None
    if isinstance(tab, PredictTab):
        return PredictConfig, "predict"
    return None, None


def load_tab_config(tab, path: str):
    """Read ``path`` with the schema of ``tab`` (the same files as the command line)."""
    from core.config import load_yaml
    from core.train import load_train_config

    cls, section = config_schema(tab)
    if cls is None:
        raise ConfigError("This tab has no settings file; choose Preprocess, Train or Predict.")
    if isinstance(tab, TrainTab):
        return load_train_config(path)
    return load_yaml(path, cls, section=section)


def save_tab_config(tab, path: str) -> Path:
    from core.config import save_yaml, to_dict

    cls, section = config_schema(tab)
    if cls is None:
        raise ConfigError("This tab has no settings file; choose Preprocess, Train or Predict.")
    cfg = tab.config()
    name = {"PreprocessConfig": "preprocess", "TrainConfig": "train",
            "PredictConfig": "predict"}[cls.__name__]
    header = (f"EpiSeg {name} settings saved by the GUI; use with "
              f"`episeg {name} --config {Path(path).name}` (ZYX, micrometres)")
    return save_yaml(path, {section: to_dict(cfg)} if section else cfg, header=header)


class MainWindow(QMainWindow):
    def __init__(self, parent: Optional[QWidget] = None, settings: Optional[QSettings] = None):
        super().__init__(parent)
        self.setWindowTitle(f"EpiSeg {__version__}")
        self.settings = settings if settings is not None else QSettings("EpiSeg", "EpiSeg")
        self.viewer = VolumeViewer()
        self.tabs = QTabWidget()
        self.preprocess_tab = PreprocessTab()
        self.train_tab = TrainTab()
        self.predict_tab = PredictTab()
        self.evaluate_tab = EvaluateTab()
        self.tabs.addTab(self.preprocess_tab, "Preprocess")
        self.tabs.addTab(self.train_tab, "Train")
        self.tabs.addTab(self.predict_tab, "Predict")
        self.tabs.addTab(self.evaluate_tab, "Evaluate")
        self.preprocess_tab.show_result.connect(self.open_in_viewer)
        self.predict_tab.show_result.connect(self.open_in_viewer)
        self.predict_tab.highlight_cell.connect(lambda c: self.viewer.highlight(c))
        self.evaluate_tab.show_arrays.connect(self.show_arrays)
        self.evaluate_tab.overlay.connect(self.viewer.set_labels)
        self.evaluate_tab.highlight_cell.connect(lambda c: self.viewer.highlight(c))
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
        self.recent_menu = file_menu.addMenu("Recent stacks")
        file_menu.addAction("Export labels...", self.choose_export)
        examples = file_menu.addMenu("Examples")
        examples.addAction("Open the real sample stack (C. elegans membranes)", self.open_sample)
        examples.addAction("Make synthetic stacks with ground truth...", self.choose_synthetic)
        file_menu.addSeparator()
        file_menu.addAction("Load settings (YAML)...", self.choose_load_config)
        file_menu.addAction("Save settings (YAML)...", self.choose_save_config)
        file_menu.addSeparator()
        file_menu.addAction("Quit", self.close)
        settings_menu = self.menuBar().addMenu("&Settings")
        device_menu = settings_menu.addMenu("Device")
        self.device_group = QActionGroup(self)
        for key, text in (("auto", "Automatic (GPU when present)"), ("cpu", "CPU"),
                          ("cuda", "GPU (CUDA)")):
            action = QAction(text, self, checkable=True)
            action.setData(key)
            self.device_group.addAction(action)
            device_menu.addAction(action)
        self.device_group.triggered.connect(lambda a: self.set_device(a.data()))
        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction("Getting started", self.getting_started)
        help_menu.addAction("About EpiSeg", self.about)

        self.device_label = QLabel(device_text())
        self.memory_label = QLabel(memory_text())
        self.statusBar().addPermanentWidget(self.device_label)
        self.statusBar().addPermanentWidget(self.memory_label)
        self._timer = QTimer(self)
        self._timer.timeout.connect(lambda: self.memory_label.setText(memory_text()))
        self._timer.start(2000)
        self.resize(1500, 900)
        self.restore_settings()

    # ------------------------------------------------------------- settings
    def restore_settings(self) -> None:
        """Device, viewer preferences and recent files from the last session."""
        self.set_device(str(self.settings.value("device", "auto")))
        v = self.viewer
        v.opacity.setValue(int(self.settings.value("viewer/opacity", v.opacity.value())))
        v.contours.setChecked(self.settings.value("viewer/contours", False) in (True, "true"))
        v.opacity.valueChanged.connect(lambda x: self.settings.setValue("viewer/opacity", x))
        v.contours.toggled.connect(lambda x: self.settings.setValue("viewer/contours", x))
        self._fill_recent()

    def set_device(self, device: str) -> None:
        """'auto', 'cpu' or 'cuda' for training and prediction; remembered."""
        device = device if device in ("auto", "cpu", "cuda") else "auto"
        self.settings.setValue("device", device)
        self.train_tab.device = device
        self.predict_tab.device = device
        for action in self.device_group.actions():
            action.setChecked(action.data() == device)

    def recent_files(self) -> List[str]:
        value = self.settings.value("recent_files", [])
        return [value] if isinstance(value, str) else list(value or [])

    def remember(self, spec: str) -> None:
        files = [spec] + [f for f in self.recent_files() if f != spec]
        self.settings.setValue("recent_files", files[:MAX_RECENT])
        self.settings.setValue("last_folder", str(split_spec(spec)[0].parent))
        self._fill_recent()

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        files = self.recent_files()
        for spec in files:
            self.recent_menu.addAction(spec, lambda spec=spec: self.open_in_viewer(spec, ""))
        self.recent_menu.setEnabled(bool(files))

    def choose_load_config(self) -> None:
        self._choose_config("Load settings", QFileDialog.getOpenFileName, self.load_config)

    def choose_save_config(self) -> None:
        self._choose_config("Save settings", QFileDialog.getSaveFileName, self.save_config)

    def _choose_config(self, title: str, dialog, action) -> None:
        start = self.settings.value("last_config_folder", str(Path.home()))
        path, _ = dialog(self, title, start, "YAML (*.yaml *.yml)")
        if path:
            action(path)

    def load_config(self, path: str) -> bool:
        """Load ``path`` into the current tab; a bad file gives a message, nothing changes."""
        tab = self.tabs.currentWidget()
        return self._config_file(path, "loaded from",
                                 lambda: tab.set_config(load_tab_config(tab, path)))

    def save_config(self, path: str) -> bool:
        return self._config_file(path, "saved to",
                                 lambda: save_tab_config(self.tabs.currentWidget(), path))

    def _config_file(self, path: str, done: str, work) -> bool:
        from core.errors import EpiSegError

        try:
            work()
        except EpiSegError as err:
            self.show_error(str(err))
            return False
        self.settings.setValue("last_config_folder", str(Path(path).parent))
        self.statusBar().showMessage(f"settings {done} {path}", 10000)
        return True

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
        self.remember(image_spec)
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
        voxel = (f"voxel {image.voxel_size} um" if image.voxel_size
                 else "voxel size not recorded")
        self.statusBar().showMessage(f"{image.name}: {image.shape} {image.data.dtype}, {voxel}",
                                     10000)

    def open_sample(self) -> None:
        from core.demo import REAL_SAMPLE

        if not REAL_SAMPLE.exists():
            self.show_error(f"The sample stack {REAL_SAMPLE} is missing from this installation.")
            return
        self.open_in_viewer(str(REAL_SAMPLE))

    def choose_synthetic(self) -> None:
        start = self.settings.value("last_folder", str(Path.home()))
        folder = QFileDialog.getExistingDirectory(self, "Folder for the synthetic stacks", start)
        if folder:
            self.make_synthetic(folder)

    def make_synthetic(self, folder: str, n: int = 4, shape=(48, 192, 192)) -> Job:
        """Write ``n`` synthetic stacks + labels into ``folder`` (a job), then show the first."""
        from core.synth import write_synthetic_dataset

        job = Job(write_synthetic_dataset, parent=self, out_dir=Path(folder), n=n, shape=shape,
                  seed=2020, overwrite=True)

        def done(pairs):
            self.statusBar().showMessage(f"{len(pairs)} synthetic stacks with labels written "
                                         f"to {folder}", 15000)
            self.open_in_viewer(str(pairs[0][0]), str(pairs[0][1]))

        job.finished.connect(done)
        job.failed.connect(self.show_error)
        self.statusBar().showMessage(f"making {n} synthetic stacks in {folder}...")
        job.start()
        return job

    def show_arrays(self, image, labels, voxel_size) -> None:
        """Show arrays a tab already holds (e.g. the Evaluate tab's stacks)."""
        self.viewer.set_image(image, voxel_size)
        if labels is not None:
            self.viewer.set_labels(labels)

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

    def getting_started(self) -> None:
        QMessageBox.information(
            self, "Getting started",
            "1. Predict: choose a model and your stacks (drag them in), an output folder and "
            "a format (TIFF for Fiji, .mat for MATLAB); Run. Each result opens in the viewer; "
            "the flagged cells are the ones to check first.\n"
            "2. Train: add your stacks with their label stacks (or preprocessed files), choose "
            "where to save the model; Run. The curves show the loss as it trains; Cancel keeps "
            "the last finished epoch, and 'Resume' goes on from it.\n"
            "3. Evaluate: a ground truth and a prediction give the figures and a per-cell table; "
            "click a row to see that cell.\n"
            "The viewer: mouse wheel or Page Up/Down move through Z; the side views are XZ "
            "and YZ at the true voxel size.")

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


def open_main_window(argv: Optional[List[str]] = None) -> "MainWindow":
    """Show the main window; ``argv``: a stack (and its labels) to open in the viewer."""
    window = MainWindow()
    window.show()
    if argv:
        window.open_in_viewer(argv[0], argv[1] if len(argv) > 1 else "")
    return window

