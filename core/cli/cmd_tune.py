"""``episeg tune``: choose a trained model's seeds and merging again on annotated stacks."""

from __future__ import annotations

from pathlib import Path

from core.cli.args import voxel_size
from core.cli.progress import TerminalProgress


def register(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="choose a model's post-processing (seeds, merging) on annotated stacks, "
             "without training",
        description=(
            "Predict each annotated stack (--pair RAW LABELS) with the model, try the shipped "
            "post-processing and the others 'episeg train' tries (seed settings, merge "
            "thresholds), and write a copy of the model (--out) that keeps the best where it "
            "beats the shipped settings clearly. 'episeg predict' and the Predict tab then use "
            "it. Use it when the choice made in training rests on few cells (a part held out "
            "of one stack), e.g. after correcting a predicted stack by hand. The model file "
            "itself is never changed."
        ),
    )
    p.add_argument("--model", required=True, help="model file written by 'episeg train'")
    p.add_argument("--pair", nargs=2, action="append", required=True,
                   metavar=("RAW", "LABELS"),
                   help="an annotated stack and its cells (labels 1..n, 0 = background); "
                        "repeat for more stacks. Any supported format: .tif, file.h5:dataset, "
                        "file.mat:variable, .npy")
    p.add_argument("--out", required=True, type=Path, help="model file to write")
    p.add_argument("--config", type=Path,
                   help="YAML file with a 'predict' section: how the network runs and the "
                        "settings the search starts from")
    p.add_argument("--tta", action="store_true", default=None,
                   help="predict with test-time augmentation, as you will predict new stacks")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run the network")
    p.add_argument("--voxel-size", type=voxel_size, metavar="Z,Y,X",
                   help="voxel size (um) of stacks whose files record none")
    p.add_argument("--max-voxels", type=int, default=None, metavar="N",
                   help="search on the centre of larger stacks (in Y and X, all of Z): "
                        "each of the 26 settings tried segments these voxels once; about a "
                        "quarter of an hour on a 2-core CPU at the default, 32000000")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from core.config import apply_overrides, from_dict, load_yaml
    from core.pipeline import PredictConfig
    from core.tune import MAX_VOXELS, tune_model

    config = (load_yaml(args.config, PredictConfig, section="predict") if args.config
              else from_dict(PredictConfig, {}))
    overrides = {"tta": args.tta, "device": args.device, "input_voxel_size_um": args.voxel_size}
    config = apply_overrides(config, {k: v for k, v in overrides.items() if v is not None})
    with TerminalProgress(quiet=args.quiet) as bar:
        result = tune_model(args.model, [tuple(p) for p in args.pair], args.out, config=config,
                            max_voxels=args.max_voxels or MAX_VOXELS, progress=bar)
    print(result.summary())
    return 0
