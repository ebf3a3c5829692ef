"""Where EpiSeg's shipped files are: ``resources/`` of the source tree, or of a frozen app.

A PyInstaller build puts ``resources/`` (models, configs, samples, icons)
beside its modules in ``sys._MEIPASS``; a source checkout has it at the
repository root. Every module asks here instead of building paths itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def resources_dir() -> Path:
    """The folder holding ``models/``, ``configs/``, ``samples/`` and ``icons/``."""
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        return Path(frozen) / "resources"
    return Path(__file__).resolve().parent.parent / "resources"


def default_model() -> Optional[Path]:
    """The bundled default model (``resources/models/default.pt``), or None if absent."""
    path = resources_dir() / "models" / "default.pt"
    return path if path.is_file() else None


def sample_stack(name: str) -> Path:
    """A stack shipped in ``resources/samples/`` (it may be absent in a trimmed install)."""
    return resources_dir() / "samples" / name
