"""Synthetic confocal stacks of a membrane-stained epithelial tube, with ground truth.

The generator stands in for the lab's salivary-gland stacks: a tube made of one
layer of columnar cells around a lumen, imaged with a membrane stain.

Geometry
    The tube's axis lies roughly along Y or X (the gland lies on the slide),
    slightly tilted, bent and flattened in Z, and may leave the field of view.
    Cells fill the shell between the apical (lumen) and basal (outer) surfaces.
    They are the Voronoi cells of seeds placed on the unwrapped cylinder
    (arc length, axial position) and relaxed by a few Lloyd iterations; the
    Voronoi diagram is taken at every radius with the arc length measured at
    that radius, which is the geometric origin of scutoids (Gomez-Galvez et al.
    2018), and seeds also drift between the apical and the basal side
    (``scutoid_strength``), so neighbours change between the two surfaces.
    Lateral membranes are warped by a smooth random field, the surfaces are
    slightly rough.
Image
    Membranes are thin sheets convolved analytically with an anisotropic
    Gaussian point-spread function (so sheets seen edge-on in Z are dim and
    thick, as in a real confocal stack); cytoplasm with darker nuclei, lumen,
    background and bright puncta are blurred with the same PSF. The signal
    fades with depth (``exp(-z / depth_attenuation_um)``) and towards the field
    corners, then photon (Poisson) noise, read noise and an offset turn it into
    12-bit counts (uint16, 0..4095).
Labels
    Cells are 1..n, background (lumen and outside) 0, no gap between touching
    cells, every cell one face-connected piece.

All arrays are ZYX; voxel sizes (z, y, x) and lengths are in micrometres.
``None`` for a geometry parameter means "drawn for each stack from a realistic
range", so a default stack of any shape holds a whole tube of ~100 cells.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import ndtr

from core.errors import ConfigError, VolumeWriteError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.volume import Volume, label_dtype

Shape = Tuple[int, int, int]
Triple = Tuple[float, float, float]

#: Smallest stack the generator accepts, (Z, Y, X) voxels.
MIN_SHAPE: Shape = (8, 16, 16)
#: Most seeds (cells on the whole tube) one stack may need.
MAX_SEEDS = 200_000
#: Voxels handled at once while rendering (bounds the working memory).
_SLAB_VOXELS = 1 << 20
#: Voxels shaded at once (small arrays stay in cache and avoid page faults).
_SHADE_VOXELS = 1 << 15
#: Most grid cells in the nearest-seed lookup tables (all levels together).
_MAX_TABLE_CELLS = 3_000_000
#: Candidate lists up to this long take the fast path.
_NARROW = 6

DIFFICULTIES = ("easy", "medium", "hard")


@dataclass
class SynthParams:
    """Parameters of one synthetic stack. Lengths in micrometres, axes (z, y, x).

    Geometry (``None`` = drawn per stack from a realistic range):

    shape: stack size (Z, Y, X) in voxels.
    voxel_size_um: (z, y, x) voxel size; recorded in the written files.
    tube_outer_radius_um: basal radius; default fits the tube to the stack
        (its height about the stack depth, sometimes cut by the border).
    tube_inner_radius_um: apical (lumen) radius; default 0.35-0.55 x outer.
    cell_diameter_um: mean cell width at mid-height; default
        2 pi r_mid / ``cells_around``, at least 5 voxels deep and 15 wide.
    cells_around: mean number of cells around the tube when the cell diameter
        is drawn (varied by -25 %/+30 % per stack).
    scutoid_strength: how far seeds drift between apical and basal side, as a
        fraction of the cell diameter (0 = only the geometric scutoids).
    geometric_scutoids: 1 = the cell pattern is a Voronoi diagram on every
        cylinder between lumen and outside, so cells change neighbours because
        the basal surface is larger (Gomez-Galvez et al. 2018); 0 = the same
        pattern at every height (prisms, apart from ``scutoid_strength``).
    membrane_wiggle: amplitude of the smooth warp of lateral membranes, as a
        fraction of the cell diameter.
    surface_roughness: relative waviness of the apical and basal surfaces.

    Optics: psf_sigma_um (z, y, x) Gaussian PSF sigmas; membrane_thickness_um
    (sigma of the stained sheet); depth_attenuation_um (signal x exp(-z/L),
    ``inf`` for none); vignetting (relative loss in the field corners); haze
    (scattered out-of-focus light, a 3 um blur of the membranes, relative).

    Intensities, relative to a lateral membrane seen edge-on at the top:
    apical_brightness, basal_brightness, cytoplasm, nucleus_contrast (how much
    darker nuclei are than cytoplasm), lumen, background, intensity_variation
    (spread of per-cell brightness), membrane_patchiness (spread along a
    membrane), puncta_per_cell (bright sub-resolution spots per cell).

    Detector: photons (expected photons at relative intensity 1: lower is
    noisier), peak_adu (counts at relative intensity 1), read_noise_adu
    (Gaussian sigma), offset_adu (dark level). Values are clipped to 0..4095.

    min_cell_voxels: cells or detached pieces of cells smaller than this are
    merged into their neighbour (or dropped when they touch no cell); larger
    detached pieces (a cell leaving the field of view and coming back) become
    cells of their own, so every label is one connected piece.
    """

    shape: Shape = (64, 256, 256)
    voxel_size_um: Triple = (1.0, 0.3, 0.3)
    tube_outer_radius_um: Optional[float] = None
    tube_inner_radius_um: Optional[float] = None
    cell_diameter_um: Optional[float] = None
    cells_around: float = 11.0
    scutoid_strength: float = 0.3
    geometric_scutoids: float = 1.0
    membrane_wiggle: float = 0.12
    surface_roughness: float = 0.05
    psf_sigma_um: Triple = (1.5, 0.4, 0.4)
    membrane_thickness_um: float = 0.1
    depth_attenuation_um: float = 100.0
    haze: float = 0.3
    vignetting: float = 0.15
    apical_brightness: float = 1.6
    basal_brightness: float = 0.8
    cytoplasm: float = 0.12
    nucleus_contrast: float = 0.5
    lumen: float = 0.05
    background: float = 0.03
    intensity_variation: float = 0.25
    membrane_patchiness: float = 0.4
    puncta_per_cell: float = 0.5
    photons: float = 30.0
    peak_adu: float = 1500.0
    read_noise_adu: float = 3.0
    offset_adu: float = 30.0
    min_cell_voxels: int = 30

    @classmethod
    def for_difficulty(cls, difficulty: str = "medium", **overrides) -> "SynthParams":
        """Parameters of a difficulty preset ("easy", "medium", "hard").

        The presets differ in photon count (noise), PSF (blur), depth
        attenuation, cytoplasm level, brightness variation and scutoid
        strength; ``overrides`` replace single fields afterwards.
        """
        presets = {
            "easy": dict(photons=120.0, read_noise_adu=2.0, psf_sigma_um=(0.8, 0.25, 0.25),
                         depth_attenuation_um=400.0, cytoplasm=0.08,
                         intensity_variation=0.15, membrane_patchiness=0.2,
                         scutoid_strength=0.2, puncta_per_cell=0.2),
            "medium": {},
            "hard": dict(photons=10.0, read_noise_adu=5.0, psf_sigma_um=(1.8, 0.55, 0.55),
                         depth_attenuation_um=80.0, cytoplasm=0.2,
                         intensity_variation=0.4, membrane_patchiness=0.45,
                         scutoid_strength=0.45, puncta_per_cell=1.5, membrane_wiggle=0.18),
        }
        key = str(difficulty).strip().lower()
        if key not in presets:
            raise ConfigError(
                f"Unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}."
            )
        params = replace(cls(), **presets[key])
        try:
            params = replace(params, **overrides)
        except TypeError as err:
            raise ConfigError(f"Unknown synthetic-data parameter: {err}") from None
        return params

    def validate(self) -> "SynthParams":
        """Raise :class:`ConfigError` naming the first bad value; return self."""
        shape = tuple(self.shape)
        if len(shape) != 3 or not all(float(s).is_integer() for s in shape):
            raise ConfigError(f"shape must be three whole numbers Z,Y,X, got {self.shape!r}.")
        if any(int(s) < m for s, m in zip(shape, MIN_SHAPE)):
            raise ConfigError(
                f"shape {tuple(int(s) for s in shape)} is too small for a synthetic tube; "
                f"use at least {MIN_SHAPE[0]},{MIN_SHAPE[1]},{MIN_SHAPE[2]} (Z,Y,X voxels)."
            )
        _check_triple("voxel_size_um", self.voxel_size_um, positive=True)
        _check_triple("psf_sigma_um", self.psf_sigma_um, positive=False)
        for name in ("tube_outer_radius_um", "tube_inner_radius_um", "cell_diameter_um"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of micrometres, got {value!r}.")
        if (self.tube_outer_radius_um is not None and self.tube_inner_radius_um is not None
                and self.tube_inner_radius_um >= self.tube_outer_radius_um):
            raise ConfigError(
                f"tube_inner_radius_um ({self.tube_inner_radius_um}) must be smaller than "
                f"tube_outer_radius_um ({self.tube_outer_radius_um})."
            )
        positive = ("cells_around", "photons", "peak_adu", "membrane_thickness_um",
                    "depth_attenuation_um")
        for name in positive:
            value = getattr(self, name)
            if not (value > 0):
                raise ConfigError(f"{name} must be positive, got {value!r}.")
        non_negative = ("scutoid_strength", "membrane_wiggle", "surface_roughness",
                        "vignetting", "haze", "apical_brightness", "basal_brightness", "cytoplasm",
                        "nucleus_contrast", "geometric_scutoids", "lumen", "background",
                        "intensity_variation",
                        "membrane_patchiness", "puncta_per_cell", "read_noise_adu",
                        "offset_adu", "min_cell_voxels")
        for name in non_negative:
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be zero or positive, got {value!r}.")
        for name in ("nucleus_contrast", "geometric_scutoids"):
            if getattr(self, name) > 1:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}.")
        if self.vignetting >= 1:
            raise ConfigError(f"vignetting must be below 1, got {self.vignetting!r}.")
        if self.surface_roughness > 0.3:
            raise ConfigError(f"surface_roughness must be at most 0.3, got {self.surface_roughness}.")
        return self


def _check_triple(name: str, value, positive: bool) -> None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be three numbers (z, y, x), got {value!r}.") from None
    ok = len(vals) == 3 and all(np.isfinite(v) and (v > 0 if positive else v >= 0) for v in vals)
    if not ok:
        kind = "positive" if positive else "non-negative"
        raise ConfigError(f"{name} must be three {kind} numbers (z, y, x) in micrometres, got {value!r}.")


# --------------------------------------------------------------------------- geometry


@dataclass
class _Tube:
    centre: np.ndarray      # (z, y, x) um, a point on the axis
    axis: np.ndarray        # unit vector along the tube
    n1: np.ndarray          # unit vector across, roughly "up" (Z)
    n2: np.ndarray          # unit vector across, in the slide plane
    flatten: float          # ellipticity: radius x (1 - f) along n1, x (1 + f) along n2
    bend: float             # curvature (1/um) of the axis, within the axis-n2 plane
    r_in: float
    r_out: float
    cell_diameter: float
    s_lo: float             # axial range holding seeds (covers the stack + margin)
    s_hi: float
    geometric: float = 1.0   # see radius()

    @property
    def r_mid(self) -> float:
        return 0.5 * (self.r_in + self.r_out)

    def radius(self, rho):
        """Radius at which arc lengths are measured at normalised height rho (0 apical).

        With ``geometric`` 1 it is the true radius (Voronoi on every cylinder:
        scutoids); with 0 it is the mid radius at every height (prisms).
        """
        return self.r_mid + self.geometric * (rho - 0.5) * (self.r_out - self.r_in)


def _draw_tube(params: SynthParams, rng: np.random.Generator) -> _Tube:
    shape = np.array(params.shape, float)
    vox = np.array(params.voxel_size_um, float)
    extent = (shape - 1) * vox                       # um, (z, y, x)
    along_x = rng.random() < 0.5
    azimuth = (math.pi / 2 if along_x else 0.0) + math.radians(rng.uniform(-20, 20))
    tilt = math.radians(rng.uniform(-4, 4))
    axis = np.array([math.sin(tilt), math.cos(tilt) * math.cos(azimuth),
                     math.cos(tilt) * math.sin(azimuth)])
    up = np.array([1.0, 0.0, 0.0])
    n1 = up - up.dot(axis) * axis
    n1 /= np.linalg.norm(n1)
    n2 = np.cross(axis, n1)
    flatten = rng.uniform(0.0, 0.18)
    across = abs(n2[1]) * extent[1] + abs(n2[2]) * extent[2]   # in-plane width across the tube

    r_out, r_in = params.tube_outer_radius_um, params.tube_inner_radius_um
    ratio = rng.uniform(0.35, 0.55)
    if r_out is None and r_in is not None:
        r_out = r_in / ratio
    if r_out is None:
        by_depth = extent[0] * rng.uniform(0.85, 1.15) / (2 * (1 - flatten))
        by_width = across * rng.uniform(0.8, 1.1) / (2 * (1 + flatten))
        r_out = max(min(by_depth, by_width), 4 * float(vox.min()))
    if r_in is None:
        r_in = r_out * ratio
    r_mid = 0.5 * (r_in + r_out)
    if params.cell_diameter_um is not None:
        cell = float(params.cell_diameter_um)
    else:
        cell = 2 * math.pi * r_mid / (params.cells_around * rng.uniform(0.75, 1.3))
        # Small stacks give thin tubes: keep cells at least ~5 voxels deep and 15 wide.
        cell = max(cell, 5 * float(vox.max()), 15 * float(vox.min()))

    centre = extent / 2.0
    centre = centre + n2 * rng.uniform(-0.15, 0.15) * across
    centre[0] = extent[0] * (0.5 + rng.uniform(-0.1, 0.1))
    # Axial range of the stack: project its corners onto the axis.
    corners = np.array([[z, y, x] for z in (0, extent[0]) for y in (0, extent[1])
                        for x in (0, extent[2])]) - centre
    proj = corners @ axis
    half_len = 0.5 * (proj.max() - proj.min())
    bend = rng.uniform(-1, 1) * 0.16 * across / max(half_len, 1e-6) ** 2
    margin = 2.5 * cell + (params.scutoid_strength + params.membrane_wiggle) * cell
    return _Tube(centre=centre, axis=axis, n1=n1, n2=n2, flatten=flatten, bend=bend,
                 r_in=float(r_in), r_out=float(r_out), cell_diameter=cell,
                 s_lo=float(proj.min() - margin), s_hi=float(proj.max() + margin),
                 geometric=float(params.geometric_scutoids))


@dataclass
class _Seeds:
    theta: np.ndarray       # angle around the tube (rad)
    s: np.ndarray           # axial position (um)
    drift: np.ndarray       # (n, 2) displacement (arc, axial) um from apical to basal
    bright: np.ndarray      # membrane brightness factor
    cyto: np.ndarray        # cytoplasm brightness factor
    nucleus_rho: np.ndarray  # normalised height of the nucleus centre


def _draw_seeds(tube: _Tube, params: SynthParams, rng: np.random.Generator) -> _Seeds:
    """Seeds on the unwrapped mid-surface, relaxed by Lloyd iterations (CVT)."""
    d = tube.cell_diameter
    circ = 2 * math.pi * tube.r_mid
    length = tube.s_hi - tube.s_lo
    n = int(round(circ * length / (0.866 * d * d)))
    if n > MAX_SEEDS:
        raise ConfigError(
            f"The cell size ({d:.3g} um, cell_diameter_um / --cell-size) is too small for this "
            f"tube: it would need {n} cells (at most {MAX_SEEDS}). Use a larger cell size, a "
            "smaller tube or a smaller stack."
        )
    n = max(n, 3)
    pts = np.column_stack([rng.random(n) * circ, rng.random(n) * length])
    # Sample points for the Lloyd centroids (~10 per cell in each direction, at most ~4 M).
    h = max(d / 10.0, math.sqrt(circ * length / 4e6))
    na, ns = max(int(circ / h), 8), max(int(length / h), 8)
    ga = (np.arange(na) + 0.5) * circ / na
    gs = (np.arange(ns) + 0.5) * length / ns
    grid = np.column_stack([np.repeat(ga, ns), np.tile(gs, na)])
    box = [circ, 4 * length]
    ang = grid[:, 0] / circ * 2 * math.pi
    for _ in range(4):
        _, owner = cKDTree(pts, boxsize=box).query(grid)
        count = np.bincount(owner, minlength=n)
        keep = count > 0
        cx = np.bincount(owner, np.cos(ang), n)
        cy = np.bincount(owner, np.sin(ang), n)
        cs = np.bincount(owner, grid[:, 1], n)
        new_a = (np.arctan2(cy, cx) % (2 * math.pi)) / (2 * math.pi) * circ
        pts[keep, 0] = new_a[keep] % circ
        pts[keep, 1] = cs[keep] / count[keep]
    direction = rng.uniform(0, 2 * math.pi, n)
    magnitude = params.scutoid_strength * d * np.sqrt(rng.random(n)) * 1.5
    drift = np.column_stack([np.cos(direction), np.sin(direction)]) * magnitude[:, None]
    var = params.intensity_variation
    return _Seeds(
        theta=pts[:, 0] / tube.r_mid,
        s=pts[:, 1] + tube.s_lo,
        drift=drift,
        bright=rng.lognormal(0.0, var, n),
        cyto=rng.lognormal(0.0, var, n),
        nucleus_rho=rng.uniform(0.35, 0.65, n),
    )


class _SurfaceFields:
    """Smooth random fields on the unwrapped tube (angle periodic, axial clipped).

    Channels: 0 apical radius noise, 1 basal radius noise, 2-3 warp (arc,
    axial) at the apical side, 4-5 warp at the basal side; unit std.
    """

    def __init__(self, tube: _Tube, rng: np.random.Generator):
        spacing = tube.cell_diameter / 3.0
        self.na = max(int(math.ceil(2 * math.pi * tube.r_mid / spacing)), 12)
        self.ns = max(int(math.ceil((tube.s_hi - tube.s_lo) / spacing)) + 1, 4)
        self.s_lo = tube.s_lo
        self.ds = (tube.s_hi - tube.s_lo) / (self.ns - 1)
        raw = rng.standard_normal((6, self.na, self.ns))
        grids = np.empty_like(raw)
        for c in range(6):
            sigma = 4.5 if c < 2 else 1.6   # surfaces vary over ~1.5 cells, warps within a cell
            g = ndimage.gaussian_filter(raw[c], sigma, mode=("wrap", "nearest"))
            grids[c] = (g - g.mean()) / (g.std() + 1e-12)
        self.flat = grids.reshape(6, -1).astype(np.float32)

    def sample(self, channels: Sequence[int], theta: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Bilinear values (len(channels), N) at angles ``theta`` (-pi..pi) and axial ``s``."""
        fa = theta * np.float32(self.na / (2 * math.pi))
        fa = np.where(fa < 0, fa + np.float32(self.na), fa)
        ia = np.minimum(fa.astype(np.intp), self.na - 1)
        wa = fa - ia
        ia1 = ia + 1
        ia1[ia1 == self.na] = 0
        fs = np.clip((s - np.float32(self.s_lo)) * np.float32(1 / self.ds), 0, self.ns - 1.001)
        js = fs.astype(np.intp)
        ws = fs - js
        ia *= self.ns
        ia1 *= self.ns
        g = self.flat[list(channels)]
        t = np.take
        return ((t(g, ia + js, axis=1) * (1 - ws) + t(g, ia + js + 1, axis=1) * ws) * (1 - wa)
                + (t(g, ia1 + js, axis=1) * (1 - ws) + t(g, ia1 + js + 1, axis=1) * ws) * wa)


class _Candidates:
    """Per-level lookup of the seeds that can be among a point's 3 nearest.

    The shell is cut into ``levels`` radial levels; in each, the unwrapped
    plane (arc at the level's radius, axial) is gridded and every grid cell
    lists every seed that can be one of the three nearest to any point of it
    at any height within the level (the bound allows for the change of radius
    and seed drift within the level). A nearest-seed query is then a table
    lookup plus a few exact distances.
    """

    def __init__(self, tube: _Tube, seeds: _Seeds, levels: int,
                 wall_reach: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 warp_max: float = 0.0):
        d = tube.cell_diameter
        length = tube.s_hi - tube.s_lo
        # Grid step: fine (fewer candidates per cell) but at most _MAX_TABLE_CELLS cells.
        g = max(d / 5.0, math.sqrt(levels * 2 * math.pi * tube.r_out * length / _MAX_TABLE_CELLS))
        n = seeds.theta.size
        self.sentinel = n
        drift_max = float(np.hypot(seeds.drift[:, 0], seeds.drift[:, 1]).max(initial=0.0))
        # Relative change of the arc scale within half a level.
        rel = 0.5 * abs(tube.radius(1.0) - tube.radius(0.0)) / levels / tube.radius(0.0)
        self.ns = max(int(math.ceil((tube.s_hi - tube.s_lo) / g)), 1)
        self.gs = (tube.s_hi - tube.s_lo) / self.ns
        self.s_lo = tube.s_lo
        box_s = 4 * (tube.s_hi - tube.s_lo) + 10 * d
        self.na = np.empty(levels, np.intp)
        self.ga = np.empty(levels, np.float32)
        self.offset = np.empty(levels, np.intp)
        tables, pures = [], []
        total = 0
        for k in range(levels):
            rho = (k + 0.5) / levels
            r = tube.radius(rho)
            circ = 2 * math.pi * r
            na = max(int(math.ceil(circ / g)), 3)
            ga = circ / na
            a = (r * seeds.theta + seeds.drift[:, 0] * (rho - 0.5)) % circ
            s = seeds.s + seeds.drift[:, 1] * (rho - 0.5) - self.s_lo + 2 * d
            tree = cKDTree(np.column_stack([a, s]) % [circ, box_s], boxsize=[circ, box_s])
            ca = (np.arange(na) + 0.5) * ga
            cs = (np.arange(self.ns) + 0.5) * self.gs + 2 * d
            centres = np.column_stack([np.repeat(ca, self.ns), np.tile(cs, na)])
            d3 = tree.query(centres, k=min(3, n))[0].reshape(len(centres), -1)[:, -1]
            diag = math.hypot(ga, self.gs)
            # A seed among the 3 nearest of a point p of the cell is within
            # d3(p) + diag/2 <= d3(centre) + diag of the centre, plus the change of
            # distances within the level (eps each way).
            eps = (d3 + diag) * rel * 1.2 + drift_max / (2 * levels)
            radius = d3 + diag + 2 * eps + 0.01 * d
            kmax = min(16, n)
            while True:
                dist, idx = tree.query(centres, k=kmax)
                dist, idx = dist.reshape(len(centres), -1), idx.reshape(len(centres), -1)
                if kmax >= n or np.all(dist[:, -1] > radius):
                    break
                kmax = min(2 * kmax, n)
            idx_all = idx
            idx = np.where(dist <= radius[:, None], idx, n)
            tables.append(idx)
            # "Pure" grid cells lie inside one cell, farther than wall_reach(theta)
            # from its walls at every height of the level: no lateral membrane there.
            if wall_reach is not None and n > 1:
                da = a[idx_all[:, 1:]] - centres[:, :1]
                da -= circ * np.round(da / circ)
                dsx = s[idx_all[:, 1:]] - centres[:, 1:]
                p1 = np.column_stack([a[idx_all[:, 0]] - centres[:, 0],
                                      s[idx_all[:, 0]] - centres[:, 1]])
                p1[:, 0] -= circ * np.round(p1[:, 0] / circ)
                q1 = (p1 ** 2).sum(1)[:, None]
                sep = np.hypot(da - p1[:, :1], dsx - p1[:, 1:]) + 1e-9
                wall = (da ** 2 + dsx ** 2 - q1) / (2 * sep)
                # Seeds beyond the list are farther than the last one: wall >= (d_k - d_1) / 2.
                beyond = 0.5 * (dist[:, -1] - dist[:, 0]) if kmax < n else np.inf
                w_min = np.minimum(wall.min(axis=1), beyond)
                theta_col = ca / r
                reach = wall_reach(theta_col)
                spread = int(math.ceil(warp_max / ga)) + 1    # the warp shifts points in arc
                reach = ndimage.maximum_filter1d(reach, 2 * spread + 1, mode="wrap")
                need = np.repeat(reach, self.ns) + 0.5 * diag + 3 * eps + 0.01 * d
                pures.append(w_min >= need)
            else:
                pures.append(np.zeros(len(centres), bool))
            self.na[k], self.ga[k], self.offset[k] = na, ga, total
            total += na * self.ns
        used = max(int((t != n).sum(axis=1).max()) for t in tables)
        width = max(used, 3)
        table = np.full((total, width), n, np.int32)
        row = 0
        for t in tables:
            w = min(width, t.shape[1])
            table[row:row + len(t), :w] = t[:, :w]
            row += len(t)
        self.table = table
        self.count = (table != n).sum(axis=1).astype(np.int16)
        self.pure = np.concatenate(pures)

    def rows(self, level: np.ndarray, arc_at_level: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Table rows of points (level index, arc at the level's radius, axial)."""
        na = self.na[level]
        ia = np.minimum((arc_at_level / self.ga[level]).astype(np.intp), na - 1)
        js = np.clip(((s - np.float32(self.s_lo)) / np.float32(self.gs)).astype(np.intp),
                     0, self.ns - 1)
        return self.offset[level] + ia * self.ns + js


def _coarse_noise(shape: Shape, vox: np.ndarray, scale_um: float, channels: int,
                  rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Smooth 3D noise on a coarse grid (unit std) and its spacing in voxels."""
    step = np.maximum(scale_um / vox, 1.0)
    cshape = tuple(int(math.ceil((n - 1) / st)) + 2 for n, st in zip(shape, step))
    noise = rng.standard_normal((channels,) + cshape).astype(np.float32)
    for c in range(channels):
        noise[c] = ndimage.gaussian_filter(noise[c], 0.8, mode="wrap")
        noise[c] = (noise[c] - noise[c].mean()) / (noise[c].std() + 1e-12)
    return noise, step


def _lerp_axis(arr: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    n = arr.shape[axis]
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, n - 2)
    w = np.clip(pos - i0, 0, 1).astype(np.float32)
    shape = [1] * arr.ndim
    shape[axis] = len(pos)
    w = w.reshape(shape)
    return np.take(arr, i0, axis=axis) * (1 - w) + np.take(arr, i0 + 1, axis=axis) * w


def _upsample_slab(noise: np.ndarray, step: np.ndarray, z0: int, z1: int,
                   ny: int, nx: int) -> np.ndarray:
    """Trilinear upsampling of coarse (C, cz, cy, cx) to slab z0:z1 -> (C, nz, ny, nx)."""
    out = _lerp_axis(noise, np.arange(z0, z1) / step[0], 1)
    out = _lerp_axis(out, np.arange(ny) / step[1], 2)
    return _lerp_axis(out, np.arange(nx) / step[2], 3)


# --------------------------------------------------------------------------- rendering


class _Scene:
    """Everything the per-voxel shading needs, computed once per stack."""

    def __init__(self, params: SynthParams, tube: _Tube, seeds: _Seeds,
                 rng: np.random.Generator):
        self.p = params
        self.tube = tube
        sig = np.array(params.psf_sigma_um, float)
        self.s2 = (sig ** 2).astype(np.float32)
        self.sm2 = np.float32(params.membrane_thickness_um ** 2)
        self.sig_ref = np.float32(math.sqrt(self.sm2 + sig[2] ** 2))
        self.sig_max = math.sqrt(self.sm2 + float((sig ** 2).max()))
        fl = tube.flatten
        # Frame: e_theta ~ -(1-f) sin t n1 + (1+f) cos t n2; e_r ~ cos t/(1-f) n1 + sin t/(1+f) n2.
        self.et_s, self.et_c = -(1 - fl) * tube.n1, (1 + fl) * tube.n2
        self.er_c, self.er_s = tube.n1 / (1 - fl), tube.n2 / (1 + fl)
        self.fields = _SurfaceFields(tube, rng)
        thick = tube.r_out - tube.r_in
        # Enough radial levels that the arc scale changes by < 1.5 % within one.
        spread = abs(tube.radius(1.0) - tube.radius(0.0)) / (2 * tube.radius(0.0))
        self.levels = int(np.clip(math.ceil(spread / 0.015), 8, 32))
        self.wiggle = np.float32(params.membrane_wiggle * tube.cell_diameter)
        warp_max = float(self.wiggle) * float(np.abs(self.fields.flat[2:]).max())
        self.cand = _Candidates(tube, seeds, self.levels, wall_reach=self.wall_reach,
                                warp_max=warp_max)
        f32 = np.float32
        # Per-seed tables with one sentinel entry far away (index n).
        self.theta = np.append(seeds.theta, 0.0).astype(f32)
        self.s = np.append(seeds.s, 1e7).astype(f32)
        self.da = np.append(seeds.drift[:, 0], 0.0).astype(f32)
        self.ds = np.append(seeds.drift[:, 1], 0.0).astype(f32)
        self.bright = np.append(seeds.bright, 0.0).astype(f32)
        self.cyto = np.append(seeds.cyto, 0.0).astype(f32)
        self.nuc_rho = np.append(seeds.nucleus_rho, 0.5).astype(f32)
        self.thick = thick

    def e_theta(self, theta):
        ct, st = np.cos(theta), np.sin(theta)
        et = [self.et_s[i] * st + self.et_c[i] * ct for i in range(3)]
        norm = np.sqrt(et[0] ** 2 + et[1] ** 2 + et[2] ** 2)
        return [e / norm for e in et]

    def wall_reach(self, theta: np.ndarray) -> np.ndarray:
        """Distance (um) beyond which a lateral membrane at angle theta adds nothing."""
        et = self.e_theta(np.asarray(theta, np.float64))
        ax = self.tube.axis
        s2 = self.s2.astype(np.float64)
        m00 = sum(s2[i] * et[i] ** 2 for i in range(3))
        m01 = sum(s2[i] * et[i] * ax[i] for i in range(3))
        m11 = float(sum(s2[i] * ax[i] ** 2 for i in range(3)))
        lam = 0.5 * (m00 + m11) + np.sqrt(0.25 * (m00 - m11) ** 2 + m01 ** 2)
        return 4.0 * np.sqrt(float(self.sm2) + lam)

    def sheet_sigma(self, comp):
        """Effective sigma of a thin sheet whose unit normal has (z, y, x) components ``comp``."""
        s2 = self.s2
        return np.sqrt(self.sm2 + s2[0] * comp[0] ** 2 + s2[1] * comp[1] ** 2
                       + s2[2] * comp[2] ** 2)

    def offsets(self, c, theta, rr, h, w_arc, ps):
        """Vectors (arc, axial) um from points to seeds ``c`` (any shape, broadcast)."""
        two_pi, pi = np.float32(2 * math.pi), np.float32(math.pi)
        dth = self.theta[c] - theta
        dth -= two_pi * (dth > pi)
        dth += two_pi * (dth < -pi)
        return rr * dth + self.da[c] * h - w_arc, self.s[c] + self.ds[c] * h - ps


def _nearest3(scene: _Scene, cidx, sel, theta, rr, h, w_arc, ps, c, a, b) -> None:
    """The 3 nearest of the candidate seeds ``cidx`` (m, K) of points ``sel``; fills c, a, b."""
    cidx = cidx.astype(np.intp)
    da, dsx = scene.offsets(cidx, theta[sel, None], rr[sel, None], h[sel, None],
                            w_arc[sel, None], ps[sel, None])
    d2 = da * da + dsx * dsx
    base = np.arange(sel.size) * d2.shape[1]
    d2f, cf, daf, dsf = d2.ravel(), cidx.ravel(), da.ravel(), dsx.ravel()
    for j in range(3):
        k = d2.argmin(axis=1) + base
        c[j][sel] = cf[k]
        a[j][sel] = daf[k]
        b[j][sel] = dsf[k]
        d2f[k] = np.float32(3e38)


def _shade_chunk(scene: _Scene, s, theta, r, tex, lab, mem, sm) -> None:
    """Labels, membrane and smooth signal for one chunk of voxels (flat arrays, in place)."""
    p, tube = scene.p, scene.tube
    f32 = np.float32
    rad = scene.fields.sample((0, 1), theta, s)
    rin = f32(tube.r_in) * (1 + f32(p.surface_roughness) * rad[0])
    rout = f32(tube.r_out) * (1 + f32(p.surface_roughness) * rad[1])
    del rad
    thick = rout - rin
    rho = (r - rin) / thick
    sm[:] = np.where(rho < 0, f32(p.lumen), f32(p.background)) * (1 + f32(0.3) * tex[1])
    reach = f32(4.5 * scene.sig_max) / thick
    near = np.flatnonzero((rho > -reach) & (rho < 1 + reach))
    if near.size == 0:
        return
    s, theta, r, rho = s[near], theta[near], r[near], rho[near]
    rin, rout, thick, tex = rin[near], rout[near], thick[near], tex[:, near]
    rho_c = np.clip(rho, 0, 1)
    r0, r1 = tube.radius(0.0), tube.radius(1.0)
    rr = f32(r0) + rho_c * f32(r1 - r0)
    warp = scene.fields.sample((2, 3, 4, 5), theta, s)
    w_arc = scene.wiggle * ((1 - rho_c) * warp[0] + rho_c * warp[2])
    w_s = scene.wiggle * ((1 - rho_c) * warp[1] + rho_c * warp[3])
    del warp
    levels = scene.levels
    level = np.minimum((rho_c * levels).astype(np.intp), levels - 1)
    r_level = f32(r0) + (level.astype(f32) + f32(0.5)) * f32((r1 - r0) / levels)
    circ = f32(2 * math.pi) * r_level
    pa = r_level * theta + w_arc
    pa = np.where(pa < 0, pa + circ, pa)
    pa = np.where(pa >= circ, pa - circ, pa)
    ps = s + w_s
    h = rho_c - f32(0.5)
    cand = scene.cand
    rows = cand.rows(level, pa, ps)
    # Nearest seed everywhere; second and third only where a lateral membrane can reach.
    n = near.size
    c = [cand.table[rows, 0].astype(np.intp),
         np.full(n, cand.sentinel, np.intp), np.full(n, cand.sentinel, np.intp)]
    a1, b1 = scene.offsets(c[0], theta, rr, h, w_arc, ps)
    a = [a1, np.full(n, 1e7, f32), np.full(n, 1e7, f32)]
    b = [b1, np.zeros(n, f32), np.zeros(n, f32)]
    imp = np.flatnonzero(~cand.pure[rows])
    if imp.size:
        # Most grid cells list few candidates: handle those with a narrow table.
        narrow = cand.count[rows[imp]] <= _NARROW
        for sel, width in ((imp[narrow], _NARROW), (imp[~narrow], None)):
            if sel.size:
                _nearest3(scene, cand.table[rows[sel], :width], sel, theta, rr, h, w_arc, ps,
                          c, a, b)
    c1, a1, b1 = c[0], a[0], b[0]
    inside = (rho >= 0) & (rho < 1)
    lab[near[inside]] = c1[inside] + 1

    signal = np.zeros(n, f32)
    bright1 = scene.bright[c1]
    q1 = a1 * a1 + b1 * b1
    if imp.size:
        lat = np.zeros(imp.size, f32)
        et = [e[imp] for e in scene.e_theta(theta)] if imp.size < n else scene.e_theta(theta)
        ai, bi, qi, bri = a1[imp], b1[imp], q1[imp], bright1[imp]
        axis = tube.axis
        for j in (1, 2):
            aj, bj = a[j][imp], b[j][imp]
            na_, ns_ = aj - ai, bj - bi
            sep = np.sqrt(na_ * na_ + ns_ * ns_) + f32(1e-6)
            dist = (aj * aj + bj * bj - qi) / (2 * sep)
            na_ /= sep
            ns_ /= sep
            sw = scene.sheet_sigma([na_ * et[i] + ns_ * f32(axis[i]) for i in range(3)])
            amp = f32(0.5) * (bri + scene.bright[c[j][imp]]) * (scene.sig_ref / sw)
            lat += amp * np.exp(f32(-0.5) * (dist / sw) ** 2)
        signal[imp] = lat
    ct, st = np.cos(theta), np.sin(theta)
    er = [scene.er_c[i] * ct + scene.er_s[i] * st for i in range(3)]
    norm = np.sqrt(er[0] ** 2 + er[1] ** 2 + er[2] ** 2)
    sig_r = scene.sheet_sigma([e / norm for e in er])
    d_ap = r - rin                       # > 0 inside the shell
    d_ba = rout - r
    edge = np.flatnonzero(np.minimum(d_ap, d_ba) < 4 * sig_r)   # lateral walls end at the surfaces
    signal[edge] *= (ndtr(d_ap[edge] / sig_r[edge]) * ndtr(d_ba[edge] / sig_r[edge])).astype(f32)
    surf = bright1 * (scene.sig_ref / sig_r)
    signal += surf * f32(p.apical_brightness) * np.exp(f32(-0.5) * (d_ap / sig_r) ** 2)
    signal += surf * f32(p.basal_brightness) * np.exp(f32(-0.5) * (d_ba / sig_r) ** 2)
    pm = f32(p.membrane_patchiness)
    signal *= np.exp(pm * tex[0] - pm * pm / 2)         # log-normal, mean 1
    mem[near] = signal

    # Cytoplasm with a darker nucleus, inside the cells only.
    ii = np.flatnonzero(inside)
    if ii.size:
        cc = c1[ii]
        rn_lat = f32(0.3 * tube.cell_diameter)
        rn_rad = f32(min(0.22 * scene.thick, 0.5 * tube.cell_diameter))
        q = q1[ii] / rn_lat ** 2 + ((rho[ii] - scene.nuc_rho[cc]) * thick[ii] / rn_rad) ** 2
        nucleus = 1 / (1 + np.exp(f32(8) * (np.sqrt(q) - 1)))
        value = (f32(p.cytoplasm) * scene.cyto[cc] * (1 + f32(0.35) * tex[1, ii])
                 * (1 - f32(p.nucleus_contrast) * nucleus))
        sm[near[ii]] = np.maximum(value, 0)


def _render(params: SynthParams, tube: _Tube, seeds: _Seeds, rng: np.random.Generator,
            reporter: Optional[ProgressReporter], cancel: CancelFlag):
    """Labels (seed index + 1), membrane signal and smooth signal for the stack."""
    Z, Y, X = (int(v) for v in params.shape)
    vox = np.array(params.voxel_size_um, float)
    scene = _Scene(params, tube, seeds, rng)
    # Texture 0: beads and gaps along membranes (~0.7 um); 1: cytoplasm and background (~2 um).
    textures = [_coarse_noise((Z, Y, X), vox, scale, 1, rng) for scale in (0.7, 2.0)]
    lab_dtype = np.uint16 if seeds.theta.size < 65535 else np.uint32
    labels = np.zeros((Z, Y, X), lab_dtype)
    membrane = np.zeros((Z, Y, X), np.float32)
    smooth = np.zeros((Z, Y, X), np.float32)
    yc = np.arange(Y) * vox[1] - tube.centre[1]
    xc = np.arange(X) * vox[2] - tube.centre[2]
    slab = _slab_depth(Y, X)
    a, n1, n2 = tube.axis, tube.n1, tube.n2
    for si, z0 in enumerate(range(0, Z, slab)):
        check_cancelled(cancel, "Making the synthetic stack")
        z1 = min(Z, z0 + slab)
        zc = np.arange(z0, z1) * vox[0] - tube.centre[0]

        def proj(vec):
            return (zc[:, None, None] * vec[0] + yc[None, :, None] * vec[1]
                    + xc[None, None, :] * vec[2]).ravel()

        s = proj(a)
        u = proj(n1) / (1 - tube.flatten)
        v = (proj(n2) - 0.5 * tube.bend * s ** 2) / (1 + tube.flatten)
        r = np.hypot(u, v).astype(np.float32)
        theta = np.arctan2(v, u).astype(np.float32)
        s = s.astype(np.float32)
        del u, v
        tex = np.concatenate([_upsample_slab(t, st, z0, z1, Y, X).reshape(1, -1)
                              for t, st in textures])
        lab = labels[z0:z1].reshape(-1)
        mem = membrane[z0:z1].reshape(-1)
        sm = smooth[z0:z1].reshape(-1)
        for c0 in range(0, r.size, _SHADE_VOXELS):
            sl = slice(c0, c0 + _SHADE_VOXELS)
            _shade_chunk(scene, s[sl], theta[sl], r[sl], tex[:, sl], lab[sl], mem[sl], sm[sl])
        if reporter is not None:
            reporter.update(si + 1)
    return labels, membrane, smooth


def _slab_depth(ny: int, nx: int) -> int:
    """Z slices handled at once for a (ny, nx) slice size."""
    return max(1, _SLAB_VOXELS // (ny * nx))


def _add_haze(smooth: np.ndarray, membrane: np.ndarray, params: SynthParams) -> None:
    """Add scattered, out-of-focus light: a broad blur of the membrane signal."""
    if params.haze <= 0:
        return
    vox = np.array(params.voxel_size_um, float)
    step = np.maximum(np.round(1.5 / vox), 1).astype(int)
    shape = np.array(membrane.shape)
    cshape = -(-shape // step)
    coarse = np.zeros(tuple(cshape), np.float32)
    zs = step[0]
    for cz in range(cshape[0]):
        block = membrane[cz * zs:(cz + 1) * zs]
        sub = block.mean(axis=0)
        pad = [(0, cshape[1] * step[1] - sub.shape[0]), (0, cshape[2] * step[2] - sub.shape[1])]
        sub = np.pad(sub, pad, mode="edge")
        coarse[cz] = sub.reshape(cshape[1], step[1], cshape[2], step[2]).mean(axis=(1, 3))
    sigma = 3.0 / (step * vox)
    coarse = ndimage.gaussian_filter(coarse, sigma, mode="nearest")
    coarse *= np.float32(params.haze)
    coarse = coarse[None]
    Y, X = membrane.shape[1:]
    slab = _slab_depth(Y, X)
    # Coarse sample k covers voxels k*step .. (k+1)*step-1; its centre is at k*step + (step-1)/2.
    for z0 in range(0, membrane.shape[0], slab):
        z1 = min(membrane.shape[0], z0 + slab)
        pz = (np.arange(z0, z1) - (step[0] - 1) / 2) / step[0]
        up = _lerp_axis(coarse, pz, 1)
        up = _lerp_axis(up, (np.arange(Y) - (step[1] - 1) / 2) / step[1], 2)
        up = _lerp_axis(up, (np.arange(X) - (step[2] - 1) / 2) / step[2], 3)
        smooth[z0:z1] += up[0]


def _fix_fragments(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Make every cell one face-connected piece of at least ``min_voxels``; may widen dtype.

    A detached piece of a cell (e.g. a cell leaving the field of view and coming
    back) becomes a cell of its own when it is large enough, so labels still
    follow the membranes; a smaller piece or cell is merged into the cell it
    touches most, or set to background when it touches no cell (it then touches
    only background, so no gap between cells appears).
    """
    struct = ndimage.generate_binary_structure(3, 1)
    next_id = int(labels.max()) + 1
    for _ in range(6):
        changed = False
        objects = ndimage.find_objects(labels)
        for i, sl in enumerate(objects):
            if sl is None:
                continue
            lab = i + 1
            big = tuple(slice(max(q.start - 1, 0), min(q.stop + 1, n))
                        for q, n in zip(sl, labels.shape))
            crop = labels[big]
            comp, ncomp = ndimage.label(crop == lab, struct)
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            if ncomp == 1 and sizes[1] >= min_voxels:
                continue
            keep = int(np.argmax(sizes)) if sizes.max() >= min_voxels else -1
            for c, psl in enumerate(ndimage.find_objects(comp), 1):
                if c == keep or psl is None:
                    continue
                pbig = tuple(slice(max(q.start - 1, 0), min(q.stop + 1, n))
                             for q, n in zip(psl, crop.shape))
                frag = comp[pbig] == c
                sub = crop[pbig]
                if sizes[c] >= min_voxels:
                    if next_id > np.iinfo(labels.dtype).max:
                        labels = labels.astype(np.uint32)
                        return _fix_fragments(labels, min_voxels)
                    sub[frag] = next_id
                    next_id += 1
                    continue
                ring = ndimage.binary_dilation(frag, struct) & ~frag
                neigh = sub[ring]
                neigh = neigh[(neigh != 0) & (neigh != lab)]
                if neigh.size:
                    values, counts = np.unique(neigh, return_counts=True)
                    sub[frag] = values[np.argmax(counts)]
                else:
                    sub[frag] = 0
                changed = True
        if not changed:
            break
    return labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels 1..n in order of first id, smallest unsigned dtype."""
    objects = ndimage.find_objects(labels)
    present = np.array([i + 1 for i, sl in enumerate(objects) if sl is not None], np.int64)
    dtype = label_dtype(max(len(present), 1))
    lut = np.zeros(len(objects) + 1, dtype)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int64).astype(dtype)
    out = np.empty(labels.shape, dtype)
    step = max(1, (1 << 22) // max(1, labels[0].size))
    for z0 in range(0, labels.shape[0], step):
        np.take(lut, labels[z0:z0 + step], out=out[z0:z0 + step])
    return out


def _add_puncta(smooth: np.ndarray, labels: np.ndarray, n_cells: int, params: SynthParams,
                rng: np.random.Generator) -> None:
    """Bright sub-resolution spots (vesicles) inside cells, as point masses before the blur."""
    count = rng.poisson(params.puncta_per_cell * n_cells)
    if count == 0:
        return
    vox = np.array(params.voxel_size_um, float)
    sig_vox = np.maximum(np.array(params.psf_sigma_um, float) / vox, 0.5)
    mass = (2 * math.pi) ** 1.5 * float(np.prod(sig_vox))
    shape = np.array(labels.shape)
    found = 0
    for _ in range(20):
        pts = (rng.random((4 * count, 3)) * shape).astype(np.int64)
        ok = labels[pts[:, 0], pts[:, 1], pts[:, 2]] > 0
        pts = pts[ok][: count - found]
        amp = rng.uniform(0.6, 2.5, len(pts)) * mass
        np.add.at(smooth, (pts[:, 0], pts[:, 1], pts[:, 2]), amp.astype(np.float32))
        found += len(pts)
        if found >= count:
            return


def _detect(smooth: np.ndarray, params: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """Depth attenuation, vignetting, photon and read noise -> uint16 counts 0..4095."""
    Z, Y, X = smooth.shape
    vox = params.voxel_size_um
    yy = (np.arange(Y) - (Y - 1) / 2) / max((Y - 1) / 2, 1)
    xx = (np.arange(X) - (X - 1) / 2) / max((X - 1) / 2, 1)
    vig = (1 - params.vignetting * 0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2)).astype(np.float32)
    gain = params.peak_adu / params.photons
    out = np.empty((Z, Y, X), np.uint16)
    step = _slab_depth(Y, X)
    for z0 in range(0, Z, step):
        z1 = min(Z, z0 + step)
        att = np.exp(-np.arange(z0, z1) * vox[0] / params.depth_attenuation_um).astype(np.float32)
        expected = np.maximum(smooth[z0:z1] * att[:, None, None] * vig * params.photons, 0)
        counts = rng.poisson(expected).astype(np.float32)
        adu = params.offset_adu + gain * counts
        if params.read_noise_adu > 0:
            adu += rng.normal(0.0, params.read_noise_adu, adu.shape).astype(np.float32)
        out[z0:z1] = np.clip(np.rint(adu), 0, 4095).astype(np.uint16)
    return out


# --------------------------------------------------------------------------- public API


def make_epithelium(params: Optional[SynthParams] = None, seed: int = 0, *,
                    progress: ProgressFn = None,
                    cancel: CancelFlag = None) -> Tuple[Volume, Volume]:
    """Make one synthetic confocal stack of an epithelial tube and its labels.

    Parameters
    ----------
    params : SynthParams, optional
        Shape, voxel size, geometry, optics, detector; defaults: ``SynthParams()``.
    seed : int
        Same seed and parameters give the same arrays.
    progress, cancel
        Job protocol (:mod:`core.jobs`); stage ``"synth"``.

    Returns
    -------
    raw : Volume
        uint16 (Z, Y, X), values 0..4095, ``voxel_size`` = ``params.voxel_size_um``;
        ``meta["synth"]`` records the seed, parameters and drawn tube geometry.
    labels : Volume
        Cells 1..n, background 0, smallest unsigned dtype, same shape and voxel size.
    """
    params = (params or SynthParams()).validate()
    params = replace(params, shape=tuple(int(v) for v in params.shape),
                     voxel_size_um=tuple(float(v) for v in params.voxel_size_um),
                     psf_sigma_um=tuple(float(v) for v in params.psf_sigma_um))
    rng = np.random.default_rng(seed)
    tube = _draw_tube(params, rng)
    seeds = _draw_seeds(tube, params, rng)
    Z, Y, X = params.shape
    n_slabs = int(math.ceil(Z / _slab_depth(Y, X)))
    reporter = ProgressReporter(progress, "synth", total=n_slabs + 2)
    labels, membrane, smooth = _render(params, tube, seeds, rng, reporter, cancel)
    check_cancelled(cancel, "Making the synthetic stack")
    labels = _fix_fragments(labels, int(params.min_cell_voxels))
    labels = _relabel(labels)
    n_cells = int(labels.max())
    _add_puncta(smooth, labels, n_cells, params, rng)
    reporter.update(n_slabs + 1)
    sig_vox = [s / v for s, v in zip(params.psf_sigma_um, params.voxel_size_um)]
    ndimage.gaussian_filter(smooth, sig_vox, output=smooth, mode="nearest", truncate=3.5)
    _add_haze(smooth, membrane, params)
    smooth += membrane
    del membrane
    check_cancelled(cancel, "Making the synthetic stack")
    raw = _detect(smooth, params, rng)
    del smooth
    reporter.update(n_slabs + 2)
    geometry = dict(
        centre_um=[float(c) for c in tube.centre],
        axis=[float(c) for c in tube.axis], up=[float(c) for c in tube.n1],
        across=[float(c) for c in tube.n2],
        inner_radius_um=float(tube.r_in), outer_radius_um=float(tube.r_out),
        cell_diameter_um=float(tube.cell_diameter), flatten=float(tube.flatten),
        bend_per_um=float(tube.bend), n_cells=n_cells,
    )
    meta = {"synth": {"seed": int(seed), "params": asdict(params), "tube": geometry}}
    vs = params.voxel_size_um
    raw_vol = Volume(raw, vs, name="synthetic", source=f"synthetic seed={seed}", meta=meta)
    lab_vol = Volume(labels, vs, name="synthetic_labels", source=f"synthetic seed={seed}",
                     meta={"synth": dict(meta["synth"])})
    return raw_vol, lab_vol


def stack_seed(seed: int, index: int) -> int:
    """Seed of stack ``index`` in a set made with ``seed`` (independent of the set size)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def medium_params(params: SynthParams, seed: int, index: int,
                  brightness: Tuple[float, float]) -> SynthParams:
    """``params`` with the medium around the tissue and the lumen at a brightness each
    drawn uniformly from ``brightness`` (relative intensities, as ``background`` and
    ``lumen``; the cytoplasm is 0.08-0.2 in the presets). Drawn from their own stream, so
    the stack's geometry, cells and noise do not change."""
    try:
        lo, hi = (float(v) for v in brightness)
    except (TypeError, ValueError):
        raise ConfigError(f"medium brightness range {brightness!r}: give two numbers, "
                          "low and high, e.g. 0.02,0.3.") from None
    if not 0.0 <= lo <= hi:
        raise ConfigError(f"medium brightness range {brightness!r}: give 0 <= low <= high.")
    rng = np.random.default_rng([int(seed), int(index), 1])
    background, lumen = rng.uniform(lo, hi, size=2)
    return replace(params, background=float(background), lumen=float(lumen))


def write_synthetic_dataset(out_dir: Union[str, Path], n: int, shape: Optional[Shape] = None,
                            seed: int = 0, params: Optional[SynthParams] = None, *,
                            prefix: str = "synth", preview: bool = False,
                            overwrite: bool = False, first: int = 0,
                            medium_brightness: Optional[Tuple[float, float]] = None,
                            progress: ProgressFn = None,
                            cancel: CancelFlag = None) -> List[Tuple[Path, Path]]:
    """Write ``n`` synthetic stacks as ``PREFIX_000_raw.tif`` / ``PREFIX_000_labels.tif``.

    Stack ``i`` uses ``make_epithelium(params, stack_seed(seed, i))``: the set is
    deterministic, every stack differs (tube size, position, orientation, cell
    size, cells, noise), and stack ``i`` is the same whatever ``n`` is. The voxel
    size is written into the TIFFs. With ``preview`` a ``PREFIX_000_preview.png``
    of a few XY and XZ/YZ slices is written as well. Existing files are an error
    unless ``overwrite``. ``first``: the index of the first stack (a set can be
    written in parts). ``medium_brightness`` (low, high): each stack's medium and
    lumen get their own brightness from that range (:func:`medium_params`), so a
    network trained on them cannot take "brighter than the medium" for tissue.
    Returns the (raw, labels) paths of the stacks written.
    """
    from core.io import write_volume  # local: core.io is heavier and optional for arrays

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"The number of stacks must be a whole number of at least 1, got {n!r}.")
    prefix = str(prefix)
    if not prefix or any(ch in prefix for ch in "/\\:*?\"<>|"):
        raise ConfigError(f"Prefix {prefix!r} cannot be used in a file name; use letters, digits, _ or -.")
    params = params or SynthParams()
    if shape is not None:
        params = replace(params, shape=tuple(shape))
    params.validate()
    if not isinstance(first, (int, np.integer)) or first < 0:
        raise ConfigError(f"The first stack's index must be a whole number >= 0, got {first!r}.")
    if medium_brightness is not None:
        medium_params(params, seed, first, medium_brightness)  # a bad range fails before any write
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VolumeWriteError(f"{out} exists and is not a folder; choose another output folder.")
    indices = range(int(first), int(first) + int(n))
    names = [(out / f"{prefix}_{i:03d}_raw.tif", out / f"{prefix}_{i:03d}_labels.tif")
             for i in indices]
    if not overwrite:
        clash = [p for pair in names for p in pair if p.exists()]
        if clash:
            raise VolumeWriteError(
                f"{clash[0]} already exists ({len(clash)} file(s) would be replaced). "
                "Choose another folder or prefix, or allow overwriting (--overwrite)."
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VolumeWriteError(f"Cannot create the output folder {out}: {err.strerror}.") from None
    reporter = ProgressReporter(progress, "stacks", total=n)
    written: List[Tuple[Path, Path]] = []
    for k, (i, (raw_path, lab_path)) in enumerate(zip(indices, names)):
        check_cancelled(cancel, "Writing the synthetic data set")
        stack_params = (params if medium_brightness is None
                        else medium_params(params, seed, i, medium_brightness))
        raw, labels = make_epithelium(stack_params, stack_seed(seed, i), progress=progress,
                                      cancel=cancel)
        stem = f"{prefix}_{i:03d}"
        raw.name, labels.name = f"{stem}_raw", f"{stem}_labels"
        write_volume(raw_path, raw)
        write_volume(lab_path, labels, labels=True)
        if preview:
            save_preview_png(raw, labels, out / f"{stem}_preview.png")
        written.append((raw_path, lab_path))
        info = raw.meta["synth"]["tube"]
        reporter.update(k + 1, message=f"{raw_path.name}: {info['n_cells']} cells")
    return written


# --------------------------------------------------------------------------- preview picture


def preview_image(raw: Volume, labels: Optional[Volume] = None, *,
                  scale_bar_um: Optional[float] = None) -> np.ndarray:
    """An RGB uint8 picture of a stack: three XY slices and two cross-sections.

    Top rows: raw, one contrast stretch for all panels (so the fading with depth
    shows); XY slices at 20 %, 50 % and 80 % of the depth, then XZ (middle Y)
    and YZ (middle X) sections stretched to isotropic pixels. Bottom rows (with
    ``labels``): the same slices with cells coloured and their outlines. A white
    scale bar of ``scale_bar_um`` (default: a round ~1/5 of the width) sits in
    the first panel.
    """
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    data = raw.data
    Z, Y, X = data.shape
    vz, vy, vx = raw.voxel_size_or((1.0, 1.0, 1.0))
    zs = [int(round(f * (Z - 1))) for f in (0.2, 0.5, 0.8)]

    def cut(vol, order):
        """The three XY slices and the XZ / YZ sections stretched to square pixels."""
        xy = [np.asarray(vol[z]) for z in zs]
        xz = np.asarray(vol[:, Y // 2, :])
        yz = np.asarray(vol[:, :, X // 2])
        sections = [
            resize(xz, (max(1, int(round(Z * vz / vx))), X), order=order, preserve_range=True,
                   anti_aliasing=False, mode="edge"),
            resize(yz, (max(1, int(round(Z * vz / vy))), Y), order=order, preserve_range=True,
                   anti_aliasing=False, mode="edge"),
        ]
        return xy, sections

    xy, sections = cut(data, 1)
    # One contrast stretch for all panels, so the fading with depth shows.
    sample = np.concatenate([np.ravel(p) for p in xy + sections]).astype(np.float32)
    lo, hi = np.percentile(sample, [0.5, 99.8])

    def stretch(p):
        return np.clip((np.asarray(p, np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)

    xy = [stretch(p) for p in xy]
    sections = [stretch(p) for p in sections]

    pad = 6

    def compose(rows):
        height = sum(max(p.shape[0] for p in row) for row in rows) + pad * (len(rows) + 1)
        width = max(sum(p.shape[1] for p in row) + pad * (len(row) + 1) for row in rows)
        canvas = np.full((height, width, 3), 40, np.uint8)
        y = pad
        for row in rows:
            x = pad
            for p in row:
                canvas[y:y + p.shape[0], x:x + p.shape[1]] = p
                x += p.shape[1] + pad
            y += max(q.shape[0] for q in row) + pad
        return canvas

    def to_rgb(g):
        return np.repeat((np.clip(g, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)

    xy_rgb = [to_rgb(p) for p in xy]
    sec_rgb = [to_rgb(p) for p in sections]
    bar = scale_bar_um or _round_length(X * vx / 5)
    bar_px = int(round(bar / vx))
    if bar_px >= 2 and X > bar_px + 12 and Y > 16:
        xy_rgb[0][Y - 10:Y - 7, X - 8 - bar_px:X - 8] = 255
    rows = [xy_rgb, sec_rgb]
    if labels is not None:
        lxy, lsec = cut(labels.data, 0)
        over = []
        for g, l in list(zip(xy, lxy)) + list(zip(sections, lsec)):
            l = np.asarray(l).astype(np.int64)
            rgb = label2rgb(l, image=np.clip(g, 0, 1), alpha=0.3, bg_label=0, image_alpha=1.0)
            rgb[find_boundaries(l, mode="inner")] = (1.0, 0.85, 0.1)
            over.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
        rows += [over[:3], over[3:]]
    return compose(rows)


def _round_length(value: float) -> float:
    for v in (1000, 500, 200, 100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1):
        if value >= v:
            return float(v)
    return float(value)


def save_preview_png(raw: Volume, labels: Optional[Volume], path: Union[str, Path]) -> Path:
    """Write :func:`preview_image` to ``path`` as PNG (atomically). Returns the path."""
    from skimage.io import imsave
    from core.io.atomic import atomic_path

    path = Path(path)
    image = preview_image(raw, labels)
    with atomic_path(path) as tmp:
        # skimage picks the format from the name: write "<tmp>.png", then move it onto tmp.
        png = tmp.with_name(tmp.name + ".png")
        try:
            imsave(str(png), image, check_contrast=False)
            os.replace(png, tmp)
        finally:
            if png.exists():
                png.unlink()
    return path
