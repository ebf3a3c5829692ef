"""Volumes in and out: TIFF, HDF5, MATLAB .mat and NumPy files.

A volume is a ZYX array, a voxel size (z, y, x) in micrometres and a name
(:class:`core.volume.Volume`). Every reader turns its file's layout into ZYX
(MATLAB files are column-major, see :mod:`core.io.matlab`) and every writer
turns it back, so nothing in between ever guesses.

Specs name a file and, for container files, what inside it::

    read_volume("stack.tif")
    read_volume("sample.h5:raw")          # HDF5 dataset (path/to/dataset)
    read_volume("gland.mat:I")            # MATLAB variable
    read_volume(r"C:\\data\\a.h5:raw")      # Windows drive letters work

Without a name the only 3D dataset/variable is read. 4D/5D data (channels,
time points) needs ``channel=`` / ``time=``. Problems a user can cause raise
:class:`core.errors.VolumeReadError`, :class:`~core.errors.VolumeDataError` or
:class:`~core.errors.VolumeWriteError` with a message naming the file, the
problem and what to do. Every write is atomic (:mod:`core.io.atomic`).
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from core.errors import EpiSegError, VolumeDataError, VolumeReadError, VolumeWriteError
from core.io import hdf5, matlab, numpy_io, tiff
from core.io.atomic import atomic_path
from core.io.axes import to_zyx
from core.io.base import AmbiguousVolumeError, Entry, check_dtype, fmt_shape, fmt_voxel
from core.volume import Volume, as_labels

__all__ = [
    "read_volume", "read_labels", "read_voxel_size", "write_volume", "check_same_shape",
    "list_contents", "split_spec", "format_of", "atomic_path", "Entry", "AmbiguousVolumeError",
    "SUPPORTED_EXTENSIONS",
]

Spec = Union[str, os.PathLike]

_MODULES = {
    "TIFF": tiff,
    "HDF5": hdf5,
    "MATLAB": matlab,
    "NumPy": numpy_io,
}
SUPPORTED_EXTENSIONS: Tuple[str, ...] = tuple(
    ext for module in _MODULES.values() for ext in module.EXTENSIONS
)
_SUPPORTED_TEXT = (
    ".tif/.tiff (TIFF, ImageJ, OME-TIFF), .h5/.hdf5/.hdf (HDF5), .mat (MATLAB v5 "
    "and v7.3), .npy/.npz (NumPy)"
)
_MAGIC = [
    (b"II*\0", 0, "TIFF"), (b"MM\0*", 0, "TIFF"), (b"II+\0", 0, "TIFF"), (b"MM\0+", 0, "TIFF"),
    (b"\x89HDF\r\n\x1a\n", 0, "HDF5"), (b"\x89HDF\r\n\x1a\n", 512, "HDF5"),
    (b"MATLAB", 0, "MATLAB"), (b"\x93NUMPY", 0, "NumPy"), (b"PK\x03\x04", 0, "NumPy"),
]
_SUFFIX_FOR = {"TIFF": ".tif", "HDF5": ".h5", "MATLAB": ".mat", "NumPy": ".npy/.npz"}


# ------------------------------------------------------------------ specs


def split_spec(spec: Spec) -> Tuple[Path, Optional[str]]:
    """Split ``"file.h5:path/in/file"`` into (Path, "path/in/file").

    The split happens at a ':' whose left part is an existing file or ends in
    a known extension, so Windows drive letters (``C:\\data\\a.h5:raw``) and
    folders containing ':' are left alone. Returns (path, None) when no name
    is given.
    """
    text = os.fspath(spec)
    if ":" not in text or os.path.isfile(text):
        return Path(text), None
    cuts = [i for i, c in enumerate(text) if c == ":" and not (i == 1 and text[0].isalpha())]
    for i in reversed(cuts):
        if os.path.isfile(text[:i]):
            return Path(text[:i]), text[i + 1:] or None
    for i in cuts:
        if text[:i].lower().endswith(SUPPORTED_EXTENSIONS):
            return Path(text[:i]), text[i + 1:] or None
    return Path(text), None


def format_of(path: Spec) -> Optional[str]:
    """'TIFF', 'HDF5', 'MATLAB', 'NumPy' from the file extension, or None."""
    suffix = Path(os.fspath(path)).suffix.lower()
    for fmt, module in _MODULES.items():
        if suffix in module.EXTENSIONS:
            return fmt
    return None


def _sniff(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(520)
    except OSError:
        return None
    for magic, offset, fmt in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return fmt
    return None


def _check_input(path: Path) -> str:
    """Existence, type and readability checks; returns the format name."""
    if not path.exists():
        full = path.expanduser().absolute()
        folder = full.parent
        if not folder.is_dir():
            hint = f"The folder {folder} does not exist either."
        else:
            near = difflib.get_close_matches(full.name, os.listdir(folder), n=3)
            hint = f"Did you mean {', '.join(near)}?" if near else f"Check the name and the folder {folder}."
        raise VolumeReadError(f"File not found: {full}. {hint}")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
        listing = f" Volume files inside: {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}." if inside else ""
        raise VolumeReadError(f"{path} is a folder, not a file. Give one volume file.{listing}")
    fmt = format_of(path)
    if fmt is None:
        found = _sniff(path)
        hint = f" Its content looks like {found}: rename it to end in {_SUFFIX_FOR[found]}." if found else ""
        raise VolumeReadError(
            f"{path}: unsupported file type '{path.suffix or '(no extension)'}'. EpiSeg reads "
            f"{_SUPPORTED_TEXT}.{hint or ' Convert it, e.g. in Fiji: File > Save As > Tiff...'}"
        )
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise VolumeReadError(
            f"{path} cannot be read: permission denied. Check the file's permissions, "
            "or copy it to a folder of your own."
        ) from None
    except OSError as err:
        raise VolumeReadError(f"{path} cannot be opened: {err}.") from None
    if path.stat().st_size == 0:
        raise VolumeReadError(
            f"{path} is empty (0 bytes): the copy or export did not finish. Export or copy it again."
        )
    return fmt


def _corrupt(path: Path, fmt: str, err: BaseException) -> VolumeReadError:
    detail = f"{type(err).__name__}: {err}".strip()
    if len(detail) > 200:
        detail = detail[:200] + "..."
    found = _sniff(path)
    if found and found != fmt and (fmt, found) != ("MATLAB", "HDF5"):
        return VolumeReadError(
            f"{path} could not be read as {fmt}: its content looks like {found} data. "
            f"Rename it to end in {_SUFFIX_FOR[found]}."
        )
    return VolumeReadError(
        f"{path} could not be read as {fmt} ({detail}). The file looks corrupt or "
        "truncated: re-export it from the program that made it, or copy it again."
    )


# ------------------------------------------------------------------ reading


def _check_finite(data: np.ndarray, where: str) -> None:
    if data.dtype.kind != "f":
        return
    step = max(1, (32 * 2**20) // max(1, data[0].nbytes)) if data.shape[0] else 1
    bad, first = 0, None
    for z0 in range(0, data.shape[0], step):
        mask = ~np.isfinite(data[z0:z0 + step])
        n = int(np.count_nonzero(mask))
        if n and first is None:
            z, y, x = np.argwhere(mask)[0]
            first = (int(z) + z0, int(y), int(x))
        bad += n
    if bad:
        raise VolumeDataError(
            f"{where}: {bad} voxel(s) are NaN or infinite (the first at z={first[0]}, "
            f"y={first[1]}, x={first[2]}). EpiSeg needs finite values: replace them "
            "(Fiji: Process > Math > Remove NaNs...; MATLAB: I(~isfinite(I)) = 0) and save "
            "the file again."
        )


def read_volume(spec: Spec, *, channel: Optional[int] = None, time: Optional[int] = None) -> Volume:
    """Read a 3D volume from a TIFF, HDF5, MATLAB or NumPy file.

    Parameters
    ----------
    spec : "file.tif", "file.h5:path/to/dataset", "file.mat:variable", "file.npy",
        "file.npz:array". Without a name the only 3D dataset is read.
    channel, time : index to pick along a channel or time axis of 4D/5D data
        (ImageJ hyperstacks record their axes; for other files an axis of size
        <= 4 is taken as channels, a longer one as time).

    Returns
    -------
    Volume whose ``data`` is C-contiguous (Z, Y, X) in the stored dtype (native
    byte order) and whose ``voxel_size`` is (z, y, x) micrometres or None.
    ``meta`` records the format and the axes found in the file.
    """
    path, name = split_spec(spec)
    fmt = _check_input(path)
    module = _MODULES[fmt]
    where = f"{path}:{name}" if name else str(path)
    try:
        with module.open_source(path, name) as src:
            source = f"{path}:{src.name}" if src.name else str(path)
            check_dtype(src.data.dtype, source)
            if 0 in tuple(src.data.shape):
                raise VolumeDataError(
                    f"{source} holds an empty array (shape {fmt_shape(src.data.shape)}). "
                    "Export the stack again."
                )
            data, info = to_zyx(src, channel=channel, time=time, where=source)
            voxel, fmt_name, meta = src.voxel_size, src.fmt or fmt, dict(src.meta)
    except EpiSegError:
        raise
    except MemoryError:
        raise VolumeReadError(
            f"{where} is too large to fit in memory. Close other programs, or crop or "
            "downscale the stack (e.g. in Fiji) and save it again."
        ) from None
    except PermissionError:
        raise VolumeReadError(f"{where} cannot be read: permission denied.") from None
    except Exception as err:  # library errors: corrupt, truncated, not really this format
        raise _corrupt(path, fmt, err) from err
    _check_finite(data, source)
    meta.update(info)
    meta["format"] = fmt_name
    stem = path.name[: -len(".ome.tif")] if path.name.lower().endswith(".ome.tif") else path.stem
    return Volume(data=data, voxel_size=voxel, name=stem, source=source, meta=meta)


def read_voxel_size(spec: Spec) -> Optional[Tuple[float, float, float]]:
    """The voxel size (z, y, x) um that a file records, or None, without reading the
    stack itself (TIFF tags, HDF5 attributes, the .mat / .npz voxel-size variable)."""
    path, name = split_spec(spec)
    fmt = _check_input(path)
    module = _MODULES[fmt]
    try:
        if hasattr(module, "voxel_size_of"):
            return module.voxel_size_of(path, name)
        with module.open_source(path, name) as src:  # HDF5: datasets are read lazily
            return src.voxel_size
    except EpiSegError:
        raise
    except Exception as err:  # library errors: corrupt, truncated, not really this format
        raise _corrupt(path, fmt, err) from err


def read_labels(spec: Spec, *, channel: Optional[int] = None, time: Optional[int] = None) -> Volume:
    """Read a label stack (0 = background, 1..n = cells) as the smallest unsigned dtype.

    Same specs as :func:`read_volume`; float files (e.g. MATLAB doubles) are
    accepted when every value is a whole number.
    """
    volume = read_volume(spec, channel=channel, time=time)
    volume.data = as_labels(volume.data, where=volume.source)
    return volume


def list_contents(path: Spec) -> List[Entry]:
    """Datasets, variables, arrays or image series inside a file.

    For .mat files shapes are MATLAB's ``size()`` (rows first) and dtypes the
    MATLAB class; otherwise shapes are as stored.
    """
    path, _ = split_spec(path)
    fmt = _check_input(path)
    try:
        return _MODULES[fmt].list_entries(path)
    except EpiSegError:
        raise
    except Exception as err:
        raise _corrupt(path, fmt, err) from err


# ------------------------------------------------------------------ writing


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_volume(
    path: Spec,
    volume: Union[Volume, np.ndarray],
    *,
    labels: bool = False,
    mat_variable: Optional[str] = None,
    mat_version: str = "auto",
    h5_dataset: Optional[str] = None,
) -> Path:
    """Write a ZYX volume; the format comes from the extension.

    .tif/.tiff: ImageJ TIFF with voxel size, zlib (see :mod:`core.io.tiff` for
    dtypes ImageJ cannot hold). .h5/.hdf5: dataset ``h5_dataset`` (default
    "raw", or "label" for labels), gzip 4, ``element_size_um``. .mat: variable
    ``mat_variable`` (default "I", or "labels"), v5 below 2 GB else v7.3
    (``mat_version`` "auto", "5" or "7.3"), plus ``voxel_size_zyx_um`` = [z y x].
    .npy (no voxel size) / .npz. A name after ':' in ``path`` ("out.h5:pred")
    works like ``h5_dataset``/``mat_variable``.

    labels=True stores the smallest unsigned dtype that holds the largest id.
    The file is written atomically and an existing file is replaced as a whole;
    the volume's own source file is never overwritten. Returns the path written.
    """
    target, inner = split_spec(path)
    target = target.expanduser()
    if not isinstance(volume, Volume):
        volume = Volume(data=np.asarray(volume))
    fmt = format_of(target)
    if fmt is None:
        raise VolumeWriteError(
            f"Cannot write {target}: unknown file type '{target.suffix or '(no extension)'}'. "
            f"Use one of {_SUPPORTED_TEXT}."
        )
    suffix = target.suffix.lower()
    if inner and (fmt == "TIFF" or suffix == ".npy"):
        raise VolumeWriteError(
            f"Cannot write {target}:{inner}: a {suffix} file holds one stack; leave out ':{inner}'."
        )
    data = np.asarray(volume.data)
    what = volume.source or volume.name
    if data.ndim != 3:
        raise VolumeDataError(
            f"Cannot write {what} to {target}: expected a 3D (Z, Y, X) array, got shape "
            f"{fmt_shape(data.shape)}."
        )
    check_dtype(data.dtype, what)
    if labels:
        data = as_labels(data, where=what)
    else:
        _check_finite(data, what)
    if data.dtype.byteorder not in "=|":
        data = data.astype(data.dtype.newbyteorder("="))
    if volume.source:
        src_path, _ = split_spec(volume.source)
        if _same_file(src_path, target):
            raise VolumeWriteError(
                f"Refusing to write {target}: it is the file {what} was read from, and "
                "input files are never modified. Choose another output name."
            )
    voxel = volume.voxel_size
    default_name = "label" if labels else "raw"
    note = None
    with atomic_path(target) as tmp:
        try:
            if fmt == "TIFF":
                note = tiff.write(tmp, data, voxel, labels=labels)
            elif fmt == "HDF5":
                hdf5.write(tmp, data, voxel, dataset=h5_dataset or inner or default_name)
            elif fmt == "MATLAB":
                default_var = matlab.DEFAULT_LABEL_VARIABLE if labels else matlab.DEFAULT_IMAGE_VARIABLE
                matlab.write(tmp, data, voxel, variable=mat_variable or inner or default_var,
                             mat_version=mat_version)
            else:
                note = numpy_io.write(tmp, data, voxel, name=h5_dataset or inner or default_name,
                                      suffix=suffix)
        except EpiSegError as err:
            if str(target) in str(err):
                raise
            raise type(err)(f"Cannot write {target}: {err}") from None
        except OSError:
            raise
        except Exception as err:
            raise VolumeWriteError(
                f"Cannot write {target} as {fmt}: {type(err).__name__}: {err}. "
                "Try another format (.h5 keeps every data type)."
            ) from err
    if note:
        warnings.warn(f"{target}: {note}", UserWarning, stacklevel=2)
    return target


# ------------------------------------------------------------------ checks


def check_same_shape(raw: Volume, labels: Volume) -> None:
    """Raise VolumeDataError unless image and labels have the same (Z, Y, X) shape."""
    if raw.shape == labels.shape:
        return
    a, b = raw.shape, labels.shape
    name_a = raw.source or raw.name
    name_b = labels.source or labels.name
    if sorted(a) == sorted(b):
        hint = ("They have the same sizes in a different order, so the axes look swapped "
                "(e.g. a MATLAB stack read as (Z, X, Y)); re-export one of them in the "
                "other's axis order.")
    elif all(x % y == 0 for x, y in zip(a, b)) or all(y % x == 0 for x, y in zip(a, b)):
        ratio = tuple(round(x / y, 3) for x, y in zip(a, b))
        hint = (f"One looks rescaled by (z, y, x) = {ratio}; labels must be at the image's "
                "resolution.")
    else:
        hint = "Check that the labels were made for this image (same crop, same resolution)."
    raise VolumeDataError(
        f"The image {name_a} has shape {fmt_shape(a)} (Z x Y x X) but the labels {name_b} "
        f"have shape {fmt_shape(b)}; they must match voxel for voxel. {hint}"
    )


def describe_voxel(volume: Volume) -> str:
    """'0.5 x 0.1 x 0.1 um' or 'not recorded'."""
    return fmt_voxel(volume.voxel_size)
