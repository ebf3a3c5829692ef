"""Turn a stored array of any axis order into a ZYX array.

Files record their axes (ImageJ and OME-TIFF do), or they do not (HDF5,
NumPy, MATLAB) and we guess: rows and columns are the last two axes in C
order; an extra axis of size <= 4 looks like channels, a longer one like
time points. Channel and time axes are reduced by picking one index, which
the user gives as ``channel=`` / ``time=`` (``--channel`` / ``--time``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from core.errors import VolumeDataError
from core.io.base import Source, fmt_shape
from core.scratch import release_pages, scratch_array

#: Bytes per block when copying from a lazy (HDF5) dataset, to bound memory.
BLOCK_BYTES = 64 * 2**20

_AXIS_WORDS = {"C": "channels", "T": "time points"}
_OPTION = {"C": "channel", "T": "time"}


def guess_axes(shape: Tuple[int, ...]) -> str:
    """Axis letters for an untagged array in C order (rows, columns last)."""
    n = len(shape)
    if n <= 3:
        return "ZYX"[3 - n:] if n else ""
    if n == 4:
        d0, d1, d2, d3 = shape
        if d3 <= 4 and min(d0, d1, d2) > 4:
            return "ZYXC"  # e.g. an RGB stack saved from NumPy
        if d0 <= 4 < d1:
            return "CZYX"
        if d1 <= 4:
            return "ZCYX"
        return "TZYX"
    if n == 5:
        if shape[2] <= 4 < shape[1]:
            return "TZCYX"  # ImageJ order
        return "TCZYX"  # OME order
    return "?" * n


def _normalise_letters(axes: str) -> Optional[str]:
    """Map tifffile's letters onto TCZYX; None when the meaning is unclear."""
    axes = axes.upper().replace("S", "C")
    unknown = [a for a in axes if a not in "TCZYX"]
    if len(unknown) == 1 and "Z" not in axes:
        axes = axes.replace(unknown[0], "Z")  # e.g. 'I' or 'Q' for an image sequence
    elif unknown:
        return None
    if len(set(axes)) != len(axes):
        return None
    return axes


def resolve_axes(src: Source, where: str) -> Tuple[str, Tuple[int, ...], bool]:
    """Stored-order axis letters, the natural permutation, and whether guessed."""
    shape = tuple(int(s) for s in src.data.shape)
    n = len(shape)
    natural = tuple(src.natural) if src.natural is not None else tuple(range(n))
    axes = _normalise_letters(src.axes) if src.axes else None
    if axes is not None and len(axes) == n:
        return axes, natural, False
    nat_shape = tuple(shape[p] for p in natural)
    if n > 5:
        raise VolumeDataError(
            f"{where} has {n} dimensions (shape {fmt_shape(nat_shape)}). EpiSeg reads 3D "
            "stacks (Z, Y, X), optionally with one channel and one time axis; save a "
            "single 3D stack."
        )
    if n < 2:
        raise VolumeDataError(
            f"{where} holds a {n}D array (shape {fmt_shape(nat_shape)}), not an image. "
            "EpiSeg needs a 3D stack (Z slices x Y x X)."
        )
    nat_axes = guess_axes(nat_shape)
    stored = ["?"] * n
    for j, p in enumerate(natural):
        stored[p] = nat_axes[j]
    return "".join(stored), natural, n > 3  # plain 3D arrays are ZYX by convention


def _pick(letter: str, value: Optional[int], size: int, j: int, where: str, desc: str) -> int:
    if value is None:
        return 0  # only called for size-1 axes or after the missing-index check
    value = int(value)
    if not 0 <= value < size:
        raise VolumeDataError(
            f"{where}: {_OPTION[letter]} {value} does not exist; axis {j} of {desc} has "
            f"{size} {_AXIS_WORDS[letter]} (0 to {size - 1}). Pick one with "
            f"--{_OPTION[letter]} 0 ... {size - 1}."
        )
    return value


def to_zyx(src: Source, *, channel: Optional[int], time: Optional[int], where: str) -> Tuple[np.ndarray, dict]:
    """Read ``src.data`` into a C-contiguous, native-endian ZYX array.

    Returns the array and a dict of what was done (axes, picked indices).
    Raises VolumeDataError for 2D data, unknown layouts and 4D/5D data
    without the needed ``channel``/``time`` index.
    """
    axes, natural, guessed = resolve_axes(src, where)
    shape = tuple(int(s) for s in src.data.shape)
    nat_shape = tuple(shape[p] for p in natural)
    nat_axes = "".join(axes[p] for p in natural)
    n = len(shape)
    desc = f"shape {fmt_shape(nat_shape)}, axes {nat_axes}" + (
        " (guessed: not recorded in the file)" if guessed else ""
    )

    spatial = [a for a in nat_axes if a in "ZYX"]
    if n == 2 or len(spatial) < 3 or "?" in nat_axes:
        if len(spatial) == 2 and "?" not in nat_axes:
            yx = [nat_shape[j] for j, a in enumerate(nat_axes) if a in "YX"]
            extra = ", with channels" if "C" in nat_axes else ""
            many = [nat_shape[j] for j, a in enumerate(nat_axes) if a == "C" and nat_shape[j] > 4]
            hint = (
                f" The file calls its {many[0]} planes channels; if they are Z slices, fix "
                "that in Fiji (Image > Properties...: Channels 1, Slices "
                f"{many[0]}) and save again." if many else
                " Save the whole stack (in Fiji: File > Save As > Tiff... with all "
                "slices), not one slice."
            )
            raise VolumeDataError(
                f"{where} holds a single 2D image ({fmt_shape(yx)} pixels{extra}), not a "
                f"3D stack. EpiSeg needs a 3D stack of Z slices.{hint}"
            )
        raise VolumeDataError(
            f"{where}: cannot tell which axes are Z, Y and X ({desc}). Save the data as "
            "a 3D array in Z, Y, X order."
        )

    # Untagged 4D arrays have one extra axis; either option may pick along it.
    if guessed and n == 4:
        extra = next(j for j, a in enumerate(nat_axes) if a in "CT")
        if channel is not None and time is None and nat_axes[extra] == "T":
            nat_axes = nat_axes.replace("T", "C")
        elif time is not None and channel is None and nat_axes[extra] == "C":
            nat_axes = nat_axes.replace("C", "T")
        stored = ["?"] * n
        for j, p in enumerate(natural):
            stored[p] = nat_axes[j]
        axes = "".join(stored)
        desc = f"shape {fmt_shape(nat_shape)}, axes {nat_axes} (guessed: not recorded in the file)"

    wanted = {"C": channel, "T": time}
    for letter in "CT":
        if wanted[letter] is not None and letter not in nat_axes:
            raise VolumeDataError(
                f"{where} has no {_OPTION[letter]} axis ({desc}); leave out "
                f"--{_OPTION[letter]}."
            )
    needed = [
        (j, a) for j, a in enumerate(nat_axes)
        if a in "CT" and nat_shape[j] > 1 and wanted[a] is None
    ]
    if needed:
        parts = [f"axis {j} (size {nat_shape[j]}) looks like {_AXIS_WORDS[a]}" for j, a in needed]
        opts = " ".join(f"--{_OPTION[a]} 0" for _, a in needed)
        kwargs = ", ".join(f"{_OPTION[a]}=0" for _, a in needed)
        one = "one" if len(needed) == 1 else "one of each"
        raise VolumeDataError(
            f"{where} has {n} dimensions ({desc}); {' and '.join(parts)}. "
            f"Pick {one} with {opts} (or read_volume(..., {kwargs}))."
        )

    index = []
    picked = {}
    for i, a in enumerate(axes):
        if a in "CT":
            j = natural.index(i)
            k = _pick(a, wanted[a], shape[i], j, where, desc)
            index.append(k)
            picked[_OPTION[a]] = k
        else:
            index.append(slice(None))
    kept = [a for a in axes if a in "ZYX"]
    order = tuple(kept.index(c) for c in "ZYX")
    zpos = axes.index("Z")
    out_shape = tuple(shape[axes.index(c)] for c in "ZYX")
    dtype = np.dtype(src.data.dtype)
    if dtype.byteorder not in "=|":
        dtype = dtype.newbyteorder("=")

    data = src.data
    as_is = (isinstance(data, np.memmap) and axes == "ZYX" and data.dtype == dtype
             and data.flags.c_contiguous)
    if as_is:  # already ZYX, e.g. a large TIFF decoded into a scratch file: no copy
        out = data
    elif isinstance(data, np.ndarray) and not isinstance(data, np.memmap):
        block = data[tuple(index)].transpose(order)
        out = np.ascontiguousarray(block, dtype=dtype)
    else:  # files read block by block; a large result is a scratch file (core.scratch)
        out = scratch_array(out_shape, dtype)
        plane = max(1, int(np.prod(out_shape[1:])) * dtype.itemsize)
        step = max(1, BLOCK_BYTES // plane)
        for z0 in range(0, out_shape[0], step):
            z1 = min(out_shape[0], z0 + step)
            index[zpos] = slice(z0, z1)
            out[z0:z1] = np.asarray(data[tuple(index)]).transpose(order)
            release_pages(out, data)
    info = {"axes_in_file": nat_axes, "axes_guessed": guessed, "shape_in_file": nat_shape}
    info.update(picked)
    return out, info
