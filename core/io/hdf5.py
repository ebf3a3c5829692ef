"""HDF5 (.h5, .hdf5, .hdf): datasets addressed as ``file.h5:path/to/dataset``.

Voxel size: the ``element_size_um`` attribute (z, y, x) on the dataset, as
PlantSeg and ilastik write it (or on the file root). Without a dataset path
the only 3D dataset is read; several are an error listing them.

Writing makes a new file with one dataset (default ``raw`` for images,
``label`` for label stacks), gzip level 4, chunked, with
``element_size_um`` when the voxel size is known. An existing file of that
name is replaced as a whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import h5py
import numpy as np

from core.errors import VolumeDataError
from core.io.base import Entry, Source, choose_entry, clean_voxel_size, missing_entry_error
from core.volume import VoxelSize

EXTENSIONS = (".h5", ".hdf5", ".hdf", ".he5")
VOXEL_ATTR = "element_size_um"
GZIP_LEVEL = 4


def _walk(group: h5py.Group, prefix: str = "") -> List[Entry]:
    entries: List[Entry] = []
    for key in group:
        try:
            obj = group[key]
        except (KeyError, OSError):  # dangling external/soft link
            entries.append(Entry(prefix + key, (), "?", "broken link"))
            continue
        name = prefix + key
        if isinstance(obj, h5py.Dataset):
            entries.append(Entry(name, tuple(obj.shape), str(obj.dtype)))
        elif isinstance(obj, h5py.Group):
            entries.extend(_walk(obj, name + "/"))
    return entries


def list_entries(path: Path) -> List[Entry]:
    """Every dataset in the file (recursively), with shape and dtype."""
    with h5py.File(path, "r") as f:
        return _walk(f)


def select(f: h5py.File, path: Path, name: Optional[str], kind: str = "dataset") -> Tuple[h5py.Dataset, str]:
    """The dataset ``name`` or the only 3D one; clear errors otherwise."""
    text = str(path)
    if name is None:
        name = choose_entry(_walk(f), path_text=text, kind=kind)
    key = name.strip("/")
    if key not in f and "." in key and key.replace(".", "/") in f:
        key = key.replace(".", "/")  # MATLAB struct field written as s.field
    if key not in f:
        raise missing_entry_error(text, name, _walk(f), kind)
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        inside = ", ".join(e.describe() for e in _walk(obj, key + "/")) or "nothing"
        raise VolumeDataError(
            f"{text}:{name} is a group, not a {kind}. Inside it: {inside}."
        )
    return obj, key


def read_voxel(f: h5py.File, ds: h5py.Dataset, where: str) -> Optional[VoxelSize]:
    for holder in (ds, f):
        if VOXEL_ATTR in holder.attrs:
            return clean_voxel_size(holder.attrs[VOXEL_ATTR], where)
    return None


@contextmanager
def open_source(path: Path, name: Optional[str]) -> Iterator[Source]:
    with h5py.File(path, "r") as f:
        ds, key = select(f, path, name)
        yield Source(
            data=ds,
            voxel_size=read_voxel(f, ds, f"{path}:{key}"),
            name=key,
            fmt="HDF5",
            meta={"compression": ds.compression},
        )


def chunk_shape(shape: Tuple[int, ...], itemsize: int, target_bytes: int = 2**20) -> Tuple[int, ...]:
    """ZYX chunks of about ``target_bytes``: thin in Z, wide in Y and X."""
    z, y, x = shape
    cy, cx = min(y, 256), min(x, 256)
    cz = max(1, min(z, target_bytes // max(1, cy * cx * itemsize)))
    return (cz, cy, cx)


def write(path: Path, data: np.ndarray, voxel_size: Optional[VoxelSize], *, dataset: str) -> None:
    """Write a ZYX array as ``dataset`` in a new HDF5 file (gzip 4, chunked)."""
    key = dataset.strip("/") or "raw"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            key,
            data=data,
            chunks=chunk_shape(data.shape, data.dtype.itemsize) if data.size else None,
            compression="gzip" if data.size else None,
            compression_opts=GZIP_LEVEL if data.size else None,
        )
        if voxel_size is not None:
            ds.attrs[VOXEL_ATTR] = np.asarray(voxel_size, dtype=np.float64)
