"""``episeg convert IN OUT``: convert a volume between TIFF, HDF5, .mat and NumPy.

The voxel size travels along (or is set with ``--voxel-size``); label stacks
(``--labels``) are stored in the smallest unsigned integer type.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from core.errors import VolumeWriteError
from core.io import read_labels, read_volume, split_spec, write_volume
from core.io.base import fmt_shape, fmt_voxel
from core.cli.args import voxel_size as voxel_size_arg
from core.cli.cmd_info import add_pick_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a volume between .tif, .h5, .mat, .npy and .npz",
        description=(
            "Convert a 3D volume between formats, keeping the voxel size. The output "
            "format comes from OUT's extension: .tif (ImageJ TIFF that Fiji opens with "
            "its voxel size), .h5 (gzip, element_size_um), .mat (MATLAB v5 below 2 GB, "
            "else v7.3; MATLAB loads I(row=y, col=x, slice=z)), .npy or .npz. Name the "
            "input dataset or variable after a colon (in.h5:raw, in.mat:I)."
        ),
    )
    parser.add_argument("input", metavar="IN", help="input volume, e.g. stack.tif, data.h5:raw, gland.mat:I")
    parser.add_argument("output", metavar="OUT", help="output file; must differ from IN. "
                        "out.h5:NAME or out.mat:NAME names the dataset or variable")
    parser.add_argument("--labels", action="store_true",
                        help="the volume is a label stack (0 = background, 1..n = cells): "
                             "check it and store it in the smallest unsigned integer type")
    parser.add_argument("--variable", metavar="NAME",
                        help="variable name in an output .mat file (default I, or labels with --labels)")
    parser.add_argument("--dataset", metavar="NAME",
                        help="dataset name in an output .h5/.npz file (default raw, or label with --labels)")
    parser.add_argument("--mat-version", choices=["auto", "5", "7.3"], default="auto",
                        help="MATLAB file version for .mat output: 5 (any MATLAB, under 2 GB), "
                             "7.3 (HDF5-based, any size) or auto (5 below 2 GB; default)")
    parser.add_argument("--voxel-size", type=voxel_size_arg, metavar="Z,Y,X",
                        help="set the voxel size (z, y, x) in micrometres, replacing any "
                             "recorded in the input, e.g. 0.5,0.1,0.1")
    add_pick_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    in_path, _ = split_spec(args.input)
    out_path, _ = split_spec(args.output)
    if os.path.abspath(in_path) == os.path.abspath(out_path) or (
        out_path.exists() and in_path.exists() and os.path.samefile(in_path, out_path)
    ):
        raise VolumeWriteError(
            f"OUT ({out_path}) is the input file; input files are never modified. "
            "Choose another output name."
        )
    reader = read_labels if args.labels else read_volume
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            volume = reader(args.input, channel=args.channel, time=args.time)
            if args.voxel_size is not None:
                volume.voxel_size = tuple(args.voxel_size)
            written = write_volume(
                args.output, volume, labels=args.labels, mat_variable=args.variable,
                mat_version=args.mat_version, h5_dataset=args.dataset,
            )
        finally:
            for w in caught:
                print(f"episeg convert: note: {w.message}", file=sys.stderr)
    print(
        f"Wrote {written}: {fmt_shape(volume.shape)} (Z x Y x X), {volume.data.dtype}"
        f"{' labels' if args.labels else ''}, voxel size (z, y, x) {fmt_voxel(volume.voxel_size)}"
    )
    return 0
