"""``python -m app [STACK [LABELS]]``: open the EpiSeg window (splash screen first)."""

import sys

from app.launcher import open_window

sys.exit(open_window(sys.argv[1:]))
