"""``episeg preprocess``: raw (+ labels) -> one compressed HDF5 ready for training.

Thin door onto :mod:`core.preprocess`: the configuration comes from
``--config FILE.yaml`` (schema :class:`core.preprocess.PreprocessConfig`,
example in resources/configs/preprocess.yaml) and flags override its values.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from core.config import apply_overrides, load_yaml, save_yaml
from core.errors import ConfigError
from core.preprocess import PreprocessConfig
from core.preprocess_files import plan_outputs, preprocess_files

EPILOG = """examples:
  episeg preprocess --raw gland01.mat:I --labels gland01_labels.mat:L --out gland01.h5
  episeg preprocess --raw stack.tif --labels cells.tif --out stack.h5 --factors 0.5,0.5,0.5
  episeg preprocess --pair a.tif a_labels.tif --pair b.tif b_labels.tif --out-dir prepared/ \\
                    --config resources/configs/preprocess.yaml --normalise percentile
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="Prepare raw stacks (and their labels) for training: resample, normalise, targets.",
        description=textwrap.fill(
            "Convert raw image stacks and their label stacks into one compressed HDF5 file "
            "per volume holding the normalised image (float32), the labels (smallest "
            "unsigned type), the training targets (cells separated by gaps; cell boundaries) "
            "and the metadata. Reads TIFF, HDF5 (file.h5:dataset), MATLAB (file.mat:variable) "
            "and NumPy files. Settings come from --config and are overridden by flags; axis "
            "order is ZYX, voxel sizes (z, y, x) in micrometres."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--raw", metavar="RAW", help="Raw image stack (e.g. stack.tif, file.h5:raw).")
    io.add_argument("--labels", metavar="LABELS",
                    help="Label stack for --raw: 0 = background, 1..n = cells. Without it, "
                         "only the image is preprocessed (no targets).")
    io.add_argument("--pair", nargs=2, action="append", metavar=("RAW", "LABELS"),
                    help="A raw stack and its labels; repeat for a batch (needs --out-dir).")
    io.add_argument("--out", metavar="OUT.h5", help="Output HDF5 file (single volume).")
    io.add_argument("--out-dir", metavar="DIR",
                    help="Output folder; each volume becomes DIR/<name>_preprocessed.h5.")
    io.add_argument("--config", metavar="FILE.yaml",
                    help="YAML settings (see resources/configs/preprocess.yaml); flags override it.")
    io.add_argument("--save-config", metavar="FILE.yaml",
                    help="Also save the settings actually used (config + flags) as YAML.")
    io.add_argument("--channel", type=int, help="Channel to read from multi-channel stacks.")
    io.add_argument("--time", type=int, help="Time point to read from time series.")
    io.add_argument("--quiet", action="store_true", help="No progress bars.")

    rs = p.add_argument_group("resampling (default: none)")
    rs.add_argument("--factors", metavar="Z,Y,X",
                    help="Zoom factors, output/input voxels per axis (0.5 halves; thesis: "
                         "0.25,0.125,0.125).")
    rs.add_argument("--voxel-size", metavar="Z,Y,X",
                    help="Resample to this voxel size in micrometres.")
    rs.add_argument("--input-voxel-size", metavar="Z,Y,X",
                    help="Voxel size of the input in micrometres, when the file records none "
                         "(or to override it).")
    rs.add_argument("--no-anti-aliasing", action="store_true",
                    help="Do not smooth the image before downsampling (as the thesis).")

    nm = p.add_argument_group("normalisation")
    nm.add_argument("--normalise", choices=["zscore", "robust", "percentile", "none"],
                    help="zscore: (x - mean) / std per volume (default, thesis); robust: "
                         "(x - median) / (1.4826 MAD), unchanged by a bright spot; percentile: "
                         "(x - p_low) / (p_high - p_low); none.")
    nm.add_argument("--percentiles", metavar="LOW,HIGH",
                    help="Percentiles for --normalise percentile (default 1,99.8).")
    nm.add_argument("--clip", action="store_true",
                    help="Clip percentile-normalised values to [0, 1].")

    tg = p.add_argument_group("training targets")
    tg.add_argument("--no-gaps-target", action="store_true",
                    help="Do not write the 'cells separated by gaps' target.")
    tg.add_argument("--no-boundary-target", action="store_true",
                    help="Do not write the cell-boundary target.")
    tg.add_argument("--connectivity", type=int, choices=[1, 2, 3],
                    help="find_boundaries connectivity for the gaps (default 3, thesis).")
    tg.add_argument("--mode", choices=["outer", "inner", "thick"],
                    help="find_boundaries mode for the gaps (default outer, thesis).")
    tg.add_argument("--boundary-sigma", type=float, metavar="SIGMA",
                    help="Blur the boundary target with a Gaussian of SIGMA voxels (default 0).")
    tg.add_argument("--boundary-blur", choices=["soft", "threshold"],
                    help="soft: float32 in [0, 1]; threshold: blurred >= 0.5 (PlantSeg).")
    tg.add_argument("--no-boundary-background", action="store_true",
                    help="Leave the tissue/background border out of the boundary target.")
    tg.add_argument("--check", choices=["warn", "error", "off"],
                    help="When cells are lost or merged in the gaps target: warn (default), "
                         "error (stop), off.")

    out = p.add_argument_group("output file")
    out.add_argument("--compression-level", type=int, metavar="N",
                     help="gzip level 0-9 (default 4, thesis).")
    out.add_argument("--raw-dtype", choices=["float32", "float16"],
                     help="Type of the stored image (default float32).")
    p.set_defaults(func=run)


def _overrides(args) -> Dict[str, object]:
    """Dotted config keys -> flag values (None = flag not given)."""
    pct: Tuple[Optional[str], Optional[str]] = (None, None)
    if args.percentiles is not None:
        parts = args.percentiles.split(",")
        if len(parts) != 2:
            raise ConfigError(f"command line: --percentiles {args.percentiles!r} should be "
                              "two numbers LOW,HIGH, e.g. 1,99.8.")
        pct = (parts[0].strip(), parts[1].strip())
    return {
        "resample.factors": args.factors,
        "resample.target_voxel_size_um": args.voxel_size,
        "resample.input_voxel_size_um": args.input_voxel_size,
        "resample.anti_aliasing": False if args.no_anti_aliasing else None,
        "normalisation.mode": args.normalise,
        "normalisation.low": _number(pct[0], "--percentiles"),
        "normalisation.high": _number(pct[1], "--percentiles"),
        "normalisation.clip": True if args.clip else None,
        "targets.cells_with_gaps": False if args.no_gaps_target else None,
        "targets.boundaries": False if args.no_boundary_target else None,
        "targets.connectivity": args.connectivity,
        "targets.mode": args.mode,
        "targets.boundary_sigma": args.boundary_sigma,
        "targets.boundary_blur": args.boundary_blur,
        "targets.boundary_background": False if args.no_boundary_background else None,
        "check.counts": args.check,
        "output.compression_level": args.compression_level,
        "output.raw_dtype": args.raw_dtype,
    }


def _number(text: Optional[str], flag: str) -> Optional[float]:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"command line: {flag}: {text!r} is not a number.") from None


def build_config(args) -> PreprocessConfig:
    """The config file (or the defaults), then every flag given on top of it."""
    cfg = load_yaml(args.config, PreprocessConfig) if args.config else PreprocessConfig()
    # A flag choosing one way to resample replaces the other one from the file.
    if args.factors is not None:
        cfg.resample.target_voxel_size_um = None
    if args.voxel_size is not None:
        cfg.resample.factors = None
    flags = {k: v for k, v in _overrides(args).items() if v is not None}
    return apply_overrides(cfg, flags, where="command line")


def _jobs(args) -> List[Tuple[str, Optional[str]]]:
    """(raw spec, labels spec or None) per volume; outputs checked before any work."""
    if args.pair and args.raw:
        raise ConfigError("command line: give either --raw (one volume) or --pair (a batch), "
                          "not both.")
    if not args.pair and not args.raw:
        raise ConfigError("command line: nothing to do; give --raw RAW [--labels LABELS] --out "
                          "OUT.h5, or --pair RAW LABELS (repeatable) --out-dir DIR.")
    if args.labels and not args.raw:
        raise ConfigError("command line: --labels belongs to --raw; use --pair RAW LABELS "
                          "for batches.")
    pairs = [(r, l) for r, l in args.pair] if args.pair else [(args.raw, args.labels)]
    if args.out and args.out_dir:
        raise ConfigError("command line: give either --out or --out-dir, not both.")
    if args.out and len(pairs) > 1:
        raise ConfigError("command line: several --pair volumes need --out-dir DIR, not --out.")
    if not args.out and not args.out_dir:
        raise ConfigError("command line: say where to write: --out OUT.h5 (one volume) or "
                          "--out-dir DIR.")
    plan_outputs(pairs, Path(args.out_dir) if args.out_dir else None,
                 Path(args.out) if args.out else None, where="command line")
    return pairs


def run(args) -> int:
    from core.cli.progress import TerminalProgress

    cfg = build_config(args)
    pairs = _jobs(args)
    if args.save_config:
        save_yaml(args.save_config, cfg, header="episeg preprocess settings (ZYX, micrometres)")
        print(f"settings saved to {args.save_config}")
    with TerminalProgress(quiet=args.quiet) as bar:
        def progress(event):  # the per-volume reports are printed below, to stdout
            if event.stage != "preprocess":
                bar(event)

        results = preprocess_files(pairs, cfg, out_dir=Path(args.out_dir) if args.out_dir else None,
                                   out=Path(args.out) if args.out else None,
                                   channel=args.channel, time=args.time, progress=progress)
    failed: List[str] = []
    for i, r in enumerate(results, 1):
        tag = f"[{i}/{len(results)}] " if len(results) > 1 else ""
        if r.error:
            print(f"{tag}{r.raw}: error: {r.error}", file=sys.stderr)
            failed.append(r.raw)
            continue
        print(f"{tag}{r.raw}" + (f" + {r.labels}" if r.labels else ""))
        for line in r.summary:
            print(f"  {line}")
        print(f"  written: {r.output}")
    if failed:
        print(f"{len(results) - len(failed)} of {len(results)} volumes written; failed: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 2
    return 0
