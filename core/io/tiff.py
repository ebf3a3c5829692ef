"""TIFF: 3D stacks, ImageJ hyperstacks and OME-TIFF (read); ImageJ TIFF (write).

Voxel size on reading, first found wins:
1. ImageJ metadata: ``spacing`` (z) and the XResolution/YResolution tags (x, y),
   in ImageJ's ``unit`` (micron, um, nm, mm, ... converted to micrometres);
2. OME-XML ``PhysicalSizeZ/Y/X`` with their units;
3. the JSON description tifffile writes (``spacing``, ``unit``) plus the tags.

Writing makes a TIFF that Fiji opens as a Z stack with its voxel size
(ImageJ metadata, zlib compression, lossless). ImageJ holds only uint8,
uint16, int16 and float32, so other types are converted when no value
changes (int32 with values 0..65535 -> uint16; float64 -> float32, which for
images keeps ~7 significant digits). Label stacks with ids above 65535 are
written as float32, exact up to 16,777,216; beyond that (or integer images
with values outside float32's exact range) a plain TIFF in the original
dtype is written, with a warning that Fiji may not show its voxel size.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import tifffile

from core.errors import VolumeDataError
from core.io.base import Entry, Source
from core.scratch import scratch_array
from core.volume import VoxelSize

EXTENSIONS = (".tif", ".tiff")
FLOAT32_EXACT_INT = 2**24

_UNIT_TO_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6,
    "a": 1e-4, "å": 1e-4, "pm": 1e-6,
}


def unit_factor(unit: Optional[str]) -> Optional[float]:
    """Micrometres per ``unit``; None for pixels or unknown units."""
    if unit is None:
        return None
    return _UNIT_TO_UM.get(str(unit).strip().lower())


def _res(page: tifffile.TiffPage, tag: str) -> Optional[float]:
    """Pixel size from a resolution tag (pixels per unit -> units per pixel)."""
    t = page.tags.get(tag)
    if t is None:
        return None
    num, den = t.value
    if not num or not den:
        return None
    return den / num


def _imagej_voxel(tf: tifffile.TiffFile) -> Optional[VoxelSize]:
    ij = tf.imagej_metadata or {}
    factor = unit_factor(ij.get("unit"))
    page = tf.pages[0]
    x, y = _res(page, "XResolution"), _res(page, "YResolution")
    if factor is None or x is None or y is None:
        return None
    z = float(ij.get("spacing", 1.0))  # ImageJ leaves out spacing when it is 1
    return (z * factor, y * factor, x * factor)


def _ome_voxel(tf: tifffile.TiffFile, series: int) -> Optional[VoxelSize]:
    try:
        root = ET.fromstring(tf.ome_metadata or "")
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    px = pixels[min(series, len(pixels) - 1)].attrib
    sizes = []
    for axis in "ZYX":
        value = px.get(f"PhysicalSize{axis}")
        factor = unit_factor(px.get(f"PhysicalSize{axis}Unit", "µm"))
        if value is None or factor is None:
            return None
        sizes.append(float(value) * factor)
    return tuple(sizes)  # type: ignore[return-value]


def _shaped_voxel(tf: tifffile.TiffFile) -> Optional[VoxelSize]:
    meta = (tf.shaped_metadata or [{}])[0] or {}
    factor = unit_factor(meta.get("unit"))
    page = tf.pages[0]
    x, y = _res(page, "XResolution"), _res(page, "YResolution")
    if factor is None or x is None or y is None or "spacing" not in meta:
        return None
    return (float(meta["spacing"]) * factor, y * factor, x * factor)


def _format_name(tf: tifffile.TiffFile) -> str:
    if tf.is_imagej:
        return "TIFF (ImageJ)"
    if tf.is_ome:
        return "OME-TIFF"
    return "TIFF"


@contextmanager
def open_source(path: Path, name: Optional[str]) -> Iterator[Source]:
    """The TIFF's image series (``name`` = series number, default 0)."""
    with tifffile.TiffFile(path) as tf:
        series_list = tf.series
        if not series_list:
            raise VolumeDataError(f"{path} contains no images. Re-export it.")
        index = 0
        if name is not None:
            if not name.isdigit() or int(name) >= len(series_list):
                raise VolumeDataError(
                    f"{path} has no image series '{name}'; it has {len(series_list)} "
                    f"(0 to {len(series_list) - 1}). Use {path}:0 or leave out ':{name}'."
                )
            index = int(name)
        series = series_list[index]
        voxel = _voxel(tf, index)
        # a large stack is decoded into a memory-mapped scratch file (core.scratch):
        # its pages can leave the process' memory while it is read tile by tile
        data = series.asarray(out=scratch_array(series.shape, series.dtype))
        meta = {"tiff_series": len(series_list), "photometric": str(series.keyframe.photometric.name)}
        yield Source(
            data=data,
            axes=series.axes,
            voxel_size=voxel,
            name=str(index) if len(series_list) > 1 else None,
            fmt=_format_name(tf),
            meta=meta,
        )


def _voxel(tf: tifffile.TiffFile, index: int) -> Optional[VoxelSize]:
    voxel = None
    if tf.is_imagej:
        voxel = _imagej_voxel(tf)
    if voxel is None and tf.is_ome:
        voxel = _ome_voxel(tf, index)
    if voxel is None and tf.is_shaped:
        voxel = _shaped_voxel(tf)
    return voxel


def voxel_size_of(path: Path, name: Optional[str]) -> Optional[VoxelSize]:
    """The voxel size the TIFF's tags record (series ``name``), without decoding the images."""
    with tifffile.TiffFile(path) as tf:
        index = int(name) if name is not None and name.isdigit() else 0
        return _voxel(tf, index) if tf.series else None


def list_entries(path: Path) -> List[Entry]:
    """One entry per image series, with its axes."""
    with tifffile.TiffFile(path) as tf:
        return [
            Entry(str(i), tuple(s.shape), str(s.dtype), f"axes {s.axes}")
            for i, s in enumerate(tf.series)
        ]


def _imagej_ready(data: np.ndarray, *, labels: bool) -> Tuple[np.ndarray, bool, Optional[str]]:
    """(array to write, whether ImageJ can hold it, warning or None)."""
    dt = data.dtype
    if dt in (np.uint8, np.uint16, np.int16, np.float32):
        return data, True, None
    if dt == np.float16:
        return data.astype(np.float32), True, None
    if dt == np.float64:
        big = float(np.max(np.abs(data))) if data.size else 0.0
        if big > np.finfo(np.float32).max:
            raise VolumeDataError(
                f"values up to {big:g} do not fit in a 32-bit float TIFF (the largest "
                "float type ImageJ reads). Write .h5 or .mat instead, which keep float64."
            )
        return data.astype(np.float32), True, None
    # integers
    lo = int(data.min()) if data.size else 0
    hi = int(data.max()) if data.size else 0
    if lo >= 0 and hi <= 255:
        return data.astype(np.uint8), True, None
    if lo >= 0 and hi <= 65535:
        return data.astype(np.uint16), True, None
    if lo >= -32768 and hi <= 32767:
        return data.astype(np.int16), True, None
    what = "label ids" if labels else "values"
    if max(abs(lo), abs(hi)) <= FLOAT32_EXACT_INT:
        return data.astype(np.float32), True, (
            f"{what} up to {hi} do not fit in 16 bits and ImageJ TIFF has no 32-bit integer "
            "type: written as 32-bit float, which holds them exactly (Fiji shows a 32-bit "
            "image; EpiSeg reads the labels back as integers)."
        )
    return data, False, (
        f"{what} up to {hi} do not fit in any ImageJ TIFF type: written as a plain "
        f"{dt} TIFF, which Fiji may open without its voxel size. Write .h5 to keep both."
    )


def write(path: Path, data: np.ndarray, voxel_size: Optional[VoxelSize], *, labels: bool = False) -> Optional[str]:
    """Write a ZYX array as a zlib-compressed ImageJ TIFF (see module notes).

    Returns a note for the user when the dtype had to change, else None.
    """
    arr, imagej, note = _imagej_ready(data, labels=labels)
    metadata: dict = {"axes": "ZYX"}
    kwargs: dict = {}
    if voxel_size is not None:
        z, y, x = (float(v) for v in voxel_size)
        metadata.update(spacing=z, unit="um")
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
    tifffile.imwrite(
        path,
        arr,
        imagej=imagej,
        photometric="minisblack",
        compression="zlib",
        metadata=metadata,
        **kwargs,
    )
    return note
