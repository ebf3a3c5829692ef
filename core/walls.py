"""Where exactly a wall lies: cells re-grown across the network's per-axis wall bands.

A model trained on the target ``all_walls`` also predicts, for each axis
(Z, Y, X), the band of the two voxels on either side of every wall that meets
that axis (:func:`core.preprocess.axis_wall_target`). The face between voxel
``v`` and its neighbour ``v + e_axis`` then holds a wall of strength
``min(band(v), band(v + e_axis))``: high only when both voxels of the pair are
marked, so the band says between which two voxels a wall lies, which the
boundary probability (about 3 voxels wide on tilted walls) cannot.

:func:`regrow_at_walls` keeps each cell's core (voxels farther than
``core_um`` from any other label) and gives every other tissue voxel to the
cell it reaches across the weakest strongest wall: the bottleneck (minimax)
path, i.e. a seeded watershed on the faces between voxels rather than on the
voxels. Background stays background, and no cell is created or removed.
All arrays are ZYX; sizes in micrometres.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from core.scratch import release_pages, scratch_array

#: Output channels (and training targets) of the wall bands along Z, Y and X.
WALL_CHANNELS = ("wall_z", "wall_y", "wall_x")
#: Voxels within this distance (um) of another label are re-grown; farther ones
#: keep their label. 0.6 um = 2 voxels in Y and X and 1 in Z at 1 x 0.3 x 0.3 um.
CORE_UM = 0.6
#: Relaxation sweeps: a voxel at most this many faces from a core is reached.
SWEEPS = 6


def core_radius_vox(core_um: float, voxel_size: Sequence[float]) -> Tuple[int, int, int]:
    """Half-size (z, y, x) in voxels of the box that must hold one label, at least 1."""
    return tuple(max(1, int(round(core_um / float(v)))) for v in voxel_size)  # type: ignore


def wall_strength(band: np.ndarray, axis: int) -> np.ndarray:
    """Strength (float32, 0..1) of the wall between ``v`` and ``v + e_axis``,
    stored at ``v``; the last plane along ``axis`` (no neighbour) is +inf.

    band: the predicted wall band of that axis, float in [0, 1] or uint8 0..255.
    """
    b = np.asarray(band)
    b = b.astype(np.float32) / 255.0 if b.dtype == np.uint8 else b.astype(np.float32)
    lo, hi = face_pairs(b.ndim, axis)
    out = np.full(b.shape, np.inf, np.float32)
    np.minimum(b[lo], b[hi], out=out[lo])
    return out


def face_pairs(ndim: int, axis: int):
    """Index pairs (lo, hi): ``a[lo]`` and ``a[hi]`` are the voxels on either side of
    each face between neighbours along ``axis``."""
    lo = [slice(None)] * ndim
    hi = [slice(None)] * ndim
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    return tuple(lo), tuple(hi)


def cores(labels: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Voxels (bool ZYX) whose box of half-size ``radius`` holds only their own
    non-zero label."""
    size = tuple(2 * int(r) + 1 for r in radius)
    return (ndi.maximum_filter(labels, size=size) == ndi.minimum_filter(labels, size=size)) \
        & (labels > 0)


def regrow_block(labels: np.ndarray, strengths: Sequence[np.ndarray], core: np.ndarray,
                 fixed: Optional[np.ndarray] = None, sweeps: int = SWEEPS) -> np.ndarray:
    """Re-grow the non-core tissue voxels of one block from its cores.

    labels: ZYX cells (0 = background); strengths: :func:`wall_strength` per
    axis (z, y, x); core: voxels that keep their label and grow; fixed: voxels
    that keep their label but do not grow (or None). Returns new labels;
    voxels no core reaches within ``sweeps`` faces keep theirs.
    """
    keep = core if fixed is None else core | fixed
    tissue = (labels > 0) & ~keep
    cost = np.where(core, np.float32(0), np.float32(np.inf))
    out = np.where(keep, labels, 0).astype(labels.dtype)
    for _ in range(sweeps):
        changed = False
        for axis in range(labels.ndim):
            lo, hi = face_pairs(labels.ndim, axis)
            s = strengths[axis][lo]
            for me, nb in ((lo, hi), (hi, lo)):
                through = np.maximum(cost[nb], s)
                better = (through < cost[me]) & tissue[me]
                if better.any():
                    changed = True
                    cost[me][better] = through[better]
                    out[me][better] = out[nb][better]
        if not changed:
            break
    left = (labels > 0) & (out == 0)
    out[left] = labels[left]
    return out


def regrow_at_walls(labels: np.ndarray, band_of: Callable[[int, object], np.ndarray], *,
                    voxel_size: Sequence[float], core_um: float = CORE_UM,
                    sweeps: int = SWEEPS, slab_z: int = 64, work_dir=None,
                    release: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Cells with their interface voxels re-grown across the predicted walls.

    labels: ZYX cells (0 = background), not modified. band_of(axis, index):
    the wall band of ``axis`` (0 = Z, 1 = Y, 2 = X) at ``index`` (a Z slice),
    float [0, 1] or uint8. voxel_size: (z, y, x) um. Works slab by slab with a
    halo of ``sweeps`` + the core radius, so memory stays bounded; ``release``
    is called after each slab (to hand back memory-mapped pages). Returns a new
    label array of the same dtype (scratch-backed for large stacks).
    """
    radius = core_radius_vox(core_um, voxel_size)
    n_z = labels.shape[0]
    halo = sweeps + radius[0] + 1
    out = scratch_array(labels.shape, labels.dtype, work_dir)
    # cells with no core voxel anywhere (slivers thinner than the core box) keep
    # their voxels, and do not grow
    core_count = np.zeros(int(labels.max()) + 1, np.int64)
    for z0 in range(0, n_z, slab_z):
        z1 = min(n_z, z0 + slab_z)
        a, b = max(0, z0 - radius[0]), min(n_z, z1 + radius[0])
        lab = np.asarray(labels[a:b])
        core = cores(lab, radius)[z0 - a: z1 - a]
        core_count += np.bincount(lab[z0 - a: z1 - a][core], minlength=len(core_count))
    coreless = core_count == 0
    for z0 in range(0, n_z, slab_z):
        z1 = min(n_z, z0 + slab_z)
        a, b = max(0, z0 - halo), min(n_z, z1 + halo)
        lab = np.asarray(labels[a:b])
        fixed = coreless[lab] & (lab > 0)
        strengths = [wall_strength(band_of(axis, np.s_[a:b]), axis) for axis in range(3)]
        block = regrow_block(lab, strengths, cores(lab, radius), fixed, sweeps)
        out[z0:z1] = block[z0 - a: z1 - a]
        release_pages(out)
        if release is not None:
            release()
    return out
