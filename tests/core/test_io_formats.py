"""Round trips and metadata for every format core.io reads and writes."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from core.io import (
    AmbiguousVolumeError, check_same_shape, list_contents, read_labels, read_volume,
    read_voxel_size, split_spec, write_volume,
)
from core.errors import VolumeDataError
from core.volume import Volume

SHAPE = (5, 7, 11)  # Z, Y, X: all different, so any axis mix-up shows
VOXEL = (0.5, 0.13, 0.2)


def ramp(dtype=np.uint16) -> np.ndarray:
    """Every voxel a different value."""
    return np.arange(np.prod(SHAPE)).reshape(SHAPE).astype(dtype)


def image(dtype=np.uint16, voxel=VOXEL) -> Volume:
    return Volume(ramp(dtype), voxel, "ramp")


OUTPUTS = ["a.tif", "a.tiff", "a.h5", "a.hdf5", "a.mat", "a.npz"]


@pytest.mark.parametrize("name", OUTPUTS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_round_trip_keeps_data_dtype_and_voxel_size(tmp_path, name, dtype):
    vol = Volume(ramp(np.float32).astype(dtype) if dtype != np.uint8 else
                 (ramp(np.uint16) % 251).astype(np.uint8), VOXEL, "ramp")
    out = write_volume(tmp_path / name, vol)
    back = read_volume(out)
    assert back.shape == SHAPE
    assert back.data.dtype == dtype
    np.testing.assert_array_equal(back.data, vol.data)
    assert back.voxel_size == pytest.approx(VOXEL, rel=1e-6)
    assert back.data.flags["C_CONTIGUOUS"]


def test_mat_v73_round_trip(tmp_path):
    out = write_volume(tmp_path / "a.mat", image(np.float64), mat_version="7.3")
    back = read_volume(out)
    assert back.meta["format"].startswith("MATLAB v7.3")
    assert back.data.dtype == np.float64
    np.testing.assert_array_equal(back.data, ramp(np.float64))
    assert back.voxel_size == pytest.approx(VOXEL)


def test_npy_round_trip_warns_that_voxel_size_is_lost(tmp_path):
    with pytest.warns(UserWarning, match="cannot store the voxel size"):
        out = write_volume(tmp_path / "a.npy", image())
    back = read_volume(out)
    np.testing.assert_array_equal(back.data, ramp())
    assert back.voxel_size is None


def test_no_voxel_size_stays_unrecorded(tmp_path):
    for name in ["a.tif", "a.h5", "a.mat", "a.npz"]:
        back = read_volume(write_volume(tmp_path / name, image(voxel=None)))
        assert back.voxel_size is None, name


def test_the_voxel_size_alone_is_read_as_the_whole_file_gives_it(tmp_path):
    """What training asks of every stack before loading it (the training grid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .npy cannot store it
        for name, kw in [("a.tif", {}), ("a.h5", {}), ("a.mat", {}),
                         ("b.mat", {"mat_version": "7.3"}), ("a.npz", {}), ("a.npy", {})]:
            for voxel in (VOXEL, None):
                out = write_volume(tmp_path / f"{voxel is None}{name}", image(voxel=voxel), **kw)
                assert read_voxel_size(out) == read_volume(out).voxel_size, (name, voxel)


# ------------------------------------------------------------------ TIFF


def test_tiff_is_imagej_with_voxel_size_and_lossless_compression(tmp_path):
    out = write_volume(tmp_path / "a.tif", image())
    with tifffile.TiffFile(out) as tf:
        assert tf.is_imagej
        ij = tf.imagej_metadata
        assert ij["spacing"] == pytest.approx(0.5)
        assert ij["unit"] in ("um", "micron", "µm")
        assert ij["images"] == SHAPE[0]
        page = tf.pages[0]
        assert page.compression.name in ("ADOBE_DEFLATE", "DEFLATE")
        num, den = page.tags["XResolution"].value
        assert den / num == pytest.approx(0.2, rel=1e-6)  # x pixel size
        num, den = page.tags["YResolution"].value
        assert den / num == pytest.approx(0.13, rel=1e-6)


def test_tiff_float64_becomes_float32_for_imagej(tmp_path):
    vol = Volume(ramp(np.float64) / 7.0, VOXEL)
    back = read_volume(write_volume(tmp_path / "a.tif", vol))
    assert back.data.dtype == np.float32
    np.testing.assert_allclose(back.data, vol.data, rtol=1e-6)


def test_tiff_narrow_x_axis_is_not_taken_for_rgb(tmp_path):
    data = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    back = read_volume(write_volume(tmp_path / "a.tif", Volume(data)))
    np.testing.assert_array_equal(back.data, data)


def test_tiff_labels_beyond_16_bits(tmp_path):
    labels = ramp(np.int64) * 200  # max 76800 > 65535
    with pytest.warns(UserWarning, match="32-bit float"):
        out = write_volume(tmp_path / "l.tif", Volume(labels, VOXEL), labels=True)
    with tifffile.TiffFile(out) as tf:
        assert tf.is_imagej and tf.series[0].dtype == np.float32
    back = read_labels(out)
    assert back.data.dtype == np.uint32
    np.testing.assert_array_equal(back.data, labels)


def test_tiff_labels_beyond_float32_fall_back_to_plain_tiff(tmp_path):
    labels = ramp(np.int64) + 2**25
    with pytest.warns(UserWarning, match="plain uint32 TIFF"):
        out = write_volume(tmp_path / "l.tif", Volume(labels, VOXEL), labels=True)
    back = read_labels(out)
    assert back.data.dtype == np.uint32
    np.testing.assert_array_equal(back.data, labels)
    assert back.voxel_size == pytest.approx(VOXEL, rel=1e-6)


def test_tiff_imagej_units_are_converted_to_micrometres(tmp_path):
    path = tmp_path / "nm.tif"
    tifffile.imwrite(path, ramp(), imagej=True, resolution=(1 / 130.0, 1 / 200.0),
                     metadata={"spacing": 500.0, "unit": "nm", "axes": "ZYX"})
    assert read_volume(path).voxel_size == pytest.approx((0.5, 0.2, 0.13), rel=1e-6)


def test_ome_tiff_physical_sizes(tmp_path):
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, ramp(), metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.13,
        "PhysicalSizeZ": 500, "PhysicalSizeZUnit": "nm"})
    vol = read_volume(path)
    assert vol.meta["format"] == "OME-TIFF"
    assert vol.name == "a"
    assert vol.voxel_size == pytest.approx((0.5, 0.13, 0.2))


def test_imagej_hyperstack_channel_and_time(tmp_path):
    tzcyx = np.arange(3 * 5 * 2 * 6 * 7, dtype=np.uint16).reshape(3, 5, 2, 6, 7)
    path = tmp_path / "h.tif"
    tifffile.imwrite(path, tzcyx, imagej=True, metadata={"axes": "TZCYX"})
    vol = read_volume(path, time=2, channel=1)
    np.testing.assert_array_equal(vol.data, tzcyx[2, :, 1])
    assert vol.meta["axes_in_file"] == "TZCYX"


def test_rgb_stack_channel(tmp_path):
    rgb = np.arange(5 * 6 * 7 * 3, dtype=np.uint8).reshape(5, 6, 7, 3)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    np.testing.assert_array_equal(read_volume(path, channel=2).data, rgb[..., 2])


# ------------------------------------------------------------------ HDF5


def test_hdf5_layout_like_plantseg(tmp_path):
    out = write_volume(tmp_path / "a.h5", image())
    with h5py.File(out, "r") as f:
        assert list(f) == ["raw"]
        ds = f["raw"]
        assert ds.compression == "gzip" and ds.compression_opts == 4
        assert ds.chunks is not None
        np.testing.assert_allclose(ds.attrs["element_size_um"], VOXEL)
    out = write_volume(tmp_path / "l.h5", image(), labels=True)
    with h5py.File(out, "r") as f:
        assert list(f) == ["label"] and f["label"].dtype == np.uint16
    out = write_volume(tmp_path / "p.h5:pred", image())
    assert list_contents(out)[0].name == "pred"
    out = write_volume(tmp_path / "q.h5", image(), h5_dataset="seg/cells")
    np.testing.assert_array_equal(read_volume(f"{out}:seg/cells").data, ramp())


def test_hdf5_reads_plantseg_file_with_nested_dataset_and_big_endian(tmp_path):
    path = tmp_path / "ps.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("volumes/raw", data=ramp().astype(">u2"))
        f["volumes/raw"].attrs["element_size_um"] = [1.0, 0.25, 0.25]
        f["notes"] = np.zeros((4, 4))
    vol = read_volume(path)  # the only 3D dataset
    assert vol.source.endswith("ps.h5:volumes/raw")
    assert vol.data.dtype == np.uint16 and vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, ramp())
    assert vol.voxel_size == (1.0, 0.25, 0.25)


def test_untagged_4d_hdf5_channel(tmp_path):
    czyx = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f["pred"] = czyx
    np.testing.assert_array_equal(read_volume(path, channel=1).data, czyx[1])


# ------------------------------------------------------------------ labels, npz, specs


@pytest.mark.parametrize("name", ["l.h5", "l.mat", "l.npz", "l.npy", "l.tif"])
def test_labels_use_smallest_unsigned_dtype(tmp_path, name):
    small = (ramp(np.int64) % 200)
    big = ramp(np.int64) * 200  # 76800 needs uint32
    back = read_labels(write_volume(tmp_path / f"s{name}", Volume(small), labels=True))
    assert back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_volume(tmp_path / name, Volume(big), labels=True)
    back = read_labels(out)
    assert back.data.dtype == np.uint32
    np.testing.assert_array_equal(back.data, big)
    if not name.endswith(".tif"):
        assert read_volume(out).data.dtype == np.uint32  # stored as uint32, not int64


def test_npz_several_arrays(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, raw=ramp(), label=ramp() % 3, voxel_size_zyx_um=np.array(VOXEL))
    with pytest.raises(AmbiguousVolumeError, match="m.npz:raw"):
        read_volume(path)
    vol = read_volume(f"{path}:label")
    np.testing.assert_array_equal(vol.data, ramp() % 3)
    assert vol.voxel_size == pytest.approx(VOXEL)


def test_split_spec(tmp_path):
    assert split_spec("a.h5:raw") == (Path("a.h5"), "raw")
    assert split_spec("a.h5:grp/sub/raw") == (Path("a.h5"), "grp/sub/raw")
    assert split_spec(r"C:\data\a.h5:raw") == (Path(r"C:\data\a.h5"), "raw")
    assert split_spec(r"C:\data\a.h5") == (Path(r"C:\data\a.h5"), None)
    assert split_spec("/data/run:3/a.h5:raw") == (Path("/data/run:3/a.h5"), "raw")
    assert split_spec("/data/run:3/a.tif") == (Path("/data/run:3/a.tif"), None)
    assert split_spec("a.mat:I") == (Path("a.mat"), "I")
    odd = tmp_path / "we:ird.h5"
    write_volume(odd, image())
    assert split_spec(str(odd)) == (odd, None)
    assert split_spec(f"{odd}:raw") == (odd, "raw")
    np.testing.assert_array_equal(read_volume(f"{odd}:raw").data, ramp())


def test_check_same_shape_passes_and_fails_with_both_names(tmp_path):
    raw = Volume(ramp(), source="gland.tif")
    check_same_shape(raw, Volume(ramp(np.uint8), source="gland_labels.tif"))
    swapped = Volume(np.zeros((5, 11, 7), np.uint8), source="gland_labels.mat:labels")
    with pytest.raises(VolumeDataError) as err:
        check_same_shape(raw, swapped)
    msg = str(err.value)
    assert "gland.tif" in msg and "gland_labels.mat:labels" in msg
    assert "5x7x11" in msg and "5x11x7" in msg and "swapped" in msg
    with pytest.raises(VolumeDataError, match="rescaled"):
        check_same_shape(raw, Volume(np.zeros((5, 7, 22), np.uint8), source="big.tif"))


def test_reading_never_modifies_the_input(tmp_path):
    out = write_volume(tmp_path / "a.h5", image())
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    read_volume(out)
    read_labels(out)
    list_contents(out)
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before


# ------------------------------------------------------------------ real data


def test_real_sample_patch(shared_data):
    path = shared_data / "sample_patch.h5"
    with pytest.raises(AmbiguousVolumeError) as err:
        read_volume(path)
    msg = str(err.value)
    for name in ("raw", "label", "big_label"):
        assert name in msg
    assert f"{path}:raw" in msg
    assert set(err.value.candidates) == {"raw", "label", "big_label"}
    raw = read_volume(f"{path}:raw")
    assert raw.shape == (64, 200, 200) and raw.data.dtype == np.uint16
    assert raw.voxel_size is None
    labels = read_labels(f"{path}:label")
    assert labels.data.dtype == np.uint16  # int64 ids up to ~64k fit in uint16
    check_same_shape(raw, labels)


def test_real_celegans_tiff(shared_data, tmp_path):
    vol = read_volume(shared_data / "celegans_membrane_raw.tif")
    assert vol.shape == (33, 256, 384) and vol.data.dtype == np.uint8
    assert vol.meta["format"] == "TIFF (ImageJ)"
    assert vol.voxel_size is None  # the file records no calibration
    # through MATLAB v7.3 and back, unchanged
    back = read_volume(write_volume(tmp_path / "c.mat", vol, mat_version="7.3"))
    np.testing.assert_array_equal(back.data, vol.data)


def test_a_large_tiff_is_read_into_a_scratch_file_with_the_same_voxels(tmp_path, monkeypatch):
    """Stacks above the scratch size are decoded into an unlinked memory-mapped file:
    same voxels, ZYX, nothing left in the temporary folder."""
    import tempfile

    import tifffile

    import core.scratch as scratch
    from core.io import read_volume

    data = (np.arange(6 * 20 * 30, dtype=np.uint16) * 7).reshape(6, 20, 30)
    tifffile.imwrite(tmp_path / "stack.tif", data, imagej=True, metadata={"axes": "ZYX"})
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(scratch, "SCRATCH_ABOVE_BYTES", 0)
    vol = read_volume(str(tmp_path / "stack.tif"))
    assert isinstance(vol.data, np.memmap)
    np.testing.assert_array_equal(vol.data, data)
    assert list(folder.iterdir()) == []
