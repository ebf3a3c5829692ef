"""How smooth is the viewer on a lab-sized stack? Milliseconds per user action.

Builds a 234 x 1024 x 1024 uint16 stack and a uint16 label stack as
memory-mapped .npy files (what the viewer gets from a large file), shows them
in the VolumeViewer offscreen, and times: a Z step (mouse wheel / slider), a
click that moves the XZ / YZ sections, the readout under the mouse, going to
a cell, and toggling the overlay mode. Also prints how much the process
memory grows while browsing (no full-volume copies: it should stay far below
the stack's size).

    QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/viewer_speed.py [--shape 234,1024,1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_gib() -> float:
    """Anonymous resident memory (copies made by the process; file pages of the
    memory-mapped stack are the OS's cache and are not counted)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="234,1024,1024")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))

    from PySide6.QtWidgets import QApplication

    from app.viewer import VolumeViewer

    app = QApplication.instance() or QApplication([])
    tmp = Path(tempfile.mkdtemp(prefix="episeg_viewer_"))
    t0 = time.perf_counter()
    image = np.lib.format.open_memmap(tmp / "raw.npy", "w+", np.uint16, shape)
    labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.uint16, shape)
    rng = np.random.default_rng(0)
    yy, xx = np.indices(shape[1:])
    cells = (yy // 64) * (shape[2] // 64 + 1) + xx // 64 + 1
    for z in range(shape[0]):
        image[z] = rng.integers(0, 4000, shape[1:], dtype=np.uint16)
        labels[z] = cells
    image.flush(), labels.flush()
    del image, labels
    image = np.load(tmp / "raw.npy", mmap_mode="r")
    labels = np.load(tmp / "labels.npy", mmap_mode="r")
    print(f"stack {shape} uint16 ({image.nbytes / 2 ** 30:.2f} GiB) + labels, memory-mapped; "
          f"made in {time.perf_counter() - t0:.0f} s")

    v = VolumeViewer()
    v.resize(1400, 900)
    v.show()
    app.processEvents()
    base = rss_gib()
    t = time.perf_counter()
    v.set_image(image, (0.5, 0.2, 0.2))
    v.set_labels(labels)
    app.processEvents()
    print(f"open (auto contrast from a sample, first slices): {1000 * (time.perf_counter() - t):.0f} ms")

    def timed(name, fn, n):
        times = []
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            app.processEvents()
            times.append(time.perf_counter() - t)
        times = 1000 * np.array(times)
        print(f"{name:<38s} median {np.median(times):6.1f} ms   95th pct {np.percentile(times, 95):6.1f} ms")

    timed("Z step (wheel / slider / keys)", lambda i: v.set_z((i * 7) % shape[0]), args.steps)
    timed("click: XZ / YZ sections move", lambda i: v._click(v.z, 100 + 13 * i % 800, 50 + 17 * i % 900), 20)
    timed("readout under the mouse", lambda i: v._readout(v.z, 10 + i, 20 + i), args.steps)
    v.contours.setChecked(True)
    timed("Z step, outlines only", lambda i: v.set_z((i * 5) % shape[0]), 30)
    v.contours.setChecked(False)
    timed("go to a cell (highlight)", lambda i: v.highlight(int(cells[100 + 37 * i, 200 + 41 * i])), 5)
    print(f"anonymous memory growth while browsing: {rss_gib() - base:.2f} GiB "
          f"(the stack is {2 * image.nbytes / 2 ** 30:.2f} GiB with its labels)")
    v.close()
    del image, labels
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
