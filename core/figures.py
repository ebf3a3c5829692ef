"""Figures as PNG files without a plotting library: slices with cell overlays, loss curves.

Panels are RGB uint8 arrays (rows, columns, 3); :func:`save_figure` lays them
out in a grid with titles (Pillow) and writes the PNG atomically. Used by
``episeg demo`` and the docs; the GUI draws its own views with pyqtgraph.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

#: Distinct, colour-blind-friendly-ish colours for cell ids (cycled).
PALETTE = np.array([
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (255, 255, 255), (148, 103, 189), (140, 86, 75),
    (23, 190, 207), (188, 189, 34), (255, 127, 14), (44, 160, 44), (214, 39, 40),
], dtype=np.uint8)


def stretch(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """Grey uint8 image with the ``low``..``high`` percentiles mapped to 0..255."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def label_colours(labels: np.ndarray) -> np.ndarray:
    """RGB colour per voxel of a 2D label image (background black)."""
    rgb = PALETTE[(labels.astype(np.int64) - 1) % len(PALETTE)]
    rgb[labels == 0] = 0
    return rgb


def overlay(image: np.ndarray, labels: Optional[np.ndarray] = None, *, alpha: float = 0.35,
            contours: bool = True, aspect: float = 1.0) -> np.ndarray:
    """A 2D slice as RGB with its cells drawn over it.

    image: 2D intensities (rows, columns); labels: 2D ids of the same shape or
    None; alpha: fill opacity; contours: draw cell outlines at full colour;
    aspect: row spacing / column spacing (e.g. z / x voxel size for an XZ
    slice), used to stretch rows so the panel has true proportions.
    """
    grey = stretch(image)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if labels is not None:
        colours = label_colours(labels).astype(np.float32)
        inside = labels > 0
        rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colours[inside]
        if contours:
            edge = find_boundaries(labels, mode="inner") & inside
            rgb[edge] = colours[edge]
    out = rgb.astype(np.uint8)
    if abs(aspect - 1.0) > 1e-3:
        rows = max(1, int(round(out.shape[0] * aspect)))
        out = np.asarray(Image.fromarray(out).resize((out.shape[1], rows), Image.NEAREST))
    return out


def enlarge(panel: np.ndarray, min_width: int = 256) -> np.ndarray:
    """Scale an RGB panel up by a whole factor (nearest) until it is ``min_width`` wide."""
    factor = max(1, int(np.ceil(min_width / max(1, panel.shape[1]))))
    if factor == 1:
        return panel
    return np.repeat(np.repeat(panel, factor, axis=0), factor, axis=1)


def line_plot(series: Sequence[Tuple[str, Sequence[float], Tuple[int, int, int]]], *,
              size: Tuple[int, int] = (420, 260), xlabel: str = "epoch",
              log: bool = False) -> np.ndarray:
    """Curves (name, values, colour) on axes with ticks, as an RGB panel."""
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 52, 10, 10, 34
    values = [np.asarray(v, dtype=float) for _, v, _ in series if len(v)]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if log:
        finite = finite[finite > 0]
    if finite.size == 0:
        draw.text((left, h // 2), "no data yet", fill=(0, 0, 0), font=font)
        return np.asarray(img)
    lo, hi = float(finite.min()), float(finite.max())
    if log:
        lo, hi = np.log10(lo), np.log10(hi)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(v) for v in values)

    def xy(i: int, value: float) -> Tuple[float, float]:
        v = np.log10(value) if log else value
        x = left + (w - left - right) * (i / max(1, n - 1))
        y = top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        y = top + (h - top - bottom) * (1 - frac)
        text = f"{10 ** v:.3g}" if log else f"{v:.3g}"
        draw.text((2, y - 5), text, fill=(0, 0, 0), font=font)
    draw.text((left, h - bottom + 4), "1", fill=(0, 0, 0), font=font)
    draw.text((w - right - 20, h - bottom + 4), str(n), fill=(0, 0, 0), font=font)
    draw.text(((w - len(xlabel) * 6) // 2, h - 14), xlabel, fill=(0, 0, 0), font=font)
    legend_y = top + 4
    for name, vals, colour in series:
        pts = [xy(i, v) for i, v in enumerate(vals) if np.isfinite(v) and (v > 0 or not log)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) < 40 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((w - right - 110, legend_y), name, fill=colour, font=font)
        legend_y += 12
    return np.asarray(img)


def save_figure(path: Path, panels: List[Tuple[str, np.ndarray]], *, columns: int = 3,
                title: str = "", pad: int = 8) -> Path:
    """Lay out titled RGB panels in a grid and write a PNG atomically."""
    from core.io.atomic import atomic_path

    font = ImageFont.load_default()
    cell_w = max(p.shape[1] for _, p in panels)
    cell_h = max(p.shape[0] for _, p in panels) + 14
    rows = (len(panels) + columns - 1) // columns
    head = 20 if title else 0
    canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, head + rows * (cell_h + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill=(0, 0, 0), font=font)
    for k, (name, panel) in enumerate(panels):
        r, c = divmod(k, columns)
        x = pad + c * (cell_w + pad)
        y = head + pad + r * (cell_h + pad)
        draw.text((x, y), name, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel[..., :3])), (x, y + 14))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
