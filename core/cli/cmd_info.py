"""``episeg info FILE...``: what is inside a volume file.

For each file: the format, the datasets/variables inside (HDF5, .mat, .npz,
multi-series TIFF), and for the 3D volume (each candidate when there are
several): shape (Z, Y, X), dtype, value range and voxel size (z, y, x).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional, Tuple

import numpy as np

from core.errors import EpiSegError
from core.io import (
    AmbiguousVolumeError, format_of, list_contents, read_volume, split_spec,
)
from core.io.base import example_name, fmt_shape, fmt_voxel
from core.volume import Volume


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def add_pick_options(parser: argparse.ArgumentParser) -> None:
    """--channel / --time, shared with ``episeg convert``."""
    parser.add_argument(
        "--channel", type=non_negative_int, metavar="N",
        help="for 4D/5D data with a channel axis (e.g. ImageJ ZCYX hyperstacks): "
             "which channel to use, counting from 0",
    )
    parser.add_argument(
        "--time", type=non_negative_int, metavar="N",
        help="for 4D/5D data with a time axis: which time point to use, counting from 0",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show what is inside volume files (shape, dtype, values, voxel size)",
        description=(
            "Show the format, the datasets or variables inside, and for the 3D volume "
            "its shape (Z, Y, X), data type, value range and voxel size (z, y, x) in "
            "micrometres. Name a dataset or variable after a colon: file.h5:raw, "
            "file.mat:I."
        ),
    )
    parser.add_argument(
        "files", nargs="+", metavar="FILE",
        help="volume file: .tif/.tiff, .h5/.hdf5 (optionally file.h5:dataset), "
             ".mat (optionally file.mat:variable), .npy or .npz",
    )
    add_pick_options(parser)
    parser.set_defaults(func=run)


def _describe_volume(vol: Volume, indent: str = "    ") -> List[str]:
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
    4D dataset that needs --channel still shows the file's contents.
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
        lines.extend(_describe_volume(vol))
    if name is None and len(volumes) > 1:
        names = [v.source.rsplit(":", 1)[-1] for v in volumes]
        lines.append(f"  (several 3D {kind.split()[0]}: name one, e.g. {path}:{example_name(names)})")
    return lines, None


def run(args: argparse.Namespace) -> int:
    status = 0
    for i, spec in enumerate(args.files):
        if i:
            print()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lines, err = describe_file(spec, channel=args.channel, time=args.time)
        if lines:
            print("\n".join(lines), flush=True)
        for w in caught:
            print(f"episeg info: note: {w.message}", file=sys.stderr)
        if err is not None:
            print(f"episeg info: error: {err}", file=sys.stderr, flush=True)
            status = 2
    return status
