"""MATLAB orientation: a stack I(row, column, slice) is (y, x, z) and must come
out as ZYX; what we write must load in MATLAB as I(row=y, col=x, slice=z)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.io

from core.errors import VolumeDataError, VolumeWriteError
from core.io import AmbiguousVolumeError, list_contents, read_labels, read_volume, write_volume
from core.io import matlab
from core.volume import Volume

Z, Y, X = 5, 7, 11


def zyx() -> np.ndarray:
    """The volume as EpiSeg sees it; every value different."""
    return np.arange(Z * Y * X, dtype=np.uint16).reshape(Z, Y, X)


def matlab_stack() -> np.ndarray:
    """The same stack as MATLAB holds it: I(y, x, z), i.e. a (Y, X, Z) array."""
    return zyx().transpose(1, 2, 0)


def write_like_matlab_v73(path, variables):
    """What MATLAB's save -v7.3 makes: 512-byte header, column-major datasets."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in variables.items():
            ds = f.create_dataset(name, data=np.asarray(arr).T)  # column-major on disk
            ds.attrs["MATLAB_class"] = np.bytes_(matlab._MATLAB_CLASS[arr.dtype.name])
    with open(path, "r+b") as fh:
        fh.write(matlab.matlab_header())


def test_v5_file_from_matlab_reads_as_zyx(tmp_path):
    path = tmp_path / "gland.mat"
    scipy.io.savemat(path, {"I": matlab_stack()})
    vol = read_volume(path)
    assert vol.shape == (Z, Y, X)
    np.testing.assert_array_equal(vol.data, zyx())
    assert vol.meta["matlab_size"] == (Y, X, Z)


def test_v73_file_from_matlab_reads_as_zyx(tmp_path):
    path = tmp_path / "gland73.mat"
    write_like_matlab_v73(path, {"I": matlab_stack()})
    with h5py.File(path, "r") as f:
        assert f["I"].shape == (Z, X, Y)  # what the thesis saw as "(Z, X, Y)"
    vol = read_volume(path)
    assert vol.shape == (Z, Y, X)
    np.testing.assert_array_equal(vol.data, zyx())
    assert vol.meta["format"] == "MATLAB v7.3 (HDF5)"


def test_written_v5_loads_in_matlab_order(tmp_path):
    out = write_volume(tmp_path / "o.mat", Volume(zyx(), (0.5, 0.13, 0.2)))
    assert out.read_bytes()[:10] == b"MATLAB 5.0"
    loaded = scipy.io.loadmat(out)
    assert loaded["I"].shape == (Y, X, Z)  # size(I) = [Y X Z]
    np.testing.assert_array_equal(loaded["I"], matlab_stack())
    z, y, x = 2, 3, 4
    assert loaded["I"][y, x, z] == zyx()[z, y, x]
    np.testing.assert_allclose(loaded["voxel_size_zyx_um"], [[0.5, 0.13, 0.2]])


def test_written_v73_has_matlab_header_class_and_layout(tmp_path):
    out = write_volume(tmp_path / "o.mat", Volume(zyx(), (0.5, 0.13, 0.2)), mat_version="7.3")
    head = out.read_bytes()[:512]
    assert head.startswith(b"MATLAB 7.3 MAT-file")
    assert b"HDF5 schema 1.00" in head[:116]
    assert head[124:128] == b"\x00\x02IM"
    with h5py.File(out, "r") as f:
        assert f.userblock_size == 512
        ds = f["I"]
        assert ds.attrs["MATLAB_class"] == b"uint16"
        assert ds.shape == (Z, X, Y)
        np.testing.assert_array_equal(ds[()], matlab_stack().T)  # = MATLAB's I(y, x, z)
        vs = f["voxel_size_zyx_um"]
        assert vs.attrs["MATLAB_class"] == b"double" and vs.shape == (3, 1)  # 1x3 in MATLAB


@pytest.mark.parametrize("version", ["5", "7.3"])
def test_variable_names_and_label_defaults(tmp_path, version):
    out = write_volume(tmp_path / "a.mat", Volume(zyx()), mat_variable="stack", mat_version=version)
    assert [e.name for e in list_contents(out)] == ["stack"]
    np.testing.assert_array_equal(read_volume(f"{out}:stack").data, zyx())
    labels = (zyx() % 50).astype(np.float64)  # MATLAB often keeps labels as double
    out = write_volume(tmp_path / "l.mat", Volume(labels), labels=True, mat_version=version)
    entries = list_contents(out)
    assert [(e.name, e.dtype) for e in entries] == [("labels", "uint8")]
    back = read_labels(out)
    assert back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, labels)


def test_auto_version_switches_to_v73_for_big_variables(tmp_path, monkeypatch):
    monkeypatch.setattr(matlab, "V5_LIMIT_BYTES", 100)  # pretend 2 GB is 100 bytes
    out = write_volume(tmp_path / "big.mat", Volume(zyx()))
    assert out.read_bytes()[:10] == b"MATLAB 7.3"
    with pytest.raises(VolumeWriteError, match="7.3"):
        write_volume(tmp_path / "v5.mat", Volume(zyx()), mat_version="5")
    assert not (tmp_path / "v5.mat").exists()


def test_several_variables_need_a_name(tmp_path):
    path = tmp_path / "two.mat"
    scipy.io.savemat(path, {"raw": matlab_stack(), "seg": matlab_stack() % 4})
    with pytest.raises(AmbiguousVolumeError) as err:
        read_volume(path)
    assert "raw" in str(err.value) and "seg" in str(err.value) and f"{path}:raw" in str(err.value)
    with pytest.raises(VolumeDataError, match="no variable named 'rwa'"):
        read_volume(f"{path}:rwa")
    np.testing.assert_array_equal(read_volume(f"{path}:seg").data, zyx() % 4)


def test_v73_struct_field(tmp_path):
    path = tmp_path / "s.mat"
    write_like_matlab_v73(path, {"other": np.zeros((3, 3))})
    with h5py.File(path, "r+") as f:
        grp = f.create_group("s")
        grp.attrs["MATLAB_class"] = np.bytes_(b"struct")
        grp.create_dataset("img", data=matlab_stack().T)
    with pytest.raises(VolumeDataError, match="no 3D variable"):
        read_volume(path)
    np.testing.assert_array_equal(read_volume(f"{path}:s.img").data, zyx())


def test_complex_and_logical_are_refused_not_silently_cast(tmp_path):
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"I": matlab_stack() * (1 + 1j)})
    with pytest.raises(VolumeDataError, match="complex"):
        read_volume(path)
    path = tmp_path / "m.mat"
    scipy.io.savemat(path, {"mask": matlab_stack() > 3})
    with pytest.raises(VolumeDataError, match="logical"):
        read_volume(path)


def test_invalid_variable_name(tmp_path):
    with pytest.raises(VolumeWriteError, match="not a valid MATLAB variable name"):
        write_volume(tmp_path / "a.mat", Volume(zyx()), mat_variable="2 bad")
    assert list(tmp_path.iterdir()) == []
