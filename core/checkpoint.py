"""The EpiSeg model file: one self-contained, safely loadable checkpoint.

A model file is a ``torch.save`` of a plain dict (tensors, numbers, strings,
lists, dicts, tuples; no classes), so it loads with
``torch.load(weights_only=True)``: a model from a colleague cannot run code.
It holds everything needed to predict (architecture, best weights,
normalisation, training voxel size, target) and to continue training exactly
(last weights, optimizer, schedule, AMP scaler and random-generator states).

Fields (``REQUIRED`` must be present, with these types):

========================  ============================================================
format, format_version    "episeg-model", 1
episeg_version            version that wrote the file
created, updated          ISO 8601 times (UTC) of the first and the latest save
epochs                    epochs finished (int)
best_epoch                epoch (1-based) whose weights are ``best_model_state_dict``
best_metric               {"name": ..., "value": ..., "mode": "max"|"min"}
best_model_state_dict     weights of the best epoch (used for prediction)
model_state_dict          weights after the last epoch (used by --resume)
optimizer_state_dict      Adam state after the last epoch
scheduler_state_dict      learning-rate schedule state (plain dict)
scaler_state_dict         torch.amp.GradScaler state ({} when not used)
rng_state                 {"torch": ByteTensor, "torch_cuda": [ByteTensor...],
                          "numpy": PCG64 state dict, "python": random.getstate()}
train_losses              mean training loss per epoch (list of float)
valid_losses              validation loss per epoch (list of float)
valid_metrics             per epoch a dict (ap50, cell_iou, ... or {} when skipped)
test_metrics              dict of metrics on test data ({} until evaluated)
history                   per epoch {"epoch", "iterations", "lr", "seconds", ...}
elapsed_s                 training seconds spent so far (all sessions)
config                    the training config (plain dict, :class:`core.train.TrainConfig`)
model_config              :meth:`core.model.ModelConfig.to_dict`
target                    "cells_with_gaps" | "boundaries" | "both" | "all" | "all_walls"
channels                  output channel names, e.g. ["cell", "boundary"]
normalisation             {"mode": "zscore", "mask": "all"} or {"mode": "percentile",
                          "low": 1, "high": 99.8, "clip": false} or {"mode": "none"}
voxel_size_um             training voxel size [z, y, x] in um, or None
stack_voxel_size_um       (optional) the training stacks' own voxel size where the model
                          trains on a coarser grid (core.preprocess.training_grid_um):
                          what a stack that records none is taken to have; None or
                          absent = voxel_size_um
patch_size                training patch [z, y, x] in voxels
finished                  True when the planned epochs were all done
========================  ============================================================
"""

from __future__ import annotations

import datetime as _dt
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from core import __version__
from core.errors import ConfigError, ModelFileError

FORMAT = "episeg-model"
FORMAT_VERSION = 1

#: key -> accepted types
REQUIRED: Dict[str, Tuple[type, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "episeg_version": (str,),
    "epochs": (int,),
    "best_epoch": (int,),
    "best_model_state_dict": (dict,),
    "model_state_dict": (dict,),
    "optimizer_state_dict": (dict,),
    "scheduler_state_dict": (dict,),
    "scaler_state_dict": (dict,),
    "rng_state": (dict,),
    "train_losses": (list,),
    "valid_losses": (list,),
    "valid_metrics": (list,),
    "test_metrics": (dict,),
    "config": (dict,),
    "model_config": (dict,),
    "target": (str,),
    "normalisation": (dict,),
    "voxel_size_um": (list, tuple, type(None)),
    "patch_size": (list, tuple),
    "created": (str,),
}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def cpu_state_dict(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A detached CPU copy of a (nested) state dict, safe to keep while training goes on."""
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", copy=True)
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, tuple):
            return tuple(conv(x) for x in v)
        return v
    return conv(state)


def save_model_file(path: Union[str, Path], state: Mapping[str, Any]) -> Path:
    """Write ``state`` (a dict with the fields above) to ``path`` atomically.

    The format marker is added; missing required keys are a programming error
    (ValueError). The file is first written under a temporary name in the same
    folder and renamed onto ``path`` only when complete, so an interrupted save
    never destroys the previous model.
    """
    from core.io.atomic import atomic_path

    path = Path(path)
    data = dict(state)
    data["format"] = FORMAT
    data["format_version"] = FORMAT_VERSION
    data.setdefault("episeg_version", __version__)
    data.setdefault("created", now_iso())
    data["updated"] = now_iso()
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"model file state lacks {missing}")
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def _describe_zip(path: Path) -> Optional[str]:
    """Recognise a TorchScript archive (code inside) by its member names."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "a TorchScript archive (compiled code)"
    return None


def load_model_file(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    """Read and validate an EpiSeg model file with ``torch.load(weights_only=True)``.

    Raises :class:`ModelFileError`, naming the file, when it is missing, not a
    PyTorch file, contains code or classes (a full pickled model, TorchScript),
    is a bare ``state_dict`` without settings, comes from a newer EpiSeg, or
    lacks a required field.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found. Check the path, or train one "
                             "with 'episeg train --out MODEL'.")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file.")
    what = _describe_zip(path)
    if what is not None:
        raise ModelFileError(
            f"{path}: this is {what}, not an EpiSeg model file. EpiSeg only loads plain "
            "checkpoints written by 'episeg train', which cannot run code when opened.")
    try:
        with warnings.catch_warnings():  # foreign pickles make torch warn before it refuses them
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise ModelFileError(
                f"{path}: the file contains Python objects or code (e.g. a whole pickled "
                "model), not a plain EpiSeg checkpoint, so it is not loaded for safety. "
                "Use a model file written by 'episeg train'.") from None
        raise ModelFileError(f"{path}: not a PyTorch model file ({text.splitlines()[0]}). "
                             "Use a model file written by 'episeg train'.") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign files
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ModelFileError(f"{path}: cannot be read as a model file ({first}). "
                             "It may be damaged or not a model; use a model file written "
                             "by 'episeg train'.") from None
    validate_model_dict(data, where=str(path))
    return data


def validate_model_dict(data: Any, where: str = "model file") -> None:
    """Check the format marker, the version and the types of the required fields."""
    if not isinstance(data, dict):
        raise ModelFileError(f"{where}: holds a {type(data).__name__}, not an EpiSeg model "
                             "(a dict of weights and settings).")
    if data.get("format") != FORMAT:
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ModelFileError(
                f"{where}: this is a bare PyTorch state_dict (weights only, no architecture, "
                "normalisation or voxel size), not an EpiSeg model file. Train or fine-tune "
                "with 'episeg train' to get a self-contained model file.")
        raise ModelFileError(f"{where}: not an EpiSeg model file (no format marker "
                             f"'{FORMAT}'). Use a model file written by 'episeg train'.")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(f"{where}: model file format version {version!r} is newer than "
                             f"this EpiSeg ({__version__}) understands ({FORMAT_VERSION}). "
                             "Update EpiSeg.")
    for key, types in REQUIRED.items():
        if key not in data:
            raise ModelFileError(f"{where}: the model file lacks the field '{key}'; it is "
                                 "damaged or was not written by 'episeg train'.")
        if not isinstance(data[key], types) or isinstance(data[key], bool) and int in types:
            raise ModelFileError(f"{where}: field '{key}' has type {type(data[key]).__name__}; "
                                 "the model file is damaged.")
    if not data["best_model_state_dict"]:
        raise ModelFileError(f"{where}: the model file holds no weights.")


@dataclass
class ModelInfo:
    """What a loaded model needs for prediction, and its history for display.

    voxel_size_um: training voxel size (z, y, x) um, or None (unknown); new
    volumes should be resampled to it. normalisation: the mode and parameters
    to apply per volume (:func:`core.preprocess.normalise`). channels: output
    channel names in order ("cell", "boundary"). segment: the post-processing
    settings chosen on the training's validation stacks (:mod:`core.segment_choice`;
    empty: the shipped ones), segment_choice: that search's report, or None.
    stack_voxel_size_um: the training stacks' own voxel size where the model trains
    on a coarser grid, else None (see :attr:`assumed_voxel_size_um`).
    """

    path: str
    target: str
    channels: Tuple[str, ...]
    normalisation: Dict[str, Any]
    voxel_size_um: Optional[Tuple[float, float, float]]
    patch_size: Tuple[int, int, int]
    model_config: Any
    epochs: int
    best_epoch: int
    best_metric: Dict[str, Any] = field(default_factory=dict)
    valid_metrics: Dict[str, Any] = field(default_factory=dict)
    test_metrics: Dict[str, Any] = field(default_factory=dict)
    episeg_version: str = ""
    created: str = ""
    segment: Dict[str, Any] = field(default_factory=dict)
    segment_choice: Optional[Dict[str, Any]] = None
    stack_voxel_size_um: Optional[Tuple[float, float, float]] = None

    @property
    def assumed_voxel_size_um(self) -> Optional[Tuple[float, float, float]]:
        """What a stack that records no voxel size is taken to have: the training
        stacks' own voxel size (the model's grid may be coarser)."""
        return self.stack_voxel_size_um or self.voxel_size_um


def model_info(data: Mapping[str, Any], path: Union[str, Path] = "") -> ModelInfo:
    """:class:`ModelInfo` from a loaded model dict."""
    from core.model import ModelConfig

    cfg = ModelConfig.from_dict(data["model_config"], where=f"{path}: model_config")
    best = int(data["best_epoch"])
    vm = data.get("valid_metrics") or []
    best_vm = vm[best - 1] if 0 < best <= len(vm) and isinstance(vm[best - 1], dict) else {}
    vs, stack_vs = data["voxel_size_um"], data.get("stack_voxel_size_um")
    return ModelInfo(
        path=str(path), target=str(data["target"]),
        channels=tuple(data.get("channels") or cfg.channel_names),
        normalisation=dict(data["normalisation"]),
        voxel_size_um=None if vs is None else tuple(float(v) for v in vs),
        patch_size=tuple(int(v) for v in data["patch_size"]),
        model_config=cfg, epochs=int(data["epochs"]), best_epoch=best,
        best_metric=dict(data.get("best_metric") or {}), valid_metrics=dict(best_vm),
        test_metrics=dict(data.get("test_metrics") or {}),
        episeg_version=str(data.get("episeg_version", "")), created=str(data.get("created", "")),
        segment=dict(data.get("segment") or {}), segment_choice=data.get("segment_choice"),
        stack_voxel_size_um=None if stack_vs is None else tuple(float(v) for v in stack_vs),
    )


def build_from_model_dict(data: Mapping[str, Any], *, which: str = "best",
                          where: str = "model file") -> torch.nn.Module:
    """A :class:`core.model.UNet3D` with the ``which`` ("best" or "last") weights loaded."""
    from core.model import ModelConfig, build_model

    try:
        cfg = ModelConfig.from_dict(data["model_config"], where=f"{where}: model_config")
    except ConfigError as err:
        raise ModelFileError(str(err)) from None
    model = build_model(cfg)
    key = "best_model_state_dict" if which == "best" else "model_state_dict"
    try:
        model.load_state_dict(data[key])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelFileError(f"{where}: the weights do not fit the stored architecture "
                             f"({first}); the file is damaged.") from None
    return model


def load_model_for_inference(path: Union[str, Path], device: Union[str, torch.device] = "cpu"
                             ) -> Tuple[torch.nn.Module, ModelInfo]:
    """Load ``path`` for prediction: ``(model on device in eval mode with the best
    weights, ModelInfo)``."""
    data = load_model_file(path, map_location="cpu")
    model = build_from_model_dict(data, which="best", where=str(path))
    model.to(device).eval()
    return model, model_info(data, path)


def read_model_summary(path: Union[str, Path]) -> Dict[str, Any]:
    """Plain dict describing a model file (for `episeg info` or a GUI model card)."""
    data = load_model_file(path)
    info = model_info(data, path)
    return {
        "path": str(path), "target": info.target, "channels": list(info.channels),
        "normalisation": info.normalisation,
        "voxel_size_um": None if info.voxel_size_um is None else list(info.voxel_size_um),
        "stack_voxel_size_um": (None if info.stack_voxel_size_um is None
                                else list(info.stack_voxel_size_um)),
        "patch_size": list(info.patch_size), "epochs": info.epochs,
        "best_epoch": info.best_epoch, "best_metric": info.best_metric,
        "valid_metrics": info.valid_metrics, "test_metrics": info.test_metrics,
        "model_config": data["model_config"], "episeg_version": info.episeg_version,
        "created": info.created, "finished": bool(data.get("finished", False)),
        "segment": info.segment, "segment_choice": info.segment_choice,
    }


def set_test_metrics(path: Union[str, Path], metrics: Mapping[str, Any]) -> Path:
    """Record metrics on test data (plain numbers/strings) in an existing model file.

    The file is validated, updated and rewritten atomically; everything else
    is kept as it was.
    """
    data = load_model_file(path)
    plain = {str(k): (float(v) if isinstance(v, float) else v) for k, v in metrics.items()
             if isinstance(v, (int, float, str, bool, type(None)))}
    data["test_metrics"] = plain
    return save_model_file(path, data)


def list_fields() -> List[str]:
    """Required field names (for documentation and tests)."""
    return list(REQUIRED)


__all__ = [
    "FORMAT", "FORMAT_VERSION", "REQUIRED", "ModelInfo", "save_model_file", "load_model_file",
    "validate_model_dict", "model_info", "build_from_model_dict", "load_model_for_inference",
    "read_model_summary", "cpu_state_dict", "now_iso", "set_test_metrics",
]
