"""Size and start-up of the built application (packaging/build.sh's output); prints figures.

    python benchmarks/app_size_startup.py build/package [--runs 5]

Prints the archive's size, the unpacked folder's size with its largest parts,
the seconds from launch to the splash screen and to the main window
(``EpiSeg --startup-check``, median of ``--runs``, offscreen, empty
environment) and the self-test's time.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def run_app(exe: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as home:
        env = {"HOME": home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "QT_QPA_PLATFORM": "offscreen"}
        return subprocess.run([str(exe), *args], cwd=home, env=env, capture_output=True,
                              text=True, timeout=600)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path, help="packaging/build.sh's EPISEG_BUILD_DIR")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    archives = sorted(args.build.glob("EpiSeg-*.tar.gz"))
    stages = sorted((args.build / "stage").glob("EpiSeg-*"))
    if not archives or not stages:
        raise SystemExit(f"no archive or stage folder in {args.build}; run packaging/build.sh")
    stage = stages[-1]
    internal = stage / "EpiSeg" / "_internal"
    print(f"archive   {archives[-1].name}: {archives[-1].stat().st_size / 2**20:.0f} MiB")
    print(f"unpacked  {folder_bytes(stage) / 2**20:.0f} MiB, "
          f"{sum(1 for f in stage.rglob('*') if f.is_file())} files")
    parts = sorted(((folder_bytes(p) if p.is_dir() else p.stat().st_size, p.name)
                    for p in internal.iterdir()), reverse=True)
    print("largest parts: " + ", ".join(f"{name} {size / 2**20:.0f} MiB"
                                        for size, name in parts[:8]))
    exe = stage / "EpiSeg" / "EpiSeg"
    splash, window = [], []
    for _ in range(args.runs):
        done = run_app(exe, "--startup-check")
        found = re.search(r"splash shown ([\d.]+) s and window shown ([\d.]+) s", done.stdout)
        if done.returncode or not found:
            raise SystemExit(f"--startup-check failed: {done.stdout}{done.stderr}")
        splash.append(float(found.group(1)))
        window.append(float(found.group(2)))
    print(f"start-up  splash {statistics.median(splash):.2f} s, main window "
          f"{statistics.median(window):.2f} s after launch (median of {args.runs}; "
          f"{os.cpu_count()} CPUs)")
    t0 = time.monotonic()
    done = run_app(exe, "--selftest")
    print(f"self-test {'passed' if done.returncode == 0 else 'FAILED'} in "
          f"{time.monotonic() - t0:.1f} s (whole process)")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
