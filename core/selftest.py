"""``episeg selftest`` / ``EpiSeg --selftest``: does this installation segment cells?

Segments the bundled synthetic sample stack (``resources/samples/``, 40 x 160
x 160 voxels at 1 x 0.3 x 0.3 um, with its ground truth) with the bundled
default model exactly as ``episeg predict`` does, writes the cells as TIFF and
MATLAB .mat, reads both back and checks them: same shape and voxel size as
the input, identical labels in both files, a flags table, and cells that
match the ground truth (AP50 and cell IoU above a floor a working model
clears easily and a broken one cannot). Nothing outside a temporary folder
is written unless ``keep`` names a folder.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from core.jobs import ProgressFn, ProgressReporter
from core.resources import default_model, sample_stack

SAMPLE_RAW = "synthetic_epithelium_raw.tif"
SAMPLE_LABELS = "synthetic_epithelium_labels.tif"
#: What a working default model reaches on the sample is far above these
#: floors (model card: AP50 ~0.9); an untrained or mismatched model scores ~0.
MIN_AP50 = 0.6
MIN_CELL_IOU = 0.7


@dataclass
class SelftestReport:
    """``checks``: (what, passed, detail) in the order they ran."""

    checks: List[tuple] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def add(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((what, bool(ok), detail))
        return bool(ok)

    def text(self) -> str:
        lines = [f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else "")
                 for what, ok, detail in self.checks]
        verdict = "passed" if self.passed else "FAILED"
        lines.append(f"self-test {verdict} in {self.seconds:.1f} s")
        return "\n".join(lines)


def run_selftest(keep: Optional[Path] = None, *, model: Optional[Path] = None,
                 progress: ProgressFn = None) -> SelftestReport:
    """Run every check; ``keep``: write the outputs there instead of a temporary folder."""
    t0 = time.monotonic()
    report = SelftestReport()
    log = ProgressReporter(progress, "selftest")
    model = Path(model) if model else default_model()
    raw_path, gt_path = sample_stack(SAMPLE_RAW), sample_stack(SAMPLE_LABELS)
    ok = report.add("bundled default model", model is not None and model.is_file(),
                    str(model) if model else "resources/models/default.pt is missing")
    ok &= report.add("bundled sample stack", raw_path.is_file() and gt_path.is_file(),
                     str(raw_path.parent))
    if ok:
        if keep is not None:
            Path(keep).mkdir(parents=True, exist_ok=True)
            _check_outputs(report, model, raw_path, gt_path, Path(keep), log)
        else:
            with tempfile.TemporaryDirectory(prefix="episeg_selftest_") as tmp:
                _check_outputs(report, model, raw_path, gt_path, Path(tmp), log)
    report.seconds = time.monotonic() - t0
    return report


def _check_outputs(report: SelftestReport, model: Path, raw_path: Path, gt_path: Path,
                   out: Path, log: ProgressReporter) -> None:
    from core.config import from_dict
    from core.io import read_labels, read_volume, write_volume
    from core.metrics import evaluate
    from core.pipeline import PredictConfig, predict_files

    raw = read_volume(raw_path)
    log.message(f"segmenting {raw_path.name} {raw.shape} with {model.name}")
    results = predict_files(str(model), [str(raw_path)], out,
                            from_dict(PredictConfig, {"format": "tif", "device": "cpu"}))
    res = results[0]
    if not report.add("predict", not res.error and res.n_cells > 0,
                      res.error or f"{res.n_cells} cells in "
                      f"{sum(res.seconds.values()):.1f} s"):
        return
    tif = next((p for p in res.outputs if p.suffix == ".tif"), None)
    csv = next((p for p in res.outputs if p.suffix == ".csv"), None)
    if not report.add("TIFF written", tif is not None and tif.is_file(), str(tif)):
        return
    cells = read_labels(tif)
    report.add("TIFF shape and voxel size", cells.shape == raw.shape and np.allclose(
        cells.voxel_size_or(), raw.voxel_size_or()),
        f"{cells.shape} at {cells.voxel_size_or()} um")
    mat = write_volume(out / f"{tif.stem}.mat", cells, labels=True)
    back = read_labels(mat)
    report.add("MATLAB .mat written and read back", np.array_equal(back.data, cells.data)
               and np.allclose(back.voxel_size_or(), cells.voxel_size_or()), str(mat))
    report.add("flags table", csv is not None and csv.is_file()
               and len(csv.read_text(encoding="utf-8").splitlines()) > 1, str(csv))
    m = evaluate(read_labels(gt_path).data, cells.data, components=False).to_dict()
    report.add("cells match the ground truth",
               m["ap50"] >= MIN_AP50 and m["cell_iou"] >= MIN_CELL_IOU,
               f"AP50 {m['ap50']:.3f} (floor {MIN_AP50}), cell IoU {m['cell_iou']:.3f} "
               f"(floor {MIN_CELL_IOU}), {m['n_pred_cells']} cells for {m['n_gt_cells']}")
