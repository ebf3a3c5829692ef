"""``episeg selftest``: segment the bundled sample with the bundled model and check the files."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "selftest", help="check this installation: segment a bundled sample stack",
        description=("Segment the bundled synthetic sample stack with the bundled default "
                     "model, write the cells as TIFF and MATLAB .mat, read them back and "
                     "compare them with the sample's ground truth. Exit status 0 when every "
                     "check passes, 1 otherwise."))
    p.add_argument("--keep", type=Path, metavar="FOLDER",
                   help="write the outputs into FOLDER instead of a temporary folder")
    p.add_argument("--model", type=Path, help="check this model instead of the bundled one")
    p.set_defaults(func=run)


def run(args) -> int:
    from core.selftest import run_selftest

    report = run_selftest(args.keep, model=args.model)
    print(report.text())
    return 0 if report.passed else 1
