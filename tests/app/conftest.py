"""GUI tests run offscreen (no screen needed) with pytest-qt.

QSettings write under a throw-away XDG_CONFIG_HOME, so tests never touch (nor
depend on) the settings of the person running them; the folder is removed when
the test run ends.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["XDG_CONFIG_HOME"] = _SETTINGS_HOME = tempfile.mkdtemp(prefix="episeg-test-settings-")
atexit.register(shutil.rmtree, _SETTINGS_HOME, ignore_errors=True)
