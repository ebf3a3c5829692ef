"""Connected components of a large boolean ZYX mask, labelled slab by slab.

``scipy.ndimage.label`` needs the whole mask and an output of the whole stack,
and when its provisional labels outgrow a uint16 output it silently allocates
an int32 copy of the stack (1 GB for 234 x 1024 x 1024). Here each Z slab is
labelled on its own, the pieces that touch across slab faces are joined
(26-connectivity) with a graph's connected components, and the ids are made
consecutive in the order ``ndi.label`` gives (raster order of each
component's first voxel), so the result is identical to it. Memory: one slab
plus the stack-sized outputs, which are scratch files (:mod:`core.scratch`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from core.scratch import release_pages, scratch_array

#: Voxels per slab (a 1024 x 1024 plane: 16 slices).
BLOCK_VOXELS = 16 * 1024 * 1024
_FULL = np.ones((3, 3, 3), bool)


def label_components(mask: np.ndarray, work_dir=None,
                     block_voxels: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Label the 26-connected components of a boolean ZYX ``mask`` (as ``ndi.label``).

    Returns (labels 1..n, 0 outside, as uint16 when n fits, else int32; n).
    Stacks of one slab go straight to ``ndi.label``.
    """
    block = BLOCK_VOXELS if block_voxels is None else int(block_voxels)
    plane = int(np.prod(mask.shape[1:]))
    step = max(1, block // max(1, plane))
    if mask.shape[0] <= step:
        return _label_in_memory(np.asarray(mask), work_dir)

    # 1. each slab alone; provisional ids grow in raster order of first voxels
    provisional = scratch_array(mask.shape, np.uint32, work_dir)
    count = 0
    faces = []
    for z0 in range(0, mask.shape[0], step):
        z1 = min(mask.shape[0], z0 + step)
        part, k = ndi.label(np.asarray(mask[z0:z1]), structure=_FULL)
        part = part.astype(np.uint32, copy=False)
        np.add(part, np.uint32(count), out=part, where=part > 0)
        provisional[z0:z1] = part
        if z0 > 0:
            faces.append(_touching(previous_last, part[0]))
        previous_last = part[-1].copy()
        count += int(k)
        release_pages(provisional, mask)

    # 2. pieces touching across slab faces are one component
    pairs = np.concatenate(faces, axis=1) if faces else np.zeros((2, 0), np.uint32)
    graph = coo_matrix((np.ones(pairs.shape[1], np.int8), (pairs[0], pairs[1])),
                       shape=(count + 1, count + 1))
    n_comp, comp = connected_components(graph, directed=False)
    # 3. ids in order of each component's first voxel = of its smallest provisional id
    first = np.full(n_comp, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, comp[1:], np.arange(1, count + 1))
    used = first < np.iinfo(np.int64).max
    order = np.argsort(first[used], kind="stable")
    final = np.zeros(n_comp, np.int64)
    final[np.flatnonzero(used)[order]] = np.arange(1, int(used.sum()) + 1)
    n = int(used.sum())
    lut = final[comp]
    lut[0] = 0
    dtype = np.uint16 if n <= np.iinfo(np.uint16).max else np.int32
    lut = lut.astype(dtype)
    out = scratch_array(mask.shape, dtype, work_dir)
    for z0 in range(0, mask.shape[0], step):
        out[z0:z0 + step] = lut[provisional[z0:z0 + step]]
        release_pages(provisional, out)
    del provisional
    return out, n


def _touching(below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """(2, k) unique id pairs of two adjacent YX planes that touch (26-connectivity)."""
    ny, nx = below.shape
    found = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = below[max(0, dy): ny + min(0, dy), max(0, dx): nx + min(0, dx)]
            b = above[max(0, -dy): ny + min(0, -dy), max(0, -dx): nx + min(0, -dx)]
            both = (a > 0) & (b > 0)
            if both.any():  # one 64-bit key per pair: a 1D unique is fast
                found.append(np.unique((a[both].astype(np.uint64) << np.uint64(32))
                                       | b[both].astype(np.uint64)))
    if not found:
        return np.zeros((2, 0), np.uint32)
    keys = np.unique(np.concatenate(found))
    return np.stack([(keys >> np.uint64(32)).astype(np.uint32),
                     (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)])


def _label_in_memory(mask: np.ndarray, work_dir) -> Tuple[np.ndarray, int]:
    """``ndi.label`` into a uint16 output, or int32 when the count needs it."""
    try:
        out = scratch_array(mask.shape, np.uint16, work_dir)
        return out, int(ndi.label(mask, structure=_FULL, output=out))
    except RuntimeError:  # more than 65535 components: the wider type
        out = scratch_array(mask.shape, np.int32, work_dir)
        return out, int(ndi.label(mask, structure=_FULL, output=out))
