"""Argument types shared by the subcommands: Z,Y,X triples of sizes and voxel sizes."""

from __future__ import annotations

import argparse
import math


def triple(kind=float, *, positive: bool = True, unit: str = ""):
    """argparse type for 'Z,Y,X' (commas or spaces): a tuple of three ``kind`` values.

    ``kind`` is int (voxels) or float (e.g. micrometres); ``positive`` refuses 0
    and negative values; ``unit`` names the unit in the error message.
    """
    what = "whole numbers" if kind is int else "numbers"
    sign = "positive " if positive else ""
    suffix = f" in {unit}" if unit else ""

    def parse(text: str):
        parts = [p for p in str(text).replace(" ", ",").split(",") if p]
        try:
            values = tuple(kind(p) for p in parts)
        except ValueError:
            values = ()
        ok = len(values) == 3 and all(math.isfinite(v) and (v > 0 or not positive)
                                      for v in values)
        if not ok:
            raise argparse.ArgumentTypeError(
                f"expected three {sign}{what} Z,Y,X{suffix}, got {text!r}")
        return values

    return parse


#: Voxel size (z, y, x) in micrometres, e.g. '1,0.3,0.3'.
voxel_size = triple(float, unit="micrometres")
#: A shape or patch or tile size (z, y, x) in voxels, e.g. '40,160,160'.
voxels = triple(int, unit="voxels")
