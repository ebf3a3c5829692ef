"""MATLAB .mat files: v5/v7 (scipy.io) and v7.3 (HDF5, h5py).

Orientation. MATLAB stores a stack as ``I(row, column, slice)`` = (y, x, z),
column-major. scipy.io hands it over as a (Y, X, Z) array; h5py reads a v7.3
file's bytes in C order and so sees the reversed shape (Z, X, Y). Both are
turned into (Z, Y, X). Writing does the reverse, so MATLAB loads
``I(row=y, col=x, slice=z)`` and ``size(I)`` is ``[Y X Z]``.

Variables. Images are written as ``I`` and label stacks as ``labels`` unless a
name is given; reading picks the only 3D variable unless one is named
(``file.mat:variable``). The voxel size goes into an extra 1x3 double
variable ``voxel_size_zyx_um`` = ``[z y x]`` in micrometres (note the order),
and is read back from it.

Versions. ``mat_version="auto"`` writes v5 (compressed) below 2 GB and v7.3
above; v7.3 is an HDF5 file with MATLAB's 512-byte header, a ``MATLAB_class``
attribute on each variable and gzip compression.
"""

from __future__ import annotations

import platform
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import h5py
import numpy as np
import scipy.io

from core.errors import VolumeDataError, VolumeWriteError
from core.io import hdf5
from core.io.base import (
    NOT_ARRAY_NOTES, VOXEL_SIZE_KEY, Entry, Source, choose_entry, clean_voxel_size,
    missing_entry_error,
)
from core.volume import VoxelSize

EXTENSIONS = (".mat",)
DEFAULT_IMAGE_VARIABLE = "I"
DEFAULT_LABEL_VARIABLE = "labels"
V5_LIMIT_BYTES = 2**31  # MATLAB: v5/v7 files hold variables below 2 GB
HEADER_BYTES = 512
_VALID_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")

_MATLAB_CLASS = {
    "float64": "double", "float32": "single",
    "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
}

_NUMPY_DTYPE = {cls: np.dtype(name) for name, cls in _MATLAB_CLASS.items()}


def is_v73(path: Path) -> bool:
    """True for a v7.3 (HDF5) MAT-file."""
    return h5py.is_hdf5(path)


def _v5_natural(ndim: int) -> Tuple[int, ...]:
    """(d1=rows, d2=cols, d3, ..., dn) -> (dn, ..., d3, rows, cols)."""
    return tuple(range(ndim - 1, 1, -1)) + (0, 1)


def _v73_natural(ndim: int) -> Tuple[int, ...]:
    """h5py sees (dn, ..., d3, cols, rows) -> (dn, ..., d3, rows, cols)."""
    return tuple(range(ndim - 2)) + (ndim - 1, ndim - 2) if ndim >= 2 else tuple(range(ndim))


# ---------------------------------------------------------------- reading


def _v73_entries(f: h5py.File) -> List[Entry]:
    entries = []
    for key in f:
        if key.startswith("#"):
            continue
        obj = f[key]
        cls = obj.attrs.get("MATLAB_class", b"")
        cls = cls.decode() if isinstance(cls, bytes) else str(cls)
        note = cls if cls and cls.startswith(NOT_ARRAY_NOTES) else ""
        if isinstance(obj, h5py.Group):
            entries.append(Entry(key, (), cls or "group", note or "group"))
        elif obj.attrs.get("MATLAB_empty", 0):
            entries.append(Entry(key, (0, 0), cls, "empty"))
        else:
            entries.append(Entry(key, tuple(reversed(obj.shape)), cls or str(obj.dtype), note))
    return entries


def _v5_entries(path: Path) -> List[Entry]:
    return [
        Entry(name, tuple(shape), cls, cls if cls.startswith(NOT_ARRAY_NOTES) else "")
        for name, shape, cls in scipy.io.whosmat(str(path))
    ]


def list_entries(path: Path) -> List[Entry]:
    """Variables with MATLAB's size (rows first) and class."""
    if is_v73(path):
        with h5py.File(path, "r") as f:
            return _v73_entries(f)
    return _v5_entries(path)


def _pick_name(entries: List[Entry], path: Path, name: Optional[str]) -> str:
    usable = [e for e in entries if e.name != VOXEL_SIZE_KEY]
    if name is None:
        return choose_entry(usable, path_text=str(path), kind="variable")
    if name not in {e.name for e in entries}:
        raise missing_entry_error(str(path), name, usable, "variable")
    entry = next(e for e in entries if e.name == name)
    if entry.note:
        raise VolumeDataError(
            f"{path}:{name} is a MATLAB {entry.dtype}, not a numeric array. Save the "
            f"stack itself as a variable (e.g. I = s.image; save('file.mat', 'I')), or "
            f"for a v7.3 file give the field as {path}:{name}/field."
        )
    return name


def _check_logical(cls: str, where: str) -> None:
    if cls == "logical":
        raise VolumeDataError(
            f"{where}: unsupported data type logical: true/false values (a mask). "
            "Convert it first: I = uint8(I); save(...)."
        )


@contextmanager
def open_source(path: Path, name: Optional[str]) -> Iterator[Source]:
    if is_v73(path):
        with h5py.File(path, "r") as f:
            entries = _v73_entries(f)
            if name is None or not any(c in name.strip("/") for c in "/."):
                name = _pick_name(entries, path, name)
            ds, key = hdf5.select(f, path, name, kind="variable")
            cls = ds.attrs.get("MATLAB_class", b"")
            _check_logical(cls.decode() if isinstance(cls, bytes) else str(cls), f"{path}:{key}")
            voxel = None
            if VOXEL_SIZE_KEY in f and isinstance(f[VOXEL_SIZE_KEY], h5py.Dataset):
                voxel = clean_voxel_size(f[VOXEL_SIZE_KEY][()], f"{path}:{VOXEL_SIZE_KEY}")
            yield Source(
                data=ds, natural=_v73_natural(ds.ndim), voxel_size=voxel, name=key,
                fmt="MATLAB v7.3 (HDF5)", meta={"matlab_size": tuple(reversed(ds.shape))},
            )
        return
    entries = _v5_entries(path)
    name = _pick_name(entries, path, name)
    cls = next(e.dtype for e in entries if e.name == name)
    _check_logical(cls, f"{path}:{name}")
    wanted = [name] + ([VOXEL_SIZE_KEY] if any(e.name == VOXEL_SIZE_KEY for e in entries) else [])
    # mat_dtype=True would silently drop imaginary parts, so load as stored and
    # then restore the MATLAB class (MATLAB may store doubles as small integers).
    contents = scipy.io.loadmat(str(path), variable_names=wanted, mat_dtype=False)
    arr = np.asarray(contents[name])
    class_dtype = _NUMPY_DTYPE.get(cls)
    if class_dtype is not None and arr.dtype.kind in "iuf" and arr.dtype != class_dtype:
        arr = arr.astype(class_dtype)
    voxel = None
    if VOXEL_SIZE_KEY in contents:
        voxel = clean_voxel_size(contents[VOXEL_SIZE_KEY], f"{path}:{VOXEL_SIZE_KEY}")
    yield Source(
        data=arr, natural=_v5_natural(arr.ndim), voxel_size=voxel, name=name,
        fmt="MATLAB v5", meta={"matlab_size": tuple(arr.shape)},
    )


def voxel_size_of(path: Path, name: Optional[str]) -> Optional[VoxelSize]:
    """The voxel size a .mat file records, without reading the stack where the format
    allows (v5: only that variable is loaded; v7.3 reads lazily anyway)."""
    if is_v73(path):
        with open_source(path, name) as src:
            return src.voxel_size
    if not any(e.name == VOXEL_SIZE_KEY for e in _v5_entries(path)):
        return None
    contents = scipy.io.loadmat(str(path), variable_names=[VOXEL_SIZE_KEY])
    return clean_voxel_size(contents[VOXEL_SIZE_KEY], f"{path}:{VOXEL_SIZE_KEY}")


# ---------------------------------------------------------------- writing


def check_variable_name(name: str) -> str:
    if not _VALID_NAME.match(name or ""):
        raise VolumeWriteError(
            f"'{name}' is not a valid MATLAB variable name: use letters, digits and _, "
            "starting with a letter, at most 63 characters (e.g. I or labels)."
        )
    if name == VOXEL_SIZE_KEY:
        raise VolumeWriteError(f"'{name}' is reserved for the voxel size; choose another name.")
    return name


def choose_version(nbytes: int, mat_version: str) -> str:
    """'5' or '7.3' for ``mat_version`` in {'auto', '5', '7', '7.3'}."""
    version = str(mat_version).lower().lstrip("v")
    if version == "auto":
        return "5" if nbytes < V5_LIMIT_BYTES else "7.3"
    if version in ("5", "7", "6"):
        if nbytes >= V5_LIMIT_BYTES:
            raise VolumeWriteError(
                f"A v5 .mat file cannot hold a variable of {nbytes / 2**30:.1f} GB "
                "(MATLAB's limit is 2 GB). Use --mat-version 7.3 (mat_version='7.3')."
            )
        return "5"
    if version == "7.3":
        return "7.3"
    raise VolumeWriteError(
        f"Unknown MATLAB file version '{mat_version}'; use auto, 5 or 7.3."
    )


def matlab_header(now: Optional[float] = None) -> bytes:
    """The 512-byte v7.3 header: text, version 0x0200 and 'IM' at bytes 124-127."""
    created = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now))
    text = (f"MATLAB 7.3 MAT-file, Platform: {platform.system() or 'unknown'}, "
            f"Created on: {created} HDF5 schema 1.00 .")
    head = text.encode("ascii", "replace")[:116].ljust(116, b" ")
    head += b" " * 8  # subsystem data offset: none
    head += np.uint16(0x0200).tobytes() + b"IM"  # little-endian version and indicator
    return head.ljust(HEADER_BYTES, b"\0")


def _set_class(obj: h5py.HLObject, cls: str) -> None:
    """MATLAB_class attribute as MATLAB writes it: fixed-length ASCII of exactly
    ``len(cls)`` bytes, STRPAD NULLTERM (written raw so no byte is cut off)."""
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(cls))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    attr = h5py.h5a.create(obj.id, b"MATLAB_class", tid, space)
    attr.write(np.array(cls.encode("ascii"), dtype=f"S{len(cls)}"), mtype=tid)


def _matlab_class(dtype: np.dtype) -> str:
    try:
        return _MATLAB_CLASS[np.dtype(dtype).name]
    except KeyError:
        raise VolumeDataError(f"MATLAB has no class for dtype {dtype}.") from None


def _write_v73(path: Path, data: np.ndarray, voxel_size: Optional[VoxelSize], variable: str) -> None:
    cls = _matlab_class(data.dtype)
    z, y, x = data.shape
    with h5py.File(path, "w", userblock_size=HEADER_BYTES, libver="earliest") as f:
        # MATLAB reads dims reversed: an HDF5 (Z, X, Y) dataset is I(y, x, z).
        chunks = hdf5.chunk_shape((z, x, y), data.dtype.itemsize) if data.size else None
        ds = f.create_dataset(
            variable, shape=(z, x, y), dtype=data.dtype, chunks=chunks,
            compression="gzip" if data.size else None,
            compression_opts=hdf5.GZIP_LEVEL if data.size else None,
        )
        _set_class(ds, cls)
        step = max(1, (64 * 2**20) // max(1, x * y * data.dtype.itemsize))
        for z0 in range(0, z, step):
            ds[z0:z0 + step] = data[z0:z0 + step].transpose(0, 2, 1)
        if voxel_size is not None:
            vs = f.create_dataset(VOXEL_SIZE_KEY, data=np.asarray(voxel_size, np.float64).reshape(3, 1))
            _set_class(vs, "double")
    with open(path, "r+b") as fh:
        fh.write(matlab_header())


def _write_v5(path: Path, data: np.ndarray, voxel_size: Optional[VoxelSize], variable: str) -> None:
    contents = {variable: data.transpose(1, 2, 0)}  # (Z, Y, X) -> MATLAB I(y, x, z)
    if voxel_size is not None:
        contents[VOXEL_SIZE_KEY] = np.asarray(voxel_size, np.float64).reshape(1, 3)
    with open(path, "wb") as fh:
        scipy.io.savemat(fh, contents, do_compression=True, format="5", oned_as="row")


def write(
    path: Path,
    data: np.ndarray,
    voxel_size: Optional[VoxelSize],
    *,
    variable: str,
    mat_version: str = "auto",
) -> str:
    """Write a ZYX array as a MATLAB variable; returns the version written ('5' or '7.3')."""
    check_variable_name(variable)
    if data.dtype == np.float16:
        data = data.astype(np.float32)
    _matlab_class(data.dtype)
    version = choose_version(data.nbytes, mat_version)
    if version == "7.3":
        _write_v73(path, data, voxel_size, variable)
    else:
        _write_v5(path, data, voxel_size, variable)
    return version
