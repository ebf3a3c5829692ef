"""``episeg demo``: synthetic data -> training -> cells -> metrics, figure and exports."""

from __future__ import annotations

from pathlib import Path

from core.cli.args import voxels
from core.cli.progress import TerminalProgress


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on synthetic and real sample data",
        description=(
            "Make a small synthetic epithelium dataset, train a 3D U-Net on it for a few "
            "minutes on this machine, predict the cells of unseen synthetic stacks and of a "
            "real confocal stack, evaluate against the ground truth, and write label stacks "
            "(TIFF and MATLAB .mat), metrics.json and a figure demo.png into --out."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("episeg_demo"),
                   help="output folder (default ./episeg_demo)")
    p.add_argument("--minutes", type=float, default=4.0,
                   help="training budget in minutes (default 4)")
    p.add_argument("--shape", type=voxels, default=(40, 160, 160), metavar="Z,Y,X",
                   help="size of the synthetic stacks (default 40,160,160)")
    p.add_argument("--seed", type=int, default=2020, help="random seed of the synthetic data")
    p.add_argument("--init", type=Path, help="fine-tune this model instead of the bundled one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from core.demo import DemoSettings, run_demo

    if args.minutes <= 0:
        from core.errors import ConfigError
        raise ConfigError(f"--minutes {args.minutes}: the training budget must be positive.")
    settings = DemoSettings(minutes=args.minutes, shape=args.shape, seed=args.seed,
                            init_model=args.init)
    with TerminalProgress(quiet=args.quiet) as bar:
        summary = run_demo(args.out, settings, progress=bar)
    print()
    print(f"EpiSeg demo finished: trained {summary.epochs} epochs in "
          f"{summary.train_seconds / 60:.1f} min")
    for row in summary.test_metrics:
        print(f"  unseen {row['stack']}: {row['n_pred_cells']} cells found, "
              f"{row['n_gt_cells']} true; AP50 {row['ap50']:.3f}, cell IoU {row['cell_iou']:.3f}, "
              f"adapted Rand error {row['adapted_rand_error']:.3f}")
    if summary.cells_real is not None:
        before = ("" if summary.cells_real_before is None else
                  f" ({summary.cells_real_before} with the model before fine-tuning; "
                  "both in the figure)")
        print(f"  real C. elegans stack: {summary.cells_real} cells{before}")
    print(f"  figure   {summary.figure}")
    print(f"  metrics  {summary.metrics}")
    print(f"  model    {summary.model}")
    print(f"  labels   {summary.label_files[0].parent}/ ({len(summary.label_files)} files, "
          "TIFF and .mat)")
    return 0
