"""``episeg gui [STACK [LABELS]]``: open the desktop window (the app package, PySide6).

The only place the command line reaches the GUI, and only when this command
runs: ``core`` itself never imports Qt, so the engine and every other command
work on machines without a screen or without PySide6.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("gui", help="open the EpiSeg window",
                       description="Open the EpiSeg desktop window; a stack (and its labels) "
                                   "given here opens in the viewer.")
    p.add_argument("files", nargs="*", help="a stack, and optionally its label stack")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import pyqtgraph  # noqa: F401
        import PySide6.QtWidgets  # noqa: F401

        from app.launcher import open_window
    except ImportError as err:  # PySide6 or pyqtgraph missing
        from core.errors import ConfigError
        raise ConfigError(f"The window needs PySide6 and pyqtgraph ({err}); install EpiSeg "
                          "with its GUI dependencies: pip install -e .") from None
    return open_window(list(args.files))
