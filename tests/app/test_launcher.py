"""The frozen app's front door (app/launcher.py), run from the source tree."""

from __future__ import annotations

import pytest

from app.launcher import main, window_selftest


def test_window_selftest_finds_the_tabs_and_the_preselected_default_model(qtbot):
    assert window_selftest() == []


def test_version_goes_to_the_command_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert "episeg" in capsys.readouterr().out


def test_a_subcommand_runs_the_command_line(tmp_path):
    assert main(["synth", str(tmp_path), "--n", "1", "--shape", "8,48,48"]) == 0
    assert (tmp_path / "synth_000_raw.tif").is_file()
