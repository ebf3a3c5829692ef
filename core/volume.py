"""A volume: a ZYX array, its voxel size (z, y, x) in micrometres and a name.

Reading and writing by file format lives in :mod:`core.io`; this module holds
the data model and the checks every reader and writer shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from core.errors import VolumeDataError
from core.scratch import release_pages

VoxelSize = Tuple[float, float, float]


@dataclass
class Volume:
    """A 3D image or label stack.

    data: array with axes (Z, Y, X).
    voxel_size: (z, y, x) in micrometres, or None when the file did not record it.
    name: a short name, usually the file stem ("gland01").
    source: where it came from ("path/file.mat:I"), for messages and metadata.
    """

    data: np.ndarray
    voxel_size: Optional[VoxelSize] = None
    name: str = "volume"
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    def voxel_size_or(self, default: VoxelSize = (1.0, 1.0, 1.0)) -> VoxelSize:
        """The recorded voxel size, or ``default`` when none was recorded."""
        return self.voxel_size if self.voxel_size is not None else default


def label_dtype(max_id: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds ``max_id``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_id <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise VolumeDataError(f"Label id {max_id} is too large for any unsigned integer type.")


#: Voxels counted per block by :func:`label_counts` (an int64 copy of a block: 128 MiB).
COUNT_BLOCK_VOXELS = 16 * 1024 * 1024


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per label id (index = id) of a ZYX label stack, counted block by block.

    ``np.bincount`` on a whole uint16 stack first copies it as int64 (2 GB for
    234 x 1024 x 1024); counting in blocks of whole Z slices keeps that copy
    to one block. Returns int64 counts of length ``max(max id + 1, minlength)``.
    """
    flat_planes = labels.reshape(labels.shape[0], -1) if labels.ndim > 1 else labels[None]
    step = max(1, COUNT_BLOCK_VOXELS // max(1, flat_planes.shape[1]))
    counts = np.zeros(max(int(minlength), 1), np.int64)
    for z0 in range(0, flat_planes.shape[0], step):
        part = np.bincount(flat_planes[z0:z0 + step].ravel(), minlength=len(counts))
        if len(part) > len(counts):
            part[: len(counts)] += counts
            counts = part
        else:
            counts += part
        release_pages(labels)  # a memory-mapped stack's counted pages go back to the OS
    return counts


def strided_sample(image: np.ndarray, max_samples: int) -> np.ndarray:
    """Every k-th voxel along each axis of a 3D (ZYX) stack, at most ~``max_samples`` voxels.

    The whole stack when it is small enough; a view (no copy) of an array or
    memory map otherwise. For statistics (percentiles, median) of large stacks.
    """
    n = int(np.prod(image.shape))
    step = max(1, int(np.ceil((n / max_samples) ** (1 / 3))))
    return image[::step, ::step, ::step]


def centre_yx(shape: Tuple[int, int, int], max_voxels: int) -> Tuple[slice, slice, slice]:
    """ZYX slices of the centre of a stack of ``shape``, cropped in Y and X (all
    of Z kept, aspect kept) to at most about ``max_voxels`` voxels; the whole
    stack when it is no larger."""
    z, y, x = shape
    if z * y * x <= max_voxels:
        return (slice(None),) * 3
    f = float(np.sqrt(max_voxels / (z * y * x)))
    ny, nx = max(1, int(y * f)), max(1, int(x * f))
    y0, x0 = (y - ny) // 2, (x - nx) // 2
    return slice(None), slice(y0, y0 + ny), slice(x0, x0 + nx)


def as_labels(data: np.ndarray, where: str = "labels") -> np.ndarray:
    """Return ``data`` as a label stack in the smallest unsigned dtype.

    Labels must be non-negative whole numbers (float files from MATLAB are
    accepted when every value is integral). ``where`` names the file in errors.
    """
    arr = np.asarray(data)
    if arr.size == 0:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise VolumeDataError(
                f"{where}: labels contain NaN or infinity. Labels must be whole numbers "
                "(0 = background, 1..n = cells); fix or re-export the label file."
            )
        if not np.all(arr == np.round(arr)):
            raise VolumeDataError(
                f"{where}: labels contain fractional values, so this looks like an image, "
                "not a label stack. Pass the label file (0 = background, 1..n = cells)."
            )
    elif arr.dtype.kind not in "iu":
        raise VolumeDataError(
            f"{where}: dtype {arr.dtype} cannot hold labels; expected integers."
        )
    lo = arr.min()
    if lo < 0:
        raise VolumeDataError(
            f"{where}: labels contain negative values (minimum {lo}). Labels must be "
            "0 for background and positive ids for cells."
        )
    hi = int(arr.max())
    target = label_dtype(hi)
    if arr.dtype == target:
        return arr
    return arr.astype(target)
