"""The viewer shows the right slice, overlay and readout, and moves to a chosen cell."""

from __future__ import annotations

import numpy as np
import pytest

from app.viewer import VolumeViewer, auto_levels, label_rgba


@pytest.fixture
def stack():
    z, y, x = np.indices((12, 40, 60))
    image = (100 * z + y + x).astype(np.uint16)
    labels = np.zeros(image.shape, np.uint16)
    labels[2:10, 5:20, 5:25] = 1
    labels[6:12, 22:38, 30:55] = 7
    return image, labels


def test_slices_overlay_and_navigation(qtbot, stack):
    image, labels = stack
    v = VolumeViewer()
    qtbot.addWidget(v)
    v.set_image(image, (2.0, 0.5, 0.5))
    v.set_labels(labels)
    assert v.z == 6 and v.slider.maximum() == 11
    np.testing.assert_array_equal(v.xy.image.image, image[6])
    v.set_z(3)
    np.testing.assert_array_equal(v.xy.image.image, image[3])
    assert v.slider.value() == 3 and v.z_label.text() == "z 4/12"
    rgba = v.xy.overlay.image
    assert rgba.shape == (40, 60, 4)
    assert rgba[10, 10, 3] > 0 and rgba[30, 40, 3] == 0  # cell 1 drawn, cell 7 not at z=3
    v.set_z(100)  # clamped
    assert v.z == 11
    # XZ section has the image's Z rows and the aspect of the voxel size
    assert v.xz.image.image.shape == (12, 60)
    assert v.xz.image.transform().m22() == pytest.approx(2.0)


def test_keys_wheel_steps_and_highlight_moves_to_the_cell(qtbot, stack):
    from PySide6.QtCore import Qt

    image, labels = stack
    v = VolumeViewer()
    qtbot.addWidget(v)
    v.set_image(image, (1.0, 1.0, 1.0))
    v.set_labels(labels)
    qtbot.keyClick(v, Qt.Key_Up)
    assert v.z == 7
    qtbot.keyClick(v, Qt.Key_PageDown)
    assert v.z == 0
    v.xy.wheel_steps.emit(1)
    assert v.z == 1
    clicked = []
    v.cell_clicked.connect(clicked.append)
    v.highlight(7)
    assert 6 <= v.z <= 11 and labels[v.z, v.y, v.x] == 7
    shown = v.current_slice_rgba()
    assert tuple(shown[v.y, v.x, :3]) == (255, 255, 255)
    v._click(v.z, 10, 10)
    assert clicked == [int(labels[v.z, 10, 10])]


def test_readout_and_contours():
    lab = np.zeros((10, 10), np.uint16)
    lab[2:8, 2:8] = 3
    filled = label_rgba(lab, 0.5, contours=False)
    outline = label_rgba(lab, 0.5, contours=True)
    assert filled[5, 5, 3] == 128 and outline[5, 5, 3] == 0 and outline[2, 5, 3] == 255
    assert auto_levels(np.arange(1000, dtype=np.float32).reshape(10, 10, 10))[1] > 990


def test_labels_of_another_shape_are_refused(qtbot, stack):
    image, labels = stack
    v = VolumeViewer()
    qtbot.addWidget(v)
    v.set_image(image)
    with pytest.raises(ValueError, match="same shape"):
        v.set_labels(labels[:, :10])


def test_contrast_automatic_and_manual_and_sections_follow_a_click(qtbot, stack):
    image, labels = stack
    v = VolumeViewer()
    qtbot.addWidget(v)
    v.set_image(image, (1.0, 1.0, 1.0))
    lo, hi = auto_levels(image)
    assert (v.low.value(), v.high.value()) == pytest.approx((lo, hi), abs=0.01)
    v.high.setValue(500.0)  # typed by the user
    assert v.levels == (pytest.approx(lo, abs=0.01), 500.0)
    assert v.xy.image.levels.tolist() == pytest.approx([lo, 500.0], abs=0.01)
    v.auto_button.click()
    assert v.high.value() == pytest.approx(hi, abs=0.01)
    # a click in XY moves the XZ / YZ sections there; a z change leaves them alone
    v._click(v.z, 30.2, 45.7)
    np.testing.assert_array_equal(v.xz.image.image, image[:, 30, :])
    np.testing.assert_array_equal(v.yz.image.image, image[:, :, 45])
    xz_before = v.xz.image.image
    v.set_z(2)
    assert v.xz.image.image is xz_before
