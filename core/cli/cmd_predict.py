"""``episeg predict``: cells of one or many stacks with a trained model."""

from __future__ import annotations

import sys
from pathlib import Path

from core.cli.args import voxel_size, voxels
from core.cli.progress import TerminalProgress


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="segment stacks into cells with a trained model",
        description=(
            "Predict every cell of each INPUT stack with a trained model (sliding window "
            "with Gaussian blending, then a seeded watershed). Writes STEM_cells.<fmt> per "
            "input into --out, with the input's voxel size. Inputs may be TIFF, HDF5 "
            "(file.h5:dataset), MATLAB (file.mat:variable) or .npy."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="stacks to segment")
    p.add_argument("--model", help="model file written by 'episeg train' (default: the bundled "
                                   "default model, resources/models/default.pt)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", type=Path,
                   help="YAML file with a 'predict' section (flags override it)")
    p.add_argument("--format", choices=["tif", "mat", "h5"],
                   help="label stack format (default tif)")
    p.add_argument("--save-probabilities", action="store_true", default=None,
                   help="also write the probability maps (0..255)")
    p.add_argument("--no-flags", dest="flags", action="store_false", default=None,
                   help="do not write STEM_cells_flags.csv (the cells most likely wrong, ranked)")
    p.add_argument("--tta", action="store_true", default=None,
                   help="average the network over the 8 flips (test-time augmentation): "
                        "walls a little more exact, ~2.3x the prediction time on a CPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run the network")
    p.add_argument("--tile-shape", type=voxels, metavar="Z,Y,X", help="tile size in voxels")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass")
    p.add_argument("--voxel-size", type=voxel_size, metavar="Z,Y,X",
                   help="voxel size (um) of inputs whose files record none")
    p.add_argument("--post-processing", choices=["model", "shipped"],
                   help="model (default): the seed and merge settings the model chose on its "
                        "validation stacks when it was trained; shipped: the shipped ones")
    p.add_argument("--min-cell-size", type=float, metavar="UM3",
                   help="cells smaller than this (cubic micrometres) join their neighbours")
    p.add_argument("--channel", type=int, help="channel to use in multi-channel stacks")
    cluster = p.add_argument_group(
        "many processes or machines (dask.distributed; the cells are identical)")
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="run the network on a local cluster of N worker processes")
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="run the network on a running dask cluster, e.g. tcp://host:8786 "
                              "(the output folder must be on a file system the workers share)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def build_config(args):
    """PredictConfig from --config and flags (flags win)."""
    from core.config import apply_overrides, from_dict, load_yaml
    from core.pipeline import PredictConfig

    config = (load_yaml(args.config, PredictConfig, section="predict") if args.config
              else from_dict(PredictConfig, {}))
    overrides = {
        "format": args.format,
        "save_probabilities": args.save_probabilities,
        "tta": args.tta,
        "flags": args.flags,
        "device": args.device,
        "tile_shape": args.tile_shape,
        "batch_size": args.batch_size,
        "input_voxel_size_um": args.voxel_size,
        "segment.min_cell_size_um3": args.min_cell_size,
        "post_processing": args.post_processing,
    }
    return apply_overrides(config, {k: v for k, v in overrides.items() if v is not None})


def run(args) -> int:
    from core.errors import ConfigError
    from core.pipeline import predict_files
    from core.resources import default_model

    config = build_config(args)
    model = args.model or default_model()
    if model is None:
        raise ConfigError("command line: no --model given and this installation has no bundled "
                          "default model (resources/models/default.pt); train one with "
                          "'episeg train' and pass it with --model FILE.")
    if args.model is None:
        print(f"using the bundled default model {model}", file=sys.stderr)
    if args.workers is not None and args.scheduler:
        raise ConfigError("command line: give either --workers N (a local cluster) or "
                          "--scheduler ADDRESS (a running one), not both.")
    with TerminalProgress(quiet=args.quiet) as bar:
        results = predict_files(model, args.inputs, args.out, config,
                                channel=args.channel, workers=args.workers,
                                scheduler=args.scheduler, progress=bar)
    failures = [r for r in results if r.error]
    for r in results:
        if r.error:
            print(f"episeg predict: error: {r.spec}: {r.error}", file=sys.stderr)
            continue
        secs = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
        print(f"{r.spec}: {r.n_cells} cells ({secs})")
        for path in r.outputs:
            print(f"  wrote {path}")
    if failures:
        print(f"episeg predict: {len(failures)} of {len(results)} inputs failed", file=sys.stderr)
        return 2
    return 0
