"""Training losses on logits, and the Falk et al. (2019) weight map.

Tensors are ``(N, C, Z, Y, X)``: ``logits`` straight from the network (no
sigmoid), ``target`` in [0, 1] with the same shape, and an optional voxel
``weight`` of shape ``(N, 1, Z, Y, X)`` (broadcast over channels) or
``(N, C, Z, Y, X)``. Every loss casts to float32 first, so it is numerically
stable inside ``torch.autocast`` (fp16/bf16 forward passes): BCE uses the
log-sum-exp form of :func:`torch.nn.functional.binary_cross_entropy_with_logits`
and Dice the float32 sigmoid.

Losses (``make_loss(name)``):

``dice``
    Soft Dice per channel, ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)``,
    summed over the batch and all voxels, averaged over channels (the thesis'
    fix for BCE collapsing to all-background).
``bce``
    Binary cross-entropy, mean over voxels.
``weighted_bce``
    BCE with a per-voxel weight map (:func:`falk_weight_map`): class balance
    plus a separation term that is large in the thin gaps between close
    cells, so the network learns to keep touching cells apart.
``bce_dice``
    ``bce_weight * BCE + dice_weight * Dice`` (BCE weighted when a weight map
    is given).
``weighted_bce_dice``
    ``bce_dice`` with the Falk weight map on its BCE term.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from core.errors import ConfigError

LOSSES = ("dice", "bce", "weighted_bce", "bce_dice", "weighted_bce_dice")


def _f32(*tensors):
    return [None if t is None else t.float() for t in tensors]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per channel, averaged over channels; 0 for a perfect prediction.

    Sums run over the batch and every voxel of a channel, so patches without
    cells do not produce undefined ratios (``smooth`` keeps them finite).
    """
    logits, target = _f32(logits, target)
    prob = torch.sigmoid(logits)
    dims = (0,) + tuple(range(2, logits.dim()))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - dice.mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor,
             weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over voxels (weighted mean if ``weight``).

    With a weight map the sum of weighted losses is divided by the sum of the
    weights, so the loss scale does not depend on the weights' magnitude.
    """
    logits, target, weight = _f32(logits, target, weight)
    per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is None:
        return per_voxel.mean()
    weight = weight.expand_as(per_voxel)
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1e-6)


class Loss:
    """A configured loss: ``loss(logits, target, weight=None) -> scalar tensor``.

    ``needs_weight_map`` tells the data pipeline to compute and crop the
    Falk weight map alongside the targets.
    """

    def __init__(self, name: str, *, bce_weight: float = 1.0, dice_weight: float = 1.0,
                 dice_smooth: float = 1.0):
        if name not in LOSSES:
            raise ConfigError(f"loss.name = {name!r} is unknown: use one of {', '.join(LOSSES)}.")
        self.name = name
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.dice_smooth = float(dice_smooth)

    @property
    def needs_weight_map(self) -> bool:
        return self.name in ("weighted_bce", "weighted_bce_dice")

    def __call__(self, logits: torch.Tensor, target: torch.Tensor,
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        if self.name == "dice":
            return dice_loss(logits, target, smooth=self.dice_smooth)
        if self.name == "bce":
            return bce_loss(logits, target)
        if self.needs_weight_map and weight is None:
            raise ValueError(f"{self.name} needs a weight map")
        if self.name == "weighted_bce":
            return bce_loss(logits, target, weight)
        return (self.bce_weight * bce_loss(logits, target, weight)
                + self.dice_weight * dice_loss(logits, target, smooth=self.dice_smooth))

    def __repr__(self) -> str:
        return f"Loss({self.name!r})"


def make_loss(name: str, **params) -> Loss:
    """The loss called ``name`` (one of :data:`LOSSES`); ``params`` as in :class:`Loss`."""
    return Loss(name, **params)


def falk_weight_map(
    cells: np.ndarray,
    *,
    foreground: Optional[np.ndarray] = None,
    w0: float = 10.0,
    sigma_vox: float = 5.0,
    voxel_size: Optional[Sequence[float]] = None,
    balance: bool = True,
    dtype=np.float32,
) -> np.ndarray:
    """Per-voxel loss weights ``w = w_bal + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``.

    Falk et al. (2019) / Ronneberger et al. (2015). ``d1`` and ``d2`` are the
    distances from a background voxel to the nearest and second-nearest cell;
    the separation term is added to background voxels only (cell voxels have
    ``d1 = 0`` and get the class weight alone), so it peaks in the gaps between
    touching cells.

    Parameters
    ----------
    cells : ZYX instance labels of the *target* cells (0 = background), e.g.
        the labels with the cells-with-gaps gaps removed, so the gaps are
        background here.
    foreground : ZYX boolean/0-1 target used for the class balance (default
        ``cells > 0``).
    w0 : height of the separation term (Falk: 10).
    sigma_vox : its width, in units of the finest voxel (Falk: 5 pixels).
    voxel_size : (z, y, x) in micrometres: distances along coarser axes count
        proportionally more (None: isotropic).
    balance : w_bal = 0.5 / (class frequency) per class (mean weight 1);
        False: w_bal = 1.

    Returns
    -------
    ZYX array of ``dtype`` (float32), every value >= the smallest class weight.

    Cost: one Euclidean distance transform (scipy ``distance_transform_edt``)
    per cell, on the cell's bounding box grown by ``3 * sigma`` (beyond that
    the separation term is below exp(-18) ~ 0 and is ignored). Time and memory
    grow with the number of cells times their box size; about 1 s for a
    64 x 256 x 256 stack with 100 cells on one core. Computed once per volume
    at load.
    """
    cells = np.asarray(cells)
    if cells.ndim != 3:
        raise ValueError(f"cells must be a 3D (Z, Y, X) label array, got shape {cells.shape}")
    fg = (cells > 0) if foreground is None else (np.asarray(foreground) > 0)
    if voxel_size is None:
        sampling = np.ones(3)
    else:
        v = np.asarray(voxel_size, float)
        sampling = v / v.min()
    if balance:
        frac = float(fg.mean())
        frac = min(max(frac, 1e-3), 1 - 1e-3)
        w_fg, w_bg = 0.5 / frac, 0.5 / (1 - frac)
    else:
        w_fg = w_bg = 1.0
    weight = np.where(fg, np.float32(w_fg), np.float32(w_bg)).astype(np.float32)
    if w0 <= 0:
        return weight.astype(dtype, copy=False)

    reach = 3.0 * float(sigma_vox)
    big = np.float32(np.inf)
    d1 = np.full(cells.shape, big, np.float32)
    d2 = np.full(cells.shape, big, np.float32)
    objects = ndi.find_objects(cells.astype(np.int64, copy=False)
                               if cells.dtype.kind not in "iu" else cells)
    grow = [int(np.ceil(reach / s)) for s in sampling]
    for cid, box in enumerate(objects, start=1):
        if box is None:
            continue
        box = tuple(slice(max(0, sl.start - g), min(n, sl.stop + g))
                    for sl, g, n in zip(box, grow, cells.shape))
        outside = cells[box] != cid
        dist = ndi.distance_transform_edt(outside, sampling=sampling).astype(np.float32)
        a, b = d1[box], d2[box]
        b[...] = np.minimum(b, np.maximum(a, dist))
        a[...] = np.minimum(a, dist)
    sep = np.zeros(cells.shape, np.float32)
    ok = ~fg & np.isfinite(d2)
    s = d1[ok] + d2[ok]
    sep[ok] = np.float32(w0) * np.exp(-(s * s) / np.float32(2.0 * sigma_vox ** 2))
    weight += sep
    return weight.astype(dtype, copy=False)


def loss_names() -> Dict[str, str]:
    """``{name: one-line description}`` for help texts."""
    return {
        "dice": "soft Dice per channel (robust to few cell voxels)",
        "bce": "binary cross-entropy",
        "weighted_bce": "BCE weighted by class balance + separation of close cells (Falk 2019)",
        "bce_dice": "BCE + Dice",
        "weighted_bce_dice": "Falk-weighted BCE + Dice",
    }


LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
