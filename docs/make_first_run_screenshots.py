"""Screenshots of a biologist's first segmentation, for the README's five steps.

Opens the window as the installed app does (fresh settings), goes to the
Predict tab, checks that the bundled default model is preselected, adds a
stack, segments it with that model and shows the cells and the flagged cells.
Saves ``docs/screenshots/first_1_predict_tab.png`` and
``first_2_cells.png``; stops with a message if a step does not show what a
user would expect.

    QT_QPA_PLATFORM=offscreen .venv/bin/python docs/make_first_run_screenshots.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_screenshots import REPO, check, run_panel, wait_until  # noqa: E402  (sets offscreen)

from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def main(argv=None) -> int:
    from core.resources import default_model, sample_stack

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    ap.add_argument("--stack", type=Path, default=sample_stack("celegans_membrane_raw.tif"))
    args = ap.parse_args(argv)

    from app.main_window import MainWindow

    app = QApplication.instance() or QApplication([sys.argv[0]])  # noqa: F841
    work = Path(tempfile.mkdtemp(prefix="episeg_first_run_"))
    w = MainWindow(settings=QSettings(str(work / "settings.ini"), QSettings.IniFormat))
    w.resize(1700, 1000)
    w.show()

    def shot(name: str) -> None:
        QApplication.processEvents()
        path = args.out / f"{name}.png"
        w.grab().save(str(path))
        print(f"saved {path}", flush=True)

    tab = w.predict_tab
    w.tabs.setCurrentWidget(tab)
    check(tab.model.text() == str(default_model()), "the default model is not preselected")
    tab.inputs.add([str(args.stack)])
    tab.out_dir.setText(str(work / "cells"))
    tab.format.setCurrentText("tif")
    shot("first_1_predict_tab")

    run_panel(tab.panel, 900)
    n_cells = tab.results[0].n_cells
    wait_until(lambda: w.viewer.labels is not None and int(w.viewer.labels.max()) == n_cells
               and not w._load_job.is_running(), 60)
    check(tab.flag_table.rowCount() > 0, "no flagged cells listed")
    tab.flag_table.selectRow(0)
    shot("first_2_cells")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
