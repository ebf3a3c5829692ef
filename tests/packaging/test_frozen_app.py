"""The one-click build: packaging/build.sh makes the archive, and the unpacked
app segments cells with nothing from this machine's Python.

Builds the whole application (clean virtual environment, PyInstaller, archive;
about 10 minutes on 2 cores), unpacks the archive into a folder outside the
source tree and runs it with an empty environment: no PYTHONPATH, no virtual
environment, no source tree on any path. Set EPISEG_SKIP_BUNDLE=1 to leave it
out of a quick local run; CI runs it.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.environ.get("EPISEG_SKIP_BUNDLE") == "1",
                                reason="EPISEG_SKIP_BUNDLE=1: the build test was left out")


def clean_env(home: Path) -> dict:
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("build")
    env = dict(os.environ, EPISEG_BUILD_DIR=str(build))
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(REPO / "packaging" / "build.sh")], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    archives = list(build.glob("EpiSeg-*-linux-*.tar.gz"))
    assert len(archives) == 1, list(build.iterdir())
    target = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(target, filter="tar")
    (folder,) = target.iterdir()
    return folder


def test_unpacked_app_passes_its_selftest_in_an_empty_environment(unpacked, tmp_path):
    done = subprocess.run([str(unpacked / "EpiSeg" / "EpiSeg"), "--selftest"], cwd=tmp_path,
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "self-test passed" in done.stdout
    assert "main window (4 tabs, default model preselected)" in done.stdout
    assert str(REPO) not in done.stdout  # the bundled model and sample, not the checkout's


def test_unpacked_app_opens_its_window(unpacked, tmp_path):
    env = dict(clean_env(tmp_path), QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([str(unpacked / "EpiSeg" / "EpiSeg"), "--startup-check"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "window shown" in done.stdout


def test_unpacked_app_runs_the_command_line(unpacked, tmp_path):
    done = subprocess.run([str(unpacked / "EpiSeg" / "EpiSeg"), "predict", "--help"],
                          cwd=tmp_path, env=clean_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bundled default model" in done.stdout


def test_archive_has_a_launcher_and_no_development_files(unpacked):
    desktop = (unpacked / "episeg.desktop").read_text()
    assert "Exec=" in desktop and "Icon=" in desktop
    assert (unpacked / "episeg.png").is_file()
    assert os.access(unpacked / "install-launcher.sh", os.X_OK)
    internal = unpacked / "EpiSeg" / "_internal"
    assert (internal / "resources" / "models" / "default.pt").is_file()
    assert not (internal / "torch" / "test").exists()
    assert not (internal / "torch" / "include").exists()
    assert not list(internal.rglob("libcudnn*")) and not list(internal.rglob("libcublas*"))
    assert not (internal / "tests").exists()


def test_launcher_installs_a_menu_entry_pointing_at_the_app(unpacked, tmp_path):
    env = dict(clean_env(tmp_path), XDG_DATA_HOME=str(tmp_path / "share"))
    done = subprocess.run(["sh", str(unpacked / "install-launcher.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    entry = (tmp_path / "share" / "applications" / "episeg.desktop").read_text()
    assert f'Exec="{unpacked}/EpiSeg/EpiSeg" %F' in entry
    assert f"Icon={unpacked}/episeg.png" in entry
