"""Pieces every format module shares: what a reader hands back, listings,
choosing the one 3D dataset in a container file, and dtype checks.

A reader returns a :class:`Source`: the stored array (a NumPy array or a lazy
``h5py.Dataset``), the letters of its axes when the file records them, and
the voxel size (z, y, x) in micrometres. :mod:`core.io.axes` turns it into a
ZYX array.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from core.errors import VolumeDataError
from core.volume import VoxelSize

#: Name of the extra variable/array holding the voxel size in .mat and .npz files.
VOXEL_SIZE_KEY = "voxel_size_zyx_um"

#: Entry notes that mark something that is not a numeric array.
NOT_ARRAY_NOTES = ("group", "struct", "cell", "object", "sparse", "function", "empty", "broken")

SUPPORTED_DTYPES_TEXT = (
    "unsigned or signed integers (uint8, uint16, uint32, uint64, int8 ... int64) "
    "or floating point (float16, float32, float64)"
)


class AmbiguousVolumeError(VolumeDataError):
    """A container file holds several 3D datasets and none was named.

    ``candidates`` lists their names, so a caller (e.g. ``episeg info``) can
    show all of them.
    """

    def __init__(self, message: str, candidates: Sequence[str]):
        super().__init__(message)
        self.candidates = list(candidates)


@dataclass(frozen=True)
class Entry:
    """One dataset, variable, array or series inside a file.

    shape: as stored (for .mat files: MATLAB's ``size()``, rows first).
    dtype: NumPy dtype name, or the MATLAB class for .mat files.
    note: anything worth showing ("group", "struct", "axes ZCYX", ...).
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    note: str = ""

    def describe(self) -> str:
        text = f"{self.name} ({fmt_shape(self.shape)} {self.dtype})"
        if not self.note or self.note == self.dtype:
            return text
        return f"{text[:-1]}, {self.note})"


@dataclass
class Source:
    """What a format reader found.

    data: the stored array; anything with ``shape``, ``dtype`` and NumPy-style
        indexing with ints and slices (ndarray, memmap, h5py.Dataset).
    axes: one letter per stored axis from "TCZYX" (S, samples, counts as C),
        or None when the file does not record them.
    natural: permutation that puts the stored axes into C order with rows (Y)
        and columns (X) last; used when ``axes`` is None (MATLAB files are
        column-major, so theirs is not the identity).
    voxel_size: (z, y, x) in micrometres, or None.
    name: the dataset/variable/series actually read (None for single-array files).
    fmt: human-readable format, e.g. "TIFF (ImageJ)".
    """

    data: Any
    axes: Optional[str] = None
    natural: Optional[Tuple[int, ...]] = None
    voxel_size: Optional[VoxelSize] = None
    name: Optional[str] = None
    fmt: str = ""
    meta: dict = field(default_factory=dict)


def fmt_shape(shape: Sequence[int]) -> str:
    """(30, 2, 64) -> '30x2x64'."""
    return "x".join(str(int(s)) for s in shape) if len(shape) else "scalar"


def fmt_voxel(voxel_size: Optional[VoxelSize]) -> str:
    if voxel_size is None:
        return "not recorded"
    return " x ".join(f"{v:.6g}" for v in voxel_size) + " um"


def clean_voxel_size(values: Any, where: str) -> Optional[VoxelSize]:
    """Three positive finite numbers (z, y, x) or None.

    A broken attribute should not stop a file from being read: it is ignored
    (with a warning) and the voxel size counts as not recorded.
    """
    if values is None:
        return None
    try:
        arr = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.size != 3 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        warnings.warn(
            f"{where}: ignoring a voxel size that is not three positive numbers "
            f"(z, y, x in micrometres): {values!r}. Set it with --voxel-size Z,Y,X.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def check_dtype(dtype: np.dtype, where: str) -> None:
    """Raise VolumeDataError unless ``dtype`` is a plain integer or float type."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iuf":
        return
    if dtype.kind == "c" or (dtype.names and {"real", "imag"} <= set(dtype.names)):
        what = "complex numbers"
        todo = "Save the magnitude or the real part instead (MATLAB: abs(I) or real(I))."
    elif dtype.kind == "b":
        what = "true/false values (a mask)"
        todo = "Convert it to integers first (MATLAB: uint8(I); NumPy: a.astype('uint8'))."
    elif dtype.kind == "O":
        what = "Python objects"
        todo = "Save a plain numeric array instead."
    elif dtype.names:
        what = "records with fields " + ", ".join(dtype.names)
        todo = "Save one numeric field as its own array."
    else:
        what = f"values of kind '{dtype.kind}'"
        todo = "Save a plain numeric array instead."
    raise VolumeDataError(
        f"{where}: unsupported data type {dtype}: {what}. EpiSeg reads "
        f"{SUPPORTED_DTYPES_TEXT}. {todo}"
    )


def choose_entry(
    entries: List[Entry],
    *,
    path_text: str,
    kind: str,
    ndim_of=lambda e: len(e.shape),
) -> str:
    """Name of the only 3D entry; else the only 4D/5D one; else a clear error.

    kind: "dataset", "variable" or "array", used in messages.
    """
    usable = [e for e in entries if not e.note.startswith(NOT_ARRAY_NOTES)]
    three = [e for e in usable if ndim_of(e) == 3]
    more = [e for e in usable if ndim_of(e) in (4, 5)]
    if len(three) == 1:
        return three[0].name
    if not three and len(more) == 1:
        return more[0].name
    candidates = three + more
    if candidates:
        listing = ", ".join(e.describe() for e in candidates)
        first = example_name([e.name for e in candidates])
        raise AmbiguousVolumeError(
            f"{path_text} holds {len(candidates)} {kind}s that could be the volume: "
            f"{listing}. Say which one after a colon: {path_text}:{first} on the "
            f"command line, or read_volume('{path_text}:{first}') in Python.",
            [e.name for e in candidates],
        )
    if len(entries) == 1 and entries[0] in usable and ndim_of(entries[0]) == 2:
        return entries[0].name  # a lone 2D image: the reader explains that it is 2D
    found = ", ".join(e.describe() for e in entries) or "nothing"
    raise VolumeDataError(
        f"{path_text} holds no 3D {kind} (found: {found}). EpiSeg needs a 3D stack "
        "(Z slices x Y x X); check that this is the right file, or export the stack "
        "as a 3D array."
    )


def example_name(names: Sequence[str]) -> str:
    """The name most likely to be the image (raw, image, I, ...) for examples."""
    for preferred in ("raw", "image", "img", "I", "data", "volume"):
        for name in names:
            if name.rsplit("/", 1)[-1] == preferred:
                return name
    return names[0]


def missing_entry_error(path_text: str, name: str, entries: List[Entry], kind: str) -> VolumeDataError:
    found = ", ".join(e.describe() for e in entries) or "nothing"
    example = next((e.name for e in entries if len(e.shape) >= 3), None)
    hint = f" For example: {path_text}:{example}" if example else ""
    return VolumeDataError(
        f"{path_text} has no {kind} named '{name}'. Inside: {found}.{hint}"
    )
