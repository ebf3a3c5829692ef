"""From a stack on disk to its cells on disk, with a trained model.

One function per step, all over ZYX arrays with voxel sizes in micrometres:

    read -> normalise (as the model was trained) -> resample to the model's
    voxel size -> sliding-window probabilities -> resample back -> cells
    (seeded watershed) -> write ``STEM_cells.<fmt>`` (+ probabilities)

Memory: the normalised image is never materialised (tiles are normalised as
they are read), probabilities are kept as uint8, and every stack-sized working
array of a large stack (probabilities, masks, seeds, labels) is a memory-mapped
temporary file next to the outputs whose pages are handed back slab by slab
(:mod:`core.scratch`), so the process' memory does not grow with the stack
beyond the input image itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from core.errors import ConfigError, VolumeDataError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.scratch import release_pages, scratch_array
from core.segment import SegmentParams, cell_and_boundary, cells_from_channels
from core.segment_choice import describe, with_model_choice
from core.volume import Volume, strided_sample

#: Output formats and their file extensions.
FORMATS = {"tif": ".tif", "mat": ".mat", "h5": ".h5"}


@dataclass
class PredictConfig:
    """Settings of ``episeg predict`` (YAML section ``predict``)."""

    format: Literal["tif", "mat", "h5"] = field(default="tif", metadata={
        "help": "File format of the label stacks: tif (Fiji), mat (MATLAB), h5 (HDF5)."})
    save_probabilities: bool = field(default=False, metadata={
        "help": "Also write the network's probability maps (0..255 = 0..1)."})
    flags: bool = field(default=True, metadata={
        "help": "Rank the cells most likely to be wrong (STEM_cells_flags.csv; core.flags)."})
    tta: bool = field(default=False, metadata={
        "help": "Test-time augmentation: average the network over the 8 flips of the stack. "
                "Walls fall closer to the truth (adapted Rand error 0.068 against 0.074 on the "
                "benchmark's test stacks, docs/accuracy.md step 18) for about 2.3x the "
                "prediction time on a CPU."})
    tile_shape: Optional[Tuple[int, int, int]] = field(default=None, metadata={
        "gt": 0, "help": "Tile size (z, y, x) in voxels; empty = chosen from memory."})
    overlap: float = field(default=0.125, metadata={
        "min": 0, "max": 0.75, "help": "Overlap between neighbouring tiles (fraction)."})
    batch_size: Optional[int] = field(default=None, metadata={
        "gt": 0, "help": "Tiles per forward pass; empty = chosen automatically."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto uses a CUDA GPU when present, else the CPU."})
    input_voxel_size_um: Optional[Tuple[float, float, float]] = field(default=None, metadata={
        "gt": 0, "help": "Voxel size (z, y, x) um of inputs whose files record none."})
    post_processing: Literal["model", "shipped"] = field(default="model", metadata={
        "help": "model: the seed and merge settings the model chose on its validation stacks "
                "('episeg train'), wherever the segment section leaves the shipped value; "
                "shipped: the shipped settings always."})
    segment: SegmentParams = field(default_factory=SegmentParams)


def segment_params(config: "PredictConfig", info) -> SegmentParams:
    """The cell step's settings for a model: ``config.segment`` with the model's
    chosen post-processing where the config keeps the shipped values
    (:func:`core.segment_choice.with_model_choice`), unless ``post_processing``
    is "shipped"."""
    if config.post_processing == "shipped":
        return config.segment
    return with_model_choice(config.segment, getattr(info, "segment", None))


#: How a user gives the voxel size of stacks whose files record none.
SET_VOXEL_SIZE = "give it with --voxel-size Z,Y,X or the Predict tab's Voxel size (um)"


@dataclass
class StackResult:
    """What :func:`segment_stack` produced for one input."""

    labels: Volume
    probabilities: Optional[np.ndarray]  # (C, Z, Y, X) uint8, or None
    channels: Tuple[str, ...]
    n_cells: int
    seconds: Dict[str, float]
    outputs: List[Path] = field(default_factory=list)
    flags: Optional[List[Dict[str, Any]]] = None  # core.flags.cell_flags rows, or None


class NormalisedView:
    """Read-only ZYX view that normalises whatever slice is read from it.

    ``view[z0:z1, y0:y1, x0:x1]`` returns float32 ``(raw - offset) / scale``,
    so the sliding window never needs a normalised copy of the whole stack.
    """

    def __init__(self, raw: np.ndarray, offset: float, scale: float):
        self.raw = raw
        self.offset = np.float32(offset)
        self.inv_scale = np.float32(1.0 / scale)
        self.shape = tuple(raw.shape)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index) -> np.ndarray:
        out = np.subtract(self.raw[index], self.offset, dtype=np.float32)
        out *= self.inv_scale
        release_pages(self.raw)  # a memory-mapped stack (core.scratch) is read tile by tile
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def normalised_view(raw: np.ndarray, normalisation: Dict[str, Any]) -> NormalisedView:
    """Normalise ``raw`` as the model's training data were (per-volume statistics).

    ``normalisation`` is the model file's description, e.g. ``{"mode": "zscore",
    "mask": "all"}``, ``{"mode": "robust"}`` or ``{"mode": "percentile", "low": 1,
    "high": 99.8}``; the statistics are recomputed on this volume, as in training.
    """
    from core.preprocess import robust_stats, zscore_stats

    mode = normalisation.get("mode", "zscore")
    if mode == "zscore":
        stats = zscore_stats(raw, normalisation.get("mask", "all"))
        if not stats["std"] > 0:
            raise VolumeDataError("The stack is constant, so there is nothing to segment; "
                                  "check that the right file or dataset was given.")
        return NormalisedView(raw, stats["mean"], stats["std"])
    if mode == "robust":
        stats = robust_stats(raw)
        if not stats["spread"] > 0:
            raise VolumeDataError("The stack is constant, so there is nothing to segment; "
                                  "check that the right file or dataset was given.")
        return NormalisedView(raw, stats["median"], stats["spread"])
    if mode == "percentile":
        lo, hi = _percentiles(raw, normalisation.get("low", 1.0), normalisation.get("high", 99.8))
        if not hi > lo:
            raise VolumeDataError("The stack's intensity percentiles are equal, so it cannot "
                                  "be normalised; check the file.")
        return NormalisedView(raw, lo, hi - lo)
    if mode == "none":
        return NormalisedView(raw, 0.0, 1.0)
    raise ConfigError(f"The model's normalisation mode {mode!r} is unknown; update EpiSeg.")


def _percentiles(raw: np.ndarray, low: float, high: float, max_samples: int = 20_000_000):
    """Percentiles from a regular subsample when the stack is large (exact when small)."""
    sample = strided_sample(raw, max_samples)
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


def _needs_resampling(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> bool:
    if a is None or b is None:
        return False
    return any(abs(x / y - 1.0) > 0.02 for x, y in zip(a, b))


def _resize_channel(prob: np.ndarray, shape: Tuple[int, int, int]) -> np.ndarray:
    """Linear resampling of one uint8 probability channel to ``shape``."""
    from core.preprocess import resample_image

    factors = tuple(t / s for t, s in zip(shape, prob.shape))
    out = resample_image(prob, factors, order=1, anti_aliasing=True)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if out.shape != tuple(shape):  # rounding of the zoom grid
        pad = [(0, max(0, t - s)) for t, s in zip(shape, out.shape)]
        out = np.pad(out, pad, mode="edge")[: shape[0], : shape[1], : shape[2]]
    return out


@dataclass
class StackChannels:
    """The network's outputs on one stack, at the stack's own shape (ZYX).

    store: uint8 maps (C, Z, Y, X; 0..255 = 0..1), one per name in ``names``;
    voxel_size_um: what the cell step measures lengths in (the stack's, else
    the one given, else the model's, else 1 um); seconds: "prepare" and
    "network" times.
    """

    store: np.ndarray
    names: Tuple[str, ...]
    voxel_size_um: Tuple[float, float, float]
    seconds: Dict[str, float]

    @property
    def channels(self) -> Dict[str, np.ndarray]:
        """The maps by channel name (views of ``store``)."""
        return {name: self.store[i] for i, name in enumerate(self.names)}


def stack_channels(
    volume: Volume,
    model,
    info,
    *,
    config: Optional[PredictConfig] = None,
    work_dir: Optional[Path] = None,
    network=None,
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
) -> StackChannels:
    """The network's probabilities on one stack, as :func:`segment_stack` makes
    them: normalised as the model was trained, resampled to the model's voxel
    size and back, with ``config``'s tiles, device and TTA. The channels kept
    are those the cell step reads (all with ``config.save_probabilities``)."""
    from core.predict import predict_probabilities
    from core.preprocess import resample_image

    config = config or PredictConfig()
    rep = ProgressReporter(progress, "predict")
    times: Dict[str, float] = {}
    t0 = time.monotonic()
    shape = volume.shape
    voxel_size = volume.voxel_size or config.input_voxel_size_um
    model_vs = info.voxel_size_um
    # getattr: callers may pass any object with voxel_size_um as the model info
    stacks_vs = getattr(info, "stack_voxel_size_um", None)
    if voxel_size is None and stacks_vs is not None:
        # the model trains on a grid coarser than its training stacks': a stack from the
        # same microscope has theirs
        voxel_size = stacks_vs
        rep.message(f"{volume.name}: no voxel size recorded; assuming that of the model's "
                    f"training stacks, {tuple(stacks_vs)} um ({SET_VOXEL_SIZE})")
    view = normalised_view(volume.data, info.normalisation)
    image: Any = view
    resample = _needs_resampling(voxel_size, model_vs)
    if resample:
        rep.message(f"{volume.name}: resampling from voxel size {tuple(voxel_size)} um to the "
                    f"model's {tuple(model_vs)} um")
        image = resample_image(view[...], voxel_size=voxel_size, target_voxel_size=model_vs,
                               order=3, cancel=cancel)
    elif voxel_size is None and model_vs is not None:
        rep.message(f"{volume.name}: no voxel size recorded; assuming the model's "
                    f"{tuple(model_vs)} um ({SET_VOXEL_SIZE})")
    elif voxel_size is None:
        rep.message(f"{volume.name}: neither the stack nor the model records a voxel size, so "
                    "the cell step measures its lengths (seed erosion, smallest cell) in 1 um "
                    f"voxels; if the cells come out merged or cut, {SET_VOXEL_SIZE}")
    times["prepare"] = time.monotonic() - t0
    check_cancelled(cancel, "Prediction")

    t1 = time.monotonic()
    kept = used_channels(info.channels, config)
    n_channels = len(kept)
    # large maps live in an unlinked file beside the outputs (core.scratch)
    store = scratch_array((n_channels,) + tuple(image.shape), np.uint8, work_dir)
    (network or predict_probabilities)(
        model, image, tile_shape=config.tile_shape, overlap=config.overlap,
        batch_size=config.batch_size, device=None if config.device == "auto" else config.device,
        tta=config.tta, out=store, progress=progress, cancel=cancel,
        channels=None if kept == tuple(info.channels) else [info.channels.index(c) for c in kept],
    )
    del image, view
    release_pages(store)  # written: its pages may leave this process' memory
    times["network"] = time.monotonic() - t1
    if resample:
        back = scratch_array((n_channels,) + shape, np.uint8, work_dir)
        for c in range(n_channels):
            back[c] = _resize_channel(store[c], shape)
        store = back
    return StackChannels(store=store, names=kept, seconds=times,
                         voxel_size_um=tuple(voxel_size or model_vs or (1.0, 1.0, 1.0)))


def segment_stack(
    volume: Volume,
    model,
    info,
    *,
    config: Optional[PredictConfig] = None,
    work_dir: Optional[Path] = None,
    network=None,
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
) -> StackResult:
    """Cells of one stack.

    Parameters
    ----------
    volume : the stack (ZYX, any real dtype, voxel size in um or None).
    model, info : from :func:`core.checkpoint.load_model_for_inference`.
    config : :class:`PredictConfig`.
    network : what runs the network over the stack: None = in this process
        (:func:`core.predict.predict_probabilities`); a
        :class:`core.distributed.DaskPredictor` spreads it over a cluster.

    Returns a :class:`StackResult` whose labels have the input's shape and voxel
    size (0 background, cells 1..n).
    """
    config = config or PredictConfig()
    rep = ProgressReporter(progress, "predict")
    name, source = volume.name, volume.source
    recorded_voxel_size = volume.voxel_size
    net = stack_channels(volume, model, info, config=config, work_dir=work_dir,
                         network=network, progress=progress, cancel=cancel)
    # the image is not needed any more: a caller that did not keep the volume frees it here
    del volume
    times = dict(net.seconds)
    t2 = time.monotonic()
    channel, cells_vs = net.channels, net.voxel_size_um
    params = segment_params(config, info)
    if params != config.segment:
        rep.message(f"{name}: post-processing chosen when the model was trained: "
                    f"{describe(info.segment)}")
    labels = cells_from_channels(
        channel, voxel_size=cells_vs,
        params=params, work_dir=work_dir, progress=progress, cancel=cancel,
    )
    times["cells"] = time.monotonic() - t2
    flags = None
    if config.flags:
        from core.flags import cell_flags

        t3 = time.monotonic()
        cell_prob, boundary_prob = cell_and_boundary(channel)
        flags = cell_flags(labels, boundary_prob, cell_prob, voxel_size=cells_vs)
        times["flags"] = time.monotonic() - t3
    n_cells = int(labels.max()) if labels.size else 0
    rep.message(f"{name}: {n_cells} cells")
    return StackResult(
        labels=Volume(labels, recorded_voxel_size or config.input_voxel_size_um,
                      f"{name}_cells", source=source),
        probabilities=net.store if config.save_probabilities else None,
        channels=net.names, n_cells=n_cells, seconds=times, flags=flags,
    )


def used_channels(channels: Sequence[str], config: "PredictConfig") -> Tuple[str, ...]:
    """The network outputs a prediction keeps: all when the probabilities are
    saved; otherwise the per-axis wall bands only when the re-growing uses them
    (``segment.wall_core_um`` > 0), so an ``all_walls`` model needs no scratch
    space for them."""
    return tuple(channels) if config.save_probabilities else config.segment.channels_read(channels)


def output_paths(stem: str, out_dir: Path, fmt: str, channels: Sequence[str],
                 probabilities: bool) -> Dict[str, Path]:
    """Where the results of input ``stem`` go: ``STEM_cells.<ext>``, the ranked
    flags ``STEM_cells_flags.csv`` (+ probabilities)."""
    if fmt not in FORMATS:
        raise ConfigError(f"Output format {fmt!r} is not one of {', '.join(FORMATS)}.")
    ext = FORMATS[fmt]
    paths = {"cells": out_dir / f"{stem}_cells{ext}", "flags": out_dir / f"{stem}_cells_flags.csv"}
    if probabilities:
        for name in channels:
            paths[f"prob_{name}"] = out_dir / f"{stem}_{name}_probability{ext}"
    return paths


def write_stack_result(result: StackResult, stem: str, out_dir: Path, fmt: str) -> List[Path]:
    """Write the label stack, its flags and the probabilities if kept (each
    atomically); returns the paths."""
    from core.flags import write_flags_csv
    from core.io import write_volume

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(stem, out_dir, fmt, result.channels, result.probabilities is not None)
    written = [write_volume(paths["cells"], result.labels, labels=True,
                            mat_variable="labels" if fmt == "mat" else None)]
    if result.flags is not None:
        written.append(write_flags_csv(paths["flags"], result.flags))
    if result.probabilities is not None:
        for i, name in enumerate(result.channels):
            vol = Volume(np.asarray(result.probabilities[i]), result.labels.voxel_size,
                         f"{stem}_{name}_probability")
            written.append(write_volume(paths[f"prob_{name}"], vol,
                                        mat_variable="probability" if fmt == "mat" else None))
    result.outputs = written
    return written


def input_stem(spec: str) -> str:
    """File stem of an input spec, e.g. 'data/gland.h5:raw' -> 'gland'."""
    from core.io import split_spec

    path, _ = split_spec(spec)
    return Path(path).stem


@dataclass
class FileResult:
    """One input of :func:`predict_files`: what was written, or why it failed."""

    spec: str
    outputs: List[Path] = field(default_factory=list)
    n_cells: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)
    flags: Optional[List[Dict[str, Any]]] = None
    error: str = ""


def predict_files(
    model_path: str,
    inputs: Sequence[str],
    out_dir: Path,
    config: Optional[PredictConfig] = None,
    *,
    channel: Optional[int] = None,
    workers: Optional[int] = None,
    scheduler: Optional[str] = None,
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
) -> List[FileResult]:
    """Segment every input stack with one model and write the results into ``out_dir``.

    inputs: file specs (``stack.tif``, ``file.h5:raw``, ``file.mat:I``). Each is
    read, segmented (:func:`segment_stack`) and written (:func:`write_stack_result`)
    before the next is read, so memory holds one stack at a time. A user error
    on one input (unreadable file, wrong shape) is recorded in its
    :class:`FileResult` and the others go on; with a single input it is raised.
    ``workers`` (a local dask cluster of that many processes) or ``scheduler``
    (the address of a running one) spread the network over processes or
    machines (:mod:`core.distributed`); the cells are identical.
    """
    from core.checkpoint import load_model_for_inference
    from core.predict import resolve_device

    config = config or PredictConfig()
    out_dir = Path(out_dir)
    rep = ProgressReporter(progress, "predict")
    device = resolve_device(None if config.device == "auto" else config.device)
    model, info = load_model_for_inference(model_path, device)
    rep.message(f"model {model_path}: target {info.target}, trained {info.epochs} epochs, "
                f"voxel size {info.voxel_size_um} um" + (
                    f" (its training stacks' {info.stack_voxel_size_um} um)"
                    if info.stack_voxel_size_um else "") + f"; device {device}")
    out_dir.mkdir(parents=True, exist_ok=True)
    network, client = None, None
    if workers or scheduler:
        from core.distributed import DaskPredictor, make_client

        threads = max(1, (os.cpu_count() or 1) // int(workers)) if workers else 0
        client = make_client(workers, scheduler)
        network = DaskPredictor(client, model_path, out_dir, threads_per_task=threads)
        rep.message(f"dask: {len(client.scheduler_info().get('workers', {}))} workers "
                    f"({scheduler or 'local cluster'})")
    try:
        return _predict_each(inputs, model, info, config, out_dir, channel, network,
                             progress, cancel, rep)
    finally:
        if client is not None:
            from core.distributed import close_client

            close_client(client)


def _predict_each(inputs, model, info, config, out_dir, channel, network, progress, cancel,
                  rep) -> List[FileResult]:
    from core.errors import EpiSegError
    from core.io import read_volume

    results = []
    for spec in inputs:
        check_cancelled(cancel, "Prediction")
        try:
            # not kept in a variable: segment_stack frees the image after the network
            result = segment_stack(read_volume(spec, channel=channel), model, info,
                                   config=config, work_dir=out_dir, network=network,
                                   progress=progress, cancel=cancel)
            paths = write_stack_result(result, input_stem(spec), out_dir, config.format)
        except EpiSegError as err:
            if len(inputs) == 1:
                raise
            results.append(FileResult(spec, error=str(err)))
            rep.message(f"{spec}: error: {err}")
            continue
        results.append(FileResult(spec, outputs=paths, n_cells=result.n_cells,
                                  seconds=dict(result.seconds), flags=result.flags))
        rep.message(f"{spec}: {result.n_cells} cells; wrote " + ", ".join(p.name for p in paths))
    return results
