"""The `episeg` command: version, help for every subcommand, clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core import __version__
from core.cli.main import COMMAND_MODULES, build_parser, main

REPO = Path(__file__).resolve().parents[2]


def _subcommands():
    parser = build_parser()
    for action in parser._actions:  # argparse keeps subparsers here
        if action.__class__.__name__ == "_SubParsersAction":
            return sorted(action.choices)
    return []


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_every_module_registers_a_subcommand():
    assert len(_subcommands()) == len(COMMAND_MODULES)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"episeg {command}" in out
    assert len(out.splitlines()) > 3


def test_installed_console_script_runs():
    """The `episeg` entry point a user types is installed and answers."""
    exe = Path(sys.executable).with_name("episeg")
    if not exe.exists():
        pytest.skip("episeg console script not installed next to this Python")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_ci_runs_the_readme_test_command():
    """CI must run exactly what the README tells a developer to run."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    blocks = readme.split("```")
    lines = blocks[1].splitlines()[1:]  # the first line is the language tag
    commands = [line.strip() for line in lines if line.strip()
                and not line.strip().startswith("#")]
    assert len(commands) >= 2, "README must open with the demo and the test command"
    assert commands[1] in ci


def test_train_names_its_two_voxel_sizes_apart():
    """`episeg train --training-voxel-size` is the model's grid and `--stack-voxel-size`
    the microscope's; the grid's old name `--voxel-size` still works."""
    from core.cli.cmd_train import build_config

    parser = build_parser()
    base = ["train", "--pair", "a.tif", "a_labels.tif", "--out", "m.pt"]
    new = build_config(parser.parse_args(base + ["--training-voxel-size", "1,0.45,0.45",
                                                 "--stack-voxel-size", "1,0.3,0.3"]))
    old = build_config(parser.parse_args(base + ["--voxel-size", "1,0.45,0.45"]))
    assert new.data.target_voxel_size_um == old.data.target_voxel_size_um == (1.0, 0.45, 0.45)
    assert new.data.stack_voxel_size_um == (1.0, 0.3, 0.3)
    assert old.data.stack_voxel_size_um is None
