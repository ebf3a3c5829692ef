"""Choose a trained model's post-processing again, on annotated stacks, without training.

``episeg train`` chooses the seeds and merging on its validation stacks
(:mod:`core.segment_choice`). When those are a part held out of a single
stack, the choice rests on a few dozen cells, and settings that close can swap
on new stacks (docs/accuracy.md steps 23-24). A lab that has corrected a
predicted stack has many more cells: ``episeg tune`` predicts each annotated
stack as ``episeg predict`` would, runs the same search on it, and writes a
copy of the model file that keeps the new choice (the input model is never
changed). Arrays are ZYX, lengths in micrometres.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from core.errors import ConfigError, VolumeDataError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.pipeline import PredictConfig, stack_channels
from core.segment_choice import SegmentChoice, ValidationCase, choose_segment_params, describe
from core.volume import Volume, centre_yx

PathLike = Union[str, Path]
#: Voxels of each annotated stack the search segments (its centre in Y and X,
#: all of Z). Each of its 26 settings segments them once: 110 s for all 26 on
#: 4 million voxels on a 2-core CPU (docs/accuracy.md step 23), so about a
#: quarter of an hour at this size.
MAX_VOXELS = 32_000_000


@dataclass
class TuneResult:
    """What :func:`tune_model` did: the search's report, the model file it
    wrote, and the earlier choice (the model's ``segment``; empty: shipped)."""

    choice: SegmentChoice
    out: Path
    previous: dict
    stacks: List[str]

    def summary(self) -> str:
        before = describe(self.previous) if self.previous else "the shipped settings"
        return f"{self.choice.summary()}; the model had {before}; wrote {self.out}"


def tune_model(
    model_path: PathLike,
    pairs: Sequence[Sequence[Any]],
    out_path: PathLike,
    *,
    config: Optional[PredictConfig] = None,
    network=None,
    max_voxels: int = MAX_VOXELS,
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
) -> TuneResult:
    """Choose ``model_path``'s post-processing on ``pairs`` of (raw, labels)
    file specs and write the model with that choice to ``out_path``. A pair may
    carry a third item, the stack's voxel size (z, y, x) um, which replaces the
    one its file records (None: the file's).

    ``config`` gives how the network runs (device, tiles, TTA), the voxel size
    of stacks whose files record none, and the settings the search starts from
    (``config.segment``, the shipped ones by default). The labels must have
    their raw stack's shape (ZYX; 0 = background). The new choice replaces
    the model's earlier one; with no clear gain over the shipped settings the
    copy predicts with the shipped ones. ``network``: what runs the network
    (as for :func:`core.pipeline.segment_stack`; None: in this process).
    A stack larger than ``max_voxels`` is searched on its centre in Y and X.
    Raises :class:`ConfigError` without pairs or when ``out_path`` is the
    model itself, :class:`VolumeDataError` when labels do not fit their stack
    or hold no cells.
    """
    from core.checkpoint import (build_from_model_dict, load_model_file, model_info,
                                 save_model_file)
    from core.io import read_labels, read_volume
    from core.predict import resolve_device

    config = config or PredictConfig()
    model_path, out_path = Path(model_path), Path(out_path)
    if not pairs:
        raise ConfigError("tune: give at least one annotated stack (--pair RAW LABELS).")
    if out_path.exists() and out_path.resolve() == model_path.resolve():
        raise ConfigError(f"{out_path}: this is the model being tuned; choose another "
                          "output file (the model file is never overwritten).")
    data = load_model_file(model_path)
    info = model_info(data, model_path)
    device = resolve_device(None if config.device == "auto" else config.device)
    model = build_from_model_dict(data, which="best", where=str(model_path)).to(device).eval()
    rep = ProgressReporter(progress, "tune")
    cases: List[ValidationCase] = []
    for i, (raw_spec, labels_spec, *own) in enumerate(pairs):
        check_cancelled(cancel, "Tuning")
        rep.message(f"predicting annotated stack {i + 1} of {len(pairs)}: {raw_spec}")
        raw, labels = read_volume(raw_spec), read_labels(labels_spec)
        if own and own[0] is not None:
            raw.voxel_size = tuple(float(v) for v in own[0])
        if raw.shape != labels.shape:
            raise VolumeDataError(f"{labels_spec}: labels of shape {labels.shape} do not fit "
                                  f"the raw stack {raw_spec} of shape {raw.shape}; give each "
                                  "stack with its own labels.")
        if not np.any(labels.data):
            raise VolumeDataError(f"{labels_spec}: no cells (every voxel is 0); give labels "
                                  "with the stack's cells.")
        crop = centre_yx(raw.shape, max_voxels)
        if crop != (slice(None),) * 3:
            part = np.asarray(raw.data[crop])
            rep.message(f"{raw_spec}: {raw.data.size / 1e6:.0f} million voxels; the search uses "
                        f"its centre, {' x '.join(str(n) for n in part.shape)} voxels")
            raw = Volume(part, raw.voxel_size, raw.name, source=raw.source)
        net = stack_channels(raw, model, info, config=config, network=network,
                             progress=progress, cancel=cancel)
        cases.append(ValidationCase(net.channels, np.asarray(labels.data[crop]),
                                    net.voxel_size_um))
    choice = choose_segment_params(cases, config.segment, progress=progress, cancel=cancel)
    previous = dict(data.get("segment") or {})
    data["segment"] = dict(choice.chosen)
    data["segment_choice"] = {**choice.to_dict(), "tuned_on": [str(p[0]) for p in pairs]}
    save_model_file(out_path, data)
    result = TuneResult(choice=choice, out=out_path, previous=previous,
                        stacks=[str(p[0]) for p in pairs])
    rep.message(result.summary())
    return result
