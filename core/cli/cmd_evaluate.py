"""``episeg evaluate GT PRED``: how close is a segmentation to the ground truth?"""

from __future__ import annotations

import argparse
from typing import Optional

from core.cli.progress import TerminalProgress
from core.evaluate_files import AUTO, evaluate_files, write_cells_csv, write_figures_json
from core.flags_check import FlagCheck
from core.metrics import EvaluationResult

DESCRIPTION = """\
Compare a predicted label stack with its ground truth and print the scores:
the thesis' figures (cell and background IoU, confusion matrix, wrongCells),
adapted Rand error, variation of information (split / merge) and cell matching
(AP, F1 and mean IoU of cells paired one-to-one at IoU >= 0.5).
Both files are label stacks of the same shape (Z, Y, X): 0 = background, any
other value = one cell; ids need not be consecutive nor correspond.
File specs: file.tif, file.h5:dataset, file.mat:variable, file.npy.
When PRED was written by `episeg predict`, its flags (STEM_cells_flags.csv
beside it: the cells most likely wrong, ranked) are checked too: how many of
the truly wrong cells the first 10 % and 20 % of its rows hold.
"""

EPILOG = """\
examples:
  episeg evaluate gland01_gt.tif gland01_cells.tif
  episeg evaluate data.h5:label pred.h5:cells --json scores.json --cells-csv cells.csv
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a segmentation against ground truth (IoU, wrongCells, Rand, VOI, AP)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("gt", metavar="GT", help="ground-truth label stack (file or file:dataset)")
    p.add_argument("pred", metavar="PRED", help="predicted label stack, same shape as GT")
    p.add_argument("--json", metavar="FILE", dest="json_file",
                   help="also write every figure to this JSON file (plain names, "
                        "e.g. cell_iou, wrong_cells, adapted_rand_error, voi_split, ap50)")
    p.add_argument("--cells-csv", metavar="FILE", dest="cells_csv",
                   help="write the per-cell table to this CSV file: one row per GT cell "
                        "(best predicted cell, IoU, ok/split/merged/missed...) and one per "
                        "unmatched predicted cell (false_positive); with flags, also where "
                        "they ranked each predicted cell (flag_rank)")
    p.add_argument("--iou-threshold", type=float, default=0.5, metavar="T",
                   help="IoU a GT cell and a predicted cell need to count as the same cell "
                        "(0 < T <= 1; default 0.5: AP50, F1 at 0.5)")
    p.add_argument("--connectivity", type=int, choices=(1, 2, 3), default=None,
                   help="neighbourhood for counting connected pieces (wrong_components): "
                        "1 = faces (6 neighbours), 2 = +edges (18), 3 = +corners (26); "
                        "default: full, 26 in 3D, as the thesis")
    p.add_argument("--split-merge-fraction", type=float, default=0.2, metavar="F",
                   help="share of a GT cell a predicted cell must hold to count as covering "
                        "it, for the split/merged flags (0 < F <= 0.5; default 0.2)")
    p.add_argument("--no-components", action="store_true",
                   help="skip counting connected pieces (wrong_components): the slowest "
                        "figure, about nine tenths of the time on a 1024 x 1024 stack")
    flags = p.add_mutually_exclusive_group()
    flags.add_argument("--flags", metavar="CSV", default=AUTO,
                       help="the prediction's flags CSV to check against the wrong cells "
                            "(default: STEM_cells_flags.csv beside PRED, if it is there)")
    flags.add_argument("--no-flags", action="store_const", const=None, dest="flags",
                       help="do not check any flags CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with TerminalProgress(quiet=args.quiet) as bar:
        evaluated = evaluate_files(
            args.gt, args.pred,
            flags=args.flags,
            iou_threshold=args.iou_threshold,
            connectivity=args.connectivity,
            split_merge_fraction=args.split_merge_fraction,
            components=not args.no_components,
            progress=bar,
        )
    result = evaluated.result
    print(format_report(result, args.gt, args.pred, evaluated.flags, evaluated.flags_note))
    if args.json_file:
        extra = {"gt": args.gt, "pred": args.pred,
                 **(evaluated.flags.to_dict() if evaluated.flags is not None else {})}
        write_figures_json(args.json_file, result, extra)
        print(f"figures written to {args.json_file}")
    if args.cells_csv:
        write_cells_csv(args.cells_csv, result,
                        evaluated.flags.ranks if evaluated.flags is not None else None)
        print(f"per-cell table ({len(result.cells)} rows) written to {args.cells_csv}")
    return 0


def format_report(r: EvaluationResult, gt_name: str, pred_name: str,
                  flags: Optional[FlagCheck] = None, flags_note: str = "") -> str:
    """The human-readable table printed by ``episeg evaluate`` (with the flags'
    check when one was made, or why the flags were not checked)."""
    d = r.to_dict()
    cm = r.confusion
    t = r.iou_threshold
    suffix = f"{t * 100:g}"

    def line(name: str, value: str, note: str = "") -> str:
        return f"  {name:<22}{value:<12}{note}".rstrip()

    out = [
        f"ground truth: {gt_name}",
        f"prediction:   {pred_name}",
        f"shape (Z, Y, X): {tuple(r.shape)}, {d['n_voxels']} voxels",
        "",
        "Voxel classes (the thesis' figures)",
        line("cell IoU", f"{r.cell_iou:.4f}", "cell voxels (id > 0) in both / in either"),
        line("background IoU", f"{r.background_iou:.4f}", "background voxels in both / in either"),
        line("confusion matrix", "", f"tp {cm['tp']}  fp {cm['fp']}  fn {cm['fn']}  "
                                     f"tn {cm['tn']} voxels"),
        "Cell counts",
        line("wrong_cells", f"{r.wrong_cells}",
             f"|GT cells - predicted cells| = |{r.n_gt_cells} - {r.n_pred_cells}| (distinct ids)"),
        line("wrong_components", f"{r.wrong_components}",
             f"|{r.n_gt_components} - {r.n_pred_components}| connected pieces "
             f"(connectivity {r.connectivity}; thesis' wrongCells)")
        if r.wrong_components is not None else line("wrong_components", "-", "not counted"),
        "Instance agreement",
        line("adapted Rand error", f"{r.adapted_rand_error:.4f}",
             f"0 = perfect; precision {r.rand_precision:.4f} (merges lower it), "
             f"recall {r.rand_recall:.4f} (splits lower it)"),
        line("VOI split", f"{r.voi_split:.4f}", "bits; > 0 when GT cells are cut into pieces"),
        line("VOI merge", f"{r.voi_merge:.4f}", "bits; > 0 when GT cells are lumped together"),
        f"Cell matching (one-to-one, IoU >= {t:g})",
        line(f"AP{suffix}", f"{r.ap:.4f}", "TP / (TP + FP + FN), as Cellpose and StarDist"),
        line(f"F1 at {t:g}", f"{r.f1:.4f}",
             f"precision {r.precision:.4f}, recall {r.recall:.4f}"),
        line("mean matched IoU", f"{r.mean_matched_iou:.4f}", f"over {r.n_matched} matched cells"),
        line("GT cells split", f"{r.n_split}", "covered by 2+ predicted cells"),
        line("GT cells merged", f"{r.n_merged}", "share their predicted cell with another GT cell"),
        line("GT cells missed", f"{r.n_missed}", "no predicted cell covers them"),
        line("false positives", f"{r.n_false_positive}", "predicted cells matched to no GT cell"),
    ]
    if flags is not None:
        out += [f"Per-cell flags ({flags.path})"] + [f"  {text}" for text in flags.lines()]
    elif flags_note:
        out += ["Per-cell flags", f"  {flags_note}"]
    return "\n".join(out)
