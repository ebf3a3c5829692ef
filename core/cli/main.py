"""The ``episeg`` command: one subcommand per job, all thin doors onto core.

Each subcommand lives in its own module ``core/cli/cmd_<name>.py`` exposing
``register(subparsers)``; the module adds its parser and sets ``func`` to a
handler ``func(args) -> int``. Errors a user can cause (:class:`EpiSegError`)
are printed as one clear line, without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from core import __version__
from core.errors import EpiSegError, JobCancelled

#: Subcommand modules, in the order ``episeg --help`` lists them.
COMMAND_MODULES = [
    "core.cli.cmd_info",
    "core.cli.cmd_convert",
    "core.cli.cmd_synth",
    "core.cli.cmd_preprocess",
    "core.cli.cmd_evaluate",
    "core.cli.cmd_train",
    "core.cli.cmd_predict",
    "core.cli.cmd_tune",
    "core.cli.cmd_demo",
    "core.cli.cmd_selftest",
    "core.cli.cmd_gui",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="episeg",
        description=(
            "EpiSeg: find every cell in 3D confocal stacks of epithelial tissue. "
            "Axis order is ZYX; voxel sizes are (z, y, x) in micrometres."
        ),
    )
    parser.add_argument("--version", action="version", version=f"episeg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except JobCancelled as err:
        print(f"episeg {args.command}: {err}", file=sys.stderr)
        return 130
    except EpiSegError as err:
        print(f"episeg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"episeg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
