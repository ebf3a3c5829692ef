"""The one way the GUI runs long work: a core function in a QThread.

A :class:`Job` wraps any core function that follows the job protocol of
:mod:`core.jobs` (keyword arguments ``progress`` and ``cancel``). It runs the
function in its own ``QThread`` and turns the core's plain callbacks into Qt
signals, which Qt delivers on the GUI thread:

* ``progress(ProgressEvent)``: for progress bars, ETAs and live plots;
* ``log(str)``: one line per event that carries a message;
* ``finished(object)``: the function's return value;
* ``failed(str)``: the message of a user-facing error (:class:`core.errors.EpiSegError`)
  or, for a bug, the exception's type and text (the traceback goes to the log);
* ``cancelled(str)``: the user pressed Cancel and the core stopped cleanly;
* ``done()``: always last, whatever happened.

``cancel()`` sets a ``threading.Event`` that the core checks at safe points
(between tiles, batches or slabs), so it stops within about a second and
keeps what it had finished. Nothing here knows any science.
"""

from __future__ import annotations

import threading
import traceback
from typing import Any, Callable, Dict, Optional

from PySide6.QtCore import QObject, Qt, QThread, Signal

from core.errors import EpiSegError, JobCancelled
from core.jobs import ProgressEvent


class _JobSignals(QObject):
    """What a job tells: progress events, log lines, its result, its failure or cancel, the end."""

    progress = Signal(object)
    log = Signal(str)
    finished = Signal(object)
    failed = Signal(str)
    cancelled = Signal(str)
    done = Signal()


class _Runner(_JobSignals):
    """Lives in the worker thread; calls the function and emits what happened."""

    def __init__(self, fn: Callable[..., Any], kwargs: Dict[str, Any], cancel: threading.Event):
        super().__init__()
        self.fn, self.kwargs, self.cancel_event = fn, kwargs, cancel

    def _on_progress(self, event: ProgressEvent) -> None:
        self.progress.emit(event)
        if event.message:
            self.log.emit(event.message)

    def run(self) -> None:
        try:
            result = self.fn(progress=self._on_progress, cancel=self.cancel_event, **self.kwargs)
        except JobCancelled as err:
            self.cancelled.emit(str(err))
        except EpiSegError as err:
            self.failed.emit(str(err))
        except MemoryError:
            self.failed.emit("Not enough memory for this job: close other programs, use a "
                             "smaller tile size, or process a smaller stack.")
        except Exception as err:  # a bug: say so, keep the application alive
            self.log.emit(traceback.format_exc())
            self.failed.emit(f"Unexpected error ({type(err).__name__}): {err}. "
                             "The details are in the log pane; please report them.")
        else:
            self.finished.emit(result)
        finally:
            self.done.emit()


class Job(_JobSignals):
    """Run ``fn(progress=..., cancel=..., **kwargs)`` in a worker thread.

    Connect to the signals, then call :meth:`start`. A Job runs once.
    """

    def __init__(self, fn: Callable[..., Any], parent: Optional[QObject] = None, **kwargs: Any):
        super().__init__(parent)
        self._cancel = threading.Event()
        self._thread = QThread()
        self._runner = _Runner(fn, kwargs, self._cancel)
        self._runner.moveToThread(self._thread)
        self._thread.started.connect(self._runner.run)
        for name in ("progress", "log", "finished", "failed", "cancelled", "done"):
            getattr(self._runner, name).connect(getattr(self, name))
        # direct: quit from the worker thread itself, even while the GUI thread waits
        self._runner.done.connect(self._thread.quit, Qt.DirectConnection)
        self._started = False

    def start(self) -> None:
        if self._started:
            raise RuntimeError("A Job runs once; make a new one.")
        self._started = True
        self._thread.start()

    def cancel(self) -> None:
        """Ask the core to stop at its next safe point (it keeps finished results)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def is_running(self) -> bool:
        return self._thread.isRunning()

    def wait(self, ms: int = 30000) -> bool:
        """Block until the thread ended (tests and application exit only)."""
        return self._thread.wait(ms)
