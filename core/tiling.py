"""The tile grid and the blending weights of sliding-window prediction.

Axes are ZYX; sizes are in voxels. A :class:`TileGrid` covers a volume with
overlapping tiles whose starts are multiples of the network's total pooling
(the ``divisor``), so every tile sees the same pooling grid as a whole-volume
pass would. The covered extent is the volume rounded up to the divisor; the
few voxels past the end are filled by reflection and cropped afterwards.

Blending weights are separable: tile ``(i, j, k)`` weighs voxel ``(z, y, x)`` by
``wz_i(z) * wy_j(y) * wx_k(x)``. Because the grid is a product of three 1D
grids, the sum of the weights of all tiles at a voxel is the product of three
1D sums (:meth:`TileGrid.normaliser`): blending is an exact weighted average
without a weight volume in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np

from core.errors import ConfigError

Triple = Tuple[int, int, int]
OverlapSpec = Union[float, int, Sequence[Union[float, int]]]

#: Gaussian sigma as a fraction of the tile size (nnU-Net and MONAI use 1/8).
SIGMA_SCALE = 0.125
#: Smallest 1D weight relative to the centre, so tile borders still count a little.
MIN_WEIGHT = 1e-3


def ceil_to(n: int, d: int) -> int:
    """Smallest multiple of ``d`` that is >= ``n``."""
    return -(-n // d) * d


def _per_axis(value, what: str) -> Tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ConfigError(f"{what} {tuple(value)!r} should have three values (z, y, x).")
        return tuple(value)
    return (value, value, value)


def overlap_voxels(overlap: OverlapSpec, tile_shape: Sequence[int]) -> Triple:
    """Overlap per axis in voxels: a float in [0, 1) is a fraction of the tile, an int voxels."""
    out = []
    for o, t in zip(_per_axis(overlap, "Overlap"), tile_shape):
        if isinstance(o, bool) or not isinstance(o, (int, float, np.integer, np.floating)) or o < 0:
            raise ConfigError(
                f"Overlap {overlap!r} should be a fraction in [0, 1) of the tile or a number of voxels >= 0."
            )
        v = int(round(o * t)) if isinstance(o, (float, np.floating)) and o < 1 else int(o)
        if v >= t:
            raise ConfigError(
                f"Overlap {overlap!r} ({v} voxels) must be smaller than the tile ({t} voxels); "
                "use a fraction below 1 or fewer voxels."
            )
        out.append(v)
    return tuple(out)  # type: ignore[return-value]


def axis_starts(length: int, tile: int, overlap: int, divisor: int = 1) -> Tuple[np.ndarray, int, int]:
    """Tile starts along one axis.

    Returns ``(starts, tile, padded_length)``: the tile is shrunk to the padded
    length when the volume is smaller; starts are multiples of ``divisor``, the
    first is 0, the last ends at ``padded_length`` (``length`` rounded up to the
    divisor) and neighbours overlap by at least ``overlap`` voxels.
    """
    if length < 1:
        raise ConfigError(f"Cannot tile an axis of length {length}.")
    d = int(divisor)
    padded = ceil_to(length, d)
    tile = max(d, (int(tile) // d) * d)
    tile = min(tile, padded)
    if tile == padded:
        return np.zeros(1, dtype=np.int64), tile, padded
    step_units = max(1, (tile - int(overlap)) // d)
    units = (padded - tile) // d
    n = -(-units // step_units) + 1
    i = np.arange(n, dtype=np.int64)
    # round half up in integers: neighbouring starts differ by at most step_units
    starts = (2 * i * units + (n - 1)) // (2 * (n - 1)) * d
    return starts, tile, padded


def gaussian_1d(size: int, sigma_scale: float = SIGMA_SCALE, min_weight: float = MIN_WEIGHT) -> np.ndarray:
    """Gaussian weights over ``size`` voxels, 1 at the centre, at least ``min_weight``."""
    c = (size - 1) / 2.0
    sigma = max(size * sigma_scale, 1e-6)
    g = np.exp(-0.5 * ((np.arange(size) - c) / sigma) ** 2)
    return np.maximum(g / g.max(), min_weight).astype(np.float64)


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles over a ZYX volume.

    shape: volume shape (Z, Y, X); padded_shape: covered extent (multiples of
    the divisor); tile_shape: tile size; starts: per axis the tile starts;
    halo: voxels at each tile face *inside the volume* that get zero weight
    (outputs there see the tile's zero padding); blend: "gaussian" or "constant".
    """

    shape: Triple
    padded_shape: Triple
    tile_shape: Triple
    starts: Tuple[np.ndarray, np.ndarray, np.ndarray]
    halo: Triple = (0, 0, 0)
    blend: str = "gaussian"

    @property
    def n_tiles(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def tiles(self) -> Iterator[Tuple[int, int, int]]:
        """Tile starts (z, y, x) in Z-major order (all tiles of one Z row together)."""
        for z in self.starts[0]:
            for y in self.starts[1]:
                for x in self.starts[2]:
                    yield int(z), int(y), int(x)

    def axis_weights(self, axis: int) -> List[np.ndarray]:
        """1D weights of each tile along ``axis`` (one array per start)."""
        t = self.tile_shape[axis]
        base = gaussian_1d(t) if self.blend == "gaussian" else np.ones(t)
        n = len(self.starts[axis])
        h = self.halo[axis]
        out = []
        for i in range(n):
            w = base.copy()
            if h:
                if i > 0:
                    w[:h] = 0.0
                if i < n - 1:
                    w[t - h:] = 0.0
            out.append(w)
        return out

    def normaliser(self, axis: int) -> np.ndarray:
        """Sum over tiles of the 1D weights along ``axis`` (length: padded extent)."""
        s = np.zeros(self.padded_shape[axis])
        t = self.tile_shape[axis]
        for start, w in zip(self.starts[axis], self.axis_weights(axis)):
            s[start:start + t] += w
        return s

    def computed_voxels(self) -> int:
        """Voxels the network processes in all (measures the overlap overhead)."""
        return self.n_tiles * int(np.prod(self.tile_shape))


def make_grid(
    shape: Sequence[int],
    tile_shape: Sequence[int],
    overlap: OverlapSpec = 0.125,
    divisor: Sequence[int] = (1, 1, 1),
    *,
    halo: Union[int, Sequence[int]] = 0,
    blend: str = "gaussian",
) -> TileGrid:
    """Tile grid for a volume of ``shape`` (Z, Y, X).

    tile_shape: requested tile (rounded down to the divisor, shrunk to the volume).
    overlap: fraction of the tile (float < 1) or voxels (int), per axis or one for all.
    divisor: the network's total pooling per axis; starts and sizes are multiples of it.
    halo: voxels at inner tile faces that get no weight; needs overlap >= 2 * halo.
    blend: "gaussian" (smooth, no seams) or "constant" (plain average).
    """
    if len(shape) != 3 or len(tile_shape) != 3 or len(divisor) != 3:
        raise ConfigError(f"Shape {tuple(shape)}, tile {tuple(tile_shape)} and divisor must be (z, y, x).")
    if blend not in ("gaussian", "constant"):
        raise ConfigError(f"Blending {blend!r} is unknown: use 'gaussian' or 'constant'.")
    if any(int(t) < 1 for t in tile_shape):
        raise ConfigError(f"Tile shape {tuple(tile_shape)} must be positive.")
    halo_t = tuple(int(h) for h in _per_axis(halo, "Halo"))
    div = [int(d) for d in divisor]
    t_req = [max(d, (int(t) // d) * d) for t, d in zip(tile_shape, div)]
    ov = overlap_voxels(overlap, t_req)
    starts, tiles, padded, eff_halo = [], [], [], []
    for ax in range(3):
        s, t, p = axis_starts(int(shape[ax]), t_req[ax], ov[ax], div[ax])
        h = halo_t[ax] if len(s) > 1 else 0
        if h < 0 or (h and 2 * h > ov[ax]):
            raise ConfigError(
                f"Halo {halo_t[ax]} voxels on axis {'ZYX'[ax]} needs an overlap of at least "
                f"{2 * halo_t[ax]} voxels there, got {ov[ax]}; raise the overlap or lower the halo."
            )
        starts.append(s)
        tiles.append(t)
        padded.append(p)
        eff_halo.append(h)
    return TileGrid(
        shape=tuple(int(v) for v in shape),  # type: ignore[arg-type]
        padded_shape=tuple(padded),  # type: ignore[arg-type]
        tile_shape=tuple(tiles),  # type: ignore[arg-type]
        starts=tuple(starts),  # type: ignore[arg-type]
        halo=tuple(eff_halo),  # type: ignore[arg-type]
        blend=blend,
    )


def _balanced_shape(padded: Sequence[int], div: Sequence[int], max_voxels: int) -> List[float]:
    """Side lengths with product ``max_voxels``, proportional to the divisor (so tiles are
    roughly cubic in pooled units), no larger than the padded volume; the budget left by
    a short axis goes to the others."""
    sides = [0.0, 0.0, 0.0]
    free = [0, 1, 2]
    budget = float(max_voxels)
    while free:
        unit = (budget / np.prod([div[a] for a in free])) ** (1.0 / len(free))
        capped = [a for a in free if unit * div[a] >= padded[a]]
        if not capped:
            for a in free:
                sides[a] = unit * div[a]
            break
        for a in capped:
            sides[a] = float(padded[a])
            budget /= padded[a]
            free.remove(a)
    return sides


def auto_tile_shape(
    shape: Sequence[int],
    divisor: Sequence[int],
    *,
    max_voxels: int,
    overlap: OverlapSpec = 0.125,
    spread: Tuple[float, float] = (0.5, 1.6),
) -> Triple:
    """A tile shape within ``max_voxels`` that is chunky and wastes little on overlap.

    Starts from a tile roughly cubic in pooled units (sides proportional to the
    divisor, shrunk to the volume where it is smaller), then tries all sides
    (multiples of the divisor) within ``spread`` times that start and keeps the
    one with the fewest voxels processed in all (tiles x tile volume), ties going
    to fewer tiles. Thin tiles are never chosen: their borders, where the
    network sees zero padding, would be a large part of them.
    """
    div = [int(d) for d in divisor]
    padded = [ceil_to(int(s), d) for s, d in zip(shape, div)]
    target = _balanced_shape(padded, div, max_voxels)
    cands = []
    for ax in range(3):
        lo = max(div[ax], int(target[ax] * spread[0]) // div[ax] * div[ax])
        hi = min(padded[ax], ceil_to(int(target[ax] * spread[1]), div[ax]))
        cands.append(list(range(min(lo, hi), hi + 1, div[ax])))
    # computed voxels = prod over axes of (number of tiles * tile size): separable
    cost = []
    for ax in range(3):
        c = []
        o_ax = overlap[ax] if isinstance(overlap, (list, tuple)) else overlap
        for t in cands[ax]:
            try:
                ov = overlap_voxels(o_ax, (t, t, t))[0]
            except ConfigError:  # an overlap in voxels that does not fit this tile
                c.append((np.inf, np.inf))
                continue
            n = len(axis_starts(int(shape[ax]), t, ov, div[ax])[0])
            c.append((n * t, n))
        cost.append(np.array(c, dtype=np.float64))
    tz, ty, tx = np.meshgrid(*[np.array(c, dtype=np.float64) for c in cands], indexing="ij")
    vol = tz * ty * tx
    computed = cost[0][:, 0][:, None, None] * cost[1][:, 0][None, :, None] * cost[2][:, 0][None, None, :]
    ntiles = cost[0][:, 1][:, None, None] * cost[1][:, 1][None, :, None] * cost[2][:, 1][None, None, :]
    ok = (vol <= max_voxels) & np.isfinite(computed)
    if not ok.any():  # even the smallest candidate is too big: take it anyway
        return tuple(c[0] for c in cands)  # type: ignore[return-value]
    smallest_side = np.minimum(np.minimum(tz, ty), tx)
    order = np.lexsort((-smallest_side[ok], ntiles[ok], computed[ok]))
    i = np.flatnonzero(ok.ravel())[order[0]]
    iz, iy, ix = np.unravel_index(i, vol.shape)
    return (cands[0][iz], cands[1][iy], cands[2][ix])
