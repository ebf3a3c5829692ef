"""Render the core's progress events as a terminal progress bar (tqdm)."""

from __future__ import annotations

import sys
from typing import Dict

from tqdm import tqdm

from core.jobs import ProgressEvent


class TerminalProgress:
    """A callable progress sink: one tqdm bar per stage, log lines above it.

    Use as ``progress=TerminalProgress()`` and call :meth:`close` at the end
    (or use it as a context manager).
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bars: Dict[str, tqdm] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        if event.total is None:
            if event.message:
                tqdm.write(event.message, file=sys.stderr)
            return
        bar = self.bars.get(event.stage)
        if bar is not None and event.done < bar.n:  # the stage started again (next stack)
            bar.close()
            bar = None
        if bar is None:
            bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr,
                       leave=True, dynamic_ncols=True)
            self.bars[event.stage] = bar
        bar.total = event.total  # may be re-estimated as the job runs
        bar.n = event.done
        if event.data:
            bar.set_postfix({k: _fmt(v) for k, v in event.data.items()}, refresh=False)
        bar.refresh()
        if event.message:
            tqdm.write(event.message, file=sys.stderr)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def __enter__(self) -> "TerminalProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return value
