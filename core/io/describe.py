"""What is inside a volume file, in words: for ``episeg info`` and the GUI's file panels.

:func:`describe_file` lists the datasets / variables inside a file and, for
the 3D volume (each candidate when there are several), its shape (Z, Y, X),
dtype, value range and voxel size (z, y, x) in micrometres.
:func:`volume_entries` names the entries that can be a volume, so a user can
pick one (``file.h5:dataset``, ``file.mat:variable``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from core.errors import EpiSegError
from core.io import AmbiguousVolumeError, format_of, list_contents, read_volume, split_spec
from core.io.base import NOT_ARRAY_NOTES, example_name, fmt_shape, fmt_voxel
from core.volume import Volume


def volume_entries(path) -> List[str]:
    """Names of the entries of ``path`` with 3 to 5 dimensions (candidate volumes).

    Empty for files that hold one image only (a plain TIFF, a .npy file).
    """
    path, _ = split_spec(path)
    fmt = format_of(path)
    entries = list_contents(path)
    if fmt not in ("HDF5", "MATLAB") and path.suffix.lower() != ".npz" and len(entries) <= 1:
        return []
    return [e.name for e in entries
            if not e.note.startswith(NOT_ARRAY_NOTES) and 3 <= len(e.shape) <= 5]


def describe_volume(vol: Volume, indent: str = "    ") -> List[str]:
    """Shape, dtype, value range, voxel size (and how it sat in the file) of a volume."""
    data = vol.data
    lo, hi = (np.min(data), np.max(data)) if data.size else (None, None)
    rows = [
        ("shape (Z, Y, X)", fmt_shape(vol.shape).replace("x", " x ")),
        ("dtype", str(data.dtype)),
        ("value range", f"{lo} .. {hi}" if lo is not None else "empty"),
        ("voxel size (z, y, x)", fmt_voxel(vol.voxel_size)),
    ]
    axes = vol.meta.get("axes_in_file")
    if axes and axes != "ZYX":
        shape = fmt_shape(vol.meta.get("shape_in_file", ()))
        picked = ", ".join(f"{k} {vol.meta[k]}" for k in ("channel", "time") if k in vol.meta)
        guessed = " (guessed)" if vol.meta.get("axes_guessed") else ""
        rows.append(("in the file", f"{shape}, axes {axes}{guessed}" + (f"; used {picked}" if picked else "")))
    if "matlab_size" in vol.meta:
        rows.append(("MATLAB size", fmt_shape(vol.meta["matlab_size"]).replace("x", " x ")))
    return [f"{indent}{k + ':':<22}{v}" for k, v in rows]


def describe_file(spec: str, channel: Optional[int] = None, time: Optional[int] = None
                  ) -> Tuple[List[str], Optional[EpiSegError]]:
    """Lines describing one file, and the error that stopped it (or None).

    What could be listed before an error (the datasets inside) is kept, so a
    4D dataset that needs a channel still shows the file's contents.
    """
    path, name = split_spec(spec)
    lines: List[str] = []
    try:
        entries = list_contents(path)
    except EpiSegError as err:
        return lines, err
    fmt = format_of(path) or "?"
    kind = {"HDF5": "datasets", "MATLAB": "variables (MATLAB size, class)",
            "NumPy": "arrays", "TIFF": "image series"}[fmt]
    lines.append(f"{path}  [{fmt}]")
    listed = fmt in ("HDF5", "MATLAB") or path.suffix.lower() == ".npz" or len(entries) > 1
    if listed:
        lines.append(f"  {kind}:")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            note = f"  ({e.note})" if e.note and e.note != e.dtype else ""
            lines.append(f"    {e.name:<{width}}  {fmt_shape(e.shape):>14}  {e.dtype}{note}")
    try:
        try:
            volumes = [read_volume(spec, channel=channel, time=time)]
        except AmbiguousVolumeError as err:
            volumes = [read_volume(f"{path}:{c}", channel=channel, time=time)
                       for c in err.candidates]
    except EpiSegError as err:
        if not listed and entries:
            e = entries[0]
            lines.append(f"  stored: {fmt_shape(e.shape)} {e.dtype}" + (f", {e.note}" if e.note else ""))
        return lines, err
    lines[0] = f"{path}  [{volumes[0].meta.get('format', fmt)}]"
    for vol in volumes:
        inner = vol.source[len(str(path)) + 1:] if vol.source.startswith(f"{path}:") else ""
        lines.append(f"  volume{' ' + inner if inner else ''}:")
        lines.extend(describe_volume(vol))
    if name is None and len(volumes) > 1:
        names = [v.source.rsplit(":", 1)[-1] for v in volumes]
        lines.append(f"  (several 3D {kind.split()[0]}: name one, e.g. {path}:{example_name(names)})")
    return lines, None


@dataclass
class StackInfo:
    """What :func:`inspect_stack` found: lines to show, pickable entries, the error if any."""

    spec: str
    lines: List[str] = field(default_factory=list)
    entries: List[str] = field(default_factory=list)
    error: str = ""


def inspect_stack(spec: str, *, progress=None, cancel=None) -> StackInfo:
    """Describe a file for a file panel (a job function: may read the whole volume)."""
    path, _ = split_spec(spec)
    info = StackInfo(str(spec))
    try:
        info.entries = volume_entries(path)
    except EpiSegError as err:
        info.error = str(err)
        return info
    lines, err = describe_file(str(spec))
    info.lines = lines
    info.error = str(err) if err is not None else ""
    return info
