"""Merge neighbouring cells whose shared wall the network hardly sees.

A seeded watershed cuts a cell in two wherever two seeds land in it (a faint
stain, a cell much larger than the seed settings expect). The wall between
such pieces has a low boundary probability, while a real wall between two
cells has a high one. This is the agglomeration step of PlantSeg (GASP with
average linkage) reduced to its core: the pair of neighbours whose shared
wall has the lowest mean relief is merged first, the merged cell's walls to
its neighbours are re-averaged, and so on while the lowest wall is below a
threshold (:func:`skimage.graph.merge_hierarchical` does the merging).

Arrays are ZYX; walls are counted over pairs of face-adjacent voxels (the six
neighbours) that carry two different non-zero labels.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
from skimage import graph as skgraph

from core.scratch import release_pages

ReliefOf = Callable[[slice], np.ndarray]


def wall_contacts(labels: np.ndarray, relief_of: ReliefOf, slab_z: int = 64
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The walls between cells: for each pair of touching labels ``a < b``, the
    sum of the relief over their voxel pairs and the number of voxel pairs.

    labels: ZYX cells (0 = background, ignored); relief_of(np.s_[z0:z1]) gives
    the relief (float, ZYX) of those slices, e.g. the watershed's relief. A
    voxel pair's relief is the mean of its two voxels'. Read slab by slab
    (``slab_z`` slices plus one) and summed per slab, so memory stays bounded
    on large stacks.
    Returns (a, b, relief_sum, n_pairs), one entry per touching pair.
    """
    n_z = labels.shape[0]
    n = int(labels.max()) + 1 if labels.size else 1
    parts = []  # per slab: (pair keys, relief sums, pair counts), reduced at once
    for z0 in range(0, n_z, slab_z):
        z1 = min(n_z, z0 + slab_z)
        z2 = min(n_z, z1 + 1)  # one slice more: the Z pairs across the slab's end
        lab = np.asarray(labels[z0:z2])
        rel = np.asarray(relief_of(np.s_[z0:z2]), dtype=np.float32)
        keys, sums = [], []
        for axis in range(3):
            part = slice(None) if axis == 0 else slice(0, z1 - z0)
            l_ax, r_ax = lab[part], rel[part]
            if l_ax.shape[axis] < 2:
                continue
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            l0, l1 = l_ax[tuple(lo)], l_ax[tuple(hi)]
            wall = (l0 != l1) & (l0 > 0) & (l1 > 0)
            if not wall.any():
                continue
            x = l0[wall].astype(np.int64)
            y = l1[wall].astype(np.int64)
            keys.append(np.minimum(x, y) * n + np.maximum(x, y))
            sums.append(0.5 * (r_ax[tuple(lo)][wall] + r_ax[tuple(hi)][wall]))
        release_pages(labels)
        if keys:
            key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
            parts.append((key, np.bincount(inverse, weights=np.concatenate(sums)),
                          np.bincount(inverse)))
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), empty
    key, inverse = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    relief_sum = np.bincount(inverse, weights=np.concatenate([p[1] for p in parts]))
    n_pairs = np.bincount(inverse, weights=np.concatenate([p[2] for p in parts])).astype(np.int64)
    return key // n, key % n, relief_sum, n_pairs


def _average_wall(graph, src, dst, neighbour):
    """Attributes of the wall between the merged cell (src + dst) and a neighbour:
    the voxel-pair-weighted mean of the two walls it replaces."""
    total = count = 0.0
    for node in (src, dst):
        edge = graph[node].get(neighbour)
        if edge is not None:
            total += edge["total"]
            count += edge["count"]
    return {"total": total, "count": count, "weight": total / count}


def _no_op(graph, src, dst):
    """merge_hierarchical's hook before a merge: nothing to do (the RAG joins the labels)."""


def merge_weak_walls(labels: np.ndarray, relief_of: ReliefOf, below: float,
                     slab_z: int = 64) -> np.ndarray:
    """A lookup table (index = id) that merges cells across weak walls.

    Neighbours are merged, weakest wall first, while the mean relief over
    their shared wall is below ``below`` (relief in [0, 1]: 0 inside a cell,
    1 on a wall). A merged cell takes the smallest id of its pieces; ids that
    are not merged map to themselves. Apply as ``lut[labels]``.
    """
    n = int(labels.max()) + 1 if labels.size else 1
    lut = np.arange(n, dtype=np.int64)
    a, b, total, count = wall_contacts(labels, relief_of, slab_z)
    weight = total / np.maximum(count, 1)
    if not np.any(weight < below):
        return lut
    rag = skgraph.RAG()
    for x, y, t, c, w in zip(a.tolist(), b.tolist(), total.tolist(), count.tolist(),
                             weight.tolist()):
        rag.add_edge(x, y, total=t, count=c, weight=w)
    for node in rag.nodes:
        rag.nodes[node]["labels"] = [node]
    skgraph.merge_hierarchical(np.arange(n), rag, below, rag_copy=False, in_place_merge=True,
                               merge_func=_no_op, weight_func=_average_wall)
    for _, data in rag.nodes(data=True):
        ids = data["labels"]
        lut[ids] = min(ids)
    return lut
