"""``python -m app [STACK [LABELS]]``: open the EpiSeg window."""

import sys

from app.main_window import main

sys.exit(main())
