"""EpiSeg core engine: volumes, preprocessing, models, prediction and metrics.

Nothing in this package imports Qt; the GUI (``app``) and the command line
(``core.cli``) are two thin doors onto the same functions.
"""

__version__ = "0.1.0"
