"""Bad input gets one clear error naming the file, the problem and what to do."""

from __future__ import annotations

import errno
import os
import shutil

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile

from core.errors import EpiSegError, VolumeDataError, VolumeReadError, VolumeWriteError
from core.io import atomic_path, read_labels, read_volume, tiff, write_volume
from core.volume import Volume


def vol3d(dtype=np.uint16):
    return np.arange(5 * 7 * 11).reshape(5, 7, 11).astype(dtype)


def error_of(spec, **kwargs) -> EpiSegError:
    with pytest.raises(EpiSegError) as err:
        read_volume(spec, **kwargs)
    return err.value


# ------------------------------------------------------------------ files


def test_missing_file_names_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gland01.tif").write_bytes(b"")
    err = error_of("gland1.tif")
    assert isinstance(err, VolumeReadError)
    assert str(tmp_path / "gland1.tif") in str(err) and "not found" in str(err)
    assert "gland01.tif" in str(err)  # suggests the near miss
    err = error_of(tmp_path / "nowhere" / "a.h5")
    assert "does not exist" in str(err)


def test_folder_instead_of_file(tmp_path):
    write_volume(tmp_path / "x.tif", Volume(vol3d()))
    err = error_of(tmp_path)
    assert isinstance(err, VolumeReadError)
    assert "is a folder" in str(err) and "x.tif" in str(err)


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "stack.czi"
    path.write_bytes(b"not really")
    msg = str(error_of(path))
    assert "stack.czi" in msg and ".czi" in msg
    for ext in (".tif", ".h5", ".mat", ".npy"):
        assert ext in msg


def test_empty_file(tmp_path):
    path = tmp_path / "a.h5"
    path.write_bytes(b"")
    msg = str(error_of(path))
    assert "a.h5" in msg and "empty" in msg


@pytest.mark.parametrize("name", ["a.tif", "a.h5", "a.mat", "a.npy", "a.npz"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x01garbage" * 200)
    err = error_of(path)
    assert isinstance(err, VolumeReadError)
    assert name in str(err) and "corrupt or truncated" in str(err) and "re-export" in str(err)


@pytest.mark.parametrize("name", ["a.tif", "a.h5", "a.npy", "a.mat"])
def test_truncated_file(tmp_path, name):
    good = write_volume(tmp_path / f"good_{name}", Volume(vol3d()))
    path = tmp_path / name
    data = good.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    err = error_of(path)
    assert isinstance(err, VolumeReadError)
    assert name in str(err) and "corrupt or truncated" in str(err)


def test_wrong_extension_is_recognised(tmp_path):
    tif = write_volume(tmp_path / "a.tif", Volume(vol3d()))
    path = tmp_path / "really_a_tiff.h5"
    shutil.copy(tif, path)
    msg = str(error_of(path))
    assert "really_a_tiff.h5" in msg and "TIFF" in msg and ".tif" in msg


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    path = write_volume(tmp_path / "a.tif", Volume(vol3d()))
    path.chmod(0)
    try:
        msg = str(error_of(path))
    finally:
        path.chmod(0o644)
    assert "a.tif" in msg and "permission" in msg


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """The same check where the tests run as root (which may read anything)."""
    path = write_volume(tmp_path / "locked.h5", Volume(vol3d()))
    real_open = type(path).open

    def locked(self, *args, **kwargs):
        if self.name == "locked.h5":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(path), "open", locked)
    err = error_of(path)
    assert isinstance(err, VolumeReadError)
    assert "locked.h5" in str(err) and "permission denied" in str(err)


# ------------------------------------------------------------------ contents


def test_no_3d_data(tmp_path):
    path = tmp_path / "flat.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros((6, 7))
        f["b"] = np.zeros(5)
    err = error_of(path)
    assert isinstance(err, VolumeDataError)
    assert "flat.h5" in str(err) and "no 3D dataset" in str(err) and "a (6x7 float64)" in str(err)


def test_ambiguous_dataset_lists_candidates_and_syntax(tmp_path):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = vol3d()
        f["seg/cells"] = vol3d(np.uint8)
    msg = str(error_of(path))
    assert "raw (5x7x11 uint16)" in msg and "seg/cells (5x7x11 uint8)" in msg
    assert f"{path}:raw" in msg


def test_missing_dataset_and_group(tmp_path):
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        f["grp/raw"] = vol3d()
    msg = str(error_of(f"{path}:rwa"))
    assert "no dataset named 'rwa'" in msg and "grp/raw" in msg
    msg = str(error_of(f"{path}:grp"))
    assert "is a group" in msg and "grp/raw" in msg


@pytest.mark.parametrize("name", ["flat.tif", "flat.npy", "flat.mat"])
def test_2d_data(tmp_path, name):
    path = tmp_path / name
    img = np.zeros((64, 48), np.uint8)
    if name.endswith(".tif"):
        tifffile.imwrite(path, img)
    elif name.endswith(".npy"):
        np.save(path, img)
    else:
        scipy.io.savemat(path, {"I": img})
    err = error_of(path)
    assert isinstance(err, VolumeDataError)
    assert name in str(err) and "2D image" in str(err) and "Z slices" in str(err)


def test_4d_imagej_says_which_axis_and_how_to_pick(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((30, 2, 64, 64), np.uint8), imagej=True,
                     metadata={"axes": "ZCYX"})
    msg = str(error_of(path))
    assert "stack.tif has 4 dimensions (shape 30x2x64x64, axes ZCYX)" in msg
    assert "axis 1 (size 2) looks like channels" in msg
    assert "--channel 0" in msg and "read_volume(..., channel=0)" in msg
    msg = str(error_of(path, channel=5))
    assert "channel 5 does not exist" in msg and "0 to 1" in msg
    msg = str(error_of(path, time=0))
    assert "no time axis" in msg


def test_4d_untagged_time_and_5d(tmp_path):
    path = tmp_path / "movie.h5"
    with h5py.File(path, "w") as f:
        f["t"] = np.zeros((10, 5, 6, 7), np.float32)
        f["tc"] = np.zeros((3, 2, 5, 6, 7), np.float32)
    msg = str(error_of(f"{path}:t"))
    assert "axis 0 (size 10) looks like time points" in msg and "--time 0" in msg
    assert "guessed" in msg
    msg = str(error_of(f"{path}:tc"))
    assert "time points" in msg and "channels" in msg and "--time 0 --channel 0" in msg
    assert read_volume(f"{path}:tc", time=2, channel=1).shape == (5, 6, 7)


def test_channel_for_3d_volume(tmp_path):
    path = write_volume(tmp_path / "a.h5", Volume(vol3d()))
    assert "no channel axis" in str(error_of(path, channel=1))


def test_rgb_single_image(tmp_path):
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    msg = str(error_of(path))
    assert "photo.tif" in msg and "2D image" in msg and "channels" in msg


def test_planes_tagged_as_channels_get_a_fiji_hint(tmp_path):
    path = tmp_path / "tagged.tif"
    tifffile.imwrite(path, np.zeros((12, 8, 9), np.uint8), imagej=True)  # ImageJ: 12 channels
    msg = str(error_of(path))
    assert "tagged.tif" in msg and "2D image" in msg and "Slices 12" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity(tmp_path, bad):
    data = vol3d(np.float32)
    data[2, 3, 4] = bad
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"})
    err = error_of(path)
    assert isinstance(err, VolumeDataError)
    assert "f.tif" in str(err) and "NaN or infinite" in str(err) and "z=2, y=3, x=4" in str(err)
    with pytest.raises(VolumeDataError, match="NaN or infinite"):
        write_volume(tmp_path / "out.h5", Volume(data))


@pytest.mark.parametrize("dtype,word", [(np.complex64, "complex"), (bool, "true/false"),
                                        (object, "Python objects")])
def test_unsupported_dtypes(tmp_path, dtype, word):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((3, 4, 5), dtype=dtype), allow_pickle=True)
    err = error_of(path)
    assert isinstance(err, VolumeDataError)
    msg = str(err)
    assert "d.npy" in msg and np.dtype(dtype).name in msg and word in msg and "uint16" in msg


def test_complex_hdf5(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((3, 4, 5), np.complex128)
    assert "complex" in str(error_of(path))


def test_bad_labels_name_the_file(tmp_path):
    path = write_volume(tmp_path / "lab.h5", Volume(vol3d(np.float32) / 3))
    with pytest.raises(VolumeDataError, match="lab.h5.*fractional"):
        read_labels(path)
    path = write_volume(tmp_path / "neg.h5", Volume(vol3d(np.int16) - 4))
    with pytest.raises(VolumeDataError, match="neg.h5.*negative"):
        read_labels(path)


# ------------------------------------------------------------------ writing


def test_write_errors(tmp_path):
    vol = Volume(vol3d())
    with pytest.raises(VolumeWriteError, match=r"out\.png.*\.tif"):
        write_volume(tmp_path / "out.png", vol)
    with pytest.raises(VolumeDataError, match="3D"):
        write_volume(tmp_path / "out.h5", Volume(np.zeros((4, 4))))
    (tmp_path / "folder.h5").mkdir()
    with pytest.raises(VolumeWriteError, match="is a folder"):
        write_volume(tmp_path / "folder.h5", vol)
    with pytest.raises(VolumeWriteError, match="holds one stack"):
        write_volume(tmp_path / "out.tif:raw", vol)
    with pytest.raises(VolumeDataError, match="unsupported data type bool"):
        write_volume(tmp_path / "out.h5", Volume(np.zeros((3, 4, 5), bool)))


def test_never_overwrites_its_input(tmp_path):
    path = write_volume(tmp_path / "in.h5", Volume(vol3d()))
    before = path.read_bytes()
    vol = read_volume(path)
    with pytest.raises(VolumeWriteError, match="never modified"):
        write_volume(path, vol)
    with pytest.raises(VolumeWriteError, match="never modified"):
        write_volume(f"{path}:other", vol)
    assert path.read_bytes() == before


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_failure_mid_write_leaves_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "out.tif"
    target.write_bytes(b"previous result")

    def broken_imwrite(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"II*\0half a file")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(tiff.tifffile, "imwrite", broken_imwrite)
    with pytest.raises(VolumeWriteError, match="out.tif"):
        write_volume(target, Volume(vol3d()))
    assert target.read_bytes() == b"previous result"
    assert leftovers(tmp_path) == []


def test_disk_full_gives_clear_message(tmp_path, monkeypatch):
    def full(path, *args, **kwargs):
        open(path, "wb").write(b"II*\0")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiff.tifffile, "imwrite", full)
    with pytest.raises(VolumeWriteError) as err:
        write_volume(tmp_path / "out.tif", Volume(vol3d()))
    assert "Not enough disk space" in str(err.value) and "out.tif" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.bin.tmp-")
        assert not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("boom")
    assert target.read_bytes() == b"new"
    assert leftovers(target.parent) == []
    with pytest.raises(VolumeWriteError, match="No permission"):
        with atomic_path(target) as tmp:
            raise PermissionError(errno.EACCES, "Permission denied")
    assert leftovers(target.parent) == []
