"""EpiSeg desktop application (PySide6). Holds no science: it calls ``core``."""
