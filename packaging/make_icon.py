"""Draw EpiSeg's icon (resources/icons/episeg.png, 256 x 256): a patch of hexagonal cells.

Run once when the icon should change: ``python packaging/make_icon.py``.
Needs PySide6 only (QT_QPA_PLATFORM=offscreen works).
"""

import math
import sys
from pathlib import Path

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QBrush, QColor, QGuiApplication, QImage, QPainter, QPen, QPolygonF

SIZE = 256
OUT = Path(__file__).resolve().parents[1] / "resources" / "icons" / "episeg.png"
#: Cell fills, colour-blind safe (Okabe-Ito).
COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"]


def hexagon(cx: float, cy: float, r: float) -> QPolygonF:
    return QPolygonF([QPointF(cx + r * math.cos(math.pi / 3 * k + math.pi / 6),
                              cy + r * math.sin(math.pi / 3 * k + math.pi / 6)) for k in range(6)])


def main() -> int:
    QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    img = QImage(SIZE, SIZE, QImage.Format_ARGB32)
    img.fill(Qt.transparent)
    p = QPainter(img)
    p.setRenderHint(QPainter.Antialiasing)
    p.setBrush(QBrush(QColor("#1b1f2a")))
    p.setPen(Qt.NoPen)
    p.drawRoundedRect(4, 4, SIZE - 8, SIZE - 8, 40, 40)
    r = 38.0
    w = math.sqrt(3) * r
    centres = [(SIZE / 2, SIZE / 2)] + [(SIZE / 2 + w * math.cos(math.pi / 3 * k),
                                        SIZE / 2 + w * math.sin(math.pi / 3 * k)) for k in range(6)]
    p.setPen(QPen(QColor("#f4f4f4"), 7, Qt.SolidLine, Qt.RoundCap, Qt.RoundJoin))
    for (cx, cy), colour in zip(centres, COLOURS):
        p.setBrush(QBrush(QColor(colour)))
        p.drawPolygon(hexagon(cx, cy, r))
    p.end()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if not img.save(str(OUT)):
        raise SystemExit(f"could not write {OUT}")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
