"""The training loop: patches -> 3D U-Net -> model file, with validation and resume.

One schema (:class:`TrainConfig`) serves the YAML files
(``resources/configs/train.yaml``), the ``episeg train`` flags and the GUI.
:func:`train` runs it and writes one self-contained model file
(:mod:`core.checkpoint`) at the end of every epoch, atomically.

Choices, and why
----------------
* **Optimiser**: Adam (the thesis; Falk et al.), optional weight decay.
* **Schedule**: linear warm-up, then a cosine decay from ``lr`` to
  ``lr * min_lr_factor``. The run's *progress* is the larger of the share of
  planned iterations done and the share of the ``max_minutes`` budget spent,
  so a time-limited run (the usual case on a CPU) still anneals to a low
  learning rate before it stops, instead of being cut off at a high one.
  Plateau schedules react late and need several validations; the cosine
  needs none. Without ``max_minutes`` the schedule depends on the iteration
  count only, so runs are exactly reproducible.
* **Best model**: the epoch with the best ``validation.metric``. The default
  ``loss`` is the validation loss of the averaged weights, which falls
  smoothly; a cell-level metric (``ap50``, ``f1_50``, ...) of one validation
  stack jumps by several cells between epochs and kept undertrained epochs in
  the benchmark (docs/accuracy.md, step 8). The cell-level metrics are still
  computed for the curves, at the first and last epoch and every
  ``metrics_every`` epochs (5: on a CPU they cost about a tenth of an
  epoch, time the steps can use). With a cell-level
  metric, ties are broken by the lower validation loss, and when none can be
  computed (no labels, ``metrics_every: 0``) the lowest validation loss.
* **Weight average** (``ema_decay: 0.99``): validation, the best epoch and
  the saved model use an exponential moving average of the weights over
  about the last 100 steps (:mod:`core.ema`); the raw weights keep training.
  Short CPU runs end while the weights still jump from step to step; the
  average removes most of that noise (docs/accuracy.md, step 7).
* **Memory layout**: on a CPU the network and its batches use the
  channels-last 3D layout (oneDNN's faster kernels, ~20 % per step;
  ``benchmarks/train_speed.py``).
* **Mixed precision** (``amp: auto``): CUDA uses ``torch.autocast`` with
  bfloat16 where the GPU supports it (no scaler needed), else float16 with a
  ``GradScaler``. A CPU uses bfloat16 autocast only where it computes bf16 in
  hardware (AVX512-BF16 / AMX, :mod:`core.precision`): one step of the small
  preset 666 -> 442 ms on such a 2-core EPYC. Other CPUs stay in float32
  (there bf16 is emulated: 2.2 s -> 31.5 s per step on an AVX2-only EPYC).
  ``amp: on`` forces bf16 autocast on any CPU, ``amp: off`` float32
  everywhere.
* **Stopping**: ``max_minutes`` ends the epoch in progress early, validates
  and saves (the file always holds a usable model). Cancelling keeps the file
  of the last finished epoch (or saves the current weights when none has
  finished) and raises :class:`core.errors.JobCancelled`; the unfinished epoch
  is dropped so that ``resume`` continues exactly.
* **Resume** restores weights, their average, optimiser, schedule, scaler, epoch count and
  the torch / NumPy / Python random states: N epochs, cancel, resume to N+M
  equals an uninterrupted N+M-epoch run (bit for bit on a CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from core import __version__
from core.config import FieldProblem, from_dict, load_yaml, to_dict
from core.data import (AugmentConfig, Augmenter, PatchSampler, TrainVolume, auto_patch_size,
                       check_patch_size, load_h5, load_pair, target_names, validation_patches,
                       wall_yx_channels)
from core.ema import WeightAverage
from core.errors import ConfigError, EpiSegError, JobCancelled, ModelFileError
from core.jobs import CancelFlag, ProgressEvent, ProgressFn, check_cancelled, is_cancelled
from core.losses import LOSSES, make_loss
from core.precision import cpu_has_native_bf16
from core.preprocess import NormalisationConfig
from core.segment import SegmentParams
from core.walls import WALL_CHANNELS

Triple = Tuple[int, int, int]
Vec3 = Tuple[float, float, float]
#: Chosen by benchmarks/quality.py (docs/accuracy.md): the tissue channel halves the
#: adapted Rand error of "both" by outlining the cells exactly at the tissue surface
#: (target "all"), and the per-axis wall bands of "all_walls" lowered it again by
#: 0.010 on two development sets, three training seeds each (step 15).
DEFAULT_TARGET = "all_walls"


# ============================================================================ config
@dataclass
class DataSource:
    """One training or validation volume: ``raw`` + ``labels`` specs, or a preprocessed ``h5``."""

    raw: Optional[str] = field(default=None, metadata={
        "help": "Raw image: file.tif, file.h5:dataset, file.mat:variable or file.npy."})
    labels: Optional[str] = field(default=None, metadata={
        "help": "Labels of the raw image (0 = background, 1..n = cells), any format."})
    h5: Optional[str] = field(default=None, metadata={
        "help": "A file written by 'episeg preprocess' (instead of raw + labels)."})
    voxel_size_um: Optional[Vec3] = field(default=None, metadata={
        "gt": 0, "help": "Voxel size (z, y, x) um when the file records none (or to override)."})

    def validate(self) -> None:
        if self.h5 is not None and (self.raw is not None or self.labels is not None):
            raise FieldProblem("h5", "give either h5 or raw + labels, not both.")
        if self.h5 is None and (self.raw is None or self.labels is None):
            raise FieldProblem("raw", "each data entry needs raw and labels (or h5).")

    def describe(self) -> str:
        return self.h5 if self.h5 is not None else f"{self.raw} + {self.labels}"


@dataclass
class TargetSettings:
    """How the training targets are drawn from the labels (:mod:`core.preprocess`)."""

    connectivity: Literal[1, 2, 3] = field(default=3, metadata={
        "help": "find_boundaries connectivity of the gaps between cells (thesis: 3)."})
    mode: Literal["outer", "inner", "thick"] = field(default="outer", metadata={
        "help": "find_boundaries mode of the gaps (thesis: outer)."})
    boundary_connectivity: Literal[1, 2, 3] = field(default=2, metadata={
        "help": "find_boundaries connectivity of the boundary target (PlantSeg: 2)."})
    boundary_mode: Literal["thick", "inner", "outer"] = field(default="thick", metadata={
        "help": "find_boundaries mode of the boundary target (thick: ~2 voxels)."})
    boundary_background: bool = field(default=True, metadata={
        "help": "Boundary target includes the border between tissue and background."})
    boundary_sigma: float = field(default=0.0, metadata={
        "min": 0, "help": "Gaussian blur (voxels) of the boundary target; 0 = none."})
    boundary_blur: Literal["soft", "threshold"] = field(default="soft", metadata={
        "help": "soft: max(boundary, blurred) in [0, 1]; threshold: blurred >= 0.5."})


@dataclass
class DataConfig:
    train: List[DataSource] = field(default_factory=list, metadata={
        "help": "Training volumes (several datasets may be mixed)."})
    val: List[DataSource] = field(default_factory=list, metadata={
        "help": "Validation volumes; empty = hold out part of the training data."})
    val_fraction: float = field(default=0.2, metadata={
        "min": 0, "max": 0.5,
        "help": "Without val: share held out (whole volumes when there are several, else "
                "the last part of the stack along Y or X); 0 = no validation."})
    target_voxel_size_um: Optional[Vec3] = field(default=None, metadata={
        "gt": 0, "help": "Training voxel size (z, y, x) um; others are resampled to it. "
                         "Empty = the first training volume's; on a CPU with Y and X up "
                         "to 1.5x coarser where they are over 2.2x finer than Z (a "
                         "fine-tuned model keeps its own)."})
    stack_voxel_size_um: Optional[Vec3] = field(default=None, metadata={
        "gt": 0, "help": "Voxel size (z, y, x) um of the training and validation stacks whose "
                         "files record none (most .mat files, .npy); a stack's own "
                         "voxel_size_um wins."})
    normalisation: NormalisationConfig = field(default_factory=NormalisationConfig)
    targets: TargetSettings = field(default_factory=TargetSettings)


@dataclass
class ModelSection:
    preset: Literal["small", "standard"] = field(default="small", metadata={
        "help": "small: 4 levels, 8 features (fast on CPUs); standard: 4 levels, 32 features."})
    base_features: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "Feature maps at the first level (empty = the preset's)."})
    depth: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "Resolution levels (empty = the preset's)."})
    norm: Optional[Literal["group", "batch", "instance", "none"]] = field(default=None, metadata={
        "help": "Normalisation layers (empty = the preset's: group)."})
    dropout: Optional[float] = field(default=None, metadata={
        "min": 0, "max": 0.9, "help": "Dropout after deep blocks (empty = none)."})
    upsampling: Optional[Literal["transposed", "trilinear"]] = field(default=None, metadata={
        "help": "Upsampling on the way up (empty = transposed convolution)."})
    anisotropic: bool = field(default=True, metadata={
        "help": "Pool and convolve coarse axes less (nnU-Net rule) for anisotropic voxels."})


@dataclass
class LossConfig:
    name: Literal["dice", "bce", "weighted_bce", "bce_dice", "weighted_bce_dice"] = field(
        default="bce_dice", metadata={
            "help": "dice, bce, weighted_bce (Falk 2019 weight map), bce_dice or "
                    "weighted_bce_dice (the weight map on bce_dice's BCE)."})
    bce_weight: float = field(default=1.0, metadata={"min": 0, "help": "BCE share in bce_dice."})
    dice_weight: float = field(default=1.0, metadata={"min": 0, "help": "Dice share in bce_dice."})
    w0: float = field(default=10.0, metadata={
        "min": 0, "help": "weighted losses: height of the separation weight between close cells."})
    sigma_vox: float = field(default=5.0, metadata={
        "gt": 0, "help": "weighted losses: width (voxels) of the separation weight."})


@dataclass
class OptimizerConfig:
    lr: float = field(default=5e-3, metadata={"gt": 0, "help": "Adam learning rate."})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "help": "Adam weight decay."})


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "constant"] = field(default="cosine", metadata={
        "help": "cosine: warm-up then cosine decay over the run (iterations or minutes); "
                "constant: fixed learning rate."})
    warmup_iterations: int = field(default=50, metadata={
        "min": 0, "help": "Iterations of linear warm-up at the start."})
    min_lr_factor: float = field(default=0.02, metadata={
        "min": 0, "max": 1, "help": "Final learning rate as a share of lr (cosine)."})


@dataclass
class ValidationConfig:
    metrics_every: int = field(default=5, metadata={
        "min": 0, "help": "Cell-level metrics (predict + cells + evaluate) every k epochs and "
                          "at the first and last; 0 = never (validation loss only)."})
    metric: Literal["ap50", "f1_50", "cell_iou", "mean_matched_iou", "loss"] = field(
        default="loss", metadata={"help": "Metric that picks the best epoch's model (loss: "
                                          "the validation loss, the steadiest)."})
    max_voxels: int = field(default=4_000_000, metadata={
        "min": 1, "help": "Validation volumes larger than this are centre-cropped for the "
                          "cell-level metrics (keeps validation cheap)."})
    patches_per_volume: int = field(default=8, metadata={
        "min": 1, "help": "Fixed patches per validation volume for the validation loss."})
    choose_post_processing: bool = field(default=True, metadata={
        "help": "After training, try other seed and merge settings on the validation stacks' "
                "labels; the model keeps them where they score clearly higher than the shipped "
                "ones, and 'episeg predict' uses them (core.segment_choice)."})
    segment: SegmentParams = field(default_factory=SegmentParams)


@dataclass
class TrainConfig:
    """Everything ``episeg train`` does; see resources/configs/train.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    target: Optional[Literal["cells_with_gaps", "boundaries", "both", "all", "all_walls"]] = field(default=None, metadata={
        "help": "What the network predicts: cells_with_gaps, boundaries, both, or all "
                "(both + the tissue mask, which gives exact cell outlines at the tissue surface) "
                f"(empty = {DEFAULT_TARGET}, or the --init model's)."})
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    epochs: int = field(default=40, metadata={"min": 1, "help": "Planned epochs."})
    iterations_per_epoch: int = field(default=100, metadata={
        "min": 1, "help": "Training batches per epoch."})
    batch_size: int = field(default=2, metadata={"min": 1, "help": "Patches per batch."})
    patch_size: Optional[Triple] = field(default=None, metadata={
        "min": 1, "help": "Patch (z, y, x) voxels; empty = chosen from memory and model."})
    foreground_probability: float = field(default=0.9, metadata={
        "min": 0, "max": 1, "help": "Share of patches centred on a cell voxel."})
    amp: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "Mixed precision: auto (CUDA yes; a CPU only where it computes bf16 in "
                "hardware), on, off."})
    max_minutes: Optional[float] = field(default=None, metadata={
        "gt": 0, "help": "Stop training after this many minutes of the run (counting time "
                         "before --resume), keeping the best model; the post-processing "
                         "search follows (validation.choose_post_processing: about 2 "
                         "minutes for a 4-million-voxel validation stack on 2 CPU cores)."})
    seed: int = field(default=0, metadata={"min": 0, "help": "Random seed."})
    ema_decay: float = field(default=0.99, metadata={
        "min": 0, "max": 0.9999, "help": "Validate and keep a moving average of the weights "
                                         "(decay per step: 0.99 spans ~100 steps); 0 = the "
                                         "weights as trained."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto = CUDA GPU when present, else CPU."})
    threads: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "CPU threads (empty = physical cores)."})


#: Keys that may differ between a checkpoint and the config that resumes it.
RESUME_FREE_KEYS = ("epochs", "max_minutes", "device", "threads", "amp",
                    "validation.metrics_every", "validation.max_voxels",
                    "validation.choose_post_processing")


def load_train_config(path: Union[str, Path]) -> TrainConfig:
    """Read a training YAML file; relative data paths are taken relative to its folder."""
    path = Path(path)
    cfg = load_yaml(path, TrainConfig)
    base = path.resolve().parent
    for src in cfg.data.train + cfg.data.val:
        for key in ("raw", "labels", "h5"):
            val = getattr(src, key)
            if val is not None:
                setattr(src, key, _resolve_spec(val, base))
    return cfg


def _resolve_spec(spec: str, base: Path) -> str:
    from core.io import split_spec

    file, inner = split_spec(spec)
    if file.is_absolute():
        return spec
    full = str(base / file)
    return full if inner is None else f"{full}:{inner}"


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dict -> {"a.b.c": value}; lists and scalars are values."""
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resume_conflicts(config: TrainConfig, saved: Dict[str, Any]) -> List[str]:
    """Dotted keys whose value in ``config`` differs from the checkpoint's ``saved`` config."""
    now, then = _flat(to_dict(config)), _flat(saved)
    keys = sorted(set(now) | set(then))
    return [k for k in keys if k not in RESUME_FREE_KEYS and now.get(k) != then.get(k)]


# ============================================================================ helpers
@dataclass
class TrainResult:
    """What :func:`train` did. ``stopped``: "finished", "time" or "cancelled"."""

    path: Path
    epochs: int
    best_epoch: int
    best_metric: Dict[str, Any]
    train_losses: List[float]
    valid_losses: List[float]
    valid_metrics: List[Dict[str, Any]]
    stopped: str
    seconds: float
    patch_size: Triple
    voxel_size_um: Optional[Vec3]
    device: str
    amp: str
    target: str
    warnings: List[str] = field(default_factory=list)
    #: the post-processing search's report (SegmentChoice.to_dict()), or None
    segment_choice: Optional[Dict[str, Any]] = None

    @property
    def best_valid_metrics(self) -> Dict[str, Any]:
        if 0 < self.best_epoch <= len(self.valid_metrics):
            return self.valid_metrics[self.best_epoch - 1]
        return {}


def physical_cores() -> int:
    """Physical CPU cores usable by this process (hyper-threads not counted)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
    except OSError:
        pass
    n = len(cores) or usable
    return max(1, min(n, usable))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda, but no CUDA GPU is available to PyTorch; use "
                          "--device cpu (or auto).")
    return torch.device(name)


def amp_settings(mode: str, device: torch.device) -> Tuple[bool, Optional[torch.dtype], bool, str]:
    """(autocast on, dtype, GradScaler on, description) for ``amp`` mode and device."""
    if mode == "off":
        return False, None, False, "fp32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, torch.bfloat16, False, "bf16 autocast"
        return True, torch.float16, True, "fp16 autocast + GradScaler"
    if mode == "on":
        return True, torch.bfloat16, False, "bf16 autocast (CPU)"
    if cpu_has_native_bf16():
        return True, torch.bfloat16, False, "bf16 autocast (CPU with native bf16)"
    return False, None, False, "fp32"


#: What a user who forces mixed precision on a CPU without bf16 hardware is told.
EMULATED_BF16_WARNING = (
    "Mixed precision 'on': this CPU has no bf16 hardware (AVX512-BF16 or AMX), so every "
    "bf16 step is emulated, about 35x slower than float32 (measured on an AVX2 CPU, "
    "docs/benchmarks.md). Set mixed precision to 'auto' or 'off' to train in float32 here.")


def _gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient of ``model`` is finite (no NaN or infinity)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all())


class CosineSchedule:
    """Warm-up + cosine decay on the run's progress (see the module docstring)."""

    def __init__(self, cfg: ScheduleConfig, base_lr: float, total_iterations: int,
                 budget_s: Optional[float]):
        self.cfg = cfg
        self.base_lr = float(base_lr)
        self.total = max(1, int(total_iterations))
        self.budget_s = budget_s
        self.iteration = 0
        self.progress = 0.0

    def lr(self, elapsed_s: float) -> float:
        p = self.iteration / self.total
        if self.budget_s:
            p = max(p, elapsed_s / self.budget_s)
        # not clamped to earlier values: a finished run resumed with more epochs
        # continues on the schedule of the longer run (a warm restart)
        self.progress = min(1.0, p)
        if self.cfg.name == "constant":
            factor = 1.0
        else:
            m = self.cfg.min_lr_factor
            factor = m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * self.progress))
        if self.cfg.warmup_iterations > 0:
            factor *= min(1.0, (self.iteration + 1) / self.cfg.warmup_iterations)
        return self.base_lr * factor

    def state_dict(self) -> Dict[str, Any]:
        return {"name": self.cfg.name, "iteration": self.iteration, "progress": self.progress}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.progress = float(state.get("progress", 0.0))


def _rng_state(np_rng: np.random.Generator) -> Dict[str, Any]:
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np_rng.bit_generator.state,
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any], np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "torch_cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["torch_cuda"])
        except (RuntimeError, IndexError):
            pass


def _centre_crop(vol: TrainVolume, max_voxels: int) -> TrainVolume:
    """The volume, centre-cropped in Y and X so it has at most ``max_voxels``."""
    from core.volume import centre_yx

    sl = centre_yx(vol.shape, max_voxels)
    if sl == (slice(None),) * 3:
        return vol
    return dataclasses.replace(
        vol, image=vol.image[sl], targets=vol.targets[(slice(None),) + sl],
        labels=None if vol.labels is None else vol.labels[sl],
        weight=None if vol.weight is None else vol.weight[sl])


def _choice_view(vol: TrainVolume, max_voxels: int):
    """(image, labels, region) on which the post-processing search segments and
    scores ``vol``: a held-out part within its context (:meth:`TrainVolume.split`),
    centre-cropped to about ``max_voxels`` along the axes it spans whole."""
    if vol.context is None:
        v = _centre_crop(vol, max_voxels)
        return v.image, v.labels, None
    image, region = vol.context
    labels = vol.labels
    whole = [a for a in (1, 2) if region[a] == slice(None)]
    if image.size > max_voxels and whole:
        f = (max_voxels / image.size) ** (1.0 / len(whole))
        crop = [slice(None)] * 3
        for a in whole:
            n = image.shape[a]
            m = max(1, int(n * f))
            crop[a] = slice((n - m) // 2, (n - m) // 2 + m)
        # copies: the cropped context must not keep the whole one alive
        image = np.ascontiguousarray(image[tuple(crop)])
        labels = np.ascontiguousarray(labels[tuple(crop)])
    return image, labels, region


# ============================================================================ the run
class _Run:
    """State of one training run (kept in one place so save/resume see everything)."""

    def __init__(self, config: TrainConfig, out_path: Path, progress: ProgressFn,
                 cancel: CancelFlag):
        self.cfg = config
        self.out = out_path
        self.progress = progress
        self.cancel = cancel
        self.t0 = time.monotonic()
        self.elapsed_before = 0.0
        self.not_training_s = 0.0  # the post-processing search: not in the time budget
        self.warnings: List[str] = []
        self.history: List[Dict[str, Any]] = []
        self.train_losses: List[float] = []
        self.valid_losses: List[float] = []
        self.valid_metrics: List[Dict[str, Any]] = []
        self.best_epoch = 0
        self.best_key: Optional[Tuple[float, float]] = None
        self.best_state: Optional[Dict[str, Any]] = None
        self.epochs_done = 0
        self.created: Optional[str] = None
        self.test_metrics: Dict[str, Any] = {}
        #: the post-processing search's report (core.segment_choice), or None
        self.segment_choice: Optional[Dict[str, Any]] = None
        #: the training stacks' own voxel size when the model trains on a coarser grid
        #: (what prediction assumes for a stack that records none), else None
        self.stack_voxel_size: Optional[Vec3] = None

    # -- messages --
    def say(self, text: str, stage: str = "train", **data: Any) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(stage, 0.0, None, text, dict(data), None))

    def warn(self, text: str, stage: str = "train") -> None:
        """A warning: said now, and kept for the run's result (the CLI repeats it at the end)."""
        self.warnings.append(text)
        self.say(f"warning: {text}", stage=stage)

    def elapsed(self) -> float:
        """Seconds of training in this run, counting those before --resume."""
        return self.elapsed_before + (time.monotonic() - self.t0) - self.not_training_s


def train(config: TrainConfig, out_path: Union[str, Path], *, resume: bool = False,
          init: Union[str, Path, None] = None, progress: ProgressFn = None,
          cancel: CancelFlag = None) -> TrainResult:
    """Train a 3D U-Net as ``config`` says and write the model file ``out_path``.

    Parameters
    ----------
    config : :class:`TrainConfig` (data sources, model, target, loss, ...).
    out_path : the model file (written atomically at the end of every epoch).
    resume : continue the run saved in ``out_path`` (same settings, except
        :data:`RESUME_FREE_KEYS`, e.g. more ``epochs`` or ``max_minutes``).
    init : a model file to fine-tune: its architecture, target, normalisation
        and (unless ``data.target_voxel_size_um`` is set) voxel size are used,
        its best weights are the starting point; optimiser and schedule start
        fresh.
    progress, cancel : job protocol (:mod:`core.jobs`). Stages: "load"
        (messages), "train" (one event per iteration: epoch, loss, lr, ETA),
        "epoch" (message events whose ``data`` holds the epoch's figures).

    Returns a :class:`TrainResult`. Raises :class:`JobCancelled` when
    cancelled (the model file holds the last finished epoch),
    :class:`ConfigError`, :class:`ModelFileError` and the I/O errors for bad
    inputs.
    """
    from core.checkpoint import load_model_file

    out_path = Path(out_path)
    if resume and init is not None:
        raise ConfigError("Use either --resume (continue this run) or --init (fine-tune "
                          "another model), not both.")
    cfg = copy.deepcopy(config)
    run = _Run(cfg, out_path, progress, cancel)

    saved = None
    if resume:
        if not out_path.exists():
            raise ModelFileError(f"{out_path}: cannot resume, the file does not exist. Start a "
                                 "new run without --resume.")
        saved = load_model_file(out_path)
        conflicts = resume_conflicts(cfg, saved["config"])
        if conflicts:
            then, now = _flat(saved["config"]), _flat(to_dict(cfg))
            shown = "; ".join(f"{k}: {then.get(k)!r} in the model file, {now.get(k)!r} now"
                              for k in conflicts[:6])
            raise ConfigError(
                f"{out_path}: cannot resume with different settings ({shown}). Resume with "
                "the settings of the run (only epochs, max_minutes, device, threads and amp may "
                "change), or start a new run, e.g. with --init to fine-tune this model.")
        if saved["epochs"] >= cfg.epochs:
            raise ConfigError(f"{out_path}: the run already did {saved['epochs']} of "
                              f"{cfg.epochs} epochs. Give a larger --epochs to continue it.")
        if cfg.max_minutes and float(saved.get("elapsed_s", 0.0)) >= cfg.max_minutes * 60:
            raise ConfigError(f"{out_path}: the run already used its {cfg.max_minutes:g}-minute "
                              "budget. Give a larger --max-minutes (it counts the whole run).")
    init_data = load_model_file(init) if init is not None else None

    if not cfg.data.train:
        raise ConfigError("No training data: give --pair RAW LABELS (or --h5 FILE, or a config "
                          "file with data.train entries).")

    # -- settings that follow an existing model --
    if init_data is not None:
        if cfg.target is not None and cfg.target != init_data["target"]:
            raise ConfigError(f"{init}: the model predicts '{init_data['target']}' but target "
                              f"'{cfg.target}' was asked for; fine-tuning keeps the target.")
        target = init_data["target"]
        norm = init_data["normalisation"]
        if norm.get("mode") != cfg.data.normalisation.mode:
            run.warnings.append(f"normalisation '{norm.get('mode')}' of {init} is used "
                                f"(not '{cfg.data.normalisation.mode}').")
        cfg.data.normalisation = _normalisation_config(norm, where=str(init))
    elif saved is not None:
        target = saved["target"]
    else:
        target = cfg.target or DEFAULT_TARGET
    cfg_target = target

    from core import ddp

    world = ddp.world_from_env()
    device = resolve_device(cfg.device)
    use_amp, amp_dtype, use_scaler, amp_text = amp_settings(cfg.amp, device)
    if use_amp and device.type == "cpu" and not cpu_has_native_bf16():
        run.warn(EMULATED_BF16_WARNING, stage="load")
    old_threads = torch.get_num_threads()
    threads = cfg.threads or max(1, physical_cores() // (world.size if device.type == "cpu"
                                                         and world.distributed else 1))
    torch.set_num_threads(threads)
    try:
        device = ddp.setup(world, device)
        if not world.main:  # process 0 reports and writes the model file
            run.progress = None
        return _train(run, cfg, cfg_target, saved, init_data, init, device,
                      (use_amp, amp_dtype, use_scaler, amp_text), world)
    finally:
        ddp.teardown(world)
        torch.set_num_threads(old_threads)


#: Said when no training stack records a voxel size and none was given.
NO_VOXEL_SIZE_WARNING = (
    "no training stack records a voxel size and none was given, so the model will have "
    "none: prediction then measures cells in 1 um voxels (seed erosion, smallest cell) "
    "wherever a stack records none either, which merges cells many voxels wide. Give the "
    "microscope's voxel size: --stack-voxel-size Z,Y,X, the Train tab's \"Stacks' voxel "
    "size\", or voxel_size_um per stack in the config.")


def _load_sources(run: _Run, sources: Sequence[DataSource], target: str,
                  voxel_size: Optional[Vec3], weight_map: Optional[Dict[str, float]],
                  what: str) -> Tuple[List[TrainVolume], Optional[Vec3]]:
    cfg = run.cfg
    vols: List[TrainVolume] = []
    for i, src in enumerate(sources, 1):
        if is_cancelled(run.cancel):
            raise JobCancelled("Training was cancelled while loading data; nothing was saved.")
        run.say(f"loading {what} volume {i}/{len(sources)}: {src.describe()}", stage="load")
        kw = dict(target=target, voxel_size_um=voxel_size, input_voxel_size_um=src.voxel_size_um,
                  normalisation=cfg.data.normalisation, targets_config=cfg.data.targets,
                  weight_map=weight_map)
        if src.h5 is not None:
            vol = load_h5(src.h5, **kw)
        else:
            vol = load_pair(src.raw, src.labels, cancel=run.cancel,
                            unrecorded_voxel_size_um=cfg.data.stack_voxel_size_um, **kw)
        if voxel_size is None and vol.voxel_size is not None:
            voxel_size = vol.voxel_size
        for w in vol.warnings:
            run.warn(w, stage="load")
        vols.append(vol)
    return vols, voxel_size


def _stack_voxel_size(data: Dict[str, Any]) -> Optional[Vec3]:
    vs = data.get("stack_voxel_size_um")
    return None if vs is None else tuple(float(v) for v in vs)


def _new_model_grid(run: _Run, sources: Sequence[DataSource], device: torch.device,
                    unrecorded: Optional[Vec3] = None) -> Tuple[Optional[Vec3], Optional[Vec3]]:
    """(grid, stacks' voxel size) um (z, y, x) of a new model trained on ``device`` when no
    grid was given. On a CPU, the first training stack's voxel size coarsened in Y and X
    by :func:`core.preprocess.training_grid_um` when every stack's voxel size is known:
    a CPU's minutes are far from enough to train out, and the coarser grid sees about
    twice the tissue in them. On a GPU, which has the compute, and otherwise, (None,
    None): the first stack's own grid (docs/accuracy.md, step 27). ``unrecorded``: the
    voxel size of stacks whose files record none (``data.stack_voxel_size_um``)."""
    from core.io import read_voxel_size
    from core.io.base import fmt_voxel
    from core.preprocess import training_grid_um

    if torch.device(device).type != "cpu":
        return None, None
    sizes = []
    for src in sources:
        if src.voxel_size_um is not None:
            sizes.append(tuple(float(v) for v in src.voxel_size_um))
        elif src.h5 is not None:
            return None, None  # preprocessed files keep the grid they were made at
        else:
            vs = read_voxel_size(src.raw) or read_voxel_size(src.labels) or unrecorded
            if vs is None:
                return None, None
            sizes.append(tuple(float(v) for v in vs))
    if not sizes:
        return None, None
    grid = training_grid_um(sizes[0])
    if np.allclose(grid, sizes[0]):
        return None, None
    factor = grid[1] / sizes[0][1]
    run.say(f"training grid {fmt_voxel(grid)}: Y and X {factor:.3g}x coarser than the stacks' "
            f"{fmt_voxel(sizes[0])}, much finer than their Z step: {factor ** 2:.3g}x fewer "
            "voxels, so more training per CPU minute (cells are still found on each stack's "
            "own grid). Give data.target_voxel_size_um (--training-voxel-size) to train on another "
            "grid.", stage="load")
    return grid, sizes[0]


def _train(run: _Run, cfg: TrainConfig, target: str, saved, init_data, init, device, amp,
           world) -> TrainResult:
    from core import ddp
    from core.checkpoint import build_from_model_dict
    from core.model import build_model, preset_config, ModelConfig

    use_amp, amp_dtype, use_scaler, amp_text = amp
    seed = int(cfg.seed)
    # one patch stream per process in a distributed run; the same weights everywhere
    np_rng = np.random.default_rng(ddp.rank_seed(seed, world))
    torch.manual_seed(seed)
    random.seed(seed)

    loss_fn = make_loss(cfg.loss.name, bce_weight=cfg.loss.bce_weight,
                        dice_weight=cfg.loss.dice_weight)
    weight_map = ({"w0": cfg.loss.w0, "sigma_vox": cfg.loss.sigma_vox}
                  if loss_fn.needs_weight_map else None)

    # -- data --
    voxel_size = cfg.data.target_voxel_size_um
    if voxel_size is None and saved is not None and saved["voxel_size_um"] is not None:
        voxel_size = tuple(saved["voxel_size_um"])
        run.stack_voxel_size = _stack_voxel_size(saved)
    if voxel_size is None and init_data is not None and init_data["voxel_size_um"] is not None:
        voxel_size = tuple(init_data["voxel_size_um"])
        run.stack_voxel_size = _stack_voxel_size(init_data)
    if voxel_size is None and saved is None and init_data is None:
        voxel_size, run.stack_voxel_size = _new_model_grid(run, cfg.data.train, device,
                                                           cfg.data.stack_voxel_size_um)
    train_vols, voxel_size = _load_sources(run, cfg.data.train, target, voxel_size,
                                           weight_map, "training")
    val_vols: List[TrainVolume] = []
    if cfg.data.val:
        val_vols, voxel_size = _load_sources(run, cfg.data.val, target, voxel_size,
                                             weight_map, "validation")
    elif cfg.data.val_fraction > 0:
        if len(train_vols) >= 2:
            n_val = max(1, int(round(cfg.data.val_fraction * len(train_vols))))
            order = np.random.default_rng([seed, 1]).permutation(len(train_vols))
            held = set(int(i) for i in order[:n_val])
            val_vols = [v for i, v in enumerate(train_vols) if i in held]
            train_vols = [v for i, v in enumerate(train_vols) if i not in held]
            run.say("validation: held out " + ", ".join(v.name for v in val_vols), stage="load")
        else:
            tr, va = train_vols[0].split(cfg.data.val_fraction)
            train_vols, val_vols = [tr], [va]
            run.say(f"validation: held out the last {cfg.data.val_fraction:.0%} of "
                    f"{tr.name.split(' (')[0]} along Y or X (the longer)", stage="load")
    if voxel_size is None:
        run.warn(NO_VOXEL_SIZE_WARNING, stage="load")

    # -- model --
    if init_data is not None:
        model = build_from_model_dict(init_data, which="best", where=str(init))
        model_cfg = model.cfg
    elif saved is not None:
        model_cfg = ModelConfig.from_dict(saved["model_config"], where=f"{run.out}: model_config")
        model = build_model(model_cfg)
    else:
        ms = cfg.model
        over = {k: getattr(ms, k) for k in ("base_features", "depth", "norm", "dropout", "upsampling")
                if getattr(ms, k) is not None}
        model_cfg = preset_config(ms.preset, target=target,
                                  voxel_size_um=voxel_size if ms.anisotropic else None, **over)
        model = build_model(model_cfg)
    channel_of = {"cells_with_gaps": "cell", "boundaries": "boundary", "tissue": "tissue",
                  **{name: name for name in WALL_CHANNELS}}
    if tuple(model_cfg.channel_names) != tuple(channel_of[n] for n in target_names(target)):
        raise ConfigError(f"The model's outputs {model_cfg.channel_names} do not match the "
                          f"target '{target}'.")
    model.to(device)
    if device.type == "cpu":
        # oneDNN's channels-last 3D kernels: one training step of the small preset
        # measured ~20% faster on a 2-core AVX2 CPU (benchmarks/train_speed.py)
        model.to(memory_format=torch.channels_last_3d)

    # -- patches --
    from core.model import required_divisor
    divisor = required_divisor(model_cfg)
    if cfg.patch_size is not None:
        patch = check_patch_size(cfg.patch_size, model_cfg)
    elif saved is not None:
        patch = tuple(int(v) for v in saved["patch_size"])
    else:
        patch = auto_patch_size(model_cfg, volume_shapes=[v.shape for v in train_vols],
                                voxel_size=voxel_size, batch_size=cfg.batch_size,
                                device=device.type, amp=use_amp)
    augmenter = Augmenter(cfg.augment)
    sampler = PatchSampler(train_vols, patch, rng=np_rng,
                           foreground_probability=cfg.foreground_probability,
                           rotate90=augmenter.rotate90,
                           swap_on_rotate=wall_yx_channels(target), zoom=augmenter.zoom)
    val_batches = validation_patches(val_vols, patch, divisor=divisor,
                                     per_volume=cfg.validation.patches_per_volume,
                                     seed=seed, foreground_probability=cfg.foreground_probability)
    metric_vols = [_centre_crop(v, cfg.validation.max_voxels) for v in val_vols
                   if v.labels is not None]
    # what the post-processing search will segment, cropped now: a held-out
    # part's context (up to twice its size) is not kept whole through training
    choice_vols = [_choice_view(v, cfg.validation.max_voxels) for v in val_vols
                   if v.labels is not None]
    for v in val_vols:
        v.context = None

    # -- optimiser, schedule, scaler --
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr,
                           weight_decay=cfg.optimizer.weight_decay)
    total_iters = cfg.epochs * cfg.iterations_per_epoch
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes else None
    schedule = CosineSchedule(cfg.schedule, cfg.optimizer.lr, total_iters, budget_s)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if device.type == "cuda" else None

    if saved is not None:
        model.load_state_dict(saved["model_state_dict"])
        opt.load_state_dict(saved["optimizer_state_dict"])
        schedule.load_state_dict(saved["scheduler_state_dict"])
        if scaler is not None and saved["scaler_state_dict"]:
            scaler.load_state_dict(saved["scaler_state_dict"])
        _set_rng_state(saved["rng_state"], np_rng)
        run.epochs_done = int(saved["epochs"])
        run.train_losses = list(saved["train_losses"])
        run.valid_losses = list(saved["valid_losses"])
        run.valid_metrics = list(saved["valid_metrics"])
        run.history = list(saved.get("history", []))
        run.best_epoch = int(saved["best_epoch"])
        run.best_state = saved["best_model_state_dict"]
        bk = saved.get("best_key")
        run.best_key = tuple(bk) if bk is not None else None
        run.elapsed_before = float(saved.get("elapsed_s", 0.0))
        run.created = saved.get("created")
        run.test_metrics = dict(saved.get("test_metrics", {}))
        run.segment_choice = saved.get("segment_choice")

    info = dict(target=target, voxel_size=voxel_size, patch=patch, device=str(device), amp=amp_text)
    spread = (f"; {world.size} processes (DistributedDataParallel), gradients of "
              f"{world.size} x {cfg.batch_size} patches per step" if world.distributed else "")
    run.say(f"training {model_cfg.channel_names} on {len(train_vols)} volume(s), validating on "
            f"{len(val_vols)}; patch {patch}, batch {cfg.batch_size}, {device} ({amp_text}, "
            f"{torch.get_num_threads()} threads), voxel size {voxel_size} um{spread}", stage="load",
            **{k: str(v) for k, v in info.items()})
    if world.distributed:  # augmentations differ between processes too
        torch.manual_seed(seed + 7919 * world.rank)

    ctx = _Context(run, cfg, model, model_cfg, opt, schedule, scaler, loss_fn, sampler, augmenter,
                   val_batches, metric_vols, device, use_amp, amp_dtype, voxel_size, patch,
                   target, np_rng, world)
    if saved is not None and ctx.average is not None and saved.get("weight_average"):
        ctx.average.load_state_dict(saved["weight_average"])
    stopped = ctx.loop(total_iters, budget_s)
    ddp.check_same_weights(model, world, device)
    if (world.main and cfg.validation.choose_post_processing and choice_vols
            and run.best_state is not None):
        t_search = time.monotonic()
        choice = ctx.choose_post_processing(choice_vols)
        run.not_training_s += time.monotonic() - t_search
        run.segment_choice = choice.to_dict()
        ctx.save(finished=run.epochs_done >= cfg.epochs)
        run.say(choice.summary(), stage="post-processing", **run.segment_choice)
    elif world.main and run.segment_choice is not None:  # a resumed run's, for other weights
        run.segment_choice = None
        ctx.save(finished=run.epochs_done >= cfg.epochs)
    return TrainResult(
        path=run.out, epochs=run.epochs_done, best_epoch=run.best_epoch,
        best_metric=ctx.best_metric(), train_losses=run.train_losses,
        valid_losses=run.valid_losses, valid_metrics=run.valid_metrics, stopped=stopped,
        seconds=run.elapsed(), patch_size=patch, voxel_size_um=voxel_size, device=str(device),
        amp=amp_text, target=target, warnings=run.warnings, segment_choice=run.segment_choice)


class _Context:
    """The loop proper; holds the objects built by :func:`_train`."""

    def __init__(self, run, cfg, model, model_cfg, opt, schedule, scaler, loss_fn, sampler,
                 augmenter, val_batches, metric_vols, device, use_amp, amp_dtype, voxel_size,
                 patch, target, np_rng, world=None):
        from core import ddp

        self.run, self.cfg, self.model, self.model_cfg = run, cfg, model, model_cfg
        self.world = world or ddp.World()
        self.net = ddp.wrap(model, self.world, device)  # what steps; self.model validates, saves
        self.opt, self.schedule, self.scaler, self.loss_fn = opt, schedule, scaler, loss_fn
        self.sampler, self.augmenter = sampler, augmenter
        self.val_batches, self.metric_vols = val_batches, metric_vols
        self.device, self.use_amp, self.amp_dtype = device, use_amp, amp_dtype
        self.voxel_size, self.patch, self.target, self.np_rng = voxel_size, patch, target, np_rng
        self.val_seconds = 0.0
        self.full_val_seconds = 0.0
        self.iter_seconds: Optional[float] = None
        self.average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.steps_done = 0
        self.steps_skipped = 0

    @property
    def kept(self):
        """The weights that are validated and saved as the model: the average, if any."""
        return self.average.model if self.average is not None else self.model

    # -- one step --
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def step(self) -> float:
        batch = self.augmenter(self.sampler.batch(self.cfg.batch_size).to(self.device))
        image = batch.image
        if self.device.type == "cpu":
            image = image.contiguous(memory_format=torch.channels_last_3d)
        for group in self.opt.param_groups:
            group["lr"] = self.current_lr
        with self._autocast():
            logits = self.net(image)
        loss = self.loss_fn(logits, batch.target, batch.weight)
        self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if self.use_amp and not _gradients_finite(self.model):
                self._skip_step()
                return value
            self.opt.step()
        self.steps_done += 1
        if self.average is not None:
            self.average.update(self.model)
        return value

    def _skip_step(self) -> None:
        """Drop a bf16 step whose gradients are not finite, as a GradScaler drops fp16 ones.

        bfloat16 autocast has no scaler. On CPUs, oneDNN's bf16 backward pass was seen
        to return NaN weight gradients now and then for a level one voxel deep (patch
        8 x 32 x 32 in a 4-level network; never in 3,600 steps of 32 x 104 x 104).
        Skipping keeps the weights finite; if it happens often, the run goes on in
        float32. The gradients were averaged over the processes first, so every
        process decides alike.
        """
        self.opt.zero_grad(set_to_none=True)
        self.steps_skipped += 1
        if self.steps_skipped >= 3 and self.steps_skipped > 0.01 * (self.steps_done + 1):
            self.use_amp = False
            text = (f"bf16 mixed precision gave non-finite gradients in {self.steps_skipped} "
                    f"steps (skipped); training goes on in float32.")
            self.run.warn(text)

    # -- validation --
    @torch.no_grad()
    def validate(self, want_metrics: bool) -> Tuple[float, Dict[str, Any]]:
        t0 = time.monotonic()
        net = self.kept
        net.eval()
        losses = []
        for b in self.val_batches:
            b = b.to(self.device)
            with self._autocast():
                logits = net(b.image)
            losses.append(float(self.loss_fn(logits, b.target, b.weight)))
        val_loss = float(np.mean(losses)) if losses else float("nan")
        metrics = self.cell_metrics(net) if want_metrics and self.metric_vols else {}
        self.model.train()
        self.val_seconds = time.monotonic() - t0
        if want_metrics:  # what the last epoch's validation (with metrics) will need
            self.full_val_seconds = self.val_seconds
        return val_loss, metrics

    @torch.no_grad()
    def cell_metrics(self, net) -> Dict[str, Any]:
        """Cell-level metrics of ``net`` (in eval mode) on the validation volumes."""
        from core.metrics import evaluate
        from core.segment import cells_from_channels

        metrics: Dict[str, Any] = {}
        per = []
        for vol in self.metric_vols:
            if is_cancelled(self.run.cancel):
                break
            cells = cells_from_channels(self._channel_probabilities(net, vol.image),
                                        voxel_size=self.voxel_size or (1.0, 1.0, 1.0),
                                        params=self.cfg.validation.segment)
            per.append(evaluate(vol.labels, cells).to_dict())
        if per:
            for key in ("ap50", "f1_50", "precision_50", "recall_50", "cell_iou",
                        "mean_matched_iou", "adapted_rand_error", "voi"):
                metrics[key] = float(np.mean([p[key] for p in per]))
            for key in ("wrong_cells", "n_gt_cells", "n_pred_cells", "n_split", "n_merged",
                        "n_missed", "n_false_positive"):
                metrics[key] = int(sum(p[key] for p in per))
        return metrics

    def _channel_probabilities(self, net, image: np.ndarray) -> Dict[str, np.ndarray]:
        """``net``'s probabilities on ``image`` (ZYX) by channel name: the channels
        the validation's cell step reads."""
        from core.predict import predict_probabilities

        names = tuple(self.model_cfg.channel_names)
        used = self.cfg.validation.segment.channels_read(names)
        prob = predict_probabilities(net, image, device=self.device, amp=self.use_amp,
                                     out_dtype=np.float32,
                                     channels=[names.index(n) for n in used])
        return {n: prob[i] for i, n in enumerate(used)}

    def _best_net(self):
        """A copy of the kept network with the best weights, in eval mode."""
        net = copy.deepcopy(self.kept)
        net.load_state_dict(self.run.best_state)
        return net.eval()

    def best_epoch_metrics(self) -> Dict[str, Any]:
        """Cell-level metrics of the kept best weights (for an epoch that skipped them)."""
        return self.cell_metrics(self._best_net())

    @torch.no_grad()
    def choose_post_processing(self, views):
        """Seeds and merging chosen with the kept best weights on ``views``
        ((image, labels, region) per validation volume; :mod:`core.segment_choice`)."""
        from core.segment_choice import ValidationCase, choose_segment_params

        net = self._best_net()
        self.run.say(f"choosing the post-processing on {len(views)} validation volume(s)",
                     stage="post-processing")
        cases = []
        for image, labels, region in views:
            check_cancelled(self.run.cancel, "Choosing the post-processing")
            cases.append(ValidationCase(self._channel_probabilities(net, image), labels,
                                        self.voxel_size or (1.0, 1.0, 1.0), region))
        return choose_segment_params(cases, self.cfg.validation.segment,
                                     progress=self.run.progress, cancel=self.run.cancel)

    # -- best model --
    def _key(self, val_loss: float, metrics: Dict[str, Any]) -> Optional[Tuple[float, float]]:
        name = self.cfg.validation.metric
        loss = val_loss if math.isfinite(val_loss) else float("inf")
        if name != "loss" and name in metrics:
            return (float(metrics[name]), -loss)
        if name == "loss" or not self.metric_vols or self.cfg.validation.metrics_every == 0:
            return (-loss, 0.0)
        return None  # this epoch has no cell-level metrics: not a candidate

    def best_metric(self) -> Dict[str, Any]:
        name = self.cfg.validation.metric
        run = self.run
        if run.best_epoch <= 0:
            return {}
        m = run.valid_metrics[run.best_epoch - 1] if run.best_epoch <= len(run.valid_metrics) else {}
        if name != "loss" and name in m:
            return {"name": name, "value": m[name], "mode": "max"}
        return {"name": "valid_loss", "value": run.valid_losses[run.best_epoch - 1], "mode": "min"}

    # -- saving --
    def save(self, finished: bool) -> None:
        from core.checkpoint import cpu_state_dict, now_iso, save_model_file

        run, cfg = self.run, self.cfg
        state = {
            "episeg_version": __version__,
            "created": run.created or now_iso(),
            "epochs": run.epochs_done,
            "best_epoch": run.best_epoch,
            "best_metric": self.best_metric(),
            "best_key": None if run.best_key is None else list(run.best_key),
            "best_model_state_dict": run.best_state,
            "model_state_dict": cpu_state_dict(self.model.state_dict()),
            "weight_average": (None if self.average is None
                               else cpu_state_dict(self.average.state_dict())),
            "optimizer_state_dict": cpu_state_dict(self.opt.state_dict()),
            "scheduler_state_dict": self.schedule.state_dict(),
            "scaler_state_dict": (self.scaler.state_dict() if self.scaler is not None
                                  and self.scaler.is_enabled() else {}),
            "rng_state": _rng_state(self.np_rng),
            "train_losses": list(run.train_losses),
            "valid_losses": list(run.valid_losses),
            "valid_metrics": list(run.valid_metrics),
            "test_metrics": dict(run.test_metrics),
            "history": list(run.history),
            "elapsed_s": run.elapsed(),
            "config": to_dict(cfg),
            "model_config": self.model_cfg.to_dict(),
            "target": self.target,
            "channels": list(self.model_cfg.channel_names),
            "normalisation": _normalisation_dict(cfg.data.normalisation),
            "voxel_size_um": None if self.voxel_size is None else [float(v) for v in self.voxel_size],
            "stack_voxel_size_um": (None if run.stack_voxel_size is None
                                    else [float(v) for v in run.stack_voxel_size]),
            "patch_size": [int(v) for v in self.patch],
            "finished": bool(finished),
            # post-processing chosen on the validation stacks (core.segment_choice)
            "segment": dict((run.segment_choice or {}).get("chosen") or {}),
            "segment_choice": run.segment_choice,
        }
        run.created = state["created"]
        save_model_file(run.out, state)

    def end_epoch(self, epoch: int, losses: List[float], iterations: int, t_epoch: float,
                  last: bool) -> None:
        run, cfg = self.run, self.cfg
        if not self.world.main:  # process 0 validates and writes the model file
            run.epochs_done = epoch
            return
        every = cfg.validation.metrics_every
        want = bool(self.metric_vols) and every > 0 and (epoch % every == 0 or last or epoch == 1)
        val_loss, metrics = self.validate(want) if self.val_batches or want else (float("nan"), {})
        train_loss = float(np.mean(losses)) if losses else float("nan")
        run.epochs_done = epoch
        run.train_losses.append(train_loss)
        run.valid_losses.append(val_loss)
        run.valid_metrics.append(metrics)
        run.history.append({"epoch": epoch, "iterations": iterations, "lr": self.current_lr,
                            "seconds": t_epoch, "validation_seconds": self.val_seconds})
        key = self._key(val_loss, metrics) if self.val_batches else (float(epoch), 0.0)
        if key is not None and (run.best_key is None or key > run.best_key):
            run.best_key, run.best_epoch = key, epoch
            from core.checkpoint import cpu_state_dict
            run.best_state = cpu_state_dict(self.kept.state_dict())
        if run.best_state is None:  # no candidate yet (metrics skipped): keep the latest
            from core.checkpoint import cpu_state_dict
            run.best_state = cpu_state_dict(self.kept.state_dict())
            run.best_epoch = epoch
        if last and want and not run.valid_metrics[run.best_epoch - 1]:
            # the kept epoch skipped its cell metrics: the model file still reports them
            run.valid_metrics[run.best_epoch - 1] = self.best_epoch_metrics()
        self.save(finished=last and epoch >= cfg.epochs)
        shown = "".join(f", {k} {metrics[k]:.3f}" for k in ("ap50", "cell_iou") if k in metrics)
        run.say(f"epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f}, val_loss {val_loss:.4f}"
                f"{shown}{' (best)' if run.best_epoch == epoch else ''}", stage="epoch",
                epoch=epoch, epochs=cfg.epochs, train_loss=train_loss, val_loss=val_loss,
                best_epoch=run.best_epoch, **metrics)

    # -- the loop --
    def loop(self, total_iters: int, budget_s: Optional[float]) -> str:
        run, cfg = self.run, self.cfg
        ipe = cfg.iterations_per_epoch
        self.current_lr = self.schedule.lr(run.elapsed())
        self.model.train()
        stopped = "finished"
        bad = 0
        for epoch in range(run.epochs_done + 1, cfg.epochs + 1):
            t_epoch = time.monotonic()
            losses: List[float] = []
            out_of_time = False
            for it in range(ipe):
                if is_cancelled(run.cancel):
                    self._cancel(epoch, losses, it, t_epoch)
                if budget_s is not None:
                    # the last validation, and the kept epoch's metrics if it skipped them
                    need = ((self.iter_seconds or 0.0) + max(self.val_seconds, self.full_val_seconds)
                            + self.full_val_seconds)
                    if self._agree(run.elapsed() + need > budget_s):
                        out_of_time = True
                        break
                t_it = time.monotonic()
                self.current_lr = self._from_main(self.schedule.lr(run.elapsed()))
                value = self.step()
                self.schedule.iteration += 1
                if not math.isfinite(value):
                    bad += 1
                    if bad >= 5:
                        raise EpiSegError(
                            f"Training diverged at epoch {epoch} (loss is {value}); the model "
                            f"file keeps the last good epoch. Lower the learning rate "
                            f"(--lr, now {cfg.optimizer.lr:g}) or use amp off.")
                    continue
                bad = 0
                losses.append(value)
                dt = time.monotonic() - t_it
                self.iter_seconds = dt if self.iter_seconds is None else 0.9 * self.iter_seconds + 0.1 * dt
                self._report(epoch, it + 1, losses, total_iters, budget_s)
            if out_of_time and not losses:
                stopped = "time"
                if run.epochs_done == 0:  # nothing saved yet: save what we have
                    self.end_epoch(epoch, losses, 0, time.monotonic() - t_epoch, last=True)
                break
            last = out_of_time or epoch == cfg.epochs
            self.end_epoch(epoch, losses, len(losses), time.monotonic() - t_epoch, last=last)
            if out_of_time:
                stopped = "time"
                break
        return stopped

    def _from_main(self, value: float) -> float:
        """Process 0's value on every process of a distributed run."""
        from core import ddp

        return ddp.from_main(value, self.world, self.device)

    def _agree(self, flag: bool) -> bool:
        """The same answer on every process of a distributed run (any process says stop)."""
        from core import ddp

        return ddp.agree_any(flag, self.world, self.device)

    def _report(self, epoch, it, losses, total_iters, budget_s) -> None:
        run = self.run
        if run.progress is None:
            return
        done = self.schedule.iteration
        per_it = self.iter_seconds or 0.0
        eta = (total_iters - done) * per_it
        total = total_iters
        if budget_s is not None:
            eta = min(eta, max(0.0, budget_s - run.elapsed()))
            if per_it > 0:  # the time budget ends the run first: show that end
                total = min(total_iters, done + int(round(eta / per_it)))
        run.progress(ProgressEvent(
            "train", float(done), float(max(total, done)), "",
            {"epoch": epoch, "loss": float(np.mean(losses[-20:])), "lr": self.current_lr},
            eta))

    def _cancel(self, epoch, losses, it, t_epoch) -> None:
        run = self.run
        if run.epochs_done == 0:
            if not losses:
                raise JobCancelled("Training was cancelled before the first iteration; "
                                   "no model file was written.")
            # no model on disk yet: keep the weights of this partial epoch (loss only)
            kept, self.metric_vols = self.metric_vols, []
            try:
                self.end_epoch(epoch, losses, it, time.monotonic() - t_epoch, last=False)
            finally:
                self.metric_vols = kept
        raise JobCancelled(
            f"Training was cancelled; {run.out} holds the model after epoch {run.epochs_done} "
            f"(best epoch {run.best_epoch}). Continue it with --resume.")


def _normalisation_config(norm: Dict[str, Any], where: str) -> NormalisationConfig:
    """Inverse of :func:`_normalisation_dict` (a model file's normalisation)."""
    data: Dict[str, Any] = {"mode": norm.get("mode", "zscore")}
    if "mask" in norm:
        data["zscore_mask"] = norm["mask"]
    for key in ("low", "high", "clip"):
        if key in norm:
            data[key] = norm[key]
    return from_dict(NormalisationConfig, data, where=f"{where}: normalisation")


def _normalisation_dict(nc: NormalisationConfig) -> Dict[str, Any]:
    if nc.mode == "zscore":
        return {"mode": "zscore", "mask": nc.zscore_mask}
    if nc.mode == "robust":
        return {"mode": "robust"}
    if nc.mode == "percentile":
        return {"mode": "percentile", "low": nc.low, "high": nc.high, "clip": nc.clip}
    return {"mode": "none"}


def describe_config(cfg: TrainConfig) -> str:
    """A short human summary of a config (for logs)."""
    return (f"target {cfg.target or DEFAULT_TARGET}, model {cfg.model.preset}, loss "
            f"{cfg.loss.name}, lr {cfg.optimizer.lr:g}, {cfg.epochs} epochs x "
            f"{cfg.iterations_per_epoch} iterations, batch {cfg.batch_size}, augment "
            f"{cfg.augment.level}" + (f", weight average {cfg.ema_decay:g}" if cfg.ema_decay else ""))


__all__ = [
    "TrainConfig", "DataConfig", "DataSource", "ModelSection", "LossConfig", "OptimizerConfig",
    "ScheduleConfig", "ValidationConfig", "AugmentConfig", "TrainResult", "train",
    "load_train_config", "resume_conflicts", "amp_settings", "physical_cores", "LOSSES",
]
