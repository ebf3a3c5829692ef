"""Preprocessing: dtype, resampling, normalisation, training targets, checks.

The thesis pipeline, parameterised, every step optional. Arrays are ZYX; voxel
sizes are (z, y, x) in micrometres; resampling factors are output/input sizes
per axis (0.5 halves the number of voxels along that axis).

Steps of :func:`preprocess_volume`, in order:

1. raw -> float32 (or float16), labels -> smallest unsigned integer type;
2. resampling by ``factors`` or to ``target_voxel_size_um``: spline order 3 for
   the raw image (Gaussian anti-aliasing before downsampling), nearest
   neighbour for labels (ids unchanged; ids that vanish are reported);
3. normalisation: z-score over the volume (as torchio ``ZNormalization``, the
   thesis), percentile (``(x - p_low) / (p_high - p_low)``) or none;
4. training targets from the labels: ``cells_with_gaps`` (thesis step 2:
   ``find_boundaries`` removed from the cells, then every cell set to 1) and
   ``boundaries`` (PlantSeg style: ``find_boundaries`` mode 'thick', about 2
   voxels, optionally Gaussian-blurred);
5. a check that no cell was lost or merged in ``cells_with_gaps``, per label id.

HDF5 layout written by :func:`write_preprocessed` (read back by
:func:`read_preprocessed`; the training code reads this)::

    /raw              float32 (or float16) ZYX, normalised image
    /label            smallest unsigned int ZYX, instance labels, 0 = background
                      (only when labels were given, as are the two targets)
    /cells_with_gaps  uint8 ZYX {0, 1}: 1 = cell, 0 = background and gaps
    /boundaries       uint8 ZYX {0, 1}, or float32 in [0, 1] when blurred softly

    Every dataset: chunked, gzip (level 4 by default); attribute
    ``element_size_um`` = (z, y, x) voxel size when known.

    Root attributes:
      format = "episeg-preprocessed", format_version = 1, episeg_version
      name, source_raw, source_labels ("" when none)
      voxel_size_um (z, y, x; absent when unknown), original_voxel_size_um
      (absent when unknown), original_shape, resample_factors (actual
      output/input sizes, z, y, x)
      normalisation   JSON: {"mode": "zscore", "mean": .., "std": .., ...} or
                      {"mode": "percentile", "low": 1, "high": 99.8,
                      "p_low": .., "p_high": .., "clip": false} or {"mode": "none"}
      cell_check      JSON of :class:`CellCountReport` ("" when no labels);
                      also n_cells, n_components, n_lost, n_merged as integers
      label_resample  JSON of :class:`LabelResampleReport` ("" when not resampled)
      config          YAML text of the :class:`PreprocessConfig` used
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.ndimage as ndi
from skimage import measure
from skimage.segmentation import find_boundaries

from core import __version__
from core.config import FieldProblem, to_yaml
from core.errors import ConfigError, VolumeDataError, VolumeReadError, VolumeWriteError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.scratch import release_pages
from core.volume import Volume, as_labels, label_counts, strided_sample
from core.walls import face_pairs

Vec3 = Tuple[float, float, float]
FORMAT = "episeg-preprocessed"
FORMAT_VERSION = 1
TARGET_DATASETS = ("cells_with_gaps", "boundaries")


# --------------------------------------------------------------------------- config
@dataclass
class ResampleConfig:
    factors: Optional[Tuple[float, float, float]] = field(default=None, metadata={
        "gt": 0, "help": "Zoom factors (z, y, x): output/input voxels per axis; 0.5 halves."})
    target_voxel_size_um: Optional[Tuple[float, float, float]] = field(default=None, metadata={
        "gt": 0, "help": "Resample to this voxel size (z, y, x) in micrometres."})
    input_voxel_size_um: Optional[Tuple[float, float, float]] = field(default=None, metadata={
        "gt": 0, "help": "Voxel size (z, y, x) um of the input when the file records none "
                         "(or to override it)."})
    anti_aliasing: bool = field(default=True, metadata={
        "help": "Gaussian smoothing of the raw image before downsampling (sigma = (1/f - 1)/2)."})

    def validate(self) -> None:
        if self.factors is not None and self.target_voxel_size_um is not None:
            raise FieldProblem("factors", "give either factors or target_voxel_size_um, not both.")


@dataclass
class NormalisationConfig:
    mode: Literal["zscore", "robust", "percentile", "none"] = field(default="zscore", metadata={
        "help": "zscore: (x - mean) / std over the volume (thesis); robust: (x - median) / "
                "(1.4826 MAD), a z-score that a bright spot (a saturated nucleus, debris) "
                "does not change; percentile: (x - p_low) / (p_high - p_low); none."})
    zscore_mask: Literal["all", "above_mean"] = field(default="all", metadata={
        "help": "Voxels for mean/std: all, or those above the mean (foreground, as torchio)."})
    low: float = field(default=1.0, metadata={"min": 0, "max": 100,
                                              "help": "Low percentile (percentile mode)."})
    high: float = field(default=99.8, metadata={"min": 0, "max": 100,
                                                "help": "High percentile (percentile mode)."})
    clip: bool = field(default=False, metadata={
        "help": "Percentile mode: clip the result to [0, 1]."})

    def validate(self) -> None:
        if self.low >= self.high:
            raise FieldProblem("low", f"{self.low} must be below high ({self.high}).")


@dataclass
class TargetsConfig:
    cells_with_gaps: bool = field(default=True, metadata={
        "help": "Write the 'cells separated by gaps' binary target (thesis)."})
    connectivity: Literal[1, 2, 3] = field(default=3, metadata={
        "help": "find_boundaries connectivity for the gaps (1 = faces, 3 = also corners)."})
    mode: Literal["outer", "inner", "thick"] = field(default="outer", metadata={
        "help": "find_boundaries mode for the gaps (thesis: outer)."})
    boundaries: bool = field(default=True, metadata={
        "help": "Write the cell-boundary target (PlantSeg style)."})
    boundary_connectivity: Literal[1, 2, 3] = field(default=2, metadata={
        "help": "find_boundaries connectivity for the boundary target (PlantSeg: 2)."})
    boundary_mode: Literal["thick", "inner", "outer"] = field(default="thick", metadata={
        "help": "find_boundaries mode for the boundary target (thick: ~2 voxels)."})
    boundary_background: bool = field(default=True, metadata={
        "help": "Include the border between tissue and background in the boundary target."})
    boundary_sigma: float = field(default=0.0, metadata={
        "min": 0, "help": "Gaussian sigma (voxels) to blur the boundary target; 0 = no blur."})
    boundary_blur: Literal["soft", "threshold"] = field(default="soft", metadata={
        "help": "soft: float32 max(boundary, blurred); threshold: blurred >= 0.5 (PlantSeg)."})


@dataclass
class CheckConfig:
    counts: Literal["warn", "error", "off"] = field(default="warn", metadata={
        "help": "When a cell is lost or merged in the gaps target: warn, error (stop), off."})
    connectivity: Literal[1, 2, 3] = field(default=3, metadata={
        "help": "Connectivity of the connected components counted (skimage.measure.label)."})


@dataclass
class OutputConfig:
    raw_dtype: Literal["float32", "float16"] = field(default="float32", metadata={
        "help": "Type of the stored raw image (float16 halves the size)."})
    compression_level: int = field(default=4, metadata={
        "min": 0, "max": 9, "help": "gzip level (thesis: 4; 9 is ~10% smaller, 2x slower)."})
    chunks: Tuple[int, int, int] = field(default=(32, 128, 128), metadata={
        "min": 1, "help": "HDF5 chunk shape (z, y, x), clipped to the volume."})


@dataclass
class PreprocessConfig:
    """Everything `episeg preprocess` does; see resources/configs/preprocess.yaml."""

    resample: ResampleConfig = field(default_factory=ResampleConfig)
    normalisation: NormalisationConfig = field(default_factory=NormalisationConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ----------------------------------------------------------------------- resampling
def factors_for_voxel_size(voxel_size: Sequence[float],
                           target_voxel_size: Sequence[float]) -> Vec3:
    """Zoom factors (z, y, x) that take ``voxel_size`` to ``target_voxel_size`` (um)."""
    return tuple(float(v) / float(t) for v, t in zip(voxel_size, target_voxel_size))  # type: ignore


#: Training-grid rule (:func:`training_grid_um`): Y and X are coarsened until the Z step
#: is this many times theirs ...
LATERAL_TO_AXIAL = 2.2
#: ... by at most this factor (the one measured: docs/accuracy.md, steps 26 and 27).
MAX_LATERAL_COARSENING = 1.5
#: Smaller changes are not worth a resampling (which blurs a little).
MIN_LATERAL_COARSENING = 1.1


def training_grid_um(voxel_size_um: Sequence[float]) -> Vec3:
    """The grid (z, y, x) um of a new model trained on a CPU from stacks at ``voxel_size_um``.

    Confocal stacks are sampled much more finely in Y and X than in Z. Where the
    Z step is more than :data:`LATERAL_TO_AXIAL` times the Y/X step, Y and X are
    coarsened towards that ratio, by at most :data:`MAX_LATERAL_COARSENING`; Z
    and isotropic or mildly anisotropic grids are kept. On 1 x 0.3 x 0.3 um
    stacks this gives 1 x 0.45 x 0.45 um: 2.25x fewer voxels for the same
    tissue, so a CPU's training minutes see about twice the tissue (on a GPU,
    which trains far enough either way, the stacks' own grid is kept:
    docs/accuracy.md, step 27). Predictions are still returned on each
    stack's own grid.
    """
    z, y, x = (float(v) for v in voxel_size_um)
    factor = min(MAX_LATERAL_COARSENING, z / (LATERAL_TO_AXIAL * max(y, x)))
    if factor < MIN_LATERAL_COARSENING:
        return (z, y, x)
    return (z, round(y * factor, 6), round(x * factor, 6))


def resampled_shape(shape: Sequence[int], factors: Sequence[float]) -> Tuple[int, int, int]:
    """Output shape for zoom ``factors``: round(n * f), at least 1 per axis."""
    return tuple(max(1, int(round(n * f))) for n, f in zip(shape, factors))  # type: ignore


def _resolve_shape(shape, factors, voxel_size, target_voxel_size):
    if factors is not None and target_voxel_size is not None:
        raise ValueError("give either factors or target_voxel_size, not both")
    if target_voxel_size is not None:
        if voxel_size is None:
            raise ValueError("target_voxel_size needs the input voxel_size")
        factors = factors_for_voxel_size(voxel_size, target_voxel_size)
    if factors is None:
        return tuple(shape)
    if len(factors) != 3 or min(factors) <= 0:
        raise ValueError(f"factors must be three positive numbers (z, y, x), got {factors}")
    return resampled_shape(shape, factors)


def _zoom(arr: np.ndarray, out_shape, *, order: int, out_dtype, sigma=None,
          max_slab_voxels: int = 1 << 24, cancel: CancelFlag = None) -> np.ndarray:
    """``scipy.ndimage.zoom(grid_mode=True, mode='reflect')`` done slab by slab along Z.

    Pixel edges are aligned, so the output voxel size is exactly
    ``voxel_size * in_shape / out_shape``. Slabs overlap by a halo wide enough
    for the spline prefilter and the Gaussian, so the result equals the
    whole-volume zoom while only one slab is held in float64 at a time.
    """
    in_shape = arr.shape
    out_shape = tuple(int(s) for s in out_shape)
    scale = np.asarray(in_shape, float) / np.asarray(out_shape, float)
    shift = 0.5 * scale - 0.5
    out = np.empty(out_shape, dtype=out_dtype)
    halo = (4 * order + 2 if order > 1 else 1) + (int(math.ceil(4 * sigma[0])) + 1 if sigma else 0)
    if out_shape[0] == in_shape[0] and (sigma is None or sigma[0] == 0):
        # Z unchanged: a spline through integer positions returns the samples,
        # so plane-by-plane 2D zooms give the same result with 4x fewer taps.
        for z in range(in_shape[0]):
            if z % 16 == 0:
                check_cancelled(cancel, "Resampling")
            plane = arr[z]
            if sigma is not None and any(s > 0 for s in sigma[1:]):
                plane = ndi.gaussian_filter(plane.astype(np.float32), sigma[1:], mode="reflect")
            ndi.affine_transform(plane, scale[1:], offset=shift[1:], output_shape=out_shape[1:],
                                 output=out[z], order=order, mode="reflect", prefilter=order > 1)
        return out
    in_plane = in_shape[1] * in_shape[2]
    step = max(1, int(max_slab_voxels // max(1.0, scale[0] * in_plane, out_shape[1] * out_shape[2])))
    for z0 in range(0, out_shape[0], step):
        check_cancelled(cancel, "Resampling")
        z1 = min(out_shape[0], z0 + step)
        lo = max(0, int(math.floor(z0 * scale[0] + shift[0])) - halo)
        hi = min(in_shape[0], int(math.ceil((z1 - 1) * scale[0] + shift[0])) + halo + 1)
        sub = arr[lo:hi]
        if sigma is not None and any(s > 0 for s in sigma):
            sub = ndi.gaussian_filter(sub.astype(np.float32), sigma, mode="reflect")
        ndi.affine_transform(sub, scale, offset=(z0 * scale[0] + shift[0] - lo, shift[1], shift[2]),
                             output_shape=(z1 - z0,) + out_shape[1:], output=out[z0:z1],
                             order=order, mode="reflect", prefilter=order > 1)
    return out


def resample_image(img: np.ndarray, factors: Optional[Sequence[float]] = None, *,
                   voxel_size: Optional[Sequence[float]] = None,
                   target_voxel_size: Optional[Sequence[float]] = None, order: int = 3,
                   anti_aliasing: bool = True, max_slab_voxels: int = 1 << 24,
                   cancel: CancelFlag = None) -> np.ndarray:
    """Resample a ZYX image by zoom ``factors`` or to ``target_voxel_size`` (um).

    Spline interpolation of ``order`` (3 as the thesis; scipy.ndimage.zoom with
    aligned pixel edges), done in Z slabs of about ``max_slab_voxels`` so only
    one slab is held in float64 by the spline prefilter. With
    ``anti_aliasing``, axes that shrink are first Gaussian-smoothed with
    sigma = (1/f - 1)/2 voxels. Returns float32 of shape round(shape * f).
    """
    out_shape = _resolve_shape(img.shape, factors, voxel_size, target_voxel_size)
    if out_shape == tuple(img.shape):
        return img.astype(np.float32, copy=True)
    scale = np.asarray(img.shape, float) / np.asarray(out_shape, float)
    sigma = tuple(max(0.0, (s - 1) / 2) for s in scale) if anti_aliasing else None
    return _zoom(img, out_shape, order=order, out_dtype=np.float32, sigma=sigma,
                 max_slab_voxels=max_slab_voxels, cancel=cancel)


@dataclass
class LabelResampleReport:
    """What nearest-neighbour resampling did to a label stack."""

    shape_before: Tuple[int, int, int]
    shape_after: Tuple[int, int, int]
    n_ids_before: int
    n_ids_after: int
    lost_ids: Tuple[int, ...]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def label_ids(labels: np.ndarray) -> np.ndarray:
    """Sorted non-zero ids present in ``labels`` (fast path via slab-wise counts)."""
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    hi = int(labels.max())
    if labels.dtype.kind in "ui" and hi < (1 << 26):
        ids = np.flatnonzero(label_counts(labels))
    else:
        ids = np.unique(labels)
    return ids[ids != 0].astype(np.int64)


def resample_labels(labels: np.ndarray, factors: Optional[Sequence[float]] = None, *,
                    voxel_size: Optional[Sequence[float]] = None,
                    target_voxel_size: Optional[Sequence[float]] = None,
                    cancel: CancelFlag = None) -> Tuple[np.ndarray, LabelResampleReport]:
    """Resample a ZYX label stack with nearest neighbour (order 0): ids unchanged.

    Same geometry as :func:`resample_image`, so labels stay aligned with the
    image. Returns the labels (same dtype) and a report listing ids that
    vanished (cells smaller than an output voxel).
    """
    out_shape = _resolve_shape(labels.shape, factors, voxel_size, target_voxel_size)
    before = label_ids(labels)
    if out_shape == tuple(labels.shape):
        out = labels.copy()
    else:
        out = _zoom(labels, out_shape, order=0, out_dtype=labels.dtype, cancel=cancel)
    after = label_ids(out)
    lost = np.setdiff1d(before, after)
    report = LabelResampleReport(tuple(labels.shape), tuple(out.shape), int(before.size),
                                 int(after.size), tuple(int(i) for i in lost))
    return out, report


# -------------------------------------------------------------------- normalisation
def _chunked_mean_std(img: np.ndarray, mask: Optional[np.ndarray], ddof: int = 1):
    total, count = 0.0, 0
    step = max(1, (1 << 22) // max(1, img[0].size))
    for z in range(0, img.shape[0], step):
        v = img[z:z + step] if mask is None else img[z:z + step][mask[z:z + step]]
        total += float(v.sum(dtype=np.float64))
        count += int(v.size)
        release_pages(img)  # a memory-mapped stack's pages go back as they are read
    if count <= ddof:
        raise VolumeDataError("The normalisation mask selects too few voxels to compute a "
                              "standard deviation; use zscore_mask: all.")
    mean = total / count
    sq = 0.0
    for z in range(0, img.shape[0], step):
        v = img[z:z + step] if mask is None else img[z:z + step][mask[z:z + step]]
        sq += float(np.square(v.astype(np.float64) - mean).sum())
        release_pages(img)
    return mean, math.sqrt(sq / (count - ddof))


def zscore_stats(img: np.ndarray, mask: Union[None, str, np.ndarray] = None) -> Dict[str, float]:
    """Mean and (unbiased) std of ``img`` over ``mask`` as torchio ZNormalization does.

    ``mask``: None or "all" (every voxel), "above_mean" (voxels above the
    volume mean, torchio's foreground choice) or a boolean ZYX array.
    """
    if isinstance(mask, str):
        if mask == "all":
            mask = None
        elif mask == "above_mean":
            mask = img > _chunked_mean_std(img, None, ddof=0)[0]
        else:
            raise ValueError(f"unknown mask {mask!r}")
    mean, std = _chunked_mean_std(img, mask)
    return {"mean": mean, "std": std}


def zscore(img: np.ndarray, mask: Union[None, str, np.ndarray] = None, *,
           stats: Optional[Dict[str, float]] = None) -> np.ndarray:
    """(img - mean) / std as float32 (torchio ZNormalization); see :func:`zscore_stats`."""
    stats = stats or zscore_stats(img, mask)
    if not stats["std"] > 0:
        raise VolumeDataError(
            f"The image is constant (every voxel {stats['mean']:g}), so it cannot be "
            "z-score normalised. Check that the right file or dataset was given.")
    out = np.subtract(img, np.float32(stats["mean"]), dtype=np.float32)
    out /= np.float32(stats["std"])
    return out


def robust_stats(img: np.ndarray, max_samples: int = 16_000_000) -> Dict[str, float]:
    """Median and 1.4826 x median absolute deviation of ``img`` (a robust mean and std).

    On a regular subsample of at most ``max_samples`` voxels when the stack is
    larger (exact when smaller). The MAD of a normal distribution times 1.4826
    is its standard deviation, but a few % of outliers barely move it: a
    saturated nucleus that doubles a stack's standard deviation leaves it alone.
    Falls back to the plain standard deviation when more than half the voxels
    share one value (MAD 0, e.g. a mostly black stack).
    """
    sample = np.asarray(strided_sample(img, max_samples), dtype=np.float64).ravel()
    release_pages(img)
    median = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - median)))
    if not spread > 0:
        spread = float(sample.std())
    return {"median": median, "spread": spread}


def percentile_normalise(img: np.ndarray, low: float = 1.0, high: float = 99.8, *,
                         clip: bool = False,
                         stats: Optional[Dict[str, float]] = None) -> np.ndarray:
    """(img - p_low) / (p_high - p_low) as float32: ~[0, 1], outliers beyond unless ``clip``."""
    if stats is None:
        p_lo, p_hi = np.percentile(img, [low, high])
    else:
        p_lo, p_hi = stats["p_low"], stats["p_high"]
    if not p_hi > p_lo:
        raise VolumeDataError(
            f"Percentiles {low} and {high} of the image are equal ({p_lo:g}), so it cannot be "
            "percentile-normalised. Widen low/high or use normalisation mode zscore.")
    out = np.subtract(img, np.float32(p_lo), dtype=np.float32)
    out /= np.float32(p_hi - p_lo)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def normalise(img: np.ndarray, config: NormalisationConfig) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Apply ``config`` to ``img``; returns (float32 array, JSON-able description with stats)."""
    if config.mode == "zscore":
        stats = zscore_stats(img, config.zscore_mask)
        info = {"mode": "zscore", "mask": config.zscore_mask, **stats}
        return zscore(img, stats=stats), info
    if config.mode == "robust":
        stats = robust_stats(img)
        info = {"mode": "robust", **stats}
        return zscore(img, stats={"mean": stats["median"], "std": stats["spread"]}), info
    if config.mode == "percentile":
        p_lo, p_hi = (float(p) for p in np.percentile(img, [config.low, config.high]))
        info = {"mode": "percentile", "low": config.low, "high": config.high,
                "p_low": p_lo, "p_high": p_hi, "clip": config.clip}
        return percentile_normalise(img, config.low, config.high, clip=config.clip,
                                    stats=info), info
    return img.astype(np.float32, copy=True), {"mode": "none"}


# -------------------------------------------------------------------------- targets
def cells_with_gaps_target(labels: np.ndarray, *, connectivity: int = 3,
                           mode: str = "outer") -> np.ndarray:
    """Binary target "cell vs background + gaps" (thesis step 2), uint8 ZYX {0, 1}.

    The boundaries of every cell (skimage find_boundaries with ``connectivity``
    and ``mode``) are removed from the labels so touching cells are separated
    by a gap, then every cell is set to 1.
    """
    gaps = find_boundaries(labels, connectivity=connectivity, mode=mode, background=0)
    target = labels != 0
    target &= ~gaps
    return target.view(np.uint8)


def tissue_target(labels: np.ndarray) -> np.ndarray:
    """Binary target "inside any cell" (labels > 0), uint8 ZYX {0, 1}.

    The cells-with-gaps target leaves the gaps between cells as background, so
    its mask misses the cell outlines; this one gives the tissue's exact extent.
    """
    return (labels != 0).view(np.uint8)


def boundary_target(labels: np.ndarray, *, connectivity: int = 2, mode: str = "thick",
                    include_background: bool = True, sigma: float = 0.0,
                    blur: str = "soft") -> np.ndarray:
    """Cell-boundary target (PlantSeg style) from a ZYX label stack.

    find_boundaries(``connectivity``, ``mode``): 'thick' marks both sides of
    every interface (~2 voxels), including the tissue/background border unless
    ``include_background`` is False (then only borders between two cells).
    ``sigma`` > 0 (voxels) blurs it: ``blur='soft'`` gives float32
    max(boundary, gaussian) in [0, 1]; ``'threshold'`` gives uint8
    gaussian >= 0.5 (PlantSeg). Without blur: uint8 {0, 1}.
    """
    bnd = find_boundaries(labels, connectivity=connectivity, mode=mode, background=0)
    if not include_background:
        fp = ndi.generate_binary_structure(labels.ndim, connectivity)
        top = ndi.grey_dilation(labels, footprint=fp)
        cells_only = labels.copy()
        cells_only[labels == 0] = np.iinfo(labels.dtype).max if labels.dtype.kind in "ui" else 0
        bottom = ndi.grey_erosion(cells_only, footprint=fp)
        bnd &= (top != bottom) & (top != 0)
    if sigma <= 0:
        return bnd.view(np.uint8)
    smooth = ndi.gaussian_filter(bnd.astype(np.float32), sigma, mode="reflect")
    if blur == "threshold":
        return (smooth >= 0.5).view(np.uint8)
    return np.maximum(smooth, bnd, out=smooth)


def axis_wall_target(labels: np.ndarray, axis: int) -> np.ndarray:
    """Voxels whose neighbour along ``axis`` (0 = Z, 1 = Y, 2 = X), before or
    after, is another cell: uint8 ZYX {0, 1}.

    Across a wall that meets the axis, exactly the voxel pair on either side is
    marked, so the band says between which two voxels the wall lies (unlike
    :func:`boundary_target`, whose diagonal neighbours widen it to ~3 voxels on
    tilted walls). Borders with the background (label 0) are not walls.
    """
    lab = np.asarray(labels)
    out = np.zeros(lab.shape, np.uint8)
    lo, hi = face_pairs(lab.ndim, axis)
    a, b = lab[lo], lab[hi]
    wall = (a != b) & (a != 0) & (b != 0)
    out[lo] |= wall
    out[hi] |= wall
    return out


# -------------------------------------------------------------------------- checks
@dataclass
class CellCountReport:
    """Cells in the labels vs connected components of a target, compared per id.

    n_cells: distinct non-zero ids; n_components: connected components of the
    target; lost_ids: ids with no target voxel left; merged: groups of ids
    sharing one target component; split_ids: ids in more pieces in the target
    than in the labels (cut by the gaps); split_in_labels_ids: ids in several
    target components because they are already in several pieces in the
    labels (imperfect ground truth; informative only).
    """

    n_cells: int
    n_components: int
    lost_ids: Tuple[int, ...]
    merged: Tuple[Tuple[int, ...], ...]
    split_ids: Tuple[int, ...]
    split_in_labels_ids: Tuple[int, ...]
    connectivity: int

    @property
    def n_lost(self) -> int:
        return len(self.lost_ids)

    @property
    def n_merged(self) -> int:
        return len(self.merged)

    @property
    def ok(self) -> bool:
        """No cell lost and no two cells merged."""
        return not self.lost_ids and not self.merged

    def summary(self) -> str:
        text = (f"{self.n_cells} cells in labels, {self.n_components} components in target, "
                f"{self.n_lost} lost, {self.n_merged} merged, {len(self.split_ids)} split by "
                f"the gaps")
        if self.split_in_labels_ids:
            text += (f" ({len(self.split_in_labels_ids)} more in several pieces already in "
                     "the labels)")
        if self.lost_ids:
            text += f"; lost ids: {_few(self.lost_ids)}"
        if self.merged:
            text += "; merged: " + _few(["+".join(map(str, g)) for g in self.merged])
        return text

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["merged"] = [list(g) for g in self.merged]
        d.update(n_lost=self.n_lost, n_merged=self.n_merged, ok=self.ok)
        return d


def _few(items, n: int = 10) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def _index_of(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of every value in sorted ``ids`` (values must all be in ids)."""
    if ids.size and int(ids[-1]) < (1 << 24):
        lut = np.zeros(int(ids[-1]) + 1, dtype=np.int32)
        lut[ids] = np.arange(ids.size, dtype=np.int32)
        return lut[values]
    return np.searchsorted(ids, values)


def _pieces_in_labels(labels: np.ndarray, which: np.ndarray, connectivity: int) -> np.ndarray:
    """Connected pieces of each id in ``which`` (a few ids) within ``labels``."""
    if which.size == 0:
        return np.zeros(0, np.int64)
    mask = np.isin(labels, which)
    sub = np.zeros(labels.shape, np.int32)  # 1..k for the ids in ``which``, 0 elsewhere
    sub[mask] = np.searchsorted(which, labels[mask]) + 1
    structure = ndi.generate_binary_structure(labels.ndim, connectivity)
    boxes = ndi.find_objects(sub, max_label=which.size)
    return np.array([ndi.label(sub[box] == j, structure)[1] for j, box in enumerate(boxes, 1)],
                    dtype=np.int64)


def check_cell_counts(labels: np.ndarray, target: np.ndarray, *,
                      connectivity: int = 3) -> CellCountReport:
    """Compare the cells of ``labels`` with the connected components of ``target``.

    Components are found with skimage.measure.label(``connectivity``) and
    matched to label ids voxel by voxel, so the comparison is per cell: a
    cell whose id already forms several pieces in the labels (imperfect ground
    truth) is reported as such, not as split by the target.
    """
    ids = label_ids(labels)
    n = max(int(ids.size), 1)
    tgt_cc, n_comp = measure.label(target != 0, connectivity=connectivity,
                                   background=0, return_num=True)
    inside = (tgt_cc != 0) & (labels != 0)
    key = tgt_cc[inside].astype(np.int64) * n + _index_of(labels[inside], ids)
    del inside, tgt_cc
    if (n_comp + 1) * n < 50_000_000:
        pairs = np.flatnonzero(np.bincount(key, minlength=(n_comp + 1) * n))
    else:
        pairs = np.unique(key)
    del key
    comp_of, id_of = pairs // n, pairs % n
    pieces_after = np.bincount(id_of, minlength=ids.size)[:ids.size]
    ids_per_comp = np.bincount(comp_of, minlength=n_comp + 1)
    merged = tuple(tuple(int(ids[i]) for i in id_of[comp_of == c])
                   for c in np.flatnonzero(ids_per_comp > 1))
    several = ids[pieces_after > 1]  # few: only these need their pieces in the labels
    before = _pieces_in_labels(labels, several, connectivity)
    return CellCountReport(
        n_cells=int(ids.size), n_components=int(n_comp),
        lost_ids=tuple(int(i) for i in ids[pieces_after == 0]), merged=merged,
        split_ids=tuple(int(i) for i in several[pieces_after[pieces_after > 1] > before]),
        split_in_labels_ids=tuple(int(i) for i in several[before > 1]),
        connectivity=connectivity)


# ------------------------------------------------------------------- whole volume
@dataclass
class PreprocessResult:
    """Arrays (ZYX) and metadata of one preprocessed volume."""

    raw: np.ndarray
    labels: Optional[np.ndarray]
    cells_with_gaps: Optional[np.ndarray]
    boundaries: Optional[np.ndarray]
    name: str
    source_raw: str
    source_labels: str
    original_shape: Tuple[int, int, int]
    original_voxel_size: Optional[Vec3]
    voxel_size: Optional[Vec3]
    factors: Vec3
    normalisation: Dict[str, Any]
    cell_check: Optional[CellCountReport]
    label_resample: Optional[LabelResampleReport]
    config: PreprocessConfig
    warnings: List[str] = field(default_factory=list)

    def summary_lines(self) -> List[str]:
        """Human-readable lines: shapes, voxel sizes, normalisation, cell check."""
        def vs(v):
            return "unknown" if v is None else " x ".join(f"{x:g}" for x in v) + " um"
        lines = [f"shape {_shape(self.original_shape)} -> {_shape(self.raw.shape)} "
                 f"(factors {', '.join(f'{f:.4g}' for f in self.factors)})",
                 f"voxel size (z, y, x) {vs(self.original_voxel_size)} -> {vs(self.voxel_size)}"]
        norm = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in self.normalisation.items())
        lines.append(f"normalisation: {norm}")
        if self.label_resample is not None:
            r = self.label_resample
            lines.append(f"label resampling: {r.n_ids_before} ids -> {r.n_ids_after}"
                         + (f", lost ids {_few(r.lost_ids)}" if r.lost_ids else ""))
        if self.cell_check is not None:
            lines.append("cell check: " + self.cell_check.summary())
        return lines + [f"warning: {w}" for w in self.warnings]


def _shape(s) -> str:
    return " x ".join(str(int(v)) for v in s)


def preprocess_volume(raw: Volume, labels: Optional[Volume], config: PreprocessConfig, *,
                      progress: ProgressFn = None, cancel: CancelFlag = None) -> PreprocessResult:
    """Run the configured pipeline on one raw volume and (optionally) its labels.

    Inputs are not modified. Raises :class:`VolumeDataError` on unusable data
    (or on lost/merged cells with ``check.counts: error``) and
    :class:`ConfigError` when resampling needs a voxel size that is unknown.
    """
    steps = 2 + (4 if labels is not None else 0)
    rep = ProgressReporter(progress, "preprocess", total=steps)
    warnings: List[str] = []
    data = np.asarray(raw.data)
    if data.ndim != 3:
        raise VolumeDataError(f"{raw.source or raw.name}: expected a 3D (Z, Y, X) image, got "
                              f"shape {data.shape}. Pick one channel/time point.")
    if labels is not None:
        from core.io import check_same_shape
        check_same_shape(raw, labels)
    bad = int(data.size - np.count_nonzero(np.isfinite(data))) if data.dtype.kind == "f" else 0
    if bad:
        raise VolumeDataError(f"{raw.source or raw.name}: {bad} voxels are NaN or infinite. "
                              "Fix or re-export the image.")

    rc = config.resample
    vsize = raw.voxel_size
    if labels is not None and labels.voxel_size is not None and vsize is not None and \
            not np.allclose(labels.voxel_size, vsize, rtol=1e-3):
        warnings.append(f"voxel size of labels {labels.voxel_size} differs from raw {vsize}; "
                        "using the raw one.")
    if rc.input_voxel_size_um is not None:
        if vsize is not None and not np.allclose(vsize, rc.input_voxel_size_um, rtol=1e-3):
            warnings.append(f"file voxel size {tuple(vsize)} um replaced by "
                            f"input_voxel_size_um {rc.input_voxel_size_um}.")
        vsize = rc.input_voxel_size_um
    vsize = None if vsize is None else tuple(float(v) for v in vsize)
    if rc.target_voxel_size_um is not None and vsize is None:
        raise ConfigError(
            f"{raw.source or raw.name}: the file records no voxel size, so it cannot be "
            "resampled to target_voxel_size_um. Give resample.input_voxel_size_um "
            "(--input-voxel-size Z,Y,X) or use resample.factors.")
    factors = rc.factors
    if rc.target_voxel_size_um is not None:
        factors = factors_for_voxel_size(vsize, rc.target_voxel_size_um)
    shape0 = tuple(int(s) for s in data.shape)
    out_shape = shape0 if factors is None else resampled_shape(shape0, factors)
    actual = tuple(o / i for o, i in zip(out_shape, shape0))
    new_vsize = None if vsize is None else tuple(v / f for v, f in zip(vsize, actual))

    rep.update(0, f"{raw.name}: resampling {_shape(shape0)} -> {_shape(out_shape)}"
               if out_shape != shape0 else "", step="resample")
    check_cancelled(cancel, "Preprocessing")
    if out_shape != shape0:
        img = resample_image(data.astype(np.float32, copy=False), actual,
                             anti_aliasing=rc.anti_aliasing, cancel=cancel)
    else:
        img = data  # normalise() returns a new float32 array; the input is never modified

    rep.update(1, step="normalise")
    check_cancelled(cancel, "Preprocessing")
    img, norm_info = normalise(img, config.normalisation)
    if config.output.raw_dtype == "float16":
        if float(np.abs(img).max()) > np.finfo(np.float16).max:
            raise VolumeDataError(f"{raw.source or raw.name}: values exceed float16; use "
                                  "output.raw_dtype: float32 or normalise the image.")
        img = img.astype(np.float16)

    lab = gaps = bnd = check = lres = None
    if labels is not None:
        rep.update(2, step="labels")
        lab = as_labels(labels.data, where=labels.source or labels.name)
        if out_shape != shape0:
            lab, lres = resample_labels(lab, actual, cancel=cancel)
            lab = as_labels(lab)
            if lres.lost_ids:
                warnings.append(f"{len(lres.lost_ids)} cells vanished when resampling the "
                                f"labels (ids {_few(lres.lost_ids)}): smaller than a voxel.")
        tc = config.targets
        if tc.cells_with_gaps:
            rep.update(3, step="gaps target")
            check_cancelled(cancel, "Preprocessing")
            gaps = cells_with_gaps_target(lab, connectivity=tc.connectivity, mode=tc.mode)
        if tc.boundaries:
            rep.update(4, step="boundary target")
            check_cancelled(cancel, "Preprocessing")
            bnd = boundary_target(lab, connectivity=tc.boundary_connectivity,
                                  mode=tc.boundary_mode, include_background=tc.boundary_background,
                                  sigma=tc.boundary_sigma, blur=tc.boundary_blur)
        if gaps is not None and config.check.counts != "off":
            rep.update(5, step="cell check")
            check_cancelled(cancel, "Preprocessing")
            check = check_cell_counts(lab, gaps, connectivity=config.check.connectivity)
            if not check.ok:
                msg = (f"{labels.source or labels.name}: {check.n_lost} cells lost and "
                       f"{check.n_merged} groups of cells merged in the cells-with-gaps "
                       "target (ids in the cell check).")
                if check.lost_ids:
                    msg += (" A gap takes one voxel on each side of an interface, so cells "
                            "at most ~2 voxels thick vanish: check those ids in the labels "
                            "and do not downsample them.")
                if check.merged:
                    msg += (" Merged cells still touch through a gap that is too thin: "
                            f"set targets.connectivity to {config.check.connectivity} or "
                            "more.")
                if config.check.counts == "error":
                    raise VolumeDataError(f"{msg} {check.summary()}. To accept this, set "
                                          "check.counts: warn (--check warn).")
                warnings.append(msg)
    rep.update(steps, step="done")
    return PreprocessResult(
        raw=img, labels=lab, cells_with_gaps=gaps, boundaries=bnd, name=raw.name,
        source_raw=raw.source, source_labels=labels.source if labels is not None else "",
        original_shape=shape0, original_voxel_size=vsize, voxel_size=new_vsize,
        factors=actual, normalisation=norm_info, cell_check=check, label_resample=lres,
        config=config, warnings=warnings)


# --------------------------------------------------------------------------- HDF5
def write_preprocessed(path: Union[str, Path], result: PreprocessResult) -> Path:
    """Write ``result`` as one compressed HDF5 file (layout in the module docstring).

    Written atomically (core.io.atomic.atomic_path): a crash never leaves half
    a file; OS errors (no space, no permission) become VolumeWriteError.
    """
    import h5py
    from core.io.atomic import atomic_path

    path = Path(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise VolumeWriteError(f"{path}: preprocessed output must be an HDF5 file; "
                               "use the extension .h5 or .hdf5.")
    oc = result.config.output
    level = oc.compression_level
    datasets = [("raw", result.raw), ("label", result.labels),
                ("cells_with_gaps", result.cells_with_gaps), ("boundaries", result.boundaries)]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, arr in datasets:
            if arr is None:
                continue
            chunks = tuple(min(c, s) for c, s in zip(oc.chunks, arr.shape))
            ds = f.create_dataset(name, data=arr, chunks=chunks,
                                  compression="gzip" if level > 0 else None,
                                  compression_opts=level if level > 0 else None)
            if result.voxel_size is not None:
                ds.attrs["element_size_um"] = np.asarray(result.voxel_size, float)
        a = f.attrs
        a["format"], a["format_version"], a["episeg_version"] = FORMAT, FORMAT_VERSION, __version__
        a["name"], a["source_raw"], a["source_labels"] = (
            result.name, result.source_raw, result.source_labels)
        if result.voxel_size is not None:
            a["voxel_size_um"] = np.asarray(result.voxel_size, float)
        if result.original_voxel_size is not None:
            a["original_voxel_size_um"] = np.asarray(result.original_voxel_size, float)
        a["original_shape"] = np.asarray(result.original_shape, np.int64)
        a["resample_factors"] = np.asarray(result.factors, float)
        a["normalisation"] = json.dumps(result.normalisation)
        chk = result.cell_check
        a["cell_check"] = json.dumps(chk.to_dict()) if chk is not None else ""
        if chk is not None:
            for k in ("n_cells", "n_components", "n_lost", "n_merged"):
                a[k] = int(getattr(chk, k))
        lr = result.label_resample
        a["label_resample"] = json.dumps(lr.to_dict()) if lr is not None else ""
        a["config"] = to_yaml(result.config)
    return path


def read_preprocessed(path: Union[str, Path],
                      datasets: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Read a file written by :func:`write_preprocessed` into a dict.

    Keys: the datasets present ("raw", "label", "cells_with_gaps",
    "boundaries"; or only those in ``datasets``), "voxel_size_um",
    "original_voxel_size_um" (tuples or None), "resample_factors",
    "original_shape", "normalisation", "cell_check", "label_resample"
    (dicts or None), "source_raw", "source_labels", "name",
    "episeg_version", "config" (YAML text).
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as err:
        raise VolumeReadError(f"{path}: cannot open as HDF5 ({err}).") from None
    with f:
        a = f.attrs
        if a.get("format") != FORMAT:
            raise VolumeReadError(f"{path}: not an EpiSeg preprocessed file (no format="
                                  f"'{FORMAT}' attribute). Create it with episeg preprocess.")
        out: Dict[str, Any] = {}
        for name in ("raw", "label") + TARGET_DATASETS:
            if name in f and (datasets is None or name in datasets):
                out[name] = f[name][()]

        def vec(key, kind=float):
            return tuple(kind(v) for v in a[key]) if key in a else None

        out["voxel_size_um"] = vec("voxel_size_um")
        out["original_voxel_size_um"] = vec("original_voxel_size_um")
        out["resample_factors"] = vec("resample_factors")
        out["original_shape"] = vec("original_shape", int)
        for key in ("normalisation", "cell_check", "label_resample"):
            out[key] = json.loads(a[key]) if a.get(key) else None
        for key in ("source_raw", "source_labels", "name", "episeg_version", "config"):
            out[key] = str(a.get(key, ""))
        out["format_version"] = int(a["format_version"])
    return out
