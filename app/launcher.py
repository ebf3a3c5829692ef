"""The frozen application's front door (``EpiSeg`` / ``EpiSeg.exe``; packaging/episeg.spec).

* ``EpiSeg [STACK [LABELS]]`` opens the window (a double-click does this);
* ``EpiSeg --selftest`` builds the window offscreen and checks its tabs, then
  runs :mod:`core.selftest` (bundled model on the bundled sample, TIFF and
  .mat written and checked); exit status 0 when everything passed;
* ``EpiSeg --startup-check`` opens the window, prints the seconds from the
  process start until the splash screen and until the window were shown, and
  quits (docs/benchmarks.md);
* ``EpiSeg COMMAND ...`` (``predict``, ``train``, ``demo``, ``--help``...) is
  the ``episeg`` command line, for scripts on machines with the frozen app only.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import List, Optional

#: Arguments that go to the command line instead of the window.
CLI_WORDS = {"-h", "--help", "--version"}


def _process_start() -> float:
    """Wall-clock time this process started (Linux /proc; else now)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def _cli_commands() -> set:
    from core.cli.main import COMMAND_MODULES

    return {name.rsplit(".cmd_", 1)[1] for name in COMMAND_MODULES}


def window_selftest() -> List[str]:
    """Problems found in the main window built offscreen (empty: none)."""
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow
    from core.resources import default_model

    app = QApplication.instance() or QApplication([sys.argv[0], "-platform", "offscreen"])
    problems = []
    with tempfile.TemporaryDirectory(prefix="episeg_selftest_qt_") as tmp:
        settings = QSettings(os.path.join(tmp, "settings.ini"), QSettings.IniFormat)
        window = MainWindow(settings=settings)
        window.show()
        app.processEvents()
        tabs = [window.tabs.tabText(i) for i in range(window.tabs.count())]
        if tabs != ["Preprocess", "Train", "Predict", "Evaluate"]:
            problems.append(f"window tabs are {tabs}")
        model = default_model()
        if model is None or window.predict_tab.model.text() != str(model):
            problems.append("the Predict tab does not preselect the bundled default model")
        if window.grab().isNull():
            problems.append("the window could not be drawn")
        window.close()
        app.processEvents()
    return problems


def selftest() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from core.selftest import run_selftest

    problems = window_selftest()
    print("ok   main window (4 tabs, default model preselected)" if not problems
          else "\n".join(f"FAIL {p}" for p in problems), flush=True)
    report = run_selftest()
    print(report.text(), flush=True)
    return 0 if report.passed and not problems else 1


def open_window(argv: List[str], started: Optional[float] = None) -> int:
    """Splash screen at once, then the main window (its modules take seconds to load).

    ``started``: the process start time; given, the seconds until the splash
    and until the window are printed and the app quits (``--startup-check``).
    """
    from PySide6.QtCore import Qt, QTimer
    from PySide6.QtGui import QColor, QIcon, QPixmap
    from PySide6.QtWidgets import QApplication, QSplashScreen

    from core.resources import resources_dir

    app = QApplication.instance() or QApplication([sys.argv[0]])
    icon = str(resources_dir() / "icons" / "episeg.png")
    app.setWindowIcon(QIcon(icon))
    splash = QSplashScreen(QPixmap(icon))
    splash.showMessage("Loading EpiSeg...", Qt.AlignBottom | Qt.AlignHCenter, QColor("white"))
    splash.show()
    app.processEvents()
    splash_at = time.time()

    from app.main_window import open_main_window

    window = open_main_window(argv)
    splash.finish(window)
    if started is not None:
        def shown() -> None:
            print(f"splash shown {splash_at - started:.2f} s and window shown "
                  f"{time.time() - started:.2f} s after the process started", flush=True)
            window.close()
            app.quit()

        QTimer.singleShot(0, shown)
    return app.exec()


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch as the module docstring says (packaging/episeg_entry.py has called
    ``multiprocessing.freeze_support()`` before)."""
    started = _process_start()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--selftest"]:
        return selftest()
    if argv[:1] == ["--startup-check"]:
        return open_window([], started)
    if argv and (argv[0] in CLI_WORDS or argv[0] in _cli_commands()):
        from core.cli.main import main as cli_main

        return cli_main(argv)
    return open_window(argv)


if __name__ == "__main__":
    sys.exit(main())
