"""Training data: volumes with targets, patch sampling and augmentation.

Axis order is ZYX; voxel sizes are (z, y, x) in micrometres; patch sizes are
(z, y, x) in voxels. Tensors are ``(N, C, Z, Y, X)``.

Pipeline
--------
1. **Load** (:func:`load_pair`, :func:`load_h5`, :func:`volume_from_arrays`):
   raw + labels of any supported format, or an HDF5 file written by
   ``episeg preprocess``. Raw images are resampled to the training voxel size
   (spline order 3; labels nearest) and normalised (z-score or percentile,
   :mod:`core.preprocess`); the targets (``cells_with_gaps``, ``boundaries``)
   are computed in memory from the labels with :mod:`core.preprocess`, plus the
   Falk weight map when the loss needs it (:func:`core.losses.falk_weight_map`).
   The result is a :class:`TrainVolume`.
2. **Sample** (:class:`PatchSampler`): random patches at full resolution; with
   probability ``foreground_probability`` a patch is placed around a random
   cell voxel (jittered so cells appear anywhere in the patch), otherwise
   anywhere. Volumes are drawn with equal probability, so small datasets are
   not drowned by large ones. A random 90-degree rotation in XY is applied at
   this stage: when it is odd the crop is taken with Y and X extents swapped
   and then rotated, so non-square patches work too.
3. **Augment** (:class:`Augmenter`, on torch tensors, on the training
   device): random flips on all three axes with kornia
   (``RandomDepthicalFlip3D``, ``RandomVerticalFlip3D``,
   ``RandomHorizontalFlip3D``; image, targets and weights are stacked as
   channels of one tensor so every flip hits all of them identically),
   intensity changes of the image only (gamma with
   ``kornia.enhance.adjust_gamma``, contrast with
   ``kornia.enhance.adjust_contrast_with_mean_subtraction``, Gaussian noise),
   and optionally an elastic deformation (torchio
   ``RandomElasticDeformation``: image linear, targets nearest, on the CPU).

Every random choice comes from the sampler's ``numpy.random.Generator`` or
from torch's global generator, whose states the training loop saves in the
model file so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from core.errors import ConfigError, VolumeDataError
from core.walls import WALL_CHANNELS

Triple = Tuple[int, int, int]
TARGETS = ("cells_with_gaps", "boundaries", "both", "all", "all_walls")


def wall_yx_channels(target: str) -> Optional[Tuple[int, int]]:
    """Channels of the Y and X wall bands of ``target`` (swapped by a 90-degree
    YX rotation), or None when it has none."""
    names = target_names(target)
    if WALL_CHANNELS[1] in names:
        return names.index(WALL_CHANNELS[1]), names.index(WALL_CHANNELS[2])
    return None


def target_names(target: str) -> Tuple[str, ...]:
    """Target arrays stacked as channels for a training target, in channel order."""
    if target == "cells_with_gaps":
        return ("cells_with_gaps",)
    if target == "boundaries":
        return ("boundaries",)
    if target == "both":
        return ("cells_with_gaps", "boundaries")
    if target == "all":
        return ("cells_with_gaps", "boundaries", "tissue")
    if target == "all_walls":
        return ("cells_with_gaps", "boundaries", "tissue") + WALL_CHANNELS
    raise ConfigError(f"target = {target!r} is unknown: use one of {', '.join(TARGETS)}.")


# ------------------------------------------------------------------ volumes
@dataclass
class TrainVolume:
    """One training or validation volume, ready for patch sampling.

    image: float32 ZYX, normalised. targets: ``(C, Z, Y, X)`` uint8 {0, 1} or
    float32 [0, 1], channels as :func:`target_names`. labels: instance labels
    (ZYX, 0 = background) for the cell-level validation metrics, or None.
    weight: float32 ZYX Falk weight map, or None. foreground: flat indices of a
    subsample of cell voxels (for foreground-centred patches).
    """

    name: str
    image: np.ndarray
    targets: np.ndarray
    labels: Optional[np.ndarray] = None
    weight: Optional[np.ndarray] = None
    voxel_size: Optional[Tuple[float, float, float]] = None
    foreground: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    source: str = ""
    warnings: List[str] = field(default_factory=list)
    #: A held-out part split from a stack: the image of the part with as many
    #: training voxels beside it, and the part's ZYX slices in that image, so
    #: the post-processing search can segment it in context
    #: (:mod:`core.segment_choice`). None for whole volumes.
    context: Optional[Tuple[np.ndarray, Tuple[slice, slice, slice]]] = None

    @property
    def shape(self) -> Triple:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def split(self, fraction: float, axis: Optional[int] = None) -> Tuple["TrainVolume", "TrainVolume"]:
        """(train part, held-out part): the last ``fraction`` along Y or X (the longer).

        Epithelial cells span the stack in Z, so the split is across the
        tissue plane; the two parts share no voxel. The held-out part's
        ``context`` is its image with up to as many training voxels beside it.
        """
        if axis is None:
            axis = 1 if self.shape[1] >= self.shape[2] else 2
        n = self.shape[axis]
        cut = int(round(n * (1.0 - fraction)))
        cut = min(max(cut, 1), n - 1)

        def part(a, lo, hi, ax):
            if a is None:
                return None
            idx = [slice(None)] * a.ndim
            idx[ax] = slice(lo, hi)
            return np.ascontiguousarray(a[tuple(idx)])

        out = []
        for lo, hi, tag in ((0, cut, "train"), (cut, n, "held out")):
            targets = part(self.targets, lo, hi, axis + 1)
            out.append(TrainVolume(
                name=f"{self.name} ({tag})", image=part(self.image, lo, hi, axis),
                targets=targets, labels=part(self.labels, lo, hi, axis),
                weight=part(self.weight, lo, hi, axis), voxel_size=self.voxel_size,
                foreground=foreground_indices(targets), source=self.source))
        lo = max(0, cut - (n - cut))
        region = [slice(None)] * 3
        region[axis] = slice(cut - lo, n - lo)
        out[1].context = (part(self.image, lo, n, axis), tuple(region))
        return out[0], out[1]


def foreground_indices(targets: np.ndarray, max_count: int = 200_000) -> np.ndarray:
    """Flat ZYX indices of (a regular subsample of) the voxels where the first
    target channel is > 0.5, at most about ``max_count`` of them (int64).

    Works slab by slab along Z, so memory stays small for large stacks.
    """
    fg = np.asarray(targets[0])
    plane = int(np.prod(fg.shape[1:]))
    slab = max(1, (1 << 24) // max(1, plane))
    total = sum(int(np.count_nonzero(fg[z:z + slab] > 0.5)) for z in range(0, fg.shape[0], slab))
    step = max(1, total // max_count)
    out, seen = [], 0
    for z in range(0, fg.shape[0], slab):
        idx = np.flatnonzero(fg[z:z + slab].ravel() > 0.5)
        first = (-seen) % step  # keep every step-th voxel in global order
        out.append(idx[first::step].astype(np.int64) + z * plane)
        seen += idx.size
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def volume_from_arrays(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    target: str,
    name: str = "volume",
    voxel_size: Optional[Sequence[float]] = None,
    normalisation: Any = None,
    targets_config: Any = None,
    weight_map: Optional[Dict[str, float]] = None,
    normalised: bool = False,
    source: str = "",
) -> TrainVolume:
    """A :class:`TrainVolume` from in-memory ZYX arrays (image and instance labels).

    normalisation: a :class:`core.preprocess.NormalisationConfig` (default
    z-score), ignored when ``normalised``. targets_config: a
    :class:`core.preprocess.TargetsConfig` (gap and boundary settings).
    weight_map: None, or keyword arguments of :func:`core.losses.falk_weight_map`
    (``w0``, ``sigma_vox``) to compute the weight map.
    """
    from core import preprocess as pp
    from core.volume import as_labels

    image = np.asarray(image)
    if image.ndim != 3:
        raise VolumeDataError(f"{name}: expected a 3D (Z, Y, X) image, got shape {image.shape}.")
    labels = as_labels(labels, where=name)
    if labels.shape != image.shape:
        raise VolumeDataError(f"{name}: image {image.shape} and labels {labels.shape} differ "
                              "in shape; they must describe the same voxels.")
    if normalised:
        img = image.astype(np.float32, copy=False)
    else:
        img, _ = pp.normalise(image.astype(np.float32, copy=False),
                              normalisation or pp.NormalisationConfig())
    tc = targets_config or pp.TargetsConfig()
    tgts = [_make_target(n, labels, tc) for n in target_names(target)]
    return _finish(name, img, tgts, labels, voxel_size, weight_map, tc, source)


def _make_target(name: str, labels: np.ndarray, tc: Any) -> np.ndarray:
    from core import preprocess as pp

    if name == "cells_with_gaps":
        return pp.cells_with_gaps_target(labels, connectivity=tc.connectivity, mode=tc.mode)
    if name == "tissue":
        return pp.tissue_target(labels)
    if name in WALL_CHANNELS:
        return pp.axis_wall_target(labels, WALL_CHANNELS.index(name))
    return pp.boundary_target(labels, connectivity=tc.boundary_connectivity,
                              mode=tc.boundary_mode, include_background=tc.boundary_background,
                              sigma=tc.boundary_sigma, blur=tc.boundary_blur)


def _stack_targets(tgts: Sequence[np.ndarray]) -> np.ndarray:
    if any(t.dtype != np.uint8 for t in tgts):
        return np.stack([t.astype(np.float32, copy=False) for t in tgts])
    return np.stack(tgts)


def _finish(name, img, tgts, labels, voxel_size, weight_map, tc, source, warnings=None):
    warnings = list(warnings or [])
    targets = _stack_targets(tgts)
    weight = None
    if weight_map is not None:
        from core.losses import falk_weight_map
        if labels is None:
            raise VolumeDataError(f"{name}: the weighted BCE loss needs the instance labels "
                                  "to compute distances between cells; this file has none.")
        from core import preprocess as pp
        gaps = pp.cells_with_gaps_target(labels, connectivity=tc.connectivity, mode=tc.mode)
        cells = np.where(gaps > 0, labels, 0)
        weight = falk_weight_map(cells, voxel_size=voxel_size, **weight_map)
    vs = None if voxel_size is None else tuple(float(v) for v in voxel_size)
    if not np.any(targets[0] > 0.5):
        warnings.append(f"{name}: no cell voxels in the target.")
    return TrainVolume(name=name, image=np.ascontiguousarray(img, dtype=np.float32),
                       targets=targets, labels=labels, weight=weight, voxel_size=vs,
                       foreground=foreground_indices(targets), source=source,
                       warnings=warnings)


def load_pair(
    raw_spec: str,
    labels_spec: str,
    *,
    target: str,
    voxel_size_um: Optional[Sequence[float]] = None,
    input_voxel_size_um: Optional[Sequence[float]] = None,
    normalisation: Any = None,
    targets_config: Any = None,
    weight_map: Optional[Dict[str, float]] = None,
    unrecorded_voxel_size_um: Optional[Sequence[float]] = None,
    progress=None,
    cancel=None,
) -> TrainVolume:
    """Read a raw image and its labels (any supported format) into a :class:`TrainVolume`.

    voxel_size_um: the training voxel size (z, y, x) um; the pair is resampled
    to it when its own voxel size differs (and is known). input_voxel_size_um:
    the pair's voxel size when the file records none (or to override it).
    unrecorded_voxel_size_um: the pair's voxel size only where neither file records one.
    Normalisation and targets as in :func:`core.preprocess.preprocess_volume`.
    """
    from core import preprocess as pp
    from core.io import read_labels, read_volume

    raw = read_volume(raw_spec)
    lab = read_labels(labels_spec)
    vs = input_voxel_size_um or raw.voxel_size or lab.voxel_size or unrecorded_voxel_size_um
    resample = pp.ResampleConfig(input_voxel_size_um=None if vs is None else tuple(vs))
    if voxel_size_um is not None and vs is not None and not np.allclose(vs, voxel_size_um, rtol=1e-3):
        resample.target_voxel_size_um = tuple(float(v) for v in voxel_size_um)
    tc = targets_config or pp.TargetsConfig()
    need = target_names(target)
    keys = {f.name for f in dataclasses.fields(pp.TargetsConfig)}
    targets = pp.TargetsConfig(**{**{k: v for k, v in vars(tc).items() if k in keys},
                                  "cells_with_gaps": "cells_with_gaps" in need,
                                  "boundaries": "boundaries" in need})
    cfg = pp.PreprocessConfig(resample=resample,
                              normalisation=normalisation or pp.NormalisationConfig(),
                              targets=targets)
    res = pp.preprocess_volume(raw, lab, cfg, progress=progress, cancel=cancel)
    tgts = [getattr(res, n) if n in ("cells_with_gaps", "boundaries")
            else _make_target(n, res.labels, tc) for n in need]
    warnings = list(res.warnings)
    if voxel_size_um is not None and vs is None:
        warnings.append(f"{raw_spec}: the file records no voxel size; assumed to be the "
                        f"training voxel size {tuple(voxel_size_um)} um (give it with "
                        "voxel_size_um to resample).")
    return _finish(raw.name, res.raw, tgts, res.labels, res.voxel_size or
                   (None if voxel_size_um is None else tuple(voxel_size_um)), weight_map, tc,
                   f"{raw_spec} + {labels_spec}", warnings)


def load_h5(
    path: str,
    *,
    target: str,
    voxel_size_um: Optional[Sequence[float]] = None,
    input_voxel_size_um: Optional[Sequence[float]] = None,
    normalisation: Any = None,
    targets_config: Any = None,
    weight_map: Optional[Dict[str, float]] = None,
) -> TrainVolume:
    """Load a file written by ``episeg preprocess`` (:func:`core.preprocess.write_preprocessed`).

    Targets stored in the file are used as they are; a missing one is computed
    from the stored labels. If the file's voxel size differs from
    ``voxel_size_um`` the image is resampled (order 3) and the targets are
    recomputed from the resampled labels. ``normalisation`` (a
    :class:`core.preprocess.NormalisationConfig`) must have the mode the file
    was normalised with, else :class:`ConfigError`.
    """
    from pathlib import Path

    from core import preprocess as pp

    d = pp.read_preprocessed(path)
    name = d.get("name") or Path(path).stem
    norm = d.get("normalisation") or {"mode": "none"}
    want = normalisation or pp.NormalisationConfig()
    if norm.get("mode") != want.mode:
        raise ConfigError(
            f"{path}: the file was normalised with mode '{norm.get('mode')}' but training uses "
            f"'{want.mode}'. Preprocess every file with the same normalisation, or set "
            f"data.normalisation.mode: {norm.get('mode')}.")
    if "raw" not in d:
        raise VolumeDataError(f"{path}: the file has no 'raw' dataset.")
    vs = input_voxel_size_um or d.get("voxel_size_um")
    img, labels = d["raw"].astype(np.float32, copy=False), d.get("label")
    tc = targets_config or pp.TargetsConfig()
    need = target_names(target)
    resample = (voxel_size_um is not None and vs is not None
                and not np.allclose(vs, voxel_size_um, rtol=1e-3))
    if resample:
        if labels is None:
            raise VolumeDataError(f"{path}: voxel size {tuple(vs)} um differs from the training "
                                  f"voxel size {tuple(voxel_size_um)} um, and without the "
                                  "'label' dataset the targets cannot be resampled. Preprocess "
                                  "it with --target-voxel-size or keep the labels.")
        img = pp.resample_image(img, voxel_size=vs, target_voxel_size=voxel_size_um)
        labels, _ = pp.resample_labels(labels, voxel_size=vs, target_voxel_size=voxel_size_um)
        vs = tuple(float(v) * o / n for v, o, n in zip(vs, d["raw"].shape, img.shape))
    tgts = []
    for n in need:
        if n in d and not resample:
            tgts.append(d[n])
        elif labels is not None:
            tgts.append(_make_target(n, labels, tc))
        else:
            raise VolumeDataError(f"{path}: the file has neither the '{n}' target nor the "
                                  "'label' dataset to compute it; preprocess it with labels.")
    return _finish(name, img, tgts, labels, vs, weight_map, tc, str(path))


# ------------------------------------------------------------------ patch size
def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def activation_bytes_per_voxel(model_cfg: Any, *, amp: bool = False) -> float:
    """Estimated training memory per input voxel and per batch item (bytes).

    Counts the tensors autograd keeps for the backward pass: at a level with
    ``f`` feature maps and a ``r``-fold reduced grid, the encoder keeps about
    ``6 f`` values per level voxel (two conv outputs, norms, ReLUs) and the
    decoder about ``11 f`` (upsampled, concatenation of ``2 f``, two convs,
    norms, ReLUs); the backward pass needs roughly as much again for the
    gradients of the largest level. ``amp`` halves the activations (16-bit).
    Measured peak memory on a CPU (fp32, batch 2, voxel size (1, 0.3, 0.3) um):
    small preset 1.0 KB per voxel (estimate 1.2 KB), standard preset 2.8 KB
    (estimate 5.4 KB): the estimate errs on the safe side.
    """
    per = 0.0
    red = 1.0
    feats = model_cfg.features
    for i, f in enumerate(feats):
        if i > 0:
            p = model_cfg.pooling[i - 1]
            red *= p[0] * p[1] * p[2]
        k = 6.0 if i == len(feats) - 1 else 17.0
        per += k * f / red
    per *= 1.5  # gradients of the activations during backward
    per += 2 * model_cfg.out_channels + 4  # logits, targets, sigmoid, image
    return per * (2.0 if amp else 4.0)


#: Largest training patch (voxels) on a CPU. Context beats step count once the
#: steps are fast enough: in 15 minutes on 2 threads (small preset, 4 synthetic
#: stacks, docs/accuracy.md step 9), 700-800 steps of ~32 x 110 x 110 patches
#: beat 3,800 steps of 16 x 56 x 56 in two seeds: held-out adapted Rand error
#: 0.103 vs 0.122 and 0.116 vs 0.125, AP50 the same, the hardest stack 0.80 vs
#: 0.79 and 0.77 vs 0.67. With one thread and the older, slower network, 150
#: steps of such patches had not been enough (AP50 0.27), hence the earlier
#: cap of 16 x 64 x 64.
CPU_MAX_PATCH_VOXELS = 32 * 112 * 112

#: Largest share of the smallest training volume one automatic patch covers, so
#: that random patches still differ. The real sample's training part
#: (64 x 200 x 75 voxels) with a 64 x 80 x 72 patch (38 % of it) kept its best
#: epoch at 2 of 8 and fell from AP50 0.37-0.40 to 0.29 (docs/accuracy.md step 9).
PATCH_MAX_SHARE = 1 / 8


def auto_patch_size(
    model_cfg: Any,
    *,
    volume_shapes: Sequence[Sequence[int]],
    voxel_size: Optional[Sequence[float]] = None,
    batch_size: int = 1,
    device: str = "cpu",
    amp: bool = False,
    memory_bytes: Optional[int] = None,
    max_voxels: Optional[int] = None,
) -> Triple:
    """Patch size (z, y, x) for training from the memory available and the model size.

    The voxel budget is ``memory * share / (batch_size * bytes per voxel)``
    (:func:`activation_bytes_per_voxel`; share 0.6 of free GPU memory, 0.4 of
    available RAM), capped on a CPU at :data:`CPU_MAX_PATCH_VOXELS` for speed
    and by ``max_voxels``, and never above :data:`PATCH_MAX_SHARE` of the
    smallest training volume. The shape is as cubic as possible in micrometres
    (fewer voxels along a coarser axis), a multiple of the model's pooling
    divisor on every axis, and no larger than the smallest training volume
    (rounded down to the divisor).
    """
    from core.model import required_divisor

    div = required_divisor(model_cfg)
    if memory_bytes is None:
        if str(device).startswith("cuda") and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            memory_bytes = int(free * 0.6)
        else:
            memory_bytes = int(_mem_available_bytes() * 0.4)
    n_params = sum(int(np.prod(s)) for s in _param_shapes(model_cfg))
    memory_bytes -= 16 * n_params  # weights, gradients, two Adam moments
    budget = max(1, memory_bytes) / (max(1, batch_size) * activation_bytes_per_voxel(model_cfg, amp=amp))
    if not str(device).startswith("cuda"):
        budget = min(budget, CPU_MAX_PATCH_VOXELS)
    if max_voxels is not None:
        budget = min(budget, max_voxels)
    if volume_shapes:
        budget = min(budget, PATCH_MAX_SHARE * min(float(np.prod(s)) for s in volume_shapes))
    limit = [min(int(s[a]) for s in volume_shapes) for a in range(3)] if volume_shapes else [1 << 20] * 3
    limit = [max(d, (m // d) * d) for m, d in zip(limit, div)]
    vs = np.ones(3) if voxel_size is None else np.asarray(voxel_size, float)
    ratio = vs.min() / vs  # voxels per unit length, relative
    size = [0, 0, 0]
    free_axes = [0, 1, 2]
    fixed_vox = 1.0
    while free_axes:
        scale = (budget / fixed_vox / np.prod(ratio[free_axes])) ** (1.0 / len(free_axes))
        clipped = [a for a in free_axes if scale * ratio[a] >= limit[a]]
        if not clipped:
            for a in free_axes:
                size[a] = max(div[a], int(scale * ratio[a] // div[a]) * div[a])
            break
        for a in clipped:
            size[a] = limit[a]
            fixed_vox *= limit[a]
            free_axes.remove(a)
    return tuple(int(min(s, lim)) for s, lim in zip(size, limit))  # type: ignore[return-value]


def _param_shapes(model_cfg: Any) -> List[Tuple[int, ...]]:
    f = model_cfg.features
    shapes = []
    for i in range(model_cfg.depth):
        k = int(np.prod(model_cfg.kernels[i]))
        cin = model_cfg.in_channels if i == 0 else f[i - 1]
        shapes += [(cin * f[i] * k,), (f[i] * f[i] * k,)]
        if i < model_cfg.depth - 1:
            shapes += [(2 * f[i] * f[i] * k,), (f[i] * f[i] * k,), (f[i + 1] * f[i] * 8,)]
    return shapes


def check_patch_size(patch_size: Sequence[int], model_cfg: Any) -> Triple:
    """Validate a user-given patch size against the model's pooling divisor."""
    from core.model import required_divisor

    div = required_divisor(model_cfg)
    ps = tuple(int(v) for v in patch_size)
    bad = [(p, d) for p, d in zip(ps, div) if p < d or p % d]
    if len(ps) != 3 or bad:
        good = tuple(max(d, int(round(p / d)) * d) for p, d in zip(ps, div))
        raise ConfigError(f"patch_size {ps} (z, y, x) must be a multiple of {div} on every axis "
                          f"for this model (its pooling); e.g. {good}.")
    return ps  # type: ignore[return-value]


# ------------------------------------------------------------------ sampling
@dataclass
class Batch:
    """A training batch: image (N, 1, Z, Y, X), targets (N, C, ...), weight (N, 1, ...) or None."""

    image: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor] = None

    def to(self, device) -> "Batch":
        return Batch(self.image.to(device, non_blocking=True),
                     self.target.to(device, non_blocking=True),
                     None if self.weight is None else self.weight.to(device, non_blocking=True))


def _crop(a: np.ndarray, start: Sequence[int], size: Sequence[int], lead: int = 0) -> np.ndarray:
    """Crop ``size`` at ``start`` from the last three axes; zero-pad beyond the array."""
    shape = a.shape[lead:]
    sl = tuple(slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, shape))
    part = a[(slice(None),) * lead + sl]
    if part.shape[lead:] == tuple(size):
        return part
    pad = [(0, 0)] * lead + [(max(0, -s), k - (min(n, s + k) - max(0, s)) - max(0, -s))
                             for s, k, n in zip(start, size, shape)]
    return np.pad(part, pad)


def _resize_patch(img: np.ndarray, tgt: np.ndarray, w: Optional[np.ndarray],
                  size: Sequence[int]):
    """Resize a patch's image (1, Z, Y, X), targets (C, ...) and weight to ``size``
    (trilinear: the image as a microscope would sample it, the targets soft)."""
    import torch.nn.functional as F

    parts = [img, tgt] + ([w] if w is not None else [])
    stacked = torch.from_numpy(np.concatenate([np.asarray(a, np.float32) for a in parts]))
    out = F.interpolate(stacked[None], size=tuple(int(k) for k in size), mode="trilinear",
                        align_corners=False)[0].numpy()
    n_t = tgt.shape[0]
    return out[:1], out[1:1 + n_t], (out[1 + n_t:] if w is not None else None)


class PatchSampler:
    """Draws random training patches from one or more :class:`TrainVolume`.

    Parameters
    ----------
    volumes : training volumes (each drawn with equal probability).
    patch_size : (z, y, x) voxels of every patch.
    rng : numpy Generator (its state is saved for exact resume).
    foreground_probability : share of patches centred (with jitter) on a
        random cell voxel; the rest are placed uniformly at random.
    rotate90 : random multiples of 90 degrees in the YX plane.
    swap_on_rotate : target channels (y, x) that trade places when a rotation
        turns Y into X (the per-axis wall bands), or None.
    zoom : (probability, largest factor): that share of the patches is cut
        from a region f times the patch size on every axis, f log-uniform in
        [1 / factor, factor], and resized to the patch (linear; the targets
        become soft at their edges). Cells then look f times smaller; the
        voxel size ratio between the axes stays. (0, 1) = off.
    """

    def __init__(self, volumes: Sequence[TrainVolume], patch_size: Sequence[int], *,
                 rng: np.random.Generator, foreground_probability: float = 0.9,
                 rotate90: bool = True, swap_on_rotate: Optional[Tuple[int, int]] = None,
                 zoom: Tuple[float, float] = (0.0, 1.0)):
        if not volumes:
            raise ConfigError("No training volumes: give at least one raw + labels pair.")
        if not 0.0 <= foreground_probability <= 1.0:
            raise ConfigError(f"foreground_probability = {foreground_probability}: must be in [0, 1].")
        self.volumes = list(volumes)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rng = rng
        self.foreground_probability = float(foreground_probability)
        self.rotate90 = bool(rotate90)
        self.swap_on_rotate = swap_on_rotate
        self.zoom = (float(zoom[0]), float(zoom[1]))

    def _start(self, vol: TrainVolume, size: Sequence[int], centred: bool) -> List[int]:
        shape = vol.shape
        rng = self.rng
        if centred and vol.foreground.size:
            flat = int(vol.foreground[rng.integers(vol.foreground.size)])
            centre = np.unravel_index(flat, shape)
            start = []
            for c, k, n in zip(centre, size, shape):
                jitter = int(rng.integers(-(k // 4), k // 4 + 1)) if k >= 4 else 0
                s = int(c) - k // 2 + jitter
                start.append(min(max(s, 0), max(0, n - k)) if n >= k else (n - k) // 2)
            return start
        return [int(rng.integers(0, n - k + 1)) if n >= k else (n - k) // 2
                for k, n in zip(size, shape)]

    def sample(self) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], bool]:
        """One patch: (image (1, Z, Y, X) float32, targets (C, Z, Y, X) float32,
        weight (1, Z, Y, X) or None, centred-on-a-cell flag)."""
        rng = self.rng
        vol = self.volumes[int(rng.integers(len(self.volumes)))]
        k = int(rng.integers(4)) if self.rotate90 else 0
        pz, py, px = self.patch_size
        size = (pz, px, py) if k % 2 else (pz, py, px)
        centred = bool(rng.random() < self.foreground_probability)
        out_size = size
        p_zoom, factor = self.zoom
        if p_zoom > 0 and factor > 1 and rng.random() < p_zoom:  # no draw when off: same streams
            f = float(np.exp(rng.uniform(-np.log(factor), np.log(factor))))
            size = tuple(max(1, int(round(k * f))) for k in size)
        start = self._start(vol, size, centred)
        img = _crop(vol.image, start, size)[None]
        tgt = _crop(vol.targets, start, size, lead=1)
        w = None if vol.weight is None else _crop(vol.weight, start, size)[None]
        if size != out_size:
            img, tgt, w = _resize_patch(img, tgt, w, out_size)
        if k:
            img = np.rot90(img, k, axes=(2, 3))
            tgt = np.rot90(tgt, k, axes=(2, 3))
            if k % 2 and self.swap_on_rotate is not None:
                order = list(range(tgt.shape[0]))
                iy, ix = self.swap_on_rotate
                order[iy], order[ix] = ix, iy
                tgt = tgt[order]
            w = None if w is None else np.rot90(w, k, axes=(2, 3))
        img = np.ascontiguousarray(img, dtype=np.float32)
        tgt = np.ascontiguousarray(tgt, dtype=np.float32)
        w = None if w is None else np.ascontiguousarray(w, dtype=np.float32)
        return img, tgt, w, centred

    def batch(self, batch_size: int) -> Batch:
        """``batch_size`` patches stacked as tensors (CPU)."""
        items = [self.sample() for _ in range(batch_size)]
        image = torch.from_numpy(np.stack([i[0] for i in items]))
        target = torch.from_numpy(np.stack([i[1] for i in items]))
        weight = None
        if items[0][2] is not None:
            weight = torch.from_numpy(np.stack([i[2] for i in items]))
        return Batch(image, target, weight)


def validation_patches(volumes: Sequence[TrainVolume], patch_size: Sequence[int], *,
                       divisor: Sequence[int] = (1, 1, 1), per_volume: int = 8, seed: int = 0,
                       foreground_probability: float = 0.9) -> List[Batch]:
    """A fixed, reproducible set of validation patches (one :class:`Batch` of 1 each).

    Drawn with a generator of its own (``seed``), so validation never touches
    the training random streams, and without augmentation. Patches are
    clipped to each volume's size, rounded down to a multiple of ``divisor``
    (the model's pooling; volumes thinner than that are zero-padded).
    """
    out: List[Batch] = []
    for i, vol in enumerate(volumes):
        size = tuple(max(d, min(p, (s // d) * d))
                     for p, s, d in zip(patch_size, vol.shape, divisor))
        sampler = PatchSampler([vol], size, rng=np.random.default_rng([seed, i]),
                               foreground_probability=foreground_probability, rotate90=False)
        for _ in range(per_volume):
            out.append(sampler.batch(1))
    return out


# ------------------------------------------------------------------ augmentation
AugmentLevel = Literal["off", "flips", "light", "default", "strong"]

#: Strength of each augmentation level. gamma: log-gamma range; contrast:
#: factor range; noise: max std relative to the patch std; p_*: probabilities
#: per patch; elastic: max displacement (voxels) and probability. Random zoom
#: is no level's: ``augment.zoom`` turns it on (docs/accuracy.md, step 18).
LEVELS: Dict[str, Dict[str, Any]] = {
    "off": dict(flip=False, rot90=False, p_gamma=0.0, gamma=0.0, p_contrast=0.0,
                contrast=(1.0, 1.0), p_noise=0.0, noise=0.0, p_elastic=0.0, elastic=0.0),
    "flips": dict(flip=True, rot90=False, p_gamma=0.0, gamma=0.0, p_contrast=0.0,
                  contrast=(1.0, 1.0), p_noise=0.0, noise=0.0, p_elastic=0.0, elastic=0.0),
    "light": dict(flip=True, rot90=True, p_gamma=0.3, gamma=0.15, p_contrast=0.3,
                  contrast=(0.85, 1.15), p_noise=0.2, noise=0.05, p_elastic=0.0, elastic=2.0),
    "default": dict(flip=True, rot90=True, p_gamma=0.5, gamma=0.3, p_contrast=0.5,
                    contrast=(0.7, 1.3), p_noise=0.3, noise=0.1, p_elastic=0.0, elastic=3.0),
    "strong": dict(flip=True, rot90=True, p_gamma=0.7, gamma=0.5, p_contrast=0.7,
                   contrast=(0.5, 1.5), p_noise=0.5, noise=0.2, p_elastic=0.3, elastic=4.0),
}


@dataclass
class AugmentConfig:
    """Augmentation strength (see :data:`LEVELS`); ``elastic`` overrides the level's choice;
    ``zoom`` adds random zoom (no level has it)."""

    level: AugmentLevel = field(default="default", metadata={
        "help": "off; flips (random flips on 3 axes only, the thesis' choice); light, default "
                "or strong: flips, 90-degree XY rotations, gamma, contrast and noise (strong "
                "also elastic deformation)."})
    elastic: Optional[bool] = field(default=None, metadata={
        "help": "Elastic deformation (torchio, CPU, slow); null = as the level says."})
    zoom: Optional[float] = field(default=None, metadata={
        "help": "Largest zoom factor, e.g. 1.4: 30 % of the patches are cut from a region "
                "up to this factor larger or smaller and resized to the patch, so the network "
                "also sees smaller and larger cells (null or 1: off)."})


#: share of the patches zoomed when ``augment.zoom`` is above 1
ZOOM_PROBABILITY = 0.3


class Augmenter:
    """Random augmentation of a :class:`Batch` (on any device).

    Uses torch's global generator (saved for exact resume). Geometric changes
    hit image, targets and weights identically; intensity changes touch the
    image only.
    """

    def __init__(self, config: Optional[AugmentConfig] = None):
        import kornia.augmentation as K

        self.config = config or AugmentConfig()
        if self.config.level not in LEVELS:
            raise ConfigError(f"augment.level = {self.config.level!r}: use one of {', '.join(LEVELS)}.")
        self.p = dict(LEVELS[self.config.level])
        if self.config.elastic is not None:
            self.p["p_elastic"] = (0.3 if self.config.elastic else 0.0)
            self.p["elastic"] = self.p["elastic"] or 3.0
        zoom = 1.0 if self.config.zoom is None else float(self.config.zoom)
        if not 1.0 <= zoom <= 2.0:
            raise ConfigError(f"augment.zoom = {self.config.zoom}: use a factor from 1 (off) "
                              "to 2, e.g. 1.4.")
        #: (probability per patch, largest factor) of the sampler's random zoom
        self.zoom = (ZOOM_PROBABILITY if zoom > 1.0 else 0.0, zoom)
        self.flips = None
        if self.p["flip"]:
            self.flips = K.AugmentationSequential(
                K.RandomDepthicalFlip3D(p=0.5), K.RandomVerticalFlip3D(p=0.5),
                K.RandomHorizontalFlip3D(p=0.5))

    @property
    def rotate90(self) -> bool:
        """Whether the sampler should apply random 90-degree XY rotations."""
        return bool(self.p["rot90"])

    def __call__(self, batch: Batch) -> Batch:
        image, target, weight = batch.image, batch.target, batch.weight
        if self.p["p_elastic"] > 0:
            image, target, weight = self._elastic(image, target, weight)
        if self.flips is not None:
            parts = [image, target] + ([weight] if weight is not None else [])
            sizes = [p.shape[1] for p in parts]
            stacked = self.flips(torch.cat(parts, dim=1))
            split = torch.split(stacked, sizes, dim=1)
            image, target = split[0], split[1]
            weight = split[2] if weight is not None else None
        image = self._intensity(image)
        return Batch(image.contiguous(), target.contiguous(),
                     None if weight is None else weight.contiguous())

    def _draw(self, n: int, p: float, lo: float, hi: float, device):
        """Per sample: (applied? bool tensor, value in [lo, hi] on ``device``)."""
        on = torch.rand(n) < p
        val = lo + (hi - lo) * torch.rand(n)
        return on, val.to(device)

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as E

        n = image.shape[0]
        p = self.p
        if p["p_gamma"] <= 0 and p["p_contrast"] <= 0 and p["p_noise"] <= 0:
            return image
        on_g, log_g = self._draw(n, p["p_gamma"], -p["gamma"], p["gamma"], image.device)
        on_c, c = self._draw(n, p["p_contrast"], p["contrast"][0], p["contrast"][1], image.device)
        on_n, s = self._draw(n, p["p_noise"], 0.0, p["noise"], image.device)
        noise = torch.randn(image.shape, dtype=torch.float32, device=image.device)
        gamma = torch.where(on_g.to(image.device), torch.exp(log_g), torch.ones_like(log_g))
        contrast = torch.where(on_c.to(image.device), c, torch.ones_like(c))
        flat = image.reshape(n, -1)
        lo = flat.min(dim=1).values.view(n, 1, 1, 1, 1)
        hi = flat.max(dim=1).values.view(n, 1, 1, 1, 1)
        span = (hi - lo).clamp_min(1e-6)
        unit = (image - lo) / span  # [0, 1] per patch, as kornia.enhance expects
        unit = E.adjust_gamma(unit, gamma)
        unit = E.adjust_contrast_with_mean_subtraction(unit, contrast)
        out = lo + unit * span
        std = flat.std(dim=1).view(n, 1, 1, 1, 1)
        sigma = torch.where(on_n.to(image.device), s, torch.zeros_like(s)).view(n, 1, 1, 1, 1)
        return out + noise * sigma * std

    def _elastic(self, image, target, weight):
        import torchio as tio

        on = torch.rand(image.shape[0]) < self.p["p_elastic"]
        if not bool(on.any()):
            return image, target, weight
        device = image.device
        imgs, tgts, ws = [], [], []
        for i in range(image.shape[0]):
            im, tg = image[i].cpu(), target[i].cpu()
            wt = None if weight is None else weight[i].cpu()
            if on[i]:
                shape = im.shape[1:]
                # 5-7 control points per axis; displacement below half the grid spacing
                # (torchio's folding limit: spacing = extent / (points - 2))
                ncp = tuple(int(min(7, max(5, n // 4))) for n in shape)
                disp = tuple(float(min(self.p["elastic"], 0.45 * n / (c - 2)))
                             for n, c in zip(shape, ncp))
                tr = tio.RandomElasticDeformation(num_control_points=ncp, max_displacement=disp,
                                                  locked_borders=2)
                subj = tio.Subject(img=tio.ScalarImage(tensor=im),
                                   tgt=tio.LabelMap(tensor=tg),
                                   **({} if wt is None else {"w": tio.ScalarImage(tensor=wt)}))
                out = tr(subj)
                im, tg = out["img"].data.float(), out["tgt"].data.float()
                wt = None if wt is None else out["w"].data.float()
            imgs.append(im)
            tgts.append(tg)
            ws.append(wt)
        image = torch.stack(imgs).to(device)
        target = torch.stack(tgts).to(device)
        weight = None if weight is None else torch.stack(ws).to(device)
        return image, target, weight


def describe_levels() -> str:
    """One line per augmentation level (for help texts)."""
    return "; ".join(f"{k}: " + ("none" if not v["flip"] else
                                 f"flips, rot90, gamma +-{v['gamma']}, contrast {v['contrast']}, "
                                 f"noise {v['noise']}" + (", elastic" if v["p_elastic"] else ""))
                     for k, v in LEVELS.items())


__all__ = [
    "TrainVolume", "Batch", "PatchSampler", "Augmenter", "AugmentConfig", "LEVELS",
    "load_pair", "load_h5", "volume_from_arrays", "auto_patch_size", "check_patch_size",
    "activation_bytes_per_voxel", "validation_patches", "foreground_indices", "target_names",
    "wall_yx_channels",
]
