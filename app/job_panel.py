"""Run / Cancel buttons, a progress bar with ETA and a log pane, around one :class:`Job`.

Every tab puts one of these under its form and calls
``panel.start(fn, **kwargs)``; the panel runs ``fn`` through the one worker
pattern (:class:`app.worker.Job`), shows its progress and log, and re-emits
``finished(result)``. A failing job's message is shown in a dialog and the
window keeps running; a cancelled job says what was kept.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QMessageBox, QPlainTextEdit, QProgressBar,
                               QPushButton, QVBoxLayout, QWidget)

from app.worker import Job
from core.errors import EpiSegError
from core.jobs import ProgressEvent


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"about {s // 3600} h {s % 3600 // 60:02d} min left"
    if s >= 60:
        return f"about {s // 60} min {s % 60:02d} s left"
    return f"about {s} s left"


class JobPanel(QWidget):
    """Progress, ETA, log and Cancel for the job a tab runs.

    Signals: ``finished(object)`` (the core function's result), ``progress(object)``
    (every :class:`ProgressEvent`, for live plots), ``stopped()`` (after any end).
    """

    finished = Signal(object)
    progress = Signal(object)
    stopped = Signal()

    def __init__(self, run_text: str = "Run", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.job: Optional[Job] = None
        self.last_error: str = ""
        self.error_box: Optional[QMessageBox] = None
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        self.bar.setTextVisible(False)
        self.status = QLabel("")
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setPlaceholderText("Messages of the running job appear here.")
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.bar, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.log, 1)

    def is_running(self) -> bool:
        return self.job is not None and self.job.is_running()

    def start(self, fn: Callable[..., Any], **kwargs: Any) -> Job:
        """Run ``fn(progress=..., cancel=..., **kwargs)`` in the worker thread."""
        if self.is_running():
            raise RuntimeError("A job is already running in this tab.")
        job = Job(fn, parent=self, **kwargs)
        job.progress.connect(self._on_progress)
        job.log.connect(self.append_log)
        job.finished.connect(self._on_finished)
        job.failed.connect(self._on_failed)
        job.cancelled.connect(self._on_cancelled)
        job.done.connect(self._on_done)
        self.job = job
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.bar.setRange(0, 0)  # busy until the first count arrives
        self.status.setText("running...")
        job.start()
        return job

    def cancel(self) -> None:
        if self.job is not None and self.is_running():
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling: finishing the current step...")

    def append_log(self, text: str) -> None:
        self.log.appendPlainText(text.rstrip())

    def _on_progress(self, event: ProgressEvent) -> None:
        self.progress.emit(event)
        fraction = event.fraction
        if fraction is not None:
            self.bar.setRange(0, 1000)
            self.bar.setValue(int(round(1000 * fraction)))
            self.status.setText(f"{event.stage}: {event.done:g} / {event.total:g}   "
                                f"{format_eta(event.eta_s)}")

    def _on_finished(self, result: Any) -> None:
        self.bar.setRange(0, 1000)
        self.bar.setValue(1000)
        self.status.setText("finished")
        self.finished.emit(result)

    def refuse(self, problems) -> bool:
        """Show what stops a run (a list of sentences); True when there is something."""
        if problems:
            self.show_problem(" ".join(problems))
            return True
        return False

    def config_or_refuse(self, problems, make_config: Callable[[], Any]) -> Any:
        """The run's config from ``make_config()``, or None after showing what stops the
        run: ``problems`` (a list of sentences) or the form's error (a ConfigError
        names the field). ``make_config`` is called only when there are no problems."""
        problems = list(problems)
        config = None
        if not problems:
            try:
                config = make_config()
            except EpiSegError as err:
                problems.append(str(err))
        return None if self.refuse(problems) else config

    def show_problem(self, message: str) -> None:
        """Tell the user what is wrong (dialog + log) without starting anything."""
        self.last_error = message
        self.append_log(f"error: {message}")
        self.error_box = QMessageBox(QMessageBox.Critical, "EpiSeg", message,
                                     QMessageBox.Ok, self)
        self.error_box.open()  # not exec(): the window keeps running behind it

    def _on_failed(self, message: str) -> None:
        self.status.setText("failed")
        self.show_problem(message)

    def _on_cancelled(self, message: str) -> None:
        self.status.setText("cancelled")
        self.append_log(message)

    def _on_done(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1000)
            self.bar.setValue(0)
        self.stopped.emit()
