"""A Z-slice viewer for 3D stacks with a label overlay (pyqtgraph).

The widget takes arrays and voxel sizes, never files (like napari's layers):
``set_image(image_zyx, voxel_size_um)``, ``set_labels(labels_zyx)``,
``highlight(cell_id)``. It shows the XY slice at the current Z with a Z
slider (mouse wheel, Up/Down, Page Up/Down), and the orthogonal XZ and YZ
sections through the crosshair with the true aspect from the voxel size.
Only the slices shown are ever read, so a 234 x 1024 x 1024 stack (or a
memory-mapped one) scrolls without copying the volume.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QDoubleSpinBox, QGridLayout, QHBoxLayout, QLabel,
                               QPushButton, QSlider, QVBoxLayout, QWidget)

from core.volume import strided_sample

#: Distinct colours for cell ids (id % 255 + 1); id 0 is transparent.
_PALETTE = np.zeros((256, 4), np.uint8)
_hues = (np.arange(255) * 0.618034) % 1.0
for _i, _h in enumerate(_hues, start=1):
    _c = pg.hsvColor(float(_h), sat=0.85, val=1.0)
    _PALETTE[_i] = (_c.red(), _c.green(), _c.blue(), 255)


def label_rgba(labels2d: np.ndarray, opacity: float, contours: bool,
               highlight: Optional[int] = None) -> np.ndarray:
    """RGBA (H, W, 4) uint8 colouring of one label slice (0 transparent)."""
    lab = np.asarray(labels2d)
    idx = np.where(lab > 0, (lab.astype(np.int64) % 255) + 1, 0)
    rgba = _PALETTE[idx]
    alpha = np.full(lab.shape, int(round(255 * opacity)), np.uint8)
    if contours:
        edge = np.zeros(lab.shape, bool)
        edge[1:, :] |= lab[1:, :] != lab[:-1, :]
        edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
        edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        alpha = np.where(edge, 255, 0).astype(np.uint8)
    alpha[lab == 0] = 0
    rgba[..., 3] = alpha
    if highlight:
        sel = lab == highlight
        rgba[sel] = (255, 255, 255, max(int(255 * opacity), 160))
    return rgba


def auto_levels(image: np.ndarray, low: float = 1.0, high: float = 99.5,
                max_samples: int = 2_000_000) -> Tuple[float, float]:
    """Contrast limits from percentiles of a strided sample of the stack (no full copy)."""
    a = np.asarray(image) if not hasattr(image, "shape") else image
    sample = np.asarray(strided_sample(a, max_samples), dtype=np.float32)
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


class _SliceView(pg.GraphicsLayoutWidget):
    """One 2D view: image + label overlay + crosshair; the wheel steps through slices."""

    wheel_steps = Signal(int)
    hovered = Signal(float, float)
    clicked = Signal(float, float)

    def __init__(self, title: str, wheel_scrolls: bool):
        super().__init__()
        self.setBackground("k")
        self.plot = self.addPlot(title=title)
        self.plot.hideAxis("left")
        self.plot.hideAxis("bottom")
        self.plot.setAspectLocked(True)
        self.plot.invertY(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.overlay = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.plot.addItem(self.overlay)
        pen = pg.mkPen((255, 255, 0, 120), width=1)
        self.hline = pg.InfiniteLine(angle=0, pen=pen, movable=False)
        self.vline = pg.InfiniteLine(angle=90, pen=pen, movable=False)
        self.plot.addItem(self.hline)
        self.plot.addItem(self.vline)
        self.wheel_scrolls = wheel_scrolls
        self.scene().sigMouseMoved.connect(self._moved)
        self.scene().sigMouseClicked.connect(self._clicked)

    def set_scale(self, sy: float, sx: float) -> None:
        """Pixel size in micrometres (rows, columns): gives the true aspect."""
        from PySide6.QtGui import QTransform

        t = QTransform()
        t.scale(sx, sy)
        self.image.setTransform(t)
        self.overlay.setTransform(t)
        self._scale = (sy, sx)

    def _to_pixel(self, pos) -> Optional[Tuple[float, float]]:
        if not self.plot.sceneBoundingRect().contains(pos):
            return None
        p = self.plot.vb.mapSceneToView(pos)
        sy, sx = getattr(self, "_scale", (1.0, 1.0))
        return p.y() / sy, p.x() / sx

    def _moved(self, pos) -> None:
        px = self._to_pixel(pos)
        if px is not None:
            self.hovered.emit(*px)

    def _clicked(self, event) -> None:
        px = self._to_pixel(event.scenePos())
        if px is not None:
            self.clicked.emit(*px)

    def wheelEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if self.wheel_scrolls and not (event.modifiers() & Qt.ControlModifier):
            delta = event.angleDelta().y()
            if delta:
                self.wheel_steps.emit(1 if delta > 0 else -1)
            event.accept()
            return
        super().wheelEvent(event)  # Ctrl + wheel (or the side views): zoom


class VolumeViewer(QWidget):
    """XY slice with Z slider, XZ/YZ sections, label overlay and a readout.

    Signals: ``slice_changed(z)``, ``cell_clicked(cell_id)`` (0 for background).
    """

    slice_changed = Signal(int)
    cell_clicked = Signal(int)

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.image: Optional[np.ndarray] = None
        self.labels: Optional[np.ndarray] = None
        self.voxel_size: Tuple[float, float, float] = (1.0, 1.0, 1.0)
        self.levels: Tuple[float, float] = (0.0, 1.0)
        self.z = self.y = self.x = 0
        self.highlighted: Optional[int] = None

        self.xy = _SliceView("XY", wheel_scrolls=True)
        self.xz = _SliceView("XZ", wheel_scrolls=False)
        self.yz = _SliceView("YZ", wheel_scrolls=False)
        self.xy.wheel_steps.connect(lambda s: self.set_z(self.z + s))
        self.xy.hovered.connect(lambda r, c: self._readout(self.z, r, c))
        self.xy.clicked.connect(lambda r, c: self._click(self.z, r, c))
        self.xz.hovered.connect(lambda r, c: self._readout(r, self.y, c))
        self.yz.hovered.connect(lambda r, c: self._readout(r, c, self.x))

        self.slider = QSlider(Qt.Horizontal)
        self.slider.setMinimum(0)
        self.slider.valueChanged.connect(self.set_z)
        self.z_label = QLabel("z -")
        self.readout = QLabel("")
        self.readout.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(45)
        self.opacity.setMaximumWidth(120)
        self.opacity.valueChanged.connect(lambda _: self._refresh_overlays())
        self.show_labels = QCheckBox("Cells")
        self.show_labels.setChecked(True)
        self.show_labels.toggled.connect(lambda _: self._refresh_overlays())
        self.contours = QCheckBox("Outlines only")
        self.contours.toggled.connect(lambda _: self._refresh_overlays())
        self.auto_button = QPushButton("Auto contrast")
        self.auto_button.setToolTip("Display range from the 1st to the 99.5th percentile")
        self.auto_button.clicked.connect(self.auto_contrast)
        self.low, self.high = QDoubleSpinBox(), QDoubleSpinBox()
        for box, tip in ((self.low, "darkest shown value"), (self.high, "brightest shown value")):
            box.setRange(-1e9, 1e9)
            box.setDecimals(2)
            box.setKeyboardTracking(False)
            box.setToolTip(f"Manual contrast: {tip}")
            box.setMaximumWidth(90)
            box.valueChanged.connect(lambda _: self.set_levels(self.low.value(), self.high.value()))

        side = QVBoxLayout()
        side.addWidget(self.xz, 1)
        side.addWidget(self.yz, 1)
        views = QGridLayout()
        views.addWidget(self.xy, 0, 0)
        views.addLayout(side, 0, 1)
        views.setColumnStretch(0, 3)
        views.setColumnStretch(1, 2)
        controls = QHBoxLayout()
        controls.addWidget(self.z_label)
        controls.addWidget(self.slider, 1)
        controls.addWidget(self.show_labels)
        controls.addWidget(QLabel("opacity"))
        controls.addWidget(self.opacity)
        controls.addWidget(self.contours)
        controls.addWidget(QLabel("contrast"))
        controls.addWidget(self.low)
        controls.addWidget(self.high)
        controls.addWidget(self.auto_button)
        layout = QVBoxLayout(self)
        layout.addLayout(views, 1)
        layout.addLayout(controls)
        layout.addWidget(self.readout)
        self.setFocusPolicy(Qt.StrongFocus)

    # ------------------------------------------------------------- data
    def set_image(self, image: np.ndarray, voxel_size: Optional[Sequence[float]] = None) -> None:
        """Show a ZYX stack (any numeric dtype, memory-mapped is fine); resets the labels."""
        if np.ndim(image) != 3:
            raise ValueError(f"The viewer shows 3D (Z, Y, X) stacks, got shape {np.shape(image)}.")
        self.image = image
        self.labels = None
        self.highlighted = None
        self.voxel_size = tuple(float(v) for v in (voxel_size or (1.0, 1.0, 1.0)))
        vz, vy, vx = self.voxel_size
        self.xy.set_scale(vy, vx)
        self.xz.set_scale(vz, vx)
        self.yz.set_scale(vz, vy)
        nz, ny, nx = image.shape
        self.y, self.x = ny // 2, nx // 2
        self.slider.blockSignals(True)
        self.slider.setMaximum(nz - 1)
        self.slider.blockSignals(False)
        self.levels = auto_levels(image)
        self._show_levels()
        self.set_z(nz // 2, force=True)
        for view in (self.xy, self.xz, self.yz):
            view.plot.autoRange()

    def set_labels(self, labels: Optional[np.ndarray]) -> None:
        """Overlay a ZYX label stack of the image's shape (None removes it)."""
        if labels is not None and self.image is not None and tuple(labels.shape) != tuple(self.image.shape):
            raise ValueError(f"Labels {tuple(labels.shape)} and image {tuple(self.image.shape)} "
                             "must have the same shape.")
        self.labels = labels
        self._refresh_overlays()

    def set_levels(self, low: float, high: float) -> None:
        """Manual contrast (display range in image values)."""
        self.levels = (float(low), float(max(high, low + 1e-6)))
        self._show_levels()
        self._refresh_images()

    def _show_levels(self) -> None:
        for box, value in zip((self.low, self.high), self.levels):
            box.blockSignals(True)
            box.setValue(value)
            box.blockSignals(False)

    def auto_contrast(self) -> None:
        if self.image is not None:
            self.levels = auto_levels(self.image)
            self._show_levels()
            self._refresh_images()

    def highlight(self, cell_id: Optional[int], go_to: bool = True) -> None:
        """Draw one cell in white; with ``go_to`` move the slices to its centre."""
        self.highlighted = int(cell_id) if cell_id else None
        if go_to and self.highlighted and self.labels is not None:
            centre = self._find_cell(self.highlighted)
            if centre is not None:
                self.y, self.x = centre[1], centre[2]
                self.set_z(centre[0], force=True)
                return
        self._refresh_overlays()

    def _find_cell(self, cell_id: int) -> Optional[Tuple[int, int, int]]:
        """Centre of a cell: its middle slice, then the centre there (slice by slice reads)."""
        lab = self.labels
        zs = [z for z in range(lab.shape[0]) if np.any(np.asarray(lab[z]) == cell_id)]
        if not zs:
            return None
        z = zs[len(zs) // 2]
        ys, xs = np.nonzero(np.asarray(lab[z]) == cell_id)
        return z, int(np.median(ys)), int(np.median(xs))

    # ------------------------------------------------------------- navigation
    def set_z(self, z: int, force: bool = False) -> None:
        if self.image is None:
            return
        z = int(np.clip(z, 0, self.image.shape[0] - 1))
        changed = z != self.z
        self.z = z
        if self.slider.value() != z:
            self.slider.blockSignals(True)
            self.slider.setValue(z)
            self.slider.blockSignals(False)
        if changed or force:
            self.z_label.setText(f"z {z + 1}/{self.image.shape[0]}")
            which = ("xy", "xz", "yz") if force else ("xy",)  # XZ / YZ do not change with z
            self._refresh_images(which)
            self._refresh_overlays(which)
            self.slice_changed.emit(z)

    def keyPressEvent(self, event) -> None:  # noqa: N802 (Qt name)
        step = {Qt.Key_Up: 1, Qt.Key_Down: -1, Qt.Key_PageUp: 10, Qt.Key_PageDown: -10}
        if event.key() in step:
            self.set_z(self.z + step[event.key()])
            event.accept()
        else:
            super().keyPressEvent(event)

    # ------------------------------------------------------------- drawing
    def _slices(self, a: np.ndarray, which=("xy", "xz", "yz")):
        """(view, 2D slice) for the views named in ``which``: only those slices are read."""
        take = {"xy": lambda: a[self.z], "xz": lambda: a[:, self.y, :], "yz": lambda: a[:, :, self.x]}
        views = {"xy": self.xy, "xz": self.xz, "yz": self.yz}
        return [(views[k], np.asarray(take[k]())) for k in which]

    def _refresh_images(self, which=("xy", "xz", "yz")) -> None:
        if self.image is None:
            return
        for view, sl in self._slices(self.image, which):
            view.image.setImage(sl, levels=self.levels, autoLevels=False)
        vz, vy, vx = self.voxel_size
        self.xy.hline.setPos(self.y * vy)
        self.xy.vline.setPos(self.x * vx)
        self.xz.hline.setPos(self.z * vz)
        self.xz.vline.setPos(self.x * vx)
        self.yz.hline.setPos(self.z * vz)
        self.yz.vline.setPos(self.y * vy)

    def _refresh_overlays(self, which=("xy", "xz", "yz")) -> None:
        if self.labels is None or not self.show_labels.isChecked():
            for v in (self.xy, self.xz, self.yz):
                v.overlay.clear()
            return
        op = self.opacity.value() / 100.0
        for view, sl in self._slices(self.labels, which):
            view.overlay.setImage(label_rgba(sl, op, self.contours.isChecked(), self.highlighted),
                                  autoLevels=False)

    # ------------------------------------------------------------- mouse
    def _inside(self, z: float, y: float, x: float) -> Optional[Tuple[int, int, int]]:
        if self.image is None:
            return None
        idx = (int(np.floor(z)), int(np.floor(y)), int(np.floor(x)))
        if all(0 <= i < n for i, n in zip(idx, self.image.shape)):
            return idx
        return None

    def _readout(self, z: float, y: float, x: float) -> None:
        idx = self._inside(z, y, x)
        if idx is None:
            return
        value = self.image[idx]
        text = f"z {idx[0]}  y {idx[1]}  x {idx[2]}   value {value:g}"
        if self.labels is not None:
            text += f"   cell {int(self.labels[idx])}"
        self.readout.setText(text)

    def _click(self, z: float, y: float, x: float) -> None:
        idx = self._inside(z, y, x)
        if idx is None:
            return
        self.y, self.x = idx[1], idx[2]
        self._refresh_images(("xz", "yz"))
        self._refresh_overlays(("xz", "yz"))
        cell = int(self.labels[idx]) if self.labels is not None else 0
        self.cell_clicked.emit(cell)

    def current_slice_rgba(self) -> Optional[np.ndarray]:
        """The overlay of the XY slice as shown (for tests and exports)."""
        if self.labels is None:
            return None
        return label_rgba(np.asarray(self.labels[self.z]), self.opacity.value() / 100.0,
                          self.contours.isChecked(), self.highlighted)
