"""Per-cell quality flags from the prediction alone (no ground truth needed).

A biologist should check the few cells most likely to be wrong instead of all
of them. Each cell of a label stack (ZYX, 0 = background) gets four pieces of
evidence from the network's probabilities and from its shape:

* ``inner_boundary``: mean boundary probability over the cell's inside (voxels
  farther than ``inner_margin_um`` from its surface): a wall runs through the
  cell, so it is probably two cells merged;
* ``inner_gap``: mean (1 - cell probability) over the same inside (the
  network sees a gap where there should be cell);
* ``weakest_wall``: the lowest mean boundary probability over the walls the
  cell shares with each neighbour: a wall the network does not see is
  probably a cut through one cell (a split); ``weakest_neighbour`` names it;
* ``size_deviation``: distance of log volume from the stack's median.

Each is turned into a robust z-score within the stack (median and MAD), and
``score`` is their sum (missing evidence counts 0): higher is more suspicious.
``reason`` names the largest contribution. Rows are sorted by score, most
suspicious first, and written as CSV beside the labels
(``benchmarks/quality.py`` measures how many truly wrong cells are in the top
ranks).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from core.errors import VolumeDataError
from core.io.atomic import atomic_path
from core.metrics import contingency_table, face_sliver_ids
from core import segment
from core.scratch import release_pages
from core.segment import _Prob
from core.volume import label_counts

#: Columns of the CSV written by :func:`write_flags_csv`, in order.
COLUMNS = ("rank", "cell_id", "score", "reason", "z", "y", "x", "volume_um3",
           "inner_boundary", "inner_gap", "weakest_wall", "weakest_neighbour",
           "size_deviation", "touches_border")

REASONS = {
    "inner_boundary": "merged? (a wall inside)",
    "inner_gap": "merged? (a gap inside)",
    "weakest_wall": "split? (a weak wall with cell {nb})",
    "size_deviation": "unusually {size}",
}


@dataclass
class FlagParams:
    """inner_margin_um: voxels closer than this to a cell's surface are not its inside."""

    inner_margin_um: float = 0.6


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 MAD) over the finite values; NaN -> 0."""
    out = np.zeros(len(values))
    ok = np.isfinite(values)
    if not ok.any():
        return out
    v = values[ok]
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * 1.4826
    scale = mad if mad > 1e-9 else (float(v.std()) or 1.0)
    out[ok] = (v - med) / scale
    return out


def cell_flags(
    labels: np.ndarray,
    boundary_prob: Optional[np.ndarray] = None,
    cell_prob: Optional[np.ndarray] = None,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    params: FlagParams = FlagParams(),
) -> List[Dict[str, Any]]:
    """Score every cell of ``labels`` (ZYX) by how likely it is to be wrong.

    boundary_prob, cell_prob: the network's probabilities (ZYX, [0, 1] or
    uint8 0..255), or None (that evidence is then left out).
    voxel_size: (z, y, x) in micrometres.
    Returns one dict per cell (keys :data:`COLUMNS`), most suspicious first.
    """
    if np.ndim(labels) != 3:
        raise VolumeDataError(f"cell_flags needs a 3D (Z, Y, X) label stack, got shape {np.shape(labels)}.")
    for name, prob in (("boundary", boundary_prob), ("cell", cell_prob)):
        if prob is not None and np.shape(prob) != np.shape(labels):
            raise VolumeDataError(f"{name} probability {np.shape(prob)} and labels "
                                  f"{np.shape(labels)} must have the same shape.")
    n = len(label_counts(labels)) - 1 if np.size(labels) else 0
    if n == 0:
        return []
    bp = None if boundary_prob is None else _Prob(boundary_prob, "boundary probability")
    cp = None if cell_prob is None else _Prob(cell_prob, "cell probability")
    acc = _accumulate(labels, bp, cp, n, voxel_size, params.inner_margin_um)
    counts = acc["count"]
    ids = np.flatnonzero(counts[1:]) + 1
    volume = counts * float(np.prod(voxel_size))
    logv = np.log(volume[ids])
    med_logv = float(np.median(logv))

    evidence: Dict[str, np.ndarray] = {}  # raw values per cell, aligned with ids
    evidence["size_deviation"] = np.abs(logv - med_logv)
    n_inner = acc["n_inner"]
    with np.errstate(invalid="ignore", divide="ignore"):
        if bp is not None:
            evidence["inner_boundary"] = np.where(n_inner > 0, acc["inner_bp"] / n_inner, np.nan)[ids]
            weakest, weakest_nb = _weakest(acc["walls"], n)
            evidence["weakest_wall"] = weakest[ids]
        if cp is not None:
            evidence["inner_gap"] = np.where(n_inner > 0, acc["inner_gap"] / n_inner, np.nan)[ids]
    centres = acc["centre_sum"][ids] / counts[ids, None]
    border = acc["border"]

    # robust z-scores; a weak wall is suspicious, so its sign is flipped
    z = {k: _robust_z(-v if k == "weakest_wall" else v) for k, v in evidence.items()}
    contrib = {k: np.maximum(v, 0.0) for k, v in z.items()}
    score = sum(contrib.values())
    rows = []
    for j, (i, c) in enumerate(zip(ids, centres)):
        top = max(contrib, key=lambda k: contrib[k][j])
        reason = ""
        if contrib[top][j] > 0:
            reason = REASONS[top].format(
                nb=int(weakest_nb[i]) if "weakest_wall" in evidence else 0,
                size="large" if logv[j] > med_logv else "small")
        value = lambda k: (None if k not in evidence or not np.isfinite(evidence[k][j])  # noqa: E731
                           else round(float(evidence[k][j]), 4))
        rows.append({
            "cell_id": int(i), "score": round(float(score[j]), 3), "reason": reason,
            "z": round(float(c[0]), 1), "y": round(float(c[1]), 1), "x": round(float(c[2]), 1),
            "volume_um3": round(float(volume[i]), 2),
            "inner_boundary": value("inner_boundary"), "inner_gap": value("inner_gap"),
            "weakest_wall": value("weakest_wall"),
            "weakest_neighbour": int(weakest_nb[i]) if "weakest_wall" in evidence else 0,
            "size_deviation": value("size_deviation"),
            "touches_border": bool(border[i]),
        })
    rows.sort(key=lambda r: (-r["score"], r["cell_id"]))
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    return rows


def _accumulate(labels, bp, cp, n, voxel_size, margin_um) -> Dict[str, Any]:
    """Per-cell sums over Z slabs (memory bounded by a slab, not the stack)."""

    shape = labels.shape
    plane = shape[1] * shape[2]
    step = max(1, segment.SLAB_VOXELS // max(1, plane))
    halo = int(np.ceil(margin_um / float(voxel_size[0]))) + 1
    acc: Dict[str, Any] = {
        "count": np.zeros(n + 1), "n_inner": np.zeros(n + 1), "inner_bp": np.zeros(n + 1),
        "inner_gap": np.zeros(n + 1), "centre_sum": np.zeros((n + 1, 3)),
        "border": np.zeros(n + 1, bool), "walls": [],
    }
    grid_y, grid_x = np.indices(shape[1:], dtype=np.float64)
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        a, b = max(0, z0 - halo), min(shape[0], z1 + halo)
        block = np.asarray(labels[a:b]).astype(np.int64)
        core = block[z0 - a: z1 - a]
        acc["count"] += np.bincount(core.ravel(), minlength=n + 1)
        zs = np.arange(z0, z1, dtype=np.float64)
        for axis, weights in ((0, np.broadcast_to(zs[:, None, None], core.shape)),
                              (1, np.broadcast_to(grid_y, core.shape)),
                              (2, np.broadcast_to(grid_x, core.shape))):
            acc["centre_sum"][:, axis] += np.bincount(core.ravel(), weights=weights.ravel(),
                                                      minlength=n + 1)
        inner = _inside(block, voxel_size, margin_um)[z0 - a: z1 - a]
        inner_ids = core[inner]
        acc["n_inner"] += np.bincount(inner_ids, minlength=n + 1)
        index = np.s_[z0:z1]
        if bp is not None:
            acc["inner_bp"] += np.bincount(inner_ids, weights=bp.f32(index)[inner], minlength=n + 1)
            # walls: y and x pairs inside [z0, z1); z pairs from z0 to min(z1 + 1, Z)
            zb = min(z1 + 1, shape[0])
            acc["walls"].append(_wall_sums(np.asarray(labels[z0:zb]).astype(np.int64),
                                           bp.f32(np.s_[z0:zb]), n, axes=(0,)))
            acc["walls"].append(_wall_sums(core, bp.f32(index), n, axes=(1, 2)))
        if cp is not None:
            acc["inner_gap"] += np.bincount(inner_ids, weights=1.0 - cp.f32(index)[inner],
                                            minlength=n + 1)
        for axis in (1, 2):
            for end in (0, -1):
                acc["border"][np.unique(np.take(core, end, axis=axis))] = True
        for prob in (bp, cp):
            if prob is not None:
                prob.release()
        release_pages(labels)  # a memory-mapped label stack (core.scratch)
        if z0 == 0:
            acc["border"][np.unique(core[0])] = True
        if z1 == shape[0]:
            acc["border"][np.unique(core[-1])] = True
    acc["border"][0] = False
    return acc


def _inside(lab: np.ndarray, voxel_size: Sequence[float], margin_um: float) -> np.ndarray:
    """Cell voxels farther than ``margin_um`` from any voxel of another id (or background)."""
    surface = np.zeros(lab.shape, bool)
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        diff = lab[tuple(a)] != lab[tuple(b)]
        surface[tuple(a)] |= diff
        surface[tuple(b)] |= diff
    # an erosion by the ellipsoid of margin_um: the same voxels as "distance to the surface
    # > margin_um", an order of magnitude faster than a distance transform on large slabs
    footprint = segment.ball_um(margin_um, voxel_size)
    inner = ~surface if footprint is None else ndi.binary_erosion(~surface, structure=footprint,
                                                                  border_value=1)
    return inner & (lab > 0)


def _wall_sums(lab: np.ndarray, bp: np.ndarray, n: int, axes: Sequence[int]):
    """(pair keys, summed boundary probability, voxel pairs) of the walls between cells."""
    keys, sums = [], []
    for axis in axes:
        if lab.shape[axis] < 2:
            continue
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        la, lb = lab[tuple(a)], lab[tuple(b)]
        wall = (la != lb) & (la > 0) & (lb > 0)
        lo = np.minimum(la[wall], lb[wall])
        hi = np.maximum(la[wall], lb[wall])
        keys.append(lo * (n + 1) + hi)
        sums.append(0.5 * (bp[tuple(a)][wall] + bp[tuple(b)][wall]))
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    key = np.concatenate(keys)
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq, np.bincount(inv, weights=np.concatenate(sums)), np.bincount(inv).astype(float)


def _weakest(walls, n: int):
    """Per cell: lowest mean boundary probability over its walls, and that neighbour."""
    weakest = np.full(n + 1, np.nan)
    neighbour = np.zeros(n + 1, np.int64)
    walls = [w for w in walls if len(w[0])]
    if not walls:
        return weakest, neighbour
    key = np.concatenate([w[0] for w in walls])
    uniq, inv = np.unique(key, return_inverse=True)
    mean = (np.bincount(inv, weights=np.concatenate([w[1] for w in walls]))
            / np.bincount(inv, weights=np.concatenate([w[2] for w in walls])))
    lo, hi = uniq // (n + 1), uniq % (n + 1)
    order = np.argsort(-mean)  # later writes (weaker walls) win
    for cell, other in ((lo, hi), (hi, lo)):
        weakest[cell[order]] = mean[order]
        neighbour[cell[order]] = other[order]
    return weakest, neighbour


def write_flags_csv(path: Path, rows: List[Dict[str, Any]]) -> Path:
    """Write the ranked flags (:func:`cell_flags`) as CSV, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return path


def wrong_predicted_cells(cells: List[Dict[str, Any]]) -> set:
    """Predicted ids that are wrong, from :attr:`core.metrics.EvaluationResult.cells`.

    A predicted cell is wrong when it matches no GT cell at IoU >= the threshold
    (false positives, extra pieces of split cells) or when it covers a merged,
    split or poorly overlapped GT cell.
    """
    wrong = set()
    for c in cells:
        if c.get("status") == "false_positive" and c.get("pred_id"):
            wrong.add(int(c["pred_id"]))
        elif c.get("status") in ("merged", "split", "split_merged", "low_iou") and c.get("pred_id"):
            wrong.add(int(c["pred_id"]))
    return wrong


def face_sliver_merges(gt: np.ndarray, labels: np.ndarray, wrong: set, *,
                       voxel_size: Sequence[float] = (1.0, 1.0, 1.0), sliver_um3: float = 150.0,
                       split_merge_fraction: float = 0.2, table=None) -> set:
    """The wrong predicted cells whose only fault is a sliver cut off by the stack's faces.

    gt, labels: ZYX label stacks (0 = background); voxel_size in micrometres;
    ``table``: their contingency table when already made (``evaluate(...).table``).
    Such a cell matches the GT cell it overlaps most (IoU >= 0.5), no other
    predicted cell holds ``split_merge_fraction`` of that GT cell, and the
    other GT cells it covers (that fraction of their voxels) are all face
    slivers (:func:`core.metrics.face_sliver_ids`, under ``sliver_um3``),
    which the network sees as wall (docs/accuracy.md, step 12). Returns a
    subset of ``wrong`` (:func:`wrong_predicted_cells`).
    """
    if not wrong:
        return set()
    if table is None:
        table = contingency_table(gt, labels)
    gid, pid = (a.astype(np.int64) for a in table.pair_ids())
    g_size = np.zeros(int(table.gt_ids.max()) + 1, np.int64)
    g_size[table.gt_ids.astype(np.int64)] = table.gt_sizes
    p_size = np.zeros(int(table.pred_ids.max()) + 1, np.int64)
    p_size[table.pred_ids.astype(np.int64)] = table.pred_sizes
    slivers = set(face_sliver_ids(gt, voxel_size, sliver_um3).tolist())
    out = set()
    for p in wrong:
        sel = (pid == p) & (gid > 0)
        g, c = gid[sel], table.counts[sel]
        if len(g) < 2:
            continue
        main = int(np.argmax(c))
        own = int(g[main])
        iou = c[main] / (g_size[own] + p_size[p] - c[main])
        rivals = (gid == own) & (pid > 0) & (pid != p)
        covered = [int(x) for k, (x, n) in enumerate(zip(g, c))
                   if k != main and n >= split_merge_fraction * g_size[x]]
        if (iou >= 0.5 and covered and set(covered) <= slivers
                and not np.any(table.counts[rivals] >= split_merge_fraction * g_size[own])):
            out.add(int(p))
    return out


def first_rows(n_rows: int, share: float) -> int:
    """How many rows ``share`` of a flags CSV of ``n_rows`` rows is (at least one)."""
    return max(1, int(round(share * n_rows)))


def flag_precision(rows: List[Dict[str, Any]], wrong: set, ks: Sequence[int],
                   face_slivers: Optional[set] = None,
                   shares: Sequence[float] = (0.1, 0.2)) -> Dict[str, float]:
    """Precision of the top-k flags against the truly wrong cells, for each k,
    and the share of wrong cells found in the top ``len(wrong)`` ranks and in
    the first rows a biologist would check (each of ``shares`` of all rows).

    Keys: ``precision_top{k}``, ``recall_top_n_wrong``, ``recall_top{p}pct``
    (p = 100 x share; the first :func:`first_rows` rows), ``base_rate``.
    face_slivers: the wrong cells whose only fault is a face sliver
    (:func:`face_sliver_merges`); given, ``recall_top_n_other`` is the share of
    the other wrong cells found in the top *m* ranks (*m* = their number) and
    ``recall_top{p}pct_other`` their share in the first rows (the sliver cells
    stay in the ranking, counted as not wrong).
    """
    ranked = [r["cell_id"] for r in rows]
    out: Dict[str, float] = {"n_cells": len(ranked), "n_wrong": len(wrong)}
    for k in ks:
        top = ranked[:k]
        out[f"precision_top{k}"] = (sum(c in wrong for c in top) / len(top)) if top else float("nan")

    def recall(found: set, k: int) -> float:
        return sum(c in found for c in ranked[:k]) / len(found) if found else float("nan")

    out["recall_top_n_wrong"] = recall(set(wrong), len(wrong))
    other = None if face_slivers is None else set(wrong) - set(face_slivers)
    for share in shares:
        k = first_rows(len(ranked), share)
        name = f"recall_top{int(round(100 * share))}pct"
        out[name] = recall(set(wrong), k)
        if other is not None:
            out[name + "_other"] = recall(other, k)
    out["base_rate"] = len(wrong) / len(ranked) if ranked else float("nan")
    if other is not None:
        out["n_face_sliver"] = len(set(wrong) & set(face_slivers))
        out["recall_top_n_other"] = recall(other, len(other))
    return out
