"""``episeg train``: train (or fine-tune, or resume) a model on raw + label stacks."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from core.cli.args import voxel_size, voxels
from core.cli.progress import TerminalProgress


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on raw + label stacks (or fine-tune / resume one)",
        description=(
            "Train a 3D U-Net on patches of raw stacks and their cell labels and write one "
            "self-contained model file (--out), saved after every epoch. Data come from "
            "--pair RAW LABELS (any supported format: .tif, file.h5:dataset, file.mat:variable, "
            ".npy), from --h5 files written by 'episeg preprocess', or from a YAML config "
            "(see resources/configs/train.yaml); flags override the config. Without "
            "--val-pair part of the training data is held out for validation. Ctrl+C stops "
            "cleanly and keeps the model of the last finished epoch."
        ),
    )
    p.add_argument("--config", type=Path, metavar="FILE.yaml",
                   help="training config (YAML); relative paths in it are relative to its folder")
    p.add_argument("--pair", nargs=2, action="append", metavar=("RAW", "LABELS"),
                   help="a training stack and its labels (repeat for more; replaces the "
                        "config's data.train)")
    p.add_argument("--h5", action="append", metavar="FILE",
                   help="a training file written by 'episeg preprocess' (repeatable)")
    p.add_argument("--val-pair", nargs=2, action="append", metavar=("RAW", "LABELS"),
                   help="a validation stack and its labels (repeatable); without it part of "
                        "the training data is held out")
    p.add_argument("--val-h5", action="append", metavar="FILE",
                   help="a validation file written by 'episeg preprocess' (repeatable)")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL",
                   help="model file to write (e.g. model.pt); with --resume, the run to continue")
    p.add_argument("--epochs", type=int, metavar="N", help="planned epochs (default 40)")
    p.add_argument("--iterations", type=int, metavar="N",
                   help="training batches per epoch (default 100)")
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="stop after M minutes of training (the whole run), keeping the best model")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out exactly where it stopped")
    p.add_argument("--init", type=Path, metavar="MODEL",
                   help="fine-tune this model (its architecture, target and normalisation)")
    p.add_argument("--preset", choices=["small", "standard"],
                   help="network size: small (fast on CPUs, default) or standard")
    p.add_argument("--target", choices=["cells_with_gaps", "boundaries", "both", "all", "all_walls"],
                   help="what the network predicts: cells with gaps, boundaries, both, or all "
                        "(both + tissue mask); default: see resources/configs/train.yaml")
    p.add_argument("--loss", choices=["dice", "bce", "weighted_bce", "bce_dice", "weighted_bce_dice"],
                   help="training loss (default bce_dice)")
    p.add_argument("--patch-size", type=voxels, metavar="Z,Y,X",
                   help="patch size in voxels (default: chosen from memory and model)")
    p.add_argument("--batch-size", type=int, metavar="N", help="patches per batch (default 2)")
    p.add_argument("--lr", type=float, metavar="X", help="Adam learning rate (default 0.005)")
    p.add_argument("--augment", choices=["off", "flips", "light", "default", "strong"],
                   help="augmentation strength (default: default)")
    p.add_argument("--training-voxel-size", "--voxel-size", dest="voxel_size", type=voxel_size,
                   metavar="Z,Y,X",
                   help="the grid the model trains on, in um; stacks are resampled to it "
                        "(default: the first training stack's; on a CPU with Y and X up to "
                        "1.5x coarser where they are over 2.2x finer than Z; a fine-tuned "
                        "model keeps its own). Not the microscope's voxel size: that is "
                        "--stack-voxel-size. --voxel-size is its old name")
    p.add_argument("--stack-voxel-size", type=voxel_size, metavar="Z,Y,X",
                   help="voxel size in um of the training and validation stacks whose files "
                        "record none (most .mat files, .npy)")
    p.add_argument("--amp", choices=["auto", "on", "off"],
                   help="mixed precision: auto (CUDA yes; a CPU only where it computes bf16 in "
                        "hardware), on, off")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default 0)")
    p.add_argument("--no-post-processing-search", dest="choose_post_processing",
                   action="store_false", default=None,
                   help="do not try other seed and merge settings on the validation stacks "
                        "after training (the model then predicts with the shipped ones)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _sources(pairs, h5s) -> Optional[List[Dict[str, Any]]]:
    if not pairs and not h5s:
        return None
    out = [{"raw": str(r), "labels": str(lab)} for r, lab in (pairs or [])]
    out += [{"h5": str(h)} for h in (h5s or [])]
    return out


def build_config(args):
    """:class:`core.train.TrainConfig` from --config (or the resumed model) and flags."""
    from core.checkpoint import load_model_file
    from core.config import apply_overrides, from_dict
    from core.errors import ModelFileError
    from core.train import TrainConfig, load_train_config

    if args.resume and not args.out.exists():
        raise ModelFileError(f"{args.out}: cannot resume, the file does not exist. Start a "
                             "new run without --resume.")
    if args.config is not None:
        config = load_train_config(args.config)
    elif args.resume and not (args.pair or args.h5):
        saved = load_model_file(args.out)
        config = from_dict(TrainConfig, saved["config"], where=f"{args.out} (saved config)")
    else:
        config = TrainConfig()
    overrides = {
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "max_minutes": args.max_minutes,
        "model.preset": args.preset,
        "target": args.target,
        "loss.name": args.loss,
        "patch_size": args.patch_size,
        "batch_size": args.batch_size,
        "optimizer.lr": args.lr,
        "augment.level": args.augment,
        "data.target_voxel_size_um": args.voxel_size,
        "data.stack_voxel_size_um": args.stack_voxel_size,
        "amp": args.amp,
        "device": args.device,
        "threads": args.threads,
        "seed": args.seed,
        "validation.choose_post_processing": args.choose_post_processing,
        "data.train": _sources(args.pair, args.h5),
        "data.val": _sources(args.val_pair, args.val_h5),
    }
    return apply_overrides(config, {k: v for k, v in overrides.items() if v is not None})


def _fmt(metrics: Dict[str, Any]) -> str:
    keys = ("ap50", "f1_50", "cell_iou", "mean_matched_iou", "wrong_cells")
    return ", ".join(f"{k} {metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                     for k in keys if k in metrics)


def run(args) -> int:
    from core.train import train

    config = build_config(args)
    cancel = threading.Event()
    previous = None

    def on_interrupt(signum, frame):  # first Ctrl+C: stop cleanly; second: at once
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\nepiseg train: stopping after this step (Ctrl+C again to abort now)...",
              file=sys.stderr)

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        from core.ddp import world_from_env

        with TerminalProgress(quiet=args.quiet or not world_from_env().main) as bar:
            result = train(config, args.out, resume=args.resume, init=args.init,
                           progress=bar, cancel=cancel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    from core.ddp import world_from_env

    if not world_from_env().main:  # under torchrun, process 0 reports
        return 0
    reason = {"finished": "all planned epochs done", "time": "time budget spent",
              "cancelled": "cancelled"}.get(result.stopped, result.stopped)
    print(f"trained {result.epochs} epoch(s) in {result.seconds / 60:.1f} min ({reason}); "
          f"target {result.target}, patch {'x'.join(map(str, result.patch_size))}, "
          f"{result.device} ({result.amp})")
    best = result.best_valid_metrics
    vloss = (result.valid_losses[result.best_epoch - 1]
             if 0 < result.best_epoch <= len(result.valid_losses) else float("nan"))
    print(f"best epoch {result.best_epoch}: val_loss {vloss:.4f}" + (f", {_fmt(best)}" if best else ""))
    if result.segment_choice:
        from core.segment_choice import SegmentChoice

        print(SegmentChoice.from_dict(result.segment_choice).summary())
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"wrote {result.path}")
    return 0
