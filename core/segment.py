"""Probabilities -> cells: a seeded watershed that makes touching cells touch again.

The network predicts, per voxel (ZYX), the probability of being *inside a
cell* (the thesis' cells-with-gaps target: cells shrunk away from each other
by a thin gap) and/or of being on a *cell boundary* (PlantSeg's target).
Cells are recovered in three steps:

1. **Seeds**: connected components of the confident cell interiors
   (``cell_prob > seed_threshold``, or ``boundary_prob < seed_threshold`` for
   boundary-only models), with tiny seeds dropped. The gaps of the target
   keep neighbouring seeds apart; thin bridges left between cells are cut by
   erosion. The default ``cascade`` erodes each piece step by step up to
   ``seed_erosion_um`` and keeps, for every piece, the deepest level at which
   it is still whole or splits: large cells joined by a bridge get one seed
   each, and a small cell that a deep erosion would erase keeps its seed, so
   one setting holds for small and large cells (docs/accuracy.md).
2. **Tissue mask**: the network's tissue channel where it has one (target
   ``all``); otherwise the cell voxels with the thin gaps between cells closed
   again, while the lumen and the outside stay background (0).
3. **Watershed** from the seeds inside the mask, of the mean of the boundary
   probability and ``1 - cell_prob`` when the network predicts both (two
   estimates of where the wall is: 0.002-0.005 lower adapted Rand error than
   the boundary alone, docs/accuracy.md step 12), else of the one it has. It
   runs slab by slab along Z with a halo, one slab per CPU at a time. Seeds
   carry global ids, so slabs stitch without seams and memory stays bounded
   by the slabs, not the stack (the stack-sized masks, seeds and labels of a
   large stack are memory-mapped scratch files, :mod:`core.scratch`).

Cells smaller than ``min_cell_size_um3`` are dissolved into their neighbours
and ids are made consecutive: background 0, cells 1..n.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from core.agglomerate import merge_weak_walls, wall_contacts
from core.components import label_components
from core.errors import ConfigError, VolumeDataError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.scratch import release_pages, scratch_array
from core.volume import label_counts, label_dtype
from core.walls import WALL_CHANNELS, regrow_at_walls


@dataclass
class SegmentParams:
    """Parameters of :func:`cells_from_probabilities` (voxel sizes in micrometres).

    cell_threshold: cell probability above which a voxel is tissue (mask),
        for models without a tissue channel.
    tissue_threshold: tissue probability above which a voxel is tissue, for
        models with a tissue channel (target ``all``). 0.35, not 0.5: the
        tissue channel is unsure in the outermost voxel of the tissue, and at
        0.5 the cells lost a 1-2 voxel shell at the tissue surface (5x more
        missed than extra tissue voxels; chosen on validation stacks,
        docs/accuracy.md step 9).
    seed_threshold: cell probability above which a voxel can seed a cell
        (for boundary-only models: boundary probability *below* which).
    seed_max_boundary: with a boundary channel, seeds also need a boundary
        probability below this.
    seed_erosion_um: ``cascade``: the deepest erosion (um) tried to cut a piece
        of interior into cells; ``interior``: erode seeds by this radius (0: off).
        3 um with ``merge_below`` 0.5 (cut deep, then merge the pieces the
        network sees no wall between) beat 2 um without merging on two sets of
        development stacks and tied on the validation stacks (docs/accuracy.md
        step 14).
    seed_method: ``cascade`` (default): erosions 0, 0.6, 1, 1.5 ... up to
        ``seed_erosion_um``; a piece gets the pieces of its deepest level that
        still has any, and keeps itself when every erosion erases it (small
        cells); ``interior``: one seed per connected piece of the interior
        eroded by ``seed_erosion_um``; ``distance``: pieces of the interior are
        cut between the maxima of their distance map (no erosion).
    seed_h_um: ``distance`` seeds: how far (um) a maximum must rise above its
        surroundings.
    gap_closing_vox: radius in voxels of the closing that puts the gaps between
        cells back into the tissue mask (the gap target is drawn in voxels, so
        this is in voxels too; 2 fills the 2-voxel gaps of mode='outer').
    min_seed_size_um3: seeds smaller than this are ignored (noise).
    min_cell_size_um3: final cells smaller than this are given to their neighbours.
    min_cell_tissue: with a tissue channel, cells whose mean tissue probability
        is below this and that are smaller than half the median cell become
        background: patches of doubtful tissue just outside the real surface
        (lumen, stack faces) that found a seed of their own (0: off; 0.85 chosen
        on validation stacks, docs/accuracy.md step 8).
    merge_below: neighbouring cells whose shared wall has a mean relief (the
        watershed's: boundary probability and 1 - cell probability) below this
        are merged, weakest wall first (:mod:`core.agglomerate`). This rejoins
        a cell that the seeds cut apart where its stain is faint or that the
        deepest erosion split. 0: off.
    max_neighbours_factor: a segment that touches more than this many times the
        median number of neighbours (and more than :data:`MANY_NEIGHBOURS_MIN`
        segments) becomes background: a lumen, or the medium around the tissue,
        that the network took for a cell. A cell in an epithelium touches 5-11
        others (every ground-truth stack of docs/accuracy.md: at most twice the
        median, 20 on the real sample); a lumen lined by cells touches all of
        them (39-45 in a thin tube). 3 (step 20): no effect on 36 + 18 standard
        development stacks but one, and on the stress stacks cell IoU 0.91 ->
        0.95, on thin tubes 0.83 -> 0.94. 0: off.
    wall_core_um: with per-axis wall bands (models trained on ``all_walls``),
        the voxels within this distance (um) of another cell are given again to
        the cell reached across the weakest wall (:mod:`core.walls`); 0: off,
        the default: the 15-minute models' bands find a wall's voxel pair
        reliably only where the wall faces an axis, and re-growing moved ARE by
        +0.0001 to +0.0004 on two development sets (docs/accuracy.md steps 15-16).
    slab_z: at most this many Z slices per watershed block (blocks are also
        capped at SLAB_VOXELS voxels, so memory stays bounded on any stack).
    """

    cell_threshold: float = 0.5
    tissue_threshold: float = 0.35
    seed_threshold: float = 0.6
    seed_max_boundary: float = 0.4
    seed_erosion_um: float = 3.0
    gap_closing_vox: int = 2
    seed_method: Literal["cascade", "interior", "distance"] = "cascade"
    seed_h_um: float = 0.45
    min_seed_size_um3: float = 5.0
    min_cell_size_um3: float = 20.0
    min_cell_tissue: float = 0.85
    merge_below: float = 0.5
    max_neighbours_factor: float = 3.0
    wall_core_um: float = 0.0
    slab_z: int = 64

    def validate(self) -> None:
        for key in ("cell_threshold", "tissue_threshold", "seed_threshold", "seed_max_boundary"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ConfigError(
                    f"segment.{key} = {value}: must be a probability strictly between 0 and 1."
                )
        if self.seed_method not in ("cascade", "interior", "distance"):
            raise ConfigError(f"segment.seed_method = {self.seed_method!r}: use cascade, interior "
                              "or distance.")
        for key in ("seed_erosion_um", "seed_h_um", "gap_closing_vox", "min_seed_size_um3",
                    "min_cell_size_um3", "wall_core_um"):
            if getattr(self, key) < 0:
                raise ConfigError(f"segment.{key} = {getattr(self, key)}: must be >= 0.")
        if not 0.0 <= self.min_cell_tissue < 1.0:
            raise ConfigError(f"segment.min_cell_tissue = {self.min_cell_tissue}: must be in "
                              "[0, 1) (0 turns the check off).")
        if not 0.0 <= self.merge_below < 1.0:
            raise ConfigError(f"segment.merge_below = {self.merge_below}: must be in [0, 1) "
                              "(0 turns merging off).")
        if self.max_neighbours_factor != 0 and self.max_neighbours_factor < 1.5:
            raise ConfigError(f"segment.max_neighbours_factor = {self.max_neighbours_factor}: "
                              "must be 0 (off) or at least 1.5 (3 is the default); below that "
                              "it would remove ordinary cells.")
        if self.slab_z < 1:
            raise ConfigError(f"segment.slab_z = {self.slab_z}: must be >= 1.")

    def channels_read(self, channels: Sequence[str]) -> Tuple[str, ...]:
        """The network outputs :func:`cells_from_probabilities` reads with these
        settings: all but the per-axis wall bands, which only the re-growing
        (``wall_core_um`` > 0) uses."""
        if self.wall_core_um > 0:
            return tuple(channels)
        return tuple(c for c in channels if c not in WALL_CHANNELS)


def ball_um(radius_um: float, voxel_size: Sequence[float]) -> Optional[np.ndarray]:
    """Ellipsoidal structuring element of ``radius_um`` for a (z, y, x) voxel size.

    Returns None when the radius is below half a voxel on every axis.
    """
    radii = [int(np.floor(radius_um / float(v) + 1e-6)) for v in voxel_size]
    if max(radii) == 0:
        return None
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    dist = sum((g / max(r, 1e-9)) ** 2 if r > 0 else (g * 0.0) for g, r in zip(grids, radii))
    return np.asarray(dist <= 1.0)


#: Footprints with more rows along X than this erode faster by a distance transform
#: (:func:`erode_ball`, whose cost does not grow with the radius) than row by row
#: (:func:`erode_by_rows`; 3 um at 1 x 0.3 x 0.3 um voxels: 147 rows, 3x faster
#: than the transform, 7x faster than ``binary_erosion`` with its 1,227 elements)...
EDT_ABOVE_ROWS = 400
#: ...in boxes up to this many voxels: the transform holds about 20 bytes per
#: voxel (distances and nearest-voxel indices), the rows 3.
EDT_MAX_VOXELS = 16 * 1024 * 1024


def erode_footprint(mask: np.ndarray, footprint: np.ndarray, radius_um: float,
                    voxel_size: Sequence[float], row_dist: Optional[np.ndarray] = None) -> np.ndarray:
    """``binary_erosion(mask, footprint, border_value=1)`` for ``footprint =
    ball_um(radius_um, voxel_size)``, the fastest way for its size (ZYX, the
    stack's faces do not erode); ``row_dist`` as in :func:`erode_by_rows`."""
    rows = int(np.count_nonzero(footprint.any(axis=2)))
    if rows > EDT_ABOVE_ROWS and mask.size <= EDT_MAX_VOXELS:
        return erode_ball(mask, radius_um, voxel_size)
    return erode_by_rows(mask, footprint, row_dist)


def row_distance(mask: np.ndarray) -> np.ndarray:
    """For each voxel of a boolean ZYX ``mask``, the distance in voxels along X to the
    nearest False voxel of its row (0 on False voxels; beyond the array counts as
    True), clipped at 255: uint8. Computed slab by slab (a few bytes per voxel of
    one slab at a time)."""
    m = np.asarray(mask, bool)
    nx = m.shape[-1]
    x = np.arange(nx, dtype=np.int32)
    far = np.int32(255 + nx)  # beyond the clip however the row ends
    out = np.empty(m.shape, np.uint8)
    step = max(1, (1 << 20) // max(1, int(np.prod(m.shape[1:]))))
    for z0 in range(0, m.shape[0], step):
        part = m[z0:z0 + step]
        left = np.maximum.accumulate(np.where(part, -far, x), axis=-1)  # nearest False at or before x
        right = np.minimum.accumulate(np.where(part, far + nx, x)[..., ::-1], axis=-1)[..., ::-1]
        np.minimum(np.minimum(x - left, right - x), 255, out=left)
        out[z0:z0 + step] = left
    return out


def erode_by_rows(mask: np.ndarray, footprint: np.ndarray,
                  row_dist: Optional[np.ndarray] = None) -> np.ndarray:
    """``binary_erosion(mask, footprint, border_value=1)``, exactly, row by row.

    For footprints whose rows along X are runs centred on the middle (the
    ellipsoids of :func:`ball_um`; any other footprint goes to
    ``binary_erosion``): a voxel stays when every row of the footprint around
    it is True, and a run of 2w+1 True voxels along X is where
    :func:`row_distance` (``row_dist``, computed when None; the same for every
    footprint, so callers eroding one mask by several reuse it) exceeds w. So
    the cost grows with the number of rows, not of elements. Memory: about 3
    bytes per voxel of ``mask`` (ZYX).
    """
    fp = np.asarray(footprint, bool)
    widths = fp.sum(axis=-1)
    cx = fp.shape[-1] // 2
    # every row a run of odd length centred on the middle (one array test, not a loop:
    # this runs for every piece and level)
    runs = np.abs(np.arange(fp.shape[-1]) - cx) <= (widths // 2)[..., None]
    centred = (fp.ndim == 3 and fp.shape[-1] % 2 == 1 and cx < 255
               and bool(np.all((widths % 2 == 1) | (widths == 0)))
               and np.array_equal(fp, runs & (widths > 0)[..., None]))
    if not centred:
        return ndi.binary_erosion(mask, structure=fp, border_value=1)
    dist = row_distance(mask) if row_dist is None else row_dist
    nz, ny = dist.shape[:2]
    cz, cy = fp.shape[0] // 2, fp.shape[1] // 2
    out = np.ones(dist.shape, bool)
    for width in np.unique(widths[widths > 0]):
        run = dist > width // 2
        for dz, dy in np.argwhere(widths == width) - (cz, cy):
            if abs(dz) >= nz or abs(dy) >= ny:
                continue  # the row lies outside the array for every voxel: True
            # out[z, y] &= run[z + dz, y + dy] where that lies inside (outside is True)
            here = (slice(max(0, -dz), nz - max(0, dz)), slice(max(0, -dy), ny - max(0, dy)))
            there = (slice(max(0, dz), nz + min(0, dz)), slice(max(0, dy), ny + min(0, dy)))
            np.logical_and(out[here], run[there], out=out[here])
        del run
    return out


def erode_ball(mask: np.ndarray, radius_um: float, voxel_size: Sequence[float]) -> np.ndarray:
    """``binary_erosion(mask, ball_um(radius_um, voxel_size), border_value=1)``, from
    one distance transform: its cost does not grow with the radius.

    A voxel stays when no False voxel lies inside the ellipsoid of
    :func:`ball_um` around it (axes of zero radius: the same line only); the
    stack's faces do not erode. Voxels exactly on the ellipsoid's surface may
    differ from the footprint's rounding (rarely: an integer point on it).
    """
    radii = [int(np.floor(radius_um / float(v) + 1e-6)) for v in voxel_size]
    if max(radii) == 0:
        return np.asarray(mask, bool).copy()
    if mask.all():
        return np.ones(mask.shape, bool)
    # in units of the ellipsoid's radii; an axis of radius 0 is "infinitely" long
    sampling = [1.0 / r if r > 0 else 1e6 for r in radii]
    distance = ndi.distance_transform_edt(mask, sampling=sampling)
    return distance > 1.0 + 1e-9


class _Prob:
    """A probability map kept in its stored dtype (uint8 0..255 or float in [0, 1]).

    Whole-stack copies are avoided: thresholds are compared in the stored scale
    and float32 is made only slab by slab.
    """

    def __init__(self, array, name: str):
        self.source = array  # a np.memmap keeps its mapping (np.asarray drops it)
        self.a = np.asarray(array)
        if self.a.ndim != 3:
            raise VolumeDataError(f"{name} must be a 3D (Z, Y, X) array, got shape {self.a.shape}.")
        self.scale = 255.0 if self.a.dtype == np.uint8 else 1.0

    def above(self, threshold: float, index=Ellipsis) -> np.ndarray:
        return self.a[index] > threshold * self.scale

    def below(self, threshold: float, index=Ellipsis) -> np.ndarray:
        return self.a[index] < threshold * self.scale

    def f32(self, index=Ellipsis) -> np.ndarray:
        return self.a[index].astype(np.float32) / np.float32(self.scale)

    def release(self) -> None:
        release_pages(self.source)


#: Memory the watershed's blocks may use at once, and what one block needs per voxel
#: (skimage's float64 relief and padded copies; ~25 measured on 28 x 1024 x 1024 blocks).
WATERSHED_MEMORY_BYTES = 2 * 1024 ** 3
WATERSHED_BYTES_PER_VOXEL = 28


def watershed_workers(block_voxels: int) -> int:
    """Watershed blocks run at once: one per CPU, as many as fit in
    :data:`WATERSHED_MEMORY_BYTES` (at least one)."""
    fit = WATERSHED_MEMORY_BYTES // max(1, block_voxels * WATERSHED_BYTES_PER_VOXEL)
    return int(max(1, min(os.cpu_count() or 1, fit)))


#: Voxels per block of the slab-wise steps (watershed, gap closing): bounds their
#: memory to a few hundred MiB whatever the stack size (a 1024 x 1024 plane: 16 slices).
SLAB_VOXELS = 16 * 1024 * 1024


def _slabs(n_z: int, plane: int, slab_z: int, halo: int):
    """(z0, z1, a, b): blocks [z0, z1) along Z, read with a halo as [a, b)."""
    step = max(1, min(int(slab_z), SLAB_VOXELS // max(1, plane)))
    for z0 in range(0, n_z, step):
        z1 = min(n_z, z0 + step)
        yield z0, z1, max(0, z0 - halo), min(n_z, z1 + halo)


def close_gaps(mask: np.ndarray, radius_vox: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Fill the thin gaps between cells in a boolean ZYX tissue mask.

    A voxel is filled when, along one of the 13 lattice directions, mask voxels
    lie on both sides of it within ``radius_vox`` voxels (a union of 1D
    closings). Unlike a closing with a ball this also fills the mouths of
    gaps where they open onto the lumen or the outside, while the background
    next to the tissue, which has tissue on one side only, stays background.
    The stack border continues the mask (edge padding). ``out``: where to write
    the result (e.g. a :func:`core.scratch.scratch_array`); a new array if None.
    """
    if radius_vox <= 0:
        if out is None:
            return mask
        out[...] = mask
        return out
    r = int(radius_vox)
    plane = mask.shape[1] * mask.shape[2]
    if mask.size <= SLAB_VOXELS and out is None:
        return _close_gaps_block(mask, r)
    out = np.empty(mask.shape, bool) if out is None else out
    # a voxel's result depends on the mask within 2r of it: a 2r halo makes slabs exact
    for z0, z1, a, b in _slabs(mask.shape[0], plane, mask.shape[0], 2 * r):
        out[z0:z1] = _close_gaps_block(np.asarray(mask[a:b]), r)[z0 - a: z0 - a + (z1 - z0)]
        release_pages(mask, out)
    return out


def _close_gaps_block(mask: np.ndarray, r: int) -> np.ndarray:
    """:func:`close_gaps` on one block held in memory (edge padding at its faces)."""
    padded = np.pad(mask, r, mode="edge")
    inner = (slice(r, -r),) * 3
    out = mask.copy()
    for direction in _LATTICE_DIRECTIONS:
        line = np.zeros((2 * r + 1,) * 3, dtype=bool)
        for t in range(-r, r + 1):
            line[tuple(r + t * d for d in direction)] = True
        closed = ndi.binary_erosion(ndi.binary_dilation(padded, structure=line),
                                    structure=line, border_value=1)
        out |= closed[inner]
    return out


#: One direction of each of the 13 lines through a voxel of a 3D lattice.
_LATTICE_DIRECTIONS = [
    d for d in np.ndindex(3, 3, 3)
    if (np.array(d) - 1).any() and tuple(np.array(d) - 1) > tuple(1 - np.array(d))
]
_LATTICE_DIRECTIONS = [tuple(int(v) - 1 for v in d) for d in _LATTICE_DIRECTIONS]


def find_seeds(
    interior: np.ndarray,
    *,
    voxel_size: Sequence[float],
    erosion_um: float = 0.0,
    min_size_um3: float = 0.0,
) -> Tuple[np.ndarray, int]:
    """Label connected components of a boolean ZYX ``interior`` mask as seeds.

    Returns (seeds with ids 1..n in the smallest unsigned dtype, n).
    Components smaller than ``min_size_um3`` are dropped.
    """
    mask = interior
    footprint = ball_um(erosion_um, voxel_size)
    if footprint is not None:
        mask = ndi.binary_erosion(mask, structure=footprint, border_value=1)
    seeds, n = label_components(mask)
    if n and min_size_um3 > 0:
        voxel_um3 = float(np.prod(voxel_size))
        sizes = label_counts(seeds, minlength=n + 1)
        keep = sizes * voxel_um3 >= min_size_um3
        keep[0] = False
        if not keep[1:].all():
            n = int(keep.sum())
            lut = np.zeros(len(keep), dtype=label_dtype(n))
            lut[keep] = np.arange(1, n + 1)
            seeds = lut[seeds]
    return seeds, int(n)


def split_by_distance(interior: np.ndarray, voxel_size: Sequence[float], h_um: float, *,
                      smoothing_vox: float = 1.0,
                      cancel: CancelFlag = None) -> Tuple[np.ndarray, int]:
    """Seeds: pieces of a boolean ZYX ``interior``, split where they narrow into a neck.

    Each connected piece is handled in its own bounding box: the distance (um)
    of its voxels to the nearest voxel outside it is smoothed
    (``smoothing_vox``) and its maxima that rise at least ``h_um`` above their
    surroundings (h-maxima) are found; a piece with two or more such maxima is
    cut between them by a watershed of the distance. So two cells joined by a
    thick bridge get two seeds, and every seed still fills its cell's interior
    (which keeps the slab-wise watershed exact). Returns (seeds 1..n, n).
    """
    vs = tuple(float(v) for v in voxel_size)
    pieces, n = label_components(interior)
    out = np.zeros(interior.shape, dtype=np.uint16 if 4 * n < 65535 else np.uint32)
    next_id = 1
    for i, sl in enumerate(ndi.find_objects(pieces), start=1):
        if sl is None:
            continue
        mask = pieces[sl] == i
        dist = ndi.distance_transform_edt(mask, sampling=vs).astype(np.float32)
        if smoothing_vox > 0:
            dist = ndi.gaussian_filter(dist, smoothing_vox)
        peaks, k = ndi.label(h_maxima(dist, float(h_um)).astype(bool) & mask,
                             structure=np.ones((3, 3, 3), bool))
        if k <= 1:
            out, next_id = _put_seeds(out, sl, mask.view(np.uint8), next_id, 1)
        else:
            parts = watershed(-dist, markers=peaks, mask=mask)
            out, next_id = _put_seeds(out, sl, parts, next_id, k)
        if i % 256 == 0:
            check_cancelled(cancel, "Cell segmentation")
    return _seeds_result(out, next_id)


def cascade_levels(max_erosion_um: float) -> Tuple[float, ...]:
    """Erosion radii (um) of :func:`cascade_seeds`: 0, 0.6, 1, 1.5, 2, ... up to the maximum."""
    steps = [0.6] + [1.0 + 0.5 * k for k in range(int(max(0.0, max_erosion_um) * 2) + 1)]
    return (0.0,) + tuple(e for e in steps if e < max_erosion_um - 1e-9) + (
        (float(max_erosion_um),) if max_erosion_um > 0 else ())


#: Memory the pieces of :func:`cascade_seeds` may use at once, and what one needs per
#: voxel of its box at most (about 10 bytes eroding row by row: the row distances, the
#: eroded mask, its labels and the seeds; about 30 where a distance transform erodes).
CASCADE_MEMORY_BYTES = 2 * 1024 ** 3
CASCADE_BYTES_PER_VOXEL = 32


def cascade_seeds(interior: np.ndarray, voxel_size: Sequence[float], max_erosion_um: float,
                  min_size_um3: float = 0.0, *, cancel: CancelFlag = None,
                  work_dir=None) -> Tuple[np.ndarray, int]:
    """Seeds that adapt to the cell size: pieces of a boolean ZYX ``interior``, cut by erosion.

    Each connected piece is eroded in its own bounding box by every radius of
    :func:`cascade_levels` (um, ellipsoids from the voxel size), deepest first;
    the pieces of a level that hold no seed of a deeper level become seeds
    (when at least ``min_size_um3``). So two cells joined by a bridge narrower
    than the deepest erosion get one seed each, while a cell too small for that
    erosion keeps the seed of the deepest level it survives. The stack's faces
    do not erode (a cell cut by them keeps its seed). Pieces run in threads
    (scipy's erosions release the GIL); their seeds are numbered in the order
    of the pieces, so the result does not depend on the number of CPUs.
    Memory: up to :data:`CASCADE_MEMORY_BYTES` of boxes at once (a larger box
    runs alone); the pieces and the seeds (uint16 when they fit) are scratch
    arrays (on disk in ``work_dir`` when large, :mod:`core.scratch`).
    Returns (seeds 1..n, n).
    """
    vs = tuple(float(v) for v in voxel_size)
    levels = [(e, fp) for e, fp in ((e, ball_um(e, vs)) for e in cascade_levels(max_erosion_um)[1:])
              if fp is not None]
    radius = [max([fp.shape[a] // 2 for _, fp in levels] + [0]) for a in range(3)]
    pieces, n = label_components(interior, work_dir)
    release_pages(interior)
    boxes = ndi.find_objects(pieces)
    release_pages(pieces)
    out = scratch_array(interior.shape, np.uint16, work_dir)  # widened only if the seeds need it
    next_id = 1
    workers = max(1, os.cpu_count() or 1)
    alone_above = CASCADE_MEMORY_BYTES // (CASCADE_BYTES_PER_VOXEL * workers)
    pending = deque()  # (box, future) in piece order

    def write_done(keep: int) -> None:
        nonlocal out, next_id
        while len(pending) > keep:
            sl, future = pending.popleft()
            found = future.result()
            if found is not None:
                local, k = found
                out, next_id = _put_seeds(out, sl, local, next_id, k)

    with ThreadPoolExecutor(workers) as pool:
        for i, sl in enumerate(boxes, start=1):
            if sl is None:
                continue
            alone = int(np.prod([s.stop - s.start for s in sl])) > alone_above
            if alone:
                write_done(0)  # a large box runs alone, after the pieces before it
            pending.append((sl, pool.submit(_piece_seeds, pieces, i, sl, interior.shape, levels,
                                            radius, vs, min_size_um3, work_dir)))
            write_done(0 if alone else 2 * workers)
            if i % 64 == 0:
                release_pages(pieces, out)
            if i % 256 == 0:
                check_cancelled(cancel, "Cell segmentation")
        write_done(0)
    release_pages(pieces, out)
    return _seeds_result(out, next_id)


def _piece_seeds(pieces: np.ndarray, i: int, sl, shape, levels, radius, vs,
                 min_size_um3: float, work_dir):
    """The cascade of :func:`cascade_seeds` for piece ``i`` of ``pieces`` (box ``sl``).

    Returns (seeds 1..k in the box, k), or None when the piece is smaller than
    ``min_size_um3``.
    """
    voxel_um3 = float(np.prod(vs))
    mask = pieces[sl] == i
    if mask.sum() * voxel_um3 < min_size_um3:
        return None
    # zeros around the box except at the stack's faces, where the piece goes on
    pad = [(0 if s.start == 0 else r, 0 if s.stop == n_ax else r)
           for s, r, n_ax in zip(sl, radius, shape)]
    padded = np.pad(mask, pad)
    del mask
    # compact types throughout: a piece's box can be most of a large stack
    local = scratch_array(padded.shape, np.uint16, work_dir)
    k = 0
    row_dist = row_distance(padded)  # the same for every level
    # an erosion wider than the piece (away from the stack's faces) leaves nothing
    inside_faces = [s.start > 0 and s.stop < n_ax for s, n_ax in zip(sl, shape)]
    extent = [s.stop - s.start for s in sl]
    for level_um, fp in reversed(levels):
        if any(f and e < fs for f, e, fs in zip(inside_faces, extent, fp.shape)):
            continue
        eroded = erode_footprint(padded, fp, level_um, vs, row_dist)
        # label only the box of what is left (the same ids: raster order is kept)
        crop = ndi.find_objects(eroded.view(np.uint8), max_label=1)[0]
        if crop is None:
            continue
        comp, m = label_components(eroded[crop], work_dir)
        del eroded
        has = np.zeros(m + 1, bool)
        if k:
            has[comp[local[crop] > 0]] = True
        big = label_counts(comp, minlength=m + 1) * voxel_um3 >= min_size_um3
        new = ~has & big
        new[0] = False
        ids = np.flatnonzero(new)
        if len(ids):
            if k + len(ids) > np.iinfo(local.dtype).max:
                local = local.astype(np.uint32)
            lut = np.zeros(m + 1, local.dtype)
            lut[ids] = np.arange(k + 1, k + 1 + len(ids))
            sel = new[comp]
            view = local[crop]
            view[sel] = lut[comp[sel]]
            del sel, view
            k += len(ids)
        del comp
    del row_dist
    if k == 0:  # every erosion erased it: the piece itself is one small cell's seed
        local = padded.view(np.uint8)
        k = 1
    del padded
    inner = tuple(slice(a, local.shape[d] - b) for d, (a, b) in enumerate(pad))
    return local[inner], k


def _put_seeds(out: np.ndarray, sl, local: np.ndarray, next_id: int, k: int):
    """Write a box's seeds ``local`` (1..k, 0 elsewhere) into ``out[sl]`` as ids from
    ``next_id``; widens ``out`` to uint32 when needed. Returns (out, next free id)."""
    if next_id + k > np.iinfo(out.dtype).max:
        out = out.astype(np.uint32)
    view = out[sl]
    hit = local > 0
    view[hit] = local[hit].astype(out.dtype) + (next_id - 1)
    return out, next_id + k


def _seeds_result(out: np.ndarray, next_id: int) -> Tuple[np.ndarray, int]:
    """(seeds in uint16 when their count allows, number of seeds)."""
    n_seeds = next_id - 1
    if n_seeds < 65536 and out.dtype != np.uint16:
        out = out.astype(np.uint16)
    return out, n_seeds


def cells_from_probabilities(
    cell_prob: Optional[np.ndarray] = None,
    boundary_prob: Optional[np.ndarray] = None,
    *,
    tissue_prob: Optional[np.ndarray] = None,
    wall_probs: Optional[Sequence[np.ndarray]] = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    params: Optional[SegmentParams] = None,
    work_dir=None,
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
) -> np.ndarray:
    """Turn probability maps (ZYX, values in [0, 1] or uint8 0..255) into cells.

    Parameters
    ----------
    cell_prob : probability of "inside a cell" (cells-with-gaps target), or None.
    boundary_prob : probability of "on a cell boundary", or None.
    tissue_prob : probability of "inside any cell" (no gaps), or None; when
        given it is the tissue mask, otherwise the mask comes from cell_prob.
    wall_probs : the wall bands along Z, Y and X (target ``all_walls``), or
        None; when given, the voxels next to each interface are re-grown across
        them (``params.wall_core_um``, :mod:`core.walls`).
    voxel_size : (z, y, x) in micrometres, used for every size and radius.
    params : :class:`SegmentParams`; defaults when None.
    work_dir : folder for the stack-sized working arrays of a large stack
        (memory-mapped, unlinked at once; :mod:`core.scratch`); None = the
        system's temporary folder.

    Returns
    -------
    labels : ZYX array in the smallest unsigned dtype; 0 background, cells 1..n.
    """
    params = params or SegmentParams()
    params.validate()
    if cell_prob is None and boundary_prob is None:
        raise VolumeDataError("cells_from_probabilities needs cell_prob, boundary_prob or both.")
    cp = _Prob(cell_prob, "cell_prob") if cell_prob is not None else None
    bp = _Prob(boundary_prob, "boundary_prob") if boundary_prob is not None else None
    tp = _Prob(tissue_prob, "tissue_prob") if tissue_prob is not None else None
    wp = None
    if wall_probs is not None:
        if len(wall_probs) != 3:
            raise VolumeDataError(f"wall_probs needs the Z, Y and X wall bands, got "
                                  f"{len(wall_probs)} arrays.")
        wp = [_Prob(w, f"wall_probs[{axis}]") for axis, w in enumerate(wall_probs)]
    shapes = {name: p.a.shape for name, p in (("cell_prob", cp), ("boundary_prob", bp),
                                                 ("tissue_prob", tp)) if p is not None}
    shapes.update({f"wall_probs[{axis}]": p.a.shape for axis, p in enumerate(wp or ())})
    if len(set(shapes.values())) > 1:
        raise VolumeDataError(
            "The probability maps must have the same shape: "
            + ", ".join(f"{k} {v}" for k, v in shapes.items()) + ".")
    shape = (cp if cp is not None else bp).a.shape
    n_slabs = len(list(_slabs(shape[0], shape[1] * shape[2], params.slab_z, 0)))
    rep = ProgressReporter(progress, "cells", total=1 + n_slabs)

    # 1. tissue mask and seeds, thresholded slab by slab into scratch arrays
    probs = [p for p in (cp, bp, tp) if p is not None]
    if cp is not None:
        def seedable(index):
            part = cp.above(params.seed_threshold, index)
            if bp is not None:
                part &= bp.below(params.seed_max_boundary, index)
            return part
    else:
        def seedable(index):
            return bp.below(params.seed_threshold, index)
    interior = _mask_by_slabs(shape, seedable, work_dir, probs)
    if tp is not None:
        tissue = _mask_by_slabs(shape, lambda index: tp.above(params.tissue_threshold, index),
                                work_dir, probs)
    elif cp is not None:
        cells = _mask_by_slabs(shape, lambda index: cp.above(params.cell_threshold, index),
                               work_dir, probs)
        tissue = close_gaps(cells, params.gap_closing_vox,
                            out=scratch_array(shape, bool, work_dir))
        del cells
    else:
        tissue = None
    if params.seed_method == "distance":
        seeds, n_seeds = split_by_distance(interior, voxel_size, params.seed_h_um, cancel=cancel)
    elif params.seed_method == "cascade":
        seeds, n_seeds = cascade_seeds(interior, voxel_size, params.seed_erosion_um,
                                       params.min_seed_size_um3, cancel=cancel,
                                       work_dir=work_dir)
    else:
        footprint = ball_um(params.seed_erosion_um, voxel_size)
        if footprint is not None:  # erode here so the un-eroded mask is freed before labelling
            # border_value=1: cells cut by the stack's faces keep their seeds
            interior = ndi.binary_erosion(interior, structure=footprint, border_value=1)
        seeds, n_seeds = find_seeds(interior, voxel_size=voxel_size,
                                    min_size_um3=params.min_seed_size_um3)
    del interior
    rep.update(1, message=f"{n_seeds} seeds")
    check_cancelled(cancel, "Cell segmentation")

    # 2. watershed slab by slab; seeds have global ids so slabs agree at their borders
    labels = scratch_array(shape, label_dtype(n_seeds), work_dir)
    plane = shape[1] * shape[2]
    # the halo lets each block see the seeds its cells have just above and below it
    # (eroded seeds stop short of a cell's end by the erosion radius)
    halo = 2 + 2 * int(np.ceil(params.seed_erosion_um / float(voxel_size[0])))
    blocks = list(_slabs(shape[0], plane, params.slab_z, halo))

    def flood(block) -> None:  # skimage's watershed releases the GIL: blocks run in threads
        z0, z1, a, b = block
        mask = None if tissue is None else np.asarray(tissue[a:b])
        part = watershed(_elevation(cp, bp, np.s_[a:b]), markers=np.asarray(seeds[a:b]),
                         mask=mask)
        labels[z0:z1] = part[z0 - a: z0 - a + (z1 - z0)]

    largest = max(b - a for _, _, a, b in blocks) * plane
    with ThreadPoolExecutor(watershed_workers(largest)) as pool:
        pending = [pool.submit(flood, block) for block in blocks]
        try:
            for i, done in enumerate(as_completed(pending), start=2):
                done.result()
                # shared file mappings: other threads' pages fault back in, nothing is lost
                release_pages(seeds, tissue, labels)
                for p in probs:
                    p.release()
                rep.update(i, message="")
                check_cancelled(cancel, "Cell segmentation")
        finally:
            for future in pending:
                future.cancel()
    del seeds, tissue

    # 3. dissolve tiny cells into their neighbours, drop doubtful tissue, then ids 1..n
    labels = _dissolve_small_cells(labels, voxel_size, params.min_cell_size_um3, bp, cp)
    counts = label_counts(labels)
    drop = None
    if tp is not None and params.min_cell_tissue > 0:
        drop = doubtful_patches(labels, tp, params.min_cell_tissue, counts)
    labels = _consecutive(labels, work_dir, drop=drop, counts=counts)
    # 4. merge cells across walls the network hardly sees (merge_below > 0)
    if params.merge_below > 0:
        labels = _merge_weak_walls(labels, cp, bp, params.merge_below, params.slab_z, work_dir)
    # 4b. a segment touching far more cells than any cell does is a lumen (or medium)
    if params.max_neighbours_factor > 0:
        drop = many_neighbour_segments(labels, params.max_neighbours_factor, params.slab_z)
        if drop.any():
            rep.message(f"{int(drop.sum())} segment(s) touching more than "
                        f"{params.max_neighbours_factor:g}x the median number of neighbours "
                        "made background: a lumen or the medium taken for a cell "
                        "(segment.max_neighbours_factor; 0 keeps them)")
            labels = _consecutive(labels, work_dir, drop=drop)
    # 5. with wall bands: re-grow the voxels next to each interface across them
    if wp is not None and params.wall_core_um > 0:
        def release_walls() -> None:
            for p in wp:
                p.release()

        labels = regrow_at_walls(labels, lambda axis, index: wp[axis].f32(index),
                                 voxel_size=voxel_size, core_um=params.wall_core_um,
                                 slab_z=params.slab_z, work_dir=work_dir, release=release_walls)
    return labels


def cell_and_boundary(channels: Mapping[str, np.ndarray]
                      ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """A network's cell and boundary outputs by channel name: "cell" (or
    "cells_with_gaps") and "boundary" (or "boundaries"); None where absent."""
    return (channels.get("cell", channels.get("cells_with_gaps")),
            channels.get("boundary", channels.get("boundaries")))


def cells_from_channels(channels: Mapping[str, np.ndarray], **kwargs) -> np.ndarray:
    """:func:`cells_from_probabilities` on a network's outputs by channel name:
    cell and boundary (:func:`cell_and_boundary`), "tissue", and the wall bands
    when all three are there; ``kwargs`` as there."""
    walls = ([channels[n] for n in WALL_CHANNELS]
             if all(n in channels for n in WALL_CHANNELS) else None)
    return cells_from_probabilities(*cell_and_boundary(channels),
                                    tissue_prob=channels.get("tissue"), wall_probs=walls, **kwargs)


def _block_z(labels: np.ndarray, slab_z: int) -> int:
    """Z slices per block of a pass over ``labels``: as the watershed's blocks."""
    plane = labels.shape[1] * labels.shape[2]
    return max(1, min(int(slab_z), SLAB_VOXELS // max(1, plane)))


def _merge_weak_walls(labels, cp, bp, below: float, slab_z: int, work_dir) -> np.ndarray:
    """Cells merged across walls whose mean relief is below ``below``, ids 1..n again."""
    plane = labels.shape[1] * labels.shape[2]
    lut = merge_weak_walls(labels, lambda index: _elevation(cp, bp, index), below,
                           _block_z(labels, slab_z))
    if np.array_equal(lut, np.arange(len(lut))):
        return labels
    for z0, z1, _, _ in _slabs(labels.shape[0], plane, labels.shape[0], 0):
        labels[z0:z1] = lut[labels[z0:z1]]
        release_pages(labels)
    return _consecutive(labels, work_dir)


def _mask_by_slabs(shape, mask_of, work_dir, probs) -> np.ndarray:
    """A boolean scratch array (:mod:`core.scratch`) filled slab by slab with
    ``mask_of(index)``; the probability pages read are handed back as it goes."""
    out = scratch_array(shape, bool, work_dir)
    for z0, z1, _, _ in _slabs(shape[0], shape[1] * shape[2], shape[0], 0):
        out[z0:z1] = mask_of(np.s_[z0:z1])
        release_pages(out)
        for p in probs:
            p.release()
    return out


#: A doubtful patch (``min_cell_tissue``) is also smaller than this share of the
#: stack's median cell: large cells the tissue channel is unsure of are kept.
DOUBTFUL_PATCH_MAX_SHARE = 0.5


def doubtful_patches(labels: np.ndarray, tissue: "_Prob", min_mean: float,
                     counts: np.ndarray) -> np.ndarray:
    """Cells (bool, index = id) whose mean tissue probability is below ``min_mean``
    and whose volume is below :data:`DOUBTFUL_PATCH_MAX_SHARE` of the median cell's.

    labels: ZYX cells; tissue: the network's tissue probability; counts: voxels
    per id (:func:`core.volume.label_counts`). Sums run slab by slab.
    """
    n = len(counts)
    sums = np.zeros(n)
    for z0, z1, _, _ in _slabs(labels.shape[0], labels.shape[1] * labels.shape[2],
                               labels.shape[0], 0):
        lab = np.asarray(labels[z0:z1]).ravel()
        sums += np.bincount(lab, weights=tissue.f32(np.s_[z0:z1]).ravel(), minlength=n)
        release_pages(labels)
        tissue.release()
    present = counts > 0
    present[0] = False
    if not present.any():
        return np.zeros(n, bool)
    mean = np.divide(sums, counts, out=np.ones(n), where=counts > 0)
    small = counts < DOUBTFUL_PATCH_MAX_SHARE * np.median(counts[present])
    return present & small & (mean < min_mean)


#: A segment with many neighbours (``max_neighbours_factor``) also touches more
#: than this many: in a stack of a few cells the median says little.
MANY_NEIGHBOURS_MIN = 15


def many_neighbour_segments(labels: np.ndarray, factor: float, slab_z: int = 64) -> np.ndarray:
    """Segments (bool, index = id) that touch more than ``factor`` times the median
    number of neighbours and more than :data:`MANY_NEIGHBOURS_MIN` segments.

    labels: ZYX cells, 0 = background; neighbours share a face (six-neighbourhood),
    counted slab by slab (:func:`core.agglomerate.wall_contacts`).
    """
    n = int(labels.max()) + 1 if labels.size else 1

    def no_relief(index: slice) -> np.ndarray:  # only who touches whom is needed
        z0, z1, _ = index.indices(labels.shape[0])
        return np.zeros((z1 - z0,) + labels.shape[1:], np.float32)

    a, b, _, _ = wall_contacts(labels, no_relief, _block_z(labels, slab_z))
    degree = np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
    touching = degree[1:][degree[1:] > 0]
    if touching.size == 0:
        return np.zeros(n, bool)
    many = (degree > factor * np.median(touching)) & (degree > MANY_NEIGHBOURS_MIN)
    many[0] = False
    return many


def _consecutive(labels: np.ndarray, work_dir=None, drop: Optional[np.ndarray] = None,
                 counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Ids 1..n (background 0) in the smallest unsigned dtype, via one lookup table;
    ids where ``drop`` (bool, index = id) is True become background. ``counts``:
    voxels per id when already known (:func:`core.volume.label_counts`).

    Rewritten slab by slab, in place when the dtype stays: no second full-size copy.
    """
    present = (label_counts(labels) if counts is None else counts) > 0
    if drop is not None:
        present[: len(drop)] &= ~drop[: len(present)]
    present[0] = False
    n = int(present.sum())
    lut = np.zeros(len(present), dtype=label_dtype(n))
    lut[present] = np.arange(1, n + 1)
    out = labels if lut.dtype == labels.dtype else scratch_array(labels.shape, lut.dtype, work_dir)
    plane = labels.shape[1] * labels.shape[2]
    for z0, z1, _, _ in _slabs(labels.shape[0], plane, labels.shape[0], 0):
        out[z0:z1] = lut[labels[z0:z1]]
        release_pages(labels, out)
    return out


def _elevation(cp: Optional[_Prob], bp: Optional[_Prob], index) -> np.ndarray:
    """Watershed relief (float32): the mean of the boundary probability and
    1 - cell probability, or the one of them the model predicts."""
    if bp is None:
        return 1.0 - cp.f32(index)
    relief = bp.f32(index)
    if cp is not None:
        relief += 1.0 - cp.f32(index)
        relief *= 0.5
    return relief


def _dissolve_small_cells(labels, voxel_size, min_size_um3, bp, cp) -> np.ndarray:
    """Give cells below ``min_size_um3`` to their neighbours by a second watershed."""
    if min_size_um3 <= 0:
        return labels
    sizes = label_counts(labels)
    if len(sizes) <= 1:  # no cells
        return labels
    small = sizes * float(np.prod(voxel_size)) < min_size_um3
    small[0] = False
    if not small.any():
        return labels
    keep = labels  # rewritten in place: only small cells' voxels change
    # each small cell in its bounding box grown by 2 voxels: its neighbours flood it
    boxes = ndi.find_objects(labels)
    release_pages(labels)
    for k, cell in enumerate(np.flatnonzero(small)):
        if k % 64 == 63:
            release_pages(labels)
        sl = boxes[cell - 1] if cell - 1 < len(boxes) else None
        if sl is None:
            continue
        box = tuple(slice(max(0, s.start - 2), min(n, s.stop + 2))
                    for s, n in zip(sl, labels.shape))
        lab = labels[box].copy()
        region = small[lab]
        markers = np.where(region, 0, lab)
        if not markers.any():
            continue  # nothing but small cells around: it stays
        flooded = watershed(_elevation(cp, bp, box), markers=markers, mask=lab > 0)
        mine = (lab == cell) & (flooded > 0)
        keep[box][mine] = flooded[mine]
    return keep
