"""``episeg info FILE...``: what is inside a volume file.

For each file: the format, the datasets/variables inside (HDF5, .mat, .npz,
multi-series TIFF), and for the 3D volume (each candidate when there are
several): shape (Z, Y, X), dtype, value range and voxel size (z, y, x).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from core.io.describe import describe_file


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
