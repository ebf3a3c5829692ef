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
from make_screenshots import REPO, check, open_window, predict_and_show  # noqa: E402

from PySide6.QtWidgets import QApplication  # noqa: E402


def main(argv=None) -> int:
    from core.resources import default_model, sample_stack

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    ap.add_argument("--stack", type=Path, default=sample_stack("celegans_membrane_raw.tif"))
    args = ap.parse_args(argv)

    app = QApplication.instance() or QApplication([sys.argv[0]])  # noqa: F841
    with tempfile.TemporaryDirectory(prefix="episeg_first_run_") as tmp:
        return _shoot(Path(tmp), args)


def _shoot(work: Path, args) -> int:
    """The Predict tab before and after a first prediction, in the folder ``work``."""
    from core.resources import default_model

    w, shot = open_window(work, args.out)

    tab = w.predict_tab
    w.tabs.setCurrentWidget(tab)
    check(tab.model.text() == str(default_model()), "the default model is not preselected")
    tab.inputs.add([str(args.stack)])
    tab.out_dir.setText(str(work / "cells"))
    tab.format.setCurrentText("tif")
    shot("first_1_predict_tab")

    predict_and_show(w, 900)
    shot("first_2_cells")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
