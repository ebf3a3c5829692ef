"""`episeg info` and `episeg convert`, as a user types them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import tifffile

import core.cli.main as cli_main
from core.io import read_labels, read_volume, write_volume
from core.volume import Volume

IO_COMMANDS = ["core.cli.cmd_info", "core.cli.cmd_convert"]


@pytest.fixture
def episeg(monkeypatch, capsys):
    """Run `episeg ARGS...` in-process (only the I/O subcommands are loaded,
    so these tests do not depend on the other commands); returns (rc, out, err)."""
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", IO_COMMANDS)

    def run(*argv):
        try:
            rc = cli_main.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            rc = exc.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def ramp():
    return np.arange(5 * 7 * 11, dtype=np.uint16).reshape(5, 7, 11)


def test_info_real_h5(episeg, shared_data):
    rc, out, err = episeg("info", f"{shared_data / 'sample_patch.h5'}:raw")
    assert rc == 0, err
    assert "64 x 200 x 200" in out and "uint16" in out and "not recorded" in out
    for name in ("raw", "label", "big_label"):
        assert name in out
    rc, out, err = episeg("info", shared_data / "sample_patch.h5")
    assert rc == 0, err
    assert out.count("shape (Z, Y, X)") == 3  # one block per 3D dataset


def test_info_mat_and_tif(episeg, tmp_path):
    mat = write_volume(tmp_path / "g.mat", Volume(ramp(), (0.5, 0.13, 0.2)))
    rc, out, err = episeg("info", mat, tmp_path / "nothing.tif")
    assert rc == 2
    assert "7x11x5" in out and "5 x 7 x 11" in out and "0.5 x 0.13 x 0.2 um" in out
    assert "0 .. 384" in out
    assert "nothing.tif" in err and "Traceback" not in err


def test_info_4d_shows_contents_then_how_to_pick(episeg, tmp_path):
    import h5py

    path = tmp_path / "pred.h5"
    with h5py.File(path, "w") as f:
        f["probs"] = np.zeros((2, 5, 6, 7), np.float32)
    rc, out, err = episeg("info", path)
    assert rc == 2
    assert "probs" in out and "2x5x6x7" in out
    assert "--channel 0" in err and "Traceback" not in err
    rc, out, err = episeg("info", path, "--channel", "1")
    assert rc == 0, err
    assert "5 x 6 x 7" in out and "channel 1" in out


def test_convert_keeps_voxel_size_through_every_format(episeg, tmp_path):
    tif = tmp_path / "in.tif"
    write_volume(tif, Volume(ramp(), (0.5, 0.13, 0.2)))
    chain = ["a.mat", "b.h5", "c.npz", "d.mat", "e.tif"]
    src = tif
    for name in chain:
        extra = ["--mat-version", "7.3"] if name == "d.mat" else []
        rc, out, err = episeg("convert", src, tmp_path / name, *extra)
        assert rc == 0, err
        assert "Wrote" in out and "0.5 x 0.13 x 0.2 um" in out
        src = tmp_path / name
    back = read_volume(src)
    np.testing.assert_array_equal(back.data, ramp())
    assert back.voxel_size == pytest.approx((0.5, 0.13, 0.2), rel=1e-6)


def test_convert_options(episeg, tmp_path):
    hyper = tmp_path / "hyper.tif"
    data = np.arange(4 * 2 * 6 * 7, dtype=np.uint16).reshape(4, 2, 6, 7)
    tifffile.imwrite(hyper, data, imagej=True, metadata={"axes": "ZCYX"})
    rc, out, err = episeg("convert", hyper, tmp_path / "c1.mat", "--channel", "1",
                          "--variable", "membrane", "--voxel-size", "1,0.25,0.25")
    assert rc == 0, err
    loaded = scipy.io.loadmat(tmp_path / "c1.mat")
    np.testing.assert_array_equal(loaded["membrane"], data[:, 1].transpose(1, 2, 0))
    assert read_volume(tmp_path / "c1.mat").voxel_size == (1.0, 0.25, 0.25)

    labels = tmp_path / "l.npy"
    np.save(labels, (ramp() % 7).astype(np.int64))
    rc, out, err = episeg("convert", labels, tmp_path / "l.h5", "--labels", "--dataset", "cells")
    assert rc == 0, err
    vol = read_labels(f"{tmp_path / 'l.h5'}:cells")
    assert vol.data.dtype == np.uint8


def test_convert_errors_are_one_line_without_traceback(episeg, tmp_path):
    hyper = tmp_path / "hyper.tif"
    tifffile.imwrite(hyper, np.zeros((4, 2, 6, 7), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    rc, out, err = episeg("convert", hyper, tmp_path / "o.h5")
    assert rc == 2
    assert err.startswith("episeg convert: error:") and "--channel 0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.h5").exists()

    rc, out, err = episeg("convert", hyper, hyper)
    assert rc == 2 and "input file" in err
    rc, out, err = episeg("convert", hyper, tmp_path / "o.h5", "--voxel-size", "1,2")
    assert rc == 2 and "three positive numbers" in err


def test_command_line_exit_code_without_traceback(tmp_path):
    """A real process: non-zero exit, the message, and no traceback."""
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"\x00" * 64)
    code = (
        "import sys, core.cli.main as m; "
        f"m.COMMAND_MODULES = {IO_COMMANDS!r}; sys.exit(m.main(sys.argv[1:]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, "info", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "broken.h5" in proc.stderr and "corrupt or truncated" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
