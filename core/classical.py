"""Classical segmentation without a network: the baseline a Fiji user would build.

Gaussian smoothing -> Otsu threshold of the membrane signal (the brightest
1 % of voxels clipped first, as Fiji's "Enhance Contrast" saturates them, so
that a few very bright spots cannot pull the threshold above every membrane)
-> the dark
regions between membranes -> distance transform -> one seed per regional
maximum (h-maxima) -> watershed of the smoothed image from the seeds (what
MorphoLibJ's "Distance Transform Watershed 3D" does). Regions far larger than
a typical cell (lumen, outside the tissue) are set to background.

Used by ``benchmarks/quality.py`` as the reference row every trained model
must beat. Arrays are ZYX, voxel sizes (z, y, x) in micrometres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from core.errors import ConfigError, VolumeDataError
from core.volume import label_counts, label_dtype


@dataclass
class ClassicalParams:
    """Parameters of :func:`classical_cells`.

    smoothing_um: Gaussian sigma in micrometres (per axis through the voxel size).
    threshold_factor: multiplies the Otsu threshold of the smoothed image.
    seed_h_um: a distance-transform maximum must rise this much (um) above its
        surroundings to seed a cell.
    max_cell_factor: regions larger than this many times the median region
        are background (lumen, outside the tissue).
    min_cell_size_um3: smaller regions are background.
    saturated_percent: the brightest this-many percent of the smoothed image are
        clipped before Otsu's threshold is computed (0: none). A saturated
        nucleus or a speck of debris covering ~1 % of a stack otherwise puts
        the threshold above every membrane, and the "cells" merge into one.
    """

    smoothing_um: float = 0.5
    threshold_factor: float = 1.0
    seed_h_um: float = 0.5
    max_cell_factor: float = 10.0
    min_cell_size_um3: float = 5.0
    saturated_percent: float = 1.0

    def validate(self) -> None:
        for key in ("smoothing_um", "seed_h_um", "min_cell_size_um3"):
            if getattr(self, key) < 0:
                raise ConfigError(f"classical.{key} = {getattr(self, key)}: must be >= 0.")
        for key in ("threshold_factor", "max_cell_factor"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"classical.{key} = {getattr(self, key)}: must be > 0.")
        if not 0 <= self.saturated_percent < 50:
            raise ConfigError(f"classical.saturated_percent = {self.saturated_percent}: use a "
                              "percentage from 0 to 50 (e.g. 1).")


def _otsu_saturated(image: np.ndarray, saturated_percent: float) -> float:
    """Otsu's threshold of ``image`` with its brightest ``saturated_percent`` % clipped."""
    if saturated_percent <= 0:
        return float(threshold_otsu(image))
    top = np.percentile(image, 100.0 - saturated_percent)
    return float(threshold_otsu(np.minimum(image, top)))


def classical_cells(image: np.ndarray, voxel_size: Sequence[float],
                    params: ClassicalParams = ClassicalParams()) -> np.ndarray:
    """Cells of a membrane-stained ZYX stack by smoothing, Otsu and watershed.

    Returns labels (ZYX, smallest unsigned dtype): 0 background, cells 1..n.
    """
    params.validate()
    if np.asarray(image).ndim != 3:
        raise VolumeDataError(f"classical_cells needs a 3D (Z, Y, X) image, got shape {np.shape(image)}.")
    vs = np.asarray(voxel_size, dtype=float)
    smooth = ndi.gaussian_filter(np.asarray(image, dtype=np.float32),
                                 sigma=params.smoothing_um / vs)
    membrane = smooth > _otsu_saturated(smooth, params.saturated_percent) * params.threshold_factor
    dist = ndi.distance_transform_edt(~membrane, sampling=vs).astype(np.float32)
    peaks = h_maxima(dist, params.seed_h_um) if params.seed_h_um > 0 else dist > 0
    seeds, _ = ndi.label(peaks & ~membrane, structure=np.ones((3, 3, 3), bool))
    labels = watershed(smooth, markers=seeds)
    sizes = label_counts(labels).astype(float) * float(np.prod(vs))
    sizes[0] = 0
    present = sizes > 0
    if not present.any():
        return np.zeros(labels.shape, dtype=np.uint8)
    median = float(np.median(sizes[present]))
    keep = present & (sizes >= params.min_cell_size_um3) & (sizes <= params.max_cell_factor * median)
    n = int(keep.sum())
    lut = np.zeros(len(keep), dtype=label_dtype(n))
    lut[keep] = np.arange(1, n + 1)
    return lut[labels]
