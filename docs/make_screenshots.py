"""Walk through the GUI as a user would, with real jobs, and save a screenshot of each step.

Offscreen, no terminal interaction: synthetic stacks are made, then the
Preprocess tab prepares one, the Train tab trains a 3D U-Net with its live
curves (cancelled once and resumed, as a user would), the Predict tab segments
an unseen stack and shows it with its flagged cells, and the Evaluate tab
scores it against its ground truth. Each step's window is saved to
``docs/screenshots/NN_step.png`` for the README. Every step checks what a user
would see and stops with a message if it is not there.

    QT_QPA_PLATFORM=offscreen .venv/bin/python docs/make_screenshots.py --minutes 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PySide6.QtCore import QEventLoop, QSettings, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def wait(signal, timeout_s: float) -> None:
    """Run the event loop until ``signal`` fires (or the timeout: an error)."""
    loop = QEventLoop()
    fired = []
    signal.connect(lambda *a: (fired.append(a), loop.quit()))
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    loop.exec()
    if not fired:
        raise SystemExit(f"gave up waiting after {timeout_s:.0f} s")


def wait_until(condition, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not condition():
        QApplication.processEvents(QEventLoop.AllEvents, 50)
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"gave up waiting after {timeout_s:.0f} s")


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"screenshot walk-through: {what}")


def run_panel(panel, timeout_s: float) -> None:
    loop = QEventLoop()
    panel.stopped.connect(loop.quit)
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    panel.run_button.click()
    loop.exec()
    check(not panel.is_running(), f"the job did not end within {timeout_s:.0f} s")
    check(not panel.last_error, f"the job failed: {panel.last_error}")


def open_window(work: Path, out: Path):
    """The main window with fresh settings in ``work``, and ``shot(name)``: save it as out/name.png."""
    from app.main_window import MainWindow

    out.mkdir(parents=True, exist_ok=True)
    w = MainWindow(settings=QSettings(str(work / "settings.ini"), QSettings.IniFormat))
    w.resize(1700, 1000)
    w.show()

    def shot(name: str) -> None:
        QApplication.processEvents()
        path = out / f"{name}.png"
        w.grab().save(str(path))
        print(f"saved {path}", flush=True)

    return w, shot


def predict_and_show(w, timeout_s: float) -> None:
    """Run the Predict tab; wait until its result is in the viewer; select the first flag."""
    tab = w.predict_tab
    run_panel(tab.panel, timeout_s)
    n_cells = tab.results[0].n_cells
    wait_until(lambda: w.viewer.labels is not None and int(w.viewer.labels.max()) == n_cells
               and not w._load_job.is_running(), 60)
    check(tab.flag_table.rowCount() > 0, "no flagged cells listed")
    tab.flag_table.selectRow(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    ap.add_argument("--work", type=Path, default=Path("/tmp/episeg_screenshots"))
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget in the Train tab")
    args = ap.parse_args(argv)

    from core.synth import write_synthetic_dataset

    app = QApplication.instance() or QApplication([sys.argv[0]])  # noqa: F841
    work = args.work
    pairs = write_synthetic_dataset(work / "data", 4, (48, 192, 192), seed=31, overwrite=True)
    train_pairs, (test_raw, test_lab) = pairs[:3], pairs[3]
    w, shot = open_window(work, args.out)

    # 1. Preprocess: a stack and its labels, what is inside, run, the result in the viewer
    tab = w.preprocess_tab
    w.tabs.setCurrentWidget(tab)
    tab.raws.add([str(train_pairs[0][0])])
    tab.labels.add([str(train_pairs[0][1])])
    tab.out_dir.setText(str(work / "prepared"))
    tab.raws.list.setCurrentRow(0)
    wait(tab.inspector.described, 60)
    run_panel(tab.panel, 300)
    wait_until(lambda: w.viewer.labels is not None, 60)
    check(tab.result_list.count() == 1, "the Preprocess tab lists no result")
    shot("01_preprocess")

    # 2. Train: live curves; cancel after two epochs, then resume to the budget
    tab = w.train_tab
    w.tabs.setCurrentWidget(tab)
    tab.train_data.add_files([str(p) for pair in train_pairs[:2] for p in pair])
    tab.val_data.add_pair(str(train_pairs[2][0]), str(train_pairs[2][1]))
    model = work / "model.pt"
    tab.out.setText(str(model))
    tab.epochs.setValue(1000)
    tab.iterations.setValue(40)
    tab.minutes.setValue(args.minutes)
    loop = QEventLoop()
    tab.panel.progress.connect(lambda e: e.stage == "epoch" and len(tab.epoch_x) >= 2 and loop.quit())
    tab.panel.run_button.click()
    loop.exec()
    stopped = QEventLoop()
    tab.panel.stopped.connect(stopped.quit)
    tab.panel.cancel_button.click()
    stopped.exec()
    check(tab.panel.status.text() == "cancelled", f"cancel ended as {tab.panel.status.text()!r}")
    check(model.exists(), "cancel kept no model")
    tab.resume.setChecked(True)
    run_panel(tab.panel, args.minutes * 60 + 600)
    check(len(tab.epoch_x) >= 3, "the loss curve has fewer than 3 epochs")
    shot("02_train")

    # 3. Predict: an unseen stack, shown with its cells and flagged cells
    tab = w.predict_tab
    w.tabs.setCurrentWidget(tab)
    tab.model.setText(str(model))
    tab.inputs.add([str(test_raw)])
    tab.out_dir.setText(str(work / "cells"))
    tab.format.setCurrentText("tif")
    predict_and_show(w, 600)
    tab._flag_clicked(0, 0)
    shot("03_predict")
    pred_file = tab.results[0].outputs[0]

    # 4. Evaluate: ground truth against the prediction, a cell chosen in the table
    tab = w.evaluate_tab
    w.tabs.setCurrentWidget(tab)
    tab.gt.setText(str(test_lab))
    tab.pred.setText(str(pred_file))
    tab.image.setText(str(test_raw))
    run_panel(tab.panel, 300)
    check(tab.cells.rowCount() > 0, "the per-cell table is empty")
    check(tab.evaluated.flags is not None, "the flags written beside the prediction were not checked")
    tab.cells.sortItems(list(tab.cells.horizontalHeaderItem(c).text()
                             for c in range(tab.cells.columnCount())).index("iou"))
    tab.cells.selectRow(0)
    tab._cell_clicked(0, 0)
    shot("04_evaluate")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
