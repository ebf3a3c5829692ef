"""Segmentation quality: compare a predicted label stack with the ground truth.

Both stacks are label images with axes (Z, Y, X): 0 is background, every
other value is one cell. Ids need not be consecutive, nor the same in the two
stacks. Every figure is derived from one sparse *contingency table* (how many
voxels carry ground-truth id ``i`` and predicted id ``j``, for the pairs that
actually occur), built slab by slab along Z so that a 234 x 1024 x 1024 stack
needs only a few slabs' worth of extra memory. No dense id-by-id matrix is
ever formed.

Figures (names as in :meth:`EvaluationResult.to_dict`)
-------------------------------------------------------
Voxel classes, as the thesis: ``background_iou`` and ``cell_iou`` from the
binary confusion matrix of background (id 0) against cells (id > 0).

Counts: ``wrong_cells`` = |cells in GT - cells in prediction|, a cell being a
distinct id > 0; ``wrong_components`` = the same for connected pieces of equal
id (:func:`skimage.measure.label` semantics, full connectivity by default). For
a binary prediction (0/1, as the thesis' network) or labels with gaps between
cells, ``wrong_components`` is exactly the thesis' wrongCells.

Instance agreement: adapted Rand error, variation of information (split and
merge), and detection scores from one-to-one matching of cells by IoU (AP as in
Cellpose/StarDist: TP / (TP + FP + FN)), plus a per-cell table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from skimage.measure import label as sk_label

from core.errors import ConfigError, VolumeDataError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled

#: Voxels per Z slab processed at once (about 4 million: 4 planes of 1024 x 1024).
DEFAULT_CHUNK_VOXELS = 1 << 22

#: Largest dense count array (entries) used for per-slab bookkeeping (32 MiB of int64).
_DENSE_LIMIT = 1 << 22

#: Status values of the per-cell table.
CELL_STATUSES = ("ok", "split", "merged", "split_merged", "low_iou", "missed",
                 "false_positive")

#: Column order of the per-cell table (and of the CSV the command line writes).
CELL_COLUMNS = ("gt_id", "gt_size", "pred_id", "pred_size", "overlap", "iou",
                "matched", "n_covering", "split", "merged", "status")


# --------------------------------------------------------------------------
# Contingency table
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ContingencyTable:
    """Sparse overlap counts of two label stacks of the same shape.

    gt_ids, pred_ids: sorted ids present in each stack (uint64; 0 included when
        present), with their sizes gt_sizes, pred_sizes in voxels (int64).
    rows, cols, counts: one entry per (gt, pred) pair that overlaps:
        ``counts[k]`` voxels carry ``gt_ids[rows[k]]`` and ``pred_ids[cols[k]]``.
        Entries are sorted by (row, col) and unique.
    """

    gt_ids: np.ndarray
    gt_sizes: np.ndarray
    pred_ids: np.ndarray
    pred_sizes: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.counts.sum())

    def to_sparse(self) -> sparse.csr_array:
        """The table as a scipy CSR array indexed by (row, col) positions."""
        return sparse.csr_array(
            (self.counts, (self.rows, self.cols)),
            shape=(len(self.gt_ids), len(self.pred_ids)),
        )

    def pair_ids(self) -> Tuple[np.ndarray, np.ndarray]:
        """The (gt id, pred id) of every entry."""
        return self.gt_ids[self.rows], self.pred_ids[self.cols]


def contingency_table(
    gt,
    pred,
    *,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    names: Tuple[str, str] = ("ground truth", "prediction"),
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
) -> ContingencyTable:
    """Count the voxels of every overlapping (gt id, pred id) pair.

    gt, pred: label stacks (Z, Y, X) of equal shape: NumPy arrays, or anything
        sliced lazily along Z (``np.memmap``, ``h5py.Dataset``).
    chunk_voxels: voxels per Z slab; extra memory is a small multiple of one slab.
    names: what to call the two stacks in error messages (e.g. file names).
    """
    table, _ = _scan(gt, pred, chunk_voxels=chunk_voxels, names=names,
                     connectivity=None, progress=progress, cancel=cancel)
    return table


def _check_pair(gt, pred, names: Tuple[str, str]) -> Tuple[int, ...]:
    shape_g, shape_p = tuple(np.shape(gt)), tuple(np.shape(pred))
    if shape_g != shape_p:
        hint = ("The same sizes in another order: the axes look swapped (e.g. a MATLAB "
                "stack read as (Z, X, Y)); re-export one in the other's axis order."
                if sorted(shape_g) == sorted(shape_p) else
                "Compare a prediction with the ground truth of the same stack, cropped "
                "and resampled identically.")
        raise VolumeDataError(
            f"The {names[0]} has shape {shape_g} (Z, Y, X) but the {names[1]} has shape "
            f"{shape_p}: they must match voxel for voxel. {hint}"
        )
    if len(shape_g) < 1:
        raise VolumeDataError(f"The {names[0]} is a single number, not a label stack.")
    return shape_g


def _as_label_slab(slab, where: str) -> np.ndarray:
    """Validate one slab of labels; return it as unsigned (or intp) integers."""
    arr = np.asarray(slab)
    kind = arr.dtype.kind
    if kind == "b":
        return arr.view(np.uint8)
    if kind == "u":
        return arr
    if kind == "i":
        if arr.size and arr.min() < 0:
            raise VolumeDataError(
                f"The {where} contains negative values (minimum {arr.min()}). Labels must "
                "be 0 for background and positive ids for cells."
            )
        return arr
    if kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)) \
                or (arr.size and arr.min() < 0):
            raise VolumeDataError(
                f"The {where} contains NaN, infinite, negative or fractional values, so it "
                "is not a label stack. Pass labels: 0 = background, 1..n = cells."
            )
        return arr.astype(np.int64)
    raise VolumeDataError(
        f"The {where} has dtype {arr.dtype}, which cannot hold labels; expected integers."
    )


def _local_ids(flat: np.ndarray, limit: int):
    """Ids present in ``flat``, their counts, and each voxel's index into the ids."""
    mx = int(flat.max())
    if mx <= limit:
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=mx + 1)
        ids = np.flatnonzero(counts)
        lut = np.zeros(mx + 1, dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        return ids.astype(np.uint64), lut[flat]
    ids, inverse = np.unique(flat, return_inverse=True)
    return ids.astype(np.uint64), inverse.reshape(-1).astype(np.int64, copy=False)


def _slabs(shape: Sequence[int], chunk_voxels: int):
    plane = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, int(chunk_voxels) // max(plane, 1))
    return [(z, min(z + step, shape[0])) for z in range(0, shape[0], step)]


def _scan(gt, pred, *, chunk_voxels, names, connectivity, progress, cancel):
    """One pass over Z slabs: contingency table and (optionally) component counts."""
    shape = _check_pair(gt, pred, names)
    if chunk_voxels < 1:
        raise ConfigError(f"chunk_voxels must be a positive number of voxels, got {chunk_voxels}.")
    slabs = _slabs(shape, chunk_voxels)
    limit = _DENSE_LIMIT
    counters = None
    if connectivity is not None:
        counters = (_ComponentCounter(len(shape), connectivity),
                    _ComponentCounter(len(shape), connectivity))
    parts_g, parts_p, parts_c = [], [], []
    rep = ProgressReporter(progress, "evaluate", total=len(slabs))
    for k, (z0, z1) in enumerate(slabs, 1):
        check_cancelled(cancel, "The evaluation")
        g = _as_label_slab(gt[z0:z1], names[0])
        p = _as_label_slab(pred[z0:z1], names[1])
        if counters is not None:
            counters[0].feed(g)
            counters[1].feed(p)
        if g.size:
            ids_g, inv_g = _local_ids(g.reshape(-1), limit)
            ids_p, inv_p = _local_ids(p.reshape(-1), limit)
            n_p = len(ids_p)
            key = inv_g * n_p
            key += inv_p
            del inv_g, inv_p
            if len(ids_g) * n_p <= limit:
                c = np.bincount(key, minlength=len(ids_g) * n_p)
                nz = np.flatnonzero(c)
                uk, cnt = nz, c[nz]
            else:
                uk, cnt = np.unique(key, return_counts=True)
            del key
            parts_g.append(ids_g[uk // n_p])
            parts_p.append(ids_p[uk % n_p])
            parts_c.append(cnt.astype(np.int64))
        rep.update(k, message="")
    table = _merge_parts(parts_g, parts_p, parts_c)
    comps = None
    if counters is not None:
        comps = (counters[0].count(), counters[1].count())
    return table, comps


def _merge_parts(parts_g, parts_p, parts_c) -> ContingencyTable:
    if not parts_c:
        empty_u, empty_i = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return ContingencyTable(empty_u, empty_i, empty_u, empty_i, empty_i, empty_i, empty_i)
    all_g, all_p = np.concatenate(parts_g), np.concatenate(parts_p)
    all_c = np.concatenate(parts_c)
    gt_ids, gi = np.unique(all_g, return_inverse=True)
    pred_ids, pi = np.unique(all_p, return_inverse=True)
    key = gi.reshape(-1).astype(np.int64) * len(pred_ids) + pi.reshape(-1)
    uk, inv = np.unique(key, return_inverse=True)
    counts = np.zeros(len(uk), np.int64)
    np.add.at(counts, inv.reshape(-1), all_c)
    rows, cols = uk // len(pred_ids), uk % len(pred_ids)
    gt_sizes = np.zeros(len(gt_ids), np.int64)
    pred_sizes = np.zeros(len(pred_ids), np.int64)
    np.add.at(gt_sizes, rows, counts)
    np.add.at(pred_sizes, cols, counts)
    return ContingencyTable(gt_ids, gt_sizes, pred_ids, pred_sizes, rows, cols, counts)


# --------------------------------------------------------------------------
# Connected components, counted slab by slab
# --------------------------------------------------------------------------

class _ComponentCounter:
    """Count connected pieces of equal non-zero id over slabs fed in Z order.

    Each slab is labelled with :func:`skimage.measure.label`; pieces that touch
    across a slab border (same id, neighbours under ``connectivity``) are joined
    with a graph of border contacts. The result equals
    ``skimage.measure.label(whole, connectivity=connectivity, return_num=True)[1]``.
    """

    def __init__(self, ndim: int, connectivity: int):
        self.connectivity = connectivity
        # In-plane offsets reachable from the plane above in one step.
        self.offsets = [d for d in itertools.product((-1, 0, 1), repeat=ndim - 1)
                        if 1 + sum(abs(x) for x in d) <= connectivity]
        self.n = 0
        self.n_last = 0
        self.last_ids: Optional[np.ndarray] = None
        self.last_comp: Optional[np.ndarray] = None
        self.edges: List[np.ndarray] = []

    def feed(self, slab: np.ndarray) -> None:
        if slab.shape[0] == 0:
            return
        comp, n = sk_label(slab, background=0, connectivity=self.connectivity,
                           return_num=True)
        first_ids, first_comp = slab[0], comp[0]
        if self.last_ids is not None:
            # Pieces of the previous slab (local numbers 1..n_last) touching pieces
            # of this one (1..n): one dense count of contacts, small by construction.
            n_last = self.n_last
            size = (n_last + 1) * (n + 1)
            dense = size <= _DENSE_LIMIT
            contact = np.zeros(size, np.int64) if dense else None
            keys = []
            for d in self.offsets:
                src = tuple(slice(1, None) if x < 0 else slice(0, -1) if x > 0
                            else slice(None) for x in d)
                dst = tuple(slice(0, -1) if x < 0 else slice(1, None) if x > 0
                            else slice(None) for x in d)
                a_ids, b_ids = self.last_ids[src], first_ids[dst]
                touch = (a_ids == b_ids) & (a_ids != 0)
                if touch.any():
                    key = self.last_comp[src][touch] * (n + 1) + first_comp[dst][touch]
                    if dense:
                        contact += np.bincount(key, minlength=size)
                    else:
                        keys.append(np.unique(key))
            if dense:
                nz = np.flatnonzero(contact)
            else:
                nz = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
            if nz.size:
                a, b = nz // (n + 1), nz % (n + 1)
                # global node numbers: previous slab from self.n - n_last, this one from self.n
                self.edges.append(np.stack([a + self.n - n_last - 1, b + self.n - 1]))
        self.last_ids = np.array(slab[-1], copy=True)
        self.last_comp = np.array(comp[-1], dtype=np.int64, copy=True)
        self.n_last = int(n)
        self.n += int(n)

    def count(self) -> int:
        if not self.edges:
            return self.n
        e = np.concatenate(self.edges, axis=1)
        graph = sparse.coo_array((np.ones(e.shape[1], np.int8), (e[0], e[1])),
                                 shape=(self.n, self.n))
        n, _ = connected_components(graph, directed=False)
        return int(n)


def count_components(
    labels,
    *,
    connectivity: Optional[int] = None,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> int:
    """Number of connected pieces of equal non-zero id in a label stack (Z, Y, X).

    Same count as ``skimage.measure.label(labels, connectivity=connectivity,
    return_num=True)[1]`` (for a binary mask: its connected components), computed
    slab by slab along Z. connectivity: 1 (faces), 2 (+edges) or 3 (+corners,
    the 26-neighbourhood); None = full (``labels.ndim``), skimage's default.
    """
    shape = tuple(np.shape(labels))
    conn = _check_connectivity(connectivity, len(shape))
    counter = _ComponentCounter(len(shape), conn)
    for z0, z1 in _slabs(shape, chunk_voxels):
        counter.feed(_as_label_slab(labels[z0:z1], "label stack"))
    return counter.count()


def _check_connectivity(connectivity: Optional[int], ndim: int) -> int:
    if connectivity is None:
        return max(ndim, 1)
    if int(connectivity) != connectivity or not 1 <= connectivity <= max(ndim, 1):
        raise ConfigError(
            f"connectivity must be a whole number from 1 to {max(ndim, 1)} for "
            f"{ndim}-D stacks (1 = faces, 2 = +edges, 3 = +corners), got {connectivity}."
        )
    return int(connectivity)


# --------------------------------------------------------------------------
# Figures from the table
# --------------------------------------------------------------------------

def _ratio(num: float, den: float, empty: float = 1.0) -> float:
    """num / den, or ``empty`` when there is nothing to count (den == 0)."""
    return float(num) / float(den) if den else float(empty)


def confusion_matrix(table: ContingencyTable) -> Dict[str, int]:
    """Binary confusion matrix in voxels, "positive" = cell (id > 0).

    tn: background in both; fp: background in GT, cell in prediction;
    fn: cell in GT, background in prediction; tp: cell in both.
    """
    g_pos = table.gt_ids[table.rows] > 0
    p_pos = table.pred_ids[table.cols] > 0
    c = table.counts
    return {
        "tn": int(c[~g_pos & ~p_pos].sum()),
        "fp": int(c[~g_pos & p_pos].sum()),
        "fn": int(c[g_pos & ~p_pos].sum()),
        "tp": int(c[g_pos & p_pos].sum()),
    }


def adapted_rand(table: ContingencyTable) -> Tuple[float, float, float]:
    """Adapted Rand error, precision and recall (SNEMI3D), GT background ignored.

    Same error as :func:`skimage.metrics.adapted_rand_error` (``ignore_labels=(0,)``,
    ``alpha=0.5``): voxels that are 0 in the GT do not count; predicted background
    inside GT cells counts as one more predicted segment. Precision is the share
    of voxel pairs in one predicted cell that are also in one GT cell (merges
    lower it), recall the share of pairs in one GT cell that are also in one
    predicted cell (splits lower it). Note: scikit-image (<= 0.26) returns these
    two the other way round (scikit-image issue #6485); its error is the same.
    With no GT pairs at all the scores are 1 and the error 0.
    """
    keep = table.gt_ids[table.rows] > 0
    c = table.counts[keep].astype(np.float64)
    sum_p2 = c @ c - c.sum()
    a = table.gt_sizes[table.gt_ids > 0].astype(np.float64)
    b = np.bincount(table.cols[keep], weights=c, minlength=len(table.pred_ids))
    sum_a2 = a @ a - a.sum()
    sum_b2 = b @ b - b.sum()
    precision = _ratio(sum_p2, sum_b2)
    recall = _ratio(sum_p2, sum_a2)
    fscore = _ratio(sum_p2, 0.5 * sum_a2 + 0.5 * sum_b2)
    return 1.0 - fscore, precision, recall


def variation_of_information(table: ContingencyTable) -> Tuple[float, float]:
    """(split, merge) conditional entropies in bits, background included.

    split = H(pred | GT) (over-segmentation), merge = H(GT | pred)
    (under-segmentation); the same as :func:`skimage.metrics.variation_of_information`
    with its default ``ignore_labels=()``: background is one more segment in
    both stacks, so cells predicted as background (and vice versa) count.
    """
    n = table.n_voxels
    if n == 0:
        return 0.0, 0.0
    c = table.counts.astype(np.float64)
    split = -np.sum(c / n * np.log2(c / table.gt_sizes[table.rows]))
    merge = -np.sum(c / n * np.log2(c / table.pred_sizes[table.cols]))
    return max(0.0, float(split)), max(0.0, float(merge))


def pair_iou(table: ContingencyTable) -> np.ndarray:
    """IoU of every entry's (gt cell, pred cell) pair (0 where either is background)."""
    inter = table.counts.astype(np.float64)
    union = table.gt_sizes[table.rows] + table.pred_sizes[table.cols] - table.counts
    iou = inter / union
    iou[(table.gt_ids[table.rows] == 0) | (table.pred_ids[table.cols] == 0)] = 0.0
    return iou


def face_sliver_ids(gt: np.ndarray, voxel_size: Sequence[float], sliver_um3: float) -> np.ndarray:
    """Ids of the GT cells that touch a face of the stack with less than
    ``sliver_um3`` cubic micrometres inside it: caps of cells the stack's border
    cuts off, often 1-4 voxels thick (docs/accuracy.md). gt: ZYX labels;
    voxel_size: (z, y, x) in micrometres."""
    gt = np.asarray(gt)
    sizes = np.bincount(gt.ravel().astype(np.int64))
    at_face = np.zeros(len(sizes), bool)
    for axis in range(gt.ndim):
        for end in (0, -1):
            at_face[np.unique(np.take(gt, end, axis=axis)).astype(np.int64)] = True
    at_face[0] = False
    small = sizes * float(np.prod(voxel_size)) < sliver_um3
    return np.flatnonzero(at_face & small & (sizes > 0))


def match_cells(table: ContingencyTable, iou_threshold: float = 0.5) -> np.ndarray:
    """One-to-one matching of GT and predicted cells by IoU >= ``iou_threshold``.

    Returns the indices of the table entries that are matched pairs. Above 0.5
    each cell has at most one partner, so matching is unique; at or below 0.5
    conflicts are settled as Cellpose and StarDist do (scipy's
    linear_sum_assignment: most matches first, then highest total IoU), run on
    each connected group of candidate pairs separately.
    """
    _check_threshold(iou_threshold)
    iou = pair_iou(table)
    cand = np.flatnonzero(iou >= iou_threshold)
    if cand.size == 0:
        return cand
    r, c = table.rows[cand], table.cols[cand]
    if np.bincount(r).max() <= 1 and np.bincount(c).max() <= 1:
        return cand
    # Bipartite graph of candidates: nodes = rows, then cols.
    nr = len(table.gt_ids)
    graph = sparse.coo_array((np.ones(len(cand)), (r, c + nr)),
                             shape=(nr + len(table.pred_ids),) * 2)
    _, group = connected_components(graph, directed=False)
    keep = []
    order = np.argsort(group[r], kind="stable")
    bounds = np.flatnonzero(np.diff(group[r][order])) + 1
    for chunk in np.split(order, bounds):
        if len(chunk) == 1:
            keep.append(cand[chunk])
            continue
        ur, ri = np.unique(r[chunk], return_inverse=True)
        uc, ci = np.unique(c[chunk], return_inverse=True)
        scores = np.zeros((len(ur), len(uc)))
        scores[ri, ci] = iou[cand[chunk]]
        n_min = min(len(ur), len(uc))
        cost = -(scores >= iou_threshold).astype(float) - scores / (2 * n_min)
        ti, pj = linear_sum_assignment(cost)
        ok = scores[ti, pj] >= iou_threshold
        lookup = {(a, b): k for a, b, k in zip(ri, ci, cand[chunk])}
        keep.append(np.array([lookup[(a, b)] for a, b in zip(ti[ok], pj[ok])], np.int64))
    return np.sort(np.concatenate(keep))


def _check_threshold(iou_threshold: float) -> None:
    if not (0.0 < float(iou_threshold) <= 1.0):
        raise ConfigError(
            f"iou_threshold must be above 0 and at most 1 (0.5 is the usual), got {iou_threshold}."
        )


def cell_table(
    table: ContingencyTable,
    matched: np.ndarray,
    *,
    split_merge_fraction: float = 0.2,
) -> List[Dict[str, Any]]:
    """One row per GT cell, then one per unmatched predicted cell.

    GT rows: ``pred_id`` is the matched predicted cell, or else the predicted
    cell (id > 0) overlapping it most (0 if none); ``overlap`` voxels and ``iou``
    refer to that pair. A predicted cell *covers* a GT cell when it holds at
    least ``split_merge_fraction`` of the GT cell's voxels; ``n_covering`` counts
    them. ``split``: covered by two or more predicted cells. ``merged``: the
    predicted cell overlapping it most covers it and also covers another GT cell
    (that cell's voxels at least ``split_merge_fraction`` of it). ``status``:
    ``missed`` (not matched, no predicted cell covers it), else ``split_merged``,
    ``split`` or ``merged`` when flagged, else ``ok`` (matched) or ``low_iou``
    (covered, but IoU below the threshold). A flagged cell may still be matched.

    Predicted rows (``status`` = ``false_positive``): predicted cells matched to
    no GT cell, including extra pieces of split cells; here ``gt_id`` is the GT
    cell (id > 0) that overlaps it most (0 if none), for locating it.
    """
    f = float(split_merge_fraction)
    if not 0.0 < f <= 0.5:
        raise ConfigError(
            f"split_merge_fraction must be above 0 and at most 0.5, got {split_merge_fraction}."
        )
    gid, pid = table.pair_ids()
    iou = pair_iou(table)
    cells = (gid > 0) & (pid > 0)
    g_size = table.gt_sizes[table.rows]
    p_size = table.pred_sizes[table.cols]
    nr, nc = len(table.gt_ids), len(table.pred_ids)

    is_match = np.zeros(len(table.counts), bool)
    is_match[matched] = True
    row_matched = np.zeros(nr, bool)
    row_matched[table.rows[matched]] = True
    col_matched = np.zeros(nc, bool)
    col_matched[table.cols[matched]] = True

    covers = cells & (table.counts >= f * g_size)
    n_cover_row = np.bincount(table.rows[covers], minlength=nr)
    n_cover_col = np.bincount(table.cols[covers], minlength=nc)

    # Best partner of each row / col: matched first, then overlap, IoU, smaller id.
    def best(by_rows: bool) -> np.ndarray:
        own = table.rows if by_rows else table.cols
        other = pid if by_rows else gid
        idx = np.flatnonzero(cells)
        order = np.lexsort((other[idx], -iou[idx], -table.counts[idx],
                            ~is_match[idx], own[idx]))
        idx = idx[order]
        first = np.ones(len(idx), bool)
        first[1:] = own[idx][1:] != own[idx][:-1]
        out = np.full(nr if by_rows else nc, -1, np.int64)
        out[own[idx[first]]] = idx[first]
        return out

    best_row, best_col = best(True), best(False)
    rows_out: List[Dict[str, Any]] = []
    for i in np.flatnonzero(table.gt_ids > 0):
        k = best_row[i]
        split = bool(n_cover_row[i] >= 2)
        merged = bool(k >= 0 and covers[k] and n_cover_col[table.cols[k]] >= 2)
        if not row_matched[i] and n_cover_row[i] == 0:
            status = "missed"
        elif split and merged:
            status = "split_merged"
        elif split or merged:
            status = "split" if split else "merged"
        else:
            status = "ok" if row_matched[i] else "low_iou"
        rows_out.append({
            "gt_id": int(table.gt_ids[i]),
            "gt_size": int(table.gt_sizes[i]),
            "pred_id": int(pid[k]) if k >= 0 else 0,
            "pred_size": int(p_size[k]) if k >= 0 else 0,
            "overlap": int(table.counts[k]) if k >= 0 else 0,
            "iou": float(iou[k]) if k >= 0 else 0.0,
            "matched": bool(row_matched[i]),
            "n_covering": int(n_cover_row[i]),
            "split": split,
            "merged": merged,
            "status": status,
        })
    for j in np.flatnonzero((table.pred_ids > 0) & ~col_matched):
        k = best_col[j]
        rows_out.append({
            "gt_id": int(gid[k]) if k >= 0 else 0,
            "gt_size": int(g_size[k]) if k >= 0 else 0,
            "pred_id": int(table.pred_ids[j]),
            "pred_size": int(table.pred_sizes[j]),
            "overlap": int(table.counts[k]) if k >= 0 else 0,
            "iou": float(iou[k]) if k >= 0 else 0.0,
            "matched": False,
            "n_covering": 0,
            "split": False,
            "merged": False,
            "status": "false_positive",
        })
    return rows_out


# --------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------

def _threshold_suffix(t: float) -> str:
    return f"{t * 100:g}".replace(".", "_")


@dataclass
class EvaluationResult:
    """Every figure comparing one prediction with its ground truth.

    Voxel counts are in voxels; IoU, AP, F1, precision, recall in [0, 1];
    VOI in bits. See :meth:`to_dict` for the definition of each figure.
    """

    shape: Tuple[int, ...]
    iou_threshold: float
    connectivity: int
    split_merge_fraction: float
    confusion: Dict[str, int]
    background_iou: float
    cell_iou: float
    n_gt_cells: int
    n_pred_cells: int
    n_gt_components: Optional[int]
    n_pred_components: Optional[int]
    adapted_rand_error: float
    rand_precision: float
    rand_recall: float
    voi_split: float
    voi_merge: float
    n_matched: int
    ap: float
    f1: float
    precision: float
    recall: float
    mean_matched_iou: float
    cells: List[Dict[str, Any]] = field(repr=False, default_factory=list)
    table: Optional[ContingencyTable] = field(repr=False, default=None)

    @property
    def wrong_cells(self) -> int:
        return abs(self.n_gt_cells - self.n_pred_cells)

    @property
    def wrong_components(self) -> Optional[int]:
        if self.n_gt_components is None or self.n_pred_components is None:
            return None
        return abs(self.n_gt_components - self.n_pred_components)

    @property
    def n_split(self) -> int:
        return sum(1 for c in self.cells if c["split"])

    @property
    def n_merged(self) -> int:
        return sum(1 for c in self.cells if c["merged"])

    @property
    def n_missed(self) -> int:
        return sum(1 for c in self.cells if c["status"] == "missed")

    @property
    def n_false_positive(self) -> int:
        return self.n_pred_cells - self.n_matched

    def to_dict(self, *, include_cells: bool = False) -> Dict[str, Any]:
        """Plain JSON-ready figures.

        Keys (voxel counts in voxels; "cell" = id > 0; "GT" = ground truth):

        - ``shape``: (Z, Y, X) of both stacks; ``n_voxels``.
        - ``confusion_matrix``: {tn, fp, fn, tp} voxels, positive = cell.
        - ``background_iou`` = tn / (tn + fp + fn); ``cell_iou`` = tp / (tp + fp + fn)
          (the thesis' two class IoUs; 1 when the class is absent from both).
        - ``n_gt_cells``, ``n_pred_cells``: distinct ids > 0; ``wrong_cells`` =
          |n_gt_cells - n_pred_cells|.
        - ``n_gt_components``, ``n_pred_components``: connected pieces of equal
          id > 0 (``connectivity``); ``wrong_components`` = their absolute
          difference: the thesis' wrongCells for binary predictions. Sum either
          over test volumes to get the thesis' total. All three are null when
          evaluated with ``components=False``.
        - ``adapted_rand_error``, ``rand_precision``, ``rand_recall``: SNEMI3D
          adapted Rand, GT background ignored (see :func:`adapted_rand`).
        - ``voi_split`` = H(pred|GT), ``voi_merge`` = H(GT|pred), ``voi`` = their
          sum, in bits, background included (see :func:`variation_of_information`).
        - ``ap50`` = TP / (TP + FP + FN), ``precision_50`` = TP / n_pred_cells,
          ``recall_50`` = TP / n_gt_cells, ``f1_50`` = 2TP / (2TP + FP + FN), with TP
          = ``n_matched`` cells paired one-to-one at IoU >= ``iou_threshold``; the
          suffix is the threshold in percent (``ap75`` at 0.75). Each is 1 when
          both stacks have no cells, 0 when only one has none.
        - ``mean_matched_iou``: mean IoU of the matched pairs (0 if none).
        - ``n_split``, ``n_merged``, ``n_missed``: GT cells flagged so in the per-cell
          table (``split_merge_fraction``); ``n_false_positive`` = predicted cells
          matched to none (FP).
        - ``cells`` (only with ``include_cells``): the per-cell table.
        """
        s = _threshold_suffix(self.iou_threshold)
        out: Dict[str, Any] = {
            "shape": [int(x) for x in self.shape],
            "n_voxels": int(np.prod(self.shape, dtype=np.int64)),
            "iou_threshold": float(self.iou_threshold),
            "connectivity": int(self.connectivity),
            "split_merge_fraction": float(self.split_merge_fraction),
            "background_iou": self.background_iou,
            "cell_iou": self.cell_iou,
            "confusion_matrix": dict(self.confusion),
            "n_gt_cells": self.n_gt_cells,
            "n_pred_cells": self.n_pred_cells,
            "wrong_cells": self.wrong_cells,
            "n_gt_components": self.n_gt_components,
            "n_pred_components": self.n_pred_components,
            "wrong_components": self.wrong_components,
            "adapted_rand_error": self.adapted_rand_error,
            "rand_precision": self.rand_precision,
            "rand_recall": self.rand_recall,
            "voi_split": self.voi_split,
            "voi_merge": self.voi_merge,
            "voi": self.voi_split + self.voi_merge,
            f"ap{s}": self.ap,
            f"f1_{s}": self.f1,
            f"precision_{s}": self.precision,
            f"recall_{s}": self.recall,
            "mean_matched_iou": self.mean_matched_iou,
            "n_matched": self.n_matched,
            "n_split": self.n_split,
            "n_merged": self.n_merged,
            "n_missed": self.n_missed,
            "n_false_positive": self.n_false_positive,
        }
        if include_cells:
            out["cells"] = [dict(c) for c in self.cells]
        return out


def evaluate(
    gt,
    pred,
    *,
    iou_threshold: float = 0.5,
    connectivity: Optional[int] = None,
    split_merge_fraction: float = 0.2,
    components: bool = True,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    names: Tuple[str, str] = ("ground truth", "prediction"),
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
) -> EvaluationResult:
    """Compare a predicted label stack with the ground truth.

    gt, pred: label stacks (Z, Y, X) of equal shape, 0 = background, any
        non-negative ids (need not be consecutive or correspond). NumPy arrays,
        or lazily Z-sliced arrays (np.memmap, h5py.Dataset).
    iou_threshold: IoU a (GT, predicted) pair needs to count as matched (0, 1].
    connectivity: neighbourhood for ``*_components``: 1, 2 or 3 (3D: 6-, 18-,
        26-neighbourhood); None = full (26 in 3D), skimage.measure.label's default.
    split_merge_fraction: share of a GT cell a predicted cell must hold to
        "cover" it, for the split / merged flags of the per-cell table (0, 0.5].
    components: count connected pieces (``*_components``); about nine tenths of
        the run time on large stacks, so False skips them (figures None).
    chunk_voxels: voxels per Z slab; memory beyond the inputs is a few slabs.
    names: how to call the two stacks in error messages (e.g. their files).
    progress, cancel: see :mod:`core.jobs` (stage "evaluate", one step per slab).

    Raises VolumeDataError (shapes differ, values are not labels) and
    ConfigError (a parameter out of range).
    """
    shape = _check_pair(gt, pred, names)
    _check_threshold(iou_threshold)
    conn = _check_connectivity(connectivity, len(shape))
    if not 0.0 < float(split_merge_fraction) <= 0.5:
        raise ConfigError(
            f"split_merge_fraction must be above 0 and at most 0.5, got {split_merge_fraction}."
        )
    table, comps = _scan(gt, pred, chunk_voxels=chunk_voxels, names=names,
                         connectivity=conn if components else None,
                         progress=progress, cancel=cancel)
    if comps is None:
        comps = (None, None)
    cm = confusion_matrix(table)
    are, rp, rr = adapted_rand(table)
    vs, vm = variation_of_information(table)
    matched = match_cells(table, iou_threshold)
    cells = cell_table(table, matched, split_merge_fraction=split_merge_fraction)

    n_gt = int(np.count_nonzero(table.gt_ids > 0))
    n_pred = int(np.count_nonzero(table.pred_ids > 0))
    tp = len(matched)
    fp, fn = n_pred - tp, n_gt - tp
    empty = 1.0 if n_gt == 0 and n_pred == 0 else 0.0
    ious = pair_iou(table)[matched]
    return EvaluationResult(
        shape=shape,
        iou_threshold=float(iou_threshold),
        connectivity=conn,
        split_merge_fraction=float(split_merge_fraction),
        confusion=cm,
        background_iou=_ratio(cm["tn"], cm["tn"] + cm["fp"] + cm["fn"]),
        cell_iou=_ratio(cm["tp"], cm["tp"] + cm["fp"] + cm["fn"]),
        n_gt_cells=n_gt,
        n_pred_cells=n_pred,
        n_gt_components=comps[0],
        n_pred_components=comps[1],
        adapted_rand_error=are,
        rand_precision=rp,
        rand_recall=rr,
        voi_split=vs,
        voi_merge=vm,
        n_matched=tp,
        ap=_ratio(tp, tp + fp + fn, empty),
        f1=_ratio(2 * tp, 2 * tp + fp + fn, empty),
        precision=_ratio(tp, tp + fp, empty),
        recall=_ratio(tp, tp + fn, empty),
        mean_matched_iou=float(ious.mean()) if tp else 0.0,
        cells=cells,
        table=table,
    )
