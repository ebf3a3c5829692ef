"""The one worker pattern: core jobs run off the GUI thread, report, cancel and fail cleanly."""

from __future__ import annotations

import threading
import time

import pytest

from app.worker import Job
from core.errors import ConfigError
from core.jobs import ProgressReporter, check_cancelled


def counting_job(n, *, progress=None, cancel=None, delay=0.01):
    rep = ProgressReporter(progress, "count", total=n)
    seen = []
    for i in range(1, n + 1):
        check_cancelled(cancel, "Counting")
        seen.append(threading.current_thread().name)
        time.sleep(delay)
        rep.update(i, message=f"step {i}")
    return {"steps": n, "threads": set(seen)}


def test_a_job_runs_off_the_gui_thread_and_reports_progress(qtbot):
    job = Job(counting_job, n=5)
    events, logs, results = [], [], []
    job.progress.connect(events.append)
    job.log.connect(logs.append)
    job.finished.connect(results.append)
    with qtbot.waitSignal(job.done, timeout=10000):
        job.start()
    assert results and results[0]["steps"] == 5
    assert threading.main_thread().name not in results[0]["threads"]
    assert [e.done for e in events] == [1, 2, 3, 4, 5]
    assert events[-1].fraction == 1.0 and events[-1].eta_s == pytest.approx(0, abs=1e-6)
    assert logs[-1] == "step 5"
    job.wait()


def test_cancel_stops_the_job_quickly_and_says_so(qtbot):
    job = Job(counting_job, n=10_000, delay=0.005)
    cancelled, finished = [], []
    job.cancelled.connect(cancelled.append)
    job.finished.connect(finished.append)
    with qtbot.waitSignal(job.progress, timeout=10000):
        job.start()
    t0 = time.monotonic()
    with qtbot.waitSignal(job.done, timeout=5000):
        job.cancel()
    assert time.monotonic() - t0 < 2.0
    assert cancelled and "cancelled" in cancelled[0] and not finished
    job.wait()


def test_a_user_error_becomes_a_message_and_a_bug_says_where_to_look(qtbot):
    def bad_config(*, progress=None, cancel=None):
        raise ConfigError("train.yaml: key 'lr' = -1: must be > 0.")

    def bug(*, progress=None, cancel=None):
        return 1 / 0

    for fn, expect in ((bad_config, "train.yaml: key 'lr'"), (bug, "ZeroDivisionError")):
        job = Job(fn)
        failed, logs = [], []
        job.failed.connect(failed.append)
        job.log.connect(logs.append)
        with qtbot.waitSignal(job.done, timeout=5000):
            job.start()
        assert failed and expect in failed[0]
        if fn is bug:
            assert any("Traceback" in line for line in logs)
        job.wait()


def test_the_event_loop_keeps_running_while_a_job_works(qtbot):
    """The GUI thread is never blocked: timer ticks keep coming every ~10 ms."""
    from PySide6.QtCore import QTimer

    gaps, last = [], [time.monotonic()]

    def tick():
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(10)

    def busy(*, progress=None, cancel=None):
        import numpy as np

        t0 = time.monotonic()
        a = np.random.default_rng(0).random((256, 256))
        while time.monotonic() - t0 < 1.0:  # array work, as in the core, plus Python glue
            a = np.sort(a, axis=1) + 1e-3 * sum(range(100))
            check_cancelled(cancel)
        return float(a.mean())

    job = Job(busy)
    with qtbot.waitSignal(job.done, timeout=10000):
        job.start()
    timer.stop()
    job.wait()
    timer.deleteLater()
    assert len(gaps) > 20
    assert max(gaps[1:]) < 0.1
