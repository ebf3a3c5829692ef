"""NumPy files: .npy (one array) and .npz (several, ``file.npz:name``).

A .npy file holds no voxel size; a .npz file keeps it in an extra array
``voxel_size_zyx_um`` = [z, y, x] in micrometres. Arrays are (Z, Y, X) C order
unless their shape says otherwise (see :mod:`core.io.axes`). Pickled object
arrays are never loaded.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from core.io.base import (
    VOXEL_SIZE_KEY, Entry, Source, check_dtype, choose_entry, clean_voxel_size,
    fmt_voxel, missing_entry_error,
)
from core.volume import VoxelSize

EXTENSIONS = (".npy", ".npz")


def _npy_header(path: Path):
    """(shape, dtype) from a .npy header without reading the data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), np.dtype(dtype)


def list_entries(path: Path) -> List[Entry]:
    if path.suffix.lower() == ".npy":
        shape, dtype = _npy_header(path)
        return [Entry(path.stem, shape, str(dtype))]
    with np.load(path, allow_pickle=False) as z:
        out = []
        for key in z.files:
            with z.zip.open(key + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, dtype = reader(fh)
            out.append(Entry(key, tuple(shape), str(np.dtype(dtype))))
        return out


@contextmanager
def open_source(path: Path, name: Optional[str]) -> Iterator[Source]:
    if path.suffix.lower() == ".npy":
        _, dtype = _npy_header(path)
        check_dtype(dtype, str(path))  # before np.load, which refuses object arrays obscurely
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        try:
            yield Source(data=arr, fmt="NumPy .npy")
        finally:
            del arr
        return
    entries = [e for e in list_entries(path) if e.name != VOXEL_SIZE_KEY]
    if name is None:
        name = choose_entry(entries, path_text=str(path), kind="array")
    elif name not in {e.name for e in entries}:
        raise missing_entry_error(str(path), name, entries, "array")
    check_dtype(np.dtype(next(e.dtype for e in entries if e.name == name)), f"{path}:{name}")
    with np.load(path, allow_pickle=False) as z:
        voxel = clean_voxel_size(z[VOXEL_SIZE_KEY], f"{path}:{VOXEL_SIZE_KEY}") \
            if VOXEL_SIZE_KEY in z.files else None
        yield Source(data=z[name], voxel_size=voxel, name=name, fmt="NumPy .npz")


def voxel_size_of(path: Path, name: Optional[str]) -> Optional[VoxelSize]:
    """The voxel size an .npz records (an .npy records none), without loading the stack."""
    if path.suffix.lower() == ".npy":
        return None
    with np.load(path, allow_pickle=False) as z:
        return clean_voxel_size(z[VOXEL_SIZE_KEY], f"{path}:{VOXEL_SIZE_KEY}") \
            if VOXEL_SIZE_KEY in z.files else None


def write(path: Path, data: np.ndarray, voxel_size: Optional[VoxelSize], *, name: str, suffix: str) -> Optional[str]:
    """Write .npy (no voxel size) or compressed .npz; returns a note if the voxel size was lost."""
    with open(path, "wb") as fh:
        if suffix == ".npy":
            np.save(fh, np.ascontiguousarray(data), allow_pickle=False)
            if voxel_size is not None:
                return (f"a .npy file cannot store the voxel size {fmt_voxel(voxel_size)}; "
                        "write .npz, .h5, .tif or .mat to keep it.")
        else:
            arrays = {name: data}
            if voxel_size is not None:
                arrays[VOXEL_SIZE_KEY] = np.asarray(voxel_size, np.float64)
            np.savez_compressed(fh, **arrays)
    return None
