"""``episeg synth OUT_DIR``: write synthetic confocal stacks of an epithelial tube.

Each stack is a pair ``PREFIX_000_raw.tif`` (12-bit membrane stain, uint16) and
``PREFIX_000_labels.tif`` (cells 1..n, background 0), with the voxel size in
the files. See :mod:`core.synth` for the model.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from core.cli.progress import TerminalProgress
from core.errors import ConfigError
from core.synth import DIFFICULTIES, MIN_SHAPE, SynthParams, write_synthetic_dataset

_DEFAULT = SynthParams()


def _numbers(text: str, option: str, count: tuple, example: str):
    parts = [p for p in str(text).replace(" ", ",").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) not in count or not all(math.isfinite(v) for v in values):
        want = " or ".join(str(c) for c in count)
        raise ConfigError(f"{option} expects {want} comma-separated numbers (e.g. {example}), "
                          f"got '{text}'.")
    return values


def parse_shape(text: str):
    """'64,256,256' -> (64, 256, 256), checked against the smallest usable stack."""
    values = _numbers(text, "--shape", (3,), "64,256,256")
    if not all(v.is_integer() and v > 0 for v in values):
        raise ConfigError(f"--shape expects three whole numbers Z,Y,X of voxels, got '{text}'.")
    shape = tuple(int(v) for v in values)
    if any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise ConfigError(
            f"--shape {text} is too small for a synthetic tube; use at least "
            f"{MIN_SHAPE[0]},{MIN_SHAPE[1]},{MIN_SHAPE[2]} (Z,Y,X voxels)."
        )
    return shape


def _positive_triple(text: str, option: str, example: str, allow_zero: bool = False):
    values = _numbers(text, option, (3,), example)
    if not all(v > 0 or (allow_zero and v == 0) for v in values):
        kind = "zero or positive" if allow_zero else "positive"
        raise ConfigError(f"{option} expects three {kind} numbers Z,Y,X in micrometres, got '{text}'.")
    return values


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def register(subparsers) -> None:
    d = _DEFAULT
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic stacks of an epithelial tube with their ground truth",
        description=(
            "Write N synthetic confocal stacks that look like membrane-stained salivary "
            "glands: a tube of one layer of columnar cells (scutoids) around a lumen, a "
            "PSF worse in Z than in XY, signal fading with depth, photon and read noise, "
            "12-bit values. Each stack is a pair PREFIX_000_raw.tif (uint16) and "
            "PREFIX_000_labels.tif (cells 1..n, background 0, no gap between touching "
            "cells), with the voxel size recorded (Fiji reads it). The set is the same "
            "for the same --seed and options; the tube's size, position and orientation, "
            "the cell size and the cells differ between stacks. Stack i does not depend "
            "on --n, so a larger set extends a smaller one."
        ),
        epilog=(
            "Examples: episeg synth train --n 20 --seed 1;  episeg synth test --n 5 --seed 2 "
            "--difficulty hard --voxel-size 0.8,0.25,0.25 --preview"
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the stacks (created if missing)")
    parser.add_argument("--n", type=int, default=1, metavar="N", help="number of stacks (default 1)")
    parser.add_argument("--shape", default=_fmt(d.shape), metavar="Z,Y,X",
                        help=f"stack size in voxels (default {_fmt(d.shape)}; the lab's stacks "
                             "are about 216-368,1024,1024)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed; the same seed gives the same stacks (default 0)")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="medium",
                        help="preset for noise, blur, depth fading, cytoplasm and cell-shape "
                             "irregularity (default medium); the options below override it")
    parser.add_argument("--voxel-size", metavar="Z,Y,X",
                        help=f"voxel size in micrometres (default {_fmt(d.voxel_size_um)})")
    parser.add_argument("--cell-size", type=float, metavar="UM",
                        help="mean cell diameter at mid-height in micrometres (default: drawn "
                             "per stack so that about --cells-around cells fit around the tube)")
    parser.add_argument("--cells-around", type=float, metavar="N",
                        help=f"mean number of cells around the tube when --cell-size is not "
                             f"given (default {d.cells_around:g}, varied per stack)")
    parser.add_argument("--tube-radius", metavar="OUTER[,INNER]",
                        help="basal (outer) and optionally apical (lumen) radius in micrometres "
                             "(default: drawn per stack to fit the stack's depth)")
    parser.add_argument("--photons", type=float, metavar="P",
                        help=f"expected photons at a bright membrane; lower is noisier "
                             f"(medium {d.photons:g}, easy 120, hard 10)")
    parser.add_argument("--read-noise", type=float, metavar="ADU",
                        help=f"detector read noise sigma in counts (medium {d.read_noise_adu:g})")
    parser.add_argument("--blur", metavar="Z,Y,X",
                        help=f"point-spread function sigmas in micrometres (medium "
                             f"{_fmt(d.psf_sigma_um)}; Z is usually 3-4x XY)")
    parser.add_argument("--depth-attenuation", type=float, metavar="UM",
                        help=f"signal falls as exp(-depth/UM) (medium {d.depth_attenuation_um:g}); "
                             "'inf' for no fading")
    parser.add_argument("--scutoid", type=float, metavar="S",
                        help=f"seed drift between apical and basal side as a fraction of the cell "
                             f"size; more means more neighbour changes (medium {d.scutoid_strength:g})")
    parser.add_argument("--medium", metavar="LOW,HIGH",
                        help=f"draw each stack's medium (around the tissue) and lumen brightness "
                             f"from LOW-HIGH, relative to a bright membrane (default: both dark, "
                             f"{d.background:g} and {d.lumen:g}; the cytoplasm is 0.08-0.2). "
                             "Training on 0.02,0.3 teaches a network that a bright medium is "
                             "not tissue; cells, geometry and noise stay the same")
    parser.add_argument("--first", type=int, default=0, metavar="I",
                        help="index of the first stack (default 0); stack I is the same as in "
                             "a set written from 0, so a set can be written in parts")
    parser.add_argument("--prefix", default="synth", metavar="NAME",
                        help="file name prefix (default synth: synth_000_raw.tif, ...)")
    parser.add_argument("--preview", action="store_true",
                        help="also write PREFIX_000_preview.png: XY slices and XZ/YZ sections, "
                             "raw and with the cells coloured")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files with the same names (default: refuse)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def params_from_args(args: argparse.Namespace) -> SynthParams:
    """The :class:`SynthParams` an ``episeg synth`` command line asks for."""
    overrides = {}
    if args.voxel_size is not None:
        overrides["voxel_size_um"] = _positive_triple(args.voxel_size, "--voxel-size", "1,0.3,0.3")
    if args.blur is not None:
        overrides["psf_sigma_um"] = _positive_triple(args.blur, "--blur", "1.5,0.4,0.4",
                                                     allow_zero=True)
    if args.tube_radius is not None:
        radii = _numbers(args.tube_radius, "--tube-radius", (1, 2), "40,18")
        overrides["tube_outer_radius_um"] = radii[0]
        if len(radii) == 2:
            overrides["tube_inner_radius_um"] = radii[1]
    simple = {"cell_size": "cell_diameter_um", "cells_around": "cells_around",
              "photons": "photons", "read_noise": "read_noise_adu",
              "depth_attenuation": "depth_attenuation_um", "scutoid": "scutoid_strength"}
    for arg, field_name in simple.items():
        value = getattr(args, arg)
        if value is not None:
            overrides[field_name] = value
    params = SynthParams.for_difficulty(args.difficulty)
    params = replace(params, shape=parse_shape(args.shape), **overrides)
    try:
        return params.validate()
    except ConfigError as err:
        raise ConfigError(_option_names(str(err))) from None


#: SynthParams fields with a command-line option, to name the option in errors.
_OPTION_OF = {
    "voxel_size_um": "--voxel-size", "psf_sigma_um": "--blur",
    "tube_outer_radius_um": "--tube-radius", "tube_inner_radius_um": "--tube-radius",
    "cell_diameter_um": "--cell-size", "cells_around": "--cells-around", "photons": "--photons",
    "read_noise_adu": "--read-noise", "depth_attenuation_um": "--depth-attenuation",
    "scutoid_strength": "--scutoid",
}


def _option_names(message: str) -> str:
    for field_name, option in _OPTION_OF.items():
        if message.startswith(field_name + " ") or message.startswith(field_name + "="):
            return f"{option}: {message}"
    return message


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}.")
    params = params_from_args(args)
    medium = None
    if args.medium is not None:
        medium = tuple(_numbers(args.medium, "--medium", (2,), "0.02,0.3"))
    progress = TerminalProgress(quiet=args.quiet)
    try:
        pairs = write_synthetic_dataset(
            args.out_dir, args.n, seed=args.seed, params=params, prefix=args.prefix,
            preview=args.preview, overwrite=args.overwrite, first=args.first,
            medium_brightness=medium, progress=progress,
        )
    finally:
        progress.close()
    vz, vy, vx = params.voxel_size_um
    print(f"Wrote {len(pairs)} synthetic stack(s) of {params.shape[0]} x {params.shape[1]} x "
          f"{params.shape[2]} voxels (Z x Y x X), voxel size {vz:g} x {vy:g} x {vx:g} um:")
    for raw_path, lab_path in pairs:
        print(f"  {raw_path}  {lab_path}")
    return 0
