"""Train the bundled default model (resources/models/default.pt) and write its model card.

Reproducible from its seeds and command (not a test; takes about an hour on a
2-core CPU)::

    python benchmarks/train_default_model.py --work /tmp/episeg_default

1. makes the synthetic epithelium stacks (``core.synth``): 8 training stacks
   of 64 x 256 x 256 voxels at 1 x 0.3 x 0.3 um (seeds 100-107, medium and
   hard optics taking turns), a validation stack (seed 108) and the held-out
   test stacks of ``benchmarks/quality.py`` (seeds 900+, never trained on);
2. trains ``episeg train``'s defaults (the recipe that won in
   docs/accuracy.md) for a fixed number of epochs, so that the run does not
   depend on the machine's speed;
3. scores the model with ``episeg predict``'s defaults on the held-out stacks
   and counts the cells it finds on the shipped C. elegans stack;
4. copies the model to ``--out`` (atomically) and writes the model card
   ``default.md`` beside it.

``--evaluate-only`` skips training and re-scores the model already in ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: data and scoring of the accuracy table)

from core import __version__  # noqa: E402
from core.checkpoint import load_model_for_inference  # noqa: E402
from core.cli.args import voxel_size  # noqa: E402
from core.config import from_dict  # noqa: E402
from core.io import read_volume  # noqa: E402
from core.io.atomic import atomic_path  # noqa: E402
from core.pipeline import PredictConfig, segment_stack  # noqa: E402
from core.train import TrainConfig, train  # noqa: E402

REPO = quality.REPO
CELEGANS = REPO / "resources" / "samples" / "celegans_membrane_raw.tif"
#: quality.py's stress seeds whose "bright medium" stacks the card reports
BRIGHT_SEEDS = (5000, 6000)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("episeg_default_model"),
                    help="folder for the data, the training run and the scores")
    ap.add_argument("--out", type=Path, default=REPO / "resources" / "models",
                    help="where default.pt and its card default.md go")
    ap.add_argument("--n-train", type=int, default=8, help="training stacks")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--iterations-per-epoch", type=int, default=70)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--medium", type=quality._medium, default=None, metavar="LOW,HIGH",
                    help="the training stacks' media and lumens drawn from LOW-HIGH (relative "
                         "brightness, e.g. 0.02,0.3); default: dark, as the validation stack")
    ap.add_argument("--voxel-size", type=voxel_size, default=None, metavar="Z,Y,X",
                    help="the grid the model trains on, in um (episeg train "
                         "--training-voxel-size); default: episeg train's choice")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="score the model already in --work (no training)")
    return ap.parse_args(argv)


def data_args(args: argparse.Namespace) -> SimpleNamespace:
    """The settings quality.make_data expects: its held-out test stacks, more training stacks."""
    return SimpleNamespace(n_train=args.n_train, train_difficulties=["medium", "hard"],
                           train_cells_around=None, train_tubes=None, cells_around=11.0,
                           train_seed=100, train_medium=args.medium,
                           shape=(64, 256, 256), levels=list(quality.TEST_LEVELS), n_test=2,
                           test_seed=900)


def train_model(data: Dict[str, Any], model_path: Path, args: argparse.Namespace):
    source = lambda r, l: {"raw": str(r), "labels": str(l)}  # noqa: E731
    cfg = from_dict(TrainConfig, {
        "data": {"train": [source(r, l) for r, l in data["train"]],
                 "val": [source(*data["val"])]},
        "epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch,
        "seed": args.seed,
    }, where="default model")
    if args.voxel_size is not None:
        cfg.data.target_voxel_size_um = tuple(args.voxel_size)
    return train(cfg, model_path)


def count_real_cells(model_path: Path) -> int:
    model, info = load_model_for_inference(model_path, "cpu")
    res = segment_stack(read_volume(CELEGANS), model, info,
                        config=from_dict(PredictConfig, {"flags": False}))
    return int(res.n_cells)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stacks_grid(facts: Dict[str, Any]) -> str:
    """Why a stack that records no voxel size is not taken to have the model's grid."""
    stacks = facts.get("stack_voxel_size_um")
    if not stacks or np.allclose(stacks, facts["voxel_size_um"]):
        return ""
    return " (that of its training stacks; it trained on a coarser grid)"


def _bright_text(scores: Dict[str, Any]) -> str:
    """The card's lines on stacks with a bright medium ("" when not scored)."""
    bright = scores.get("bright")
    if not bright:
        return ""
    m = bright["mean"]
    return (f"Stacks whose medium and lumen are brighter than the cells' cytoplasm "
            f"(`quality.py`'s stress condition \"bright medium\", seeds "
            f"{', '.join(str(s) for s in bright['seeds'])}): AP50 {m['ap50']:.3f}, ARE "
            f"{m['adapted_rand_error']:.3f}, wrongCells {m['wrong_cells_share']:.1%}, cell IoU "
            f"{m['cell_iou']:.3f}.\n\n")


def _background_limit(facts: Dict[str, Any]) -> str:
    """The card's limit on the medium around the tissue, as the model was trained."""
    if facts.get("medium"):
        return ("* The medium around the tissue and the lumen ranged from darker to brighter "
                "than the cells in training, but was always smooth: a textured or "
                "structured background (debris, other tissue) was never shown.\n")
    return ("* Background outside the tissue was dark and smooth in training. Where the "
            "medium is brighter than the cells' cytoplasm (the C. elegans stack) the "
            "network can take it for tissue; `episeg predict` makes a segment that touches "
            "every cell on the surface background, but the faintest cells can merge into "
            "it. Fine-tune on a few of your own stacks before trusting it on such data.\n")


def _media(facts: Dict[str, Any]) -> str:
    """The training data's media in the card's words ("" for the usual dark ones)."""
    medium = facts.get("medium")
    if not medium:
        return ""
    return (f", each stack's medium and lumen from {medium[0]:g} to {medium[1]:g} of a bright "
            "membrane's brightness (darker to brighter than the cells)")


def model_card(facts: Dict[str, Any], scores: Dict[str, Any], command: str) -> str:
    m = scores["mean"]
    table = quality.markdown({"default.pt": scores}, "Held-out synthetic stacks")
    table = table.replace("| train min |", "| train min (all) |")
    return f"""# EpiSeg default model (`default.pt`)

The model that `episeg predict`, the Predict tab and `episeg demo` start from
when no other model is chosen. Made by this project's own script, from its
seeds (reproducible up to the CPU's floating-point order):

```bash
{command}
```

| | |
| --- | --- |
| file | `default.pt`, {facts['size_mb']:.1f} MB, sha256 `{facts['sha256'][:16]}...` |
| network | 3D U-Net, {facts['levels']} levels, {facts['base_features']} features in the first ({facts['parameters']:,} weights); outputs {', '.join(facts['channels'])} |
| voxel size it was trained at | {' x '.join(f'{v:g}' for v in facts['voxel_size_um'])} um (Z, Y, X); other stacks are resampled to it and back. A stack whose file records none (most .mat files) is taken to have {' x '.join(f'{v:g}' for v in facts.get('stack_voxel_size_um') or facts['voxel_size_um'])} um{_stacks_grid(facts)}: give yours in the Predict tab's Voxel size or with `--voxel-size` |
| normalisation | {facts['normalisation']} per stack |
| post-processing | the shipped seeds and merging (`core.segment.SegmentParams`): the shipped settings were chosen on stacks like its training ones. A model fine-tuned from it with `episeg train` tries others on its own validation labels and keeps them where they score clearly higher (docs/accuracy.md step 23); `episeg tune` (or the Train tab's "Choose seeds and merging again") does the same for any model on annotated stacks, without training (step 24) |
| training data | {facts['n_train']} synthetic epithelium stacks (`core.synth`), 64 x 256 x 256 voxels, ~60 cells each, medium and hard optics taking turns (seeds 100-{99 + facts['n_train']}){_media(facts)}; validation: seed {100 + facts['n_train']} |
| training | `episeg train` defaults, {facts['epochs']} epochs x {facts['iterations_per_epoch']} iterations, patch {' x '.join(map(str, facts['patch']))}, best epoch {facts['best_epoch']} by validation loss ({facts['best_valid_loss']:.3f}; validation AP50 {facts['best_valid_ap50']:.3f}), {facts['train_minutes']:.0f} min on {facts['machine']} |
| software | EpiSeg {facts['episeg_version']}, PyTorch {facts['torch']} |

## Figures on stacks it never saw

Scored with `episeg predict`'s defaults (no tuning on these stacks) on
`benchmarks/quality.py`'s held-out synthetic stacks (seeds 900+): the same
stacks as the tables in docs/accuracy.md.

Mean: cell IoU {m['cell_iou']:.3f}, AP50 {m['ap50']:.3f}, adapted Rand error
{m['adapted_rand_error']:.3f}, wrongCells {m['wrong_cells_share']:.1%} of the cells.

{table}
{_bright_text(scores)}Real confocal stack without ground truth (C. elegans membranes,
`resources/samples/celegans_membrane_raw.tif`, its medium brighter than the
embryo's cytoplasm): {scores['celegans_cells']} cells.

## Intended use

Membrane-stained epithelia imaged by confocal microscopy (one channel, a
bright cell outline), cells about 10-17 um across at voxels near 1 x 0.3 x
0.3 um, lining a tube whose lumen is wider than a cell. It is a starting
point: predict with it to see what it finds, then
fine-tune it on a few of your own annotated stacks (Train tab, "Fine-tune";
`episeg train --init default.pt`), which `episeg demo` does in four minutes.

## Limits

* Trained on synthetic stacks only. The real annotated sample in this project
  (`sample_patch.h5`, plant tissue, unknown voxel size, cells ~40 voxels
  wide) was left out: its cells and optics are unlike an epithelium's, and
  mixing it in would teach the network a second cell scale.
{_background_limit(facts)}* Slivers of cells cut by the stack's faces (a few voxels thick) are mostly
  missed or merged into their neighbour (docs/accuracy.md, "What limits it").
* Every training tube had a lumen 27-36 um wide (cells 10-17 um). The network
  takes a lumen about one cell wide (10-15 um, a thin tube) for one large
  cell; `episeg predict` makes such a segment background because it touches
  every cell lining it (`segment.max_neighbours_factor`; cell IoU 0.71-0.82
  -> 0.93-0.96 on four thin tubes). Wider lumens, up to tubes larger than
  the stack, are fine (docs/accuracy.md, step 20).
* Nuclear or cytoplasmic stains are not what it was trained for.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/train_default_model.py"
               f" --n-train {args.n_train} --epochs {args.epochs}"
               f" --iterations-per-epoch {args.iterations_per_epoch} --seed {args.seed}"
               + (" --medium {:g},{:g}".format(*args.medium) if args.medium else "")
               + (" --voxel-size {:g},{:g},{:g}".format(*args.voxel_size) if args.voxel_size
                  else ""))
    print(f"1/4 data in {work / 'data'}", flush=True)
    data = quality.make_data(data_args(args), work)
    model_path = work / "default.pt"
    facts_path = work / "training.json"
    if not args.evaluate_only:
        print(f"2/4 training {args.epochs} epochs x {args.iterations_per_epoch} iterations",
              flush=True)
        t0 = time.monotonic()
        result = train_model(data, model_path, args)
        best = result.best_valid_metrics
        facts = {"epochs": result.epochs, "best_epoch": result.best_epoch,
                 "best_valid_loss": result.valid_losses[result.best_epoch - 1],
                 "best_valid_ap50": float(best.get("ap50", np.nan)),
                 "patch": list(result.patch_size), "train_minutes": (time.monotonic() - t0) / 60,
                 "iterations_per_epoch": args.iterations_per_epoch, "n_train": args.n_train,
                 "medium": list(args.medium) if args.medium else None,
                 "machine": (f"a {os.cpu_count()}-core {platform.machine()} CPU"
                             if result.device == "cpu" else result.device)}
        facts_path.write_text(json.dumps(facts, indent=2, default=float))
    facts = json.loads(facts_path.read_text())

    print("3/4 scoring on the held-out stacks", flush=True)
    cells_dir = work / "cells"
    cells_dir.mkdir(exist_ok=True)
    rows = quality.score_model(model_path, data["tests"], {}, False, cells_dir)
    bright = [stack for seed in BRIGHT_SEEDS
              for stack in quality.stress_stacks(work / "data" / f"stress{seed}", seed,
                                                 ["bright medium"])]
    bright_rows = quality.score_model(model_path, bright, {}, False, cells_dir)
    scores = {"rows": rows, "mean": quality.summarise(rows),
              "train_minutes": facts["train_minutes"],
              "bright": {"seeds": [s + list(quality.STRESS_CONDITIONS).index("bright medium")
                                   for s in BRIGHT_SEEDS],
                         "rows": bright_rows, "mean": quality.summarise(bright_rows)},
              "celegans_cells": count_real_cells(model_path)}
    (work / "scores.json").write_text(json.dumps(scores, indent=2, default=float))

    print(f"4/4 writing {args.out / 'default.pt'} and its card", flush=True)
    import torch

    model, info = load_model_for_inference(model_path, "cpu")
    facts.update({
        "size_mb": model_path.stat().st_size / 1e6, "sha256": sha256(model_path),
        "levels": info.model_config.depth, "base_features": info.model_config.base_features,
        "parameters": sum(p.numel() for p in model.parameters()),
        "channels": list(info.channels), "voxel_size_um": list(info.voxel_size_um),
        "stack_voxel_size_um": (list(info.stack_voxel_size_um)
                                if info.stack_voxel_size_um is not None else None),
        "normalisation": info.normalisation.get("mode", "?"),
        "episeg_version": __version__, "torch": torch.__version__,
    })
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "default.pt") as tmp:
        shutil.copyfile(model_path, tmp)
    with atomic_path(args.out / "default.md") as tmp:
        Path(tmp).write_text(model_card(facts, scores, command), encoding="utf-8")
    m = scores["mean"]
    b = scores["bright"]["mean"]
    print(f"mean AP50 {m['ap50']:.3f}  ARE {m['adapted_rand_error']:.3f}  cell IoU "
          f"{m['cell_iou']:.3f}  C. elegans cells {scores['celegans_cells']}; bright medium: "
          f"AP50 {b['ap50']:.3f}  ARE {b['adapted_rand_error']:.3f}  cell IoU {b['cell_iou']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
