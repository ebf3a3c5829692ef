"""The job protocol shared by the command line and the GUI.

Long-running core functions take two optional keyword arguments:

``progress``
    a plain callable that receives :class:`ProgressEvent` objects;
``cancel``
    a ``threading.Event`` (or any callable returning ``True`` once the user
    asked to stop). Functions call :func:`check_cancelled` at safe points and
    raise :class:`core.errors.JobCancelled` after keeping what was finished.

Neither is ever a Qt object: the GUI wraps them in one worker class, the
command line renders them as a progress bar.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from core.errors import JobCancelled

CancelFlag = Union[threading.Event, Callable[[], bool], None]


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    stage: short name of the step ("read", "train", "predict", ...).
    done, total: work units finished and planned (total None when unknown).
    message: a line for a log pane.
    data: machine-readable extras (e.g. {"loss": 0.31, "epoch": 3}).
    eta_s: estimated seconds left, or None.
    """

    stage: str
    done: float = 0.0
    total: Optional[float] = None
    message: str = ""
    data: dict = field(default_factory=dict)
    eta_s: Optional[float] = None

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))


ProgressFn = Optional[Callable[[ProgressEvent], None]]


def is_cancelled(cancel: CancelFlag) -> bool:
    """True once the user asked to stop."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def check_cancelled(cancel: CancelFlag, what: str = "The job") -> None:
    """Raise :class:`JobCancelled` if the user asked to stop."""
    if is_cancelled(cancel):
        raise JobCancelled(f"{what} was cancelled; results finished before that were kept.")


class ProgressReporter:
    """Helper that sends :class:`ProgressEvent` with an ETA from elapsed time.

    Example::

        rep = ProgressReporter(progress, "predict", total=len(tiles))
        for i, tile in enumerate(tiles, 1):
            ...
            rep.update(i, message=f"tile {i}")
    """

    def __init__(self, progress: ProgressFn, stage: str, total: Optional[float] = None):
        self.progress = progress
        self.stage = stage
        self.total = total
        self.t0 = time.monotonic()

    def update(self, done: float, message: str = "", **data: Any) -> None:
        if self.progress is None:
            return
        eta = None
        elapsed = time.monotonic() - self.t0
        if self.total and done > 0:
            eta = elapsed * (self.total - done) / done
        self.progress(
            ProgressEvent(self.stage, done, self.total, message, dict(data), eta)
        )

    def message(self, text: str, **data: Any) -> None:
        """Send a log line without changing the progress count."""
        if self.progress is not None:
            self.progress(ProgressEvent(self.stage, 0.0, None, text, dict(data), None))
