"""GUI tests run offscreen (no screen needed) with pytest-qt.

QSettings write under a throw-away XDG_CONFIG_HOME, so tests never touch (nor
depend on) the settings of the person running them.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="episeg-test-settings-")
