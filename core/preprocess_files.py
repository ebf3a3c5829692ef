"""Preprocess several stacks in one job: plan the output names, run, report per file.

Shared by ``episeg preprocess`` and the GUI's Preprocess tab. Every output is
checked before any work starts (never an input file, never two volumes into
one file); each volume is read, preprocessed (:func:`core.preprocess.preprocess_volume`)
and written atomically before the next is read, so memory holds one volume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from core.errors import ConfigError, EpiSegError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.preprocess import PreprocessConfig, preprocess_volume, write_preprocessed

Pair = Tuple[str, Optional[str]]


def output_name(raw_spec: str) -> str:
    """'a/gland01.mat:I' -> 'gland01_I_preprocessed.h5' (dataset kept: one file may hold several)."""
    from core.io import split_spec

    path, inner = split_spec(raw_spec)
    name = path.stem
    if inner:
        name += "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", inner).strip("_")
    return f"{name}_preprocessed.h5"


def plan_outputs(pairs: Sequence[Pair], out_dir: Optional[Path] = None,
                 out: Optional[Path] = None, *, where: str = "preprocess") -> List[Path]:
    """Output file of each (raw, labels) pair: ``out`` for one volume, else ``out_dir/<name>``.

    Raises ConfigError (naming ``where``) when an output is an input file or two
    volumes would be written to the same file.
    """
    from core.io import split_spec

    if out is not None:
        if len(pairs) > 1:
            raise ConfigError(f"{where}: several volumes need an output folder, not one file.")
        outs = [Path(out)]
    elif out_dir is not None:
        outs = [Path(out_dir) / output_name(raw) for raw, _ in pairs]
    else:
        raise ConfigError(f"{where}: say where to write: an output file (one volume) or an "
                          "output folder.")
    inputs = {split_spec(s)[0].resolve() for pair in pairs for s in pair if s}
    seen: Dict[Path, str] = {}
    for (raw, _), path in zip(pairs, outs):
        key = path.resolve()
        if key in inputs:
            raise ConfigError(f"{where}: the output {path} is one of the input files; inputs "
                              "are never overwritten. Choose another output name or folder.")
        if key in seen:
            raise ConfigError(f"{where}: {seen[key]} and {raw} would both be written to {path}. "
                              "Give them different file names.")
        seen[key] = raw
    return outs


@dataclass
class PreprocessedFile:
    """One volume of :func:`preprocess_files`: where it went and what happened, or the error."""

    raw: str
    labels: Optional[str]
    output: Optional[Path] = None
    summary: List[str] = field(default_factory=list)
    error: str = ""


def preprocess_files(pairs: Sequence[Pair], config: Optional[PreprocessConfig] = None, *,
                     out_dir: Optional[Path] = None, out: Optional[Path] = None,
                     channel: Optional[int] = None, time: Optional[int] = None,
                     progress: ProgressFn = None, cancel: CancelFlag = None
                     ) -> List[PreprocessedFile]:
    """Preprocess each (raw spec, labels spec or None) into one HDF5 file.

    A user error on one volume (unreadable file, shapes that differ) is kept
    in its :class:`PreprocessedFile` and the others go on; with a single
    volume it is raised. Cancelling stops between steps; files already
    written stay complete (each write is atomic).
    """
    from core.io import read_labels, read_volume

    config = config or PreprocessConfig()
    outs = plan_outputs(pairs, out_dir, out)
    rep = ProgressReporter(progress, "preprocess")
    results: List[PreprocessedFile] = []
    for i, ((raw_spec, lab_spec), path) in enumerate(zip(pairs, outs), 1):
        check_cancelled(cancel, "Preprocessing")
        tag = f"[{i}/{len(pairs)}] " if len(pairs) > 1 else ""
        try:
            raw = read_volume(raw_spec, channel=channel, time=time)
            labels = read_labels(lab_spec) if lab_spec else None
            result = preprocess_volume(raw, labels, config, progress=progress, cancel=cancel)
            del raw, labels
            write_preprocessed(path, result)
        except EpiSegError as err:
            if len(pairs) == 1:
                raise
            results.append(PreprocessedFile(raw_spec, lab_spec, error=str(err)))
            rep.message(f"{tag}{raw_spec}: error: {err}")
            continue
        done = PreprocessedFile(raw_spec, lab_spec, path, result.summary_lines())
        results.append(done)
        rep.message("\n".join([f"{tag}{raw_spec}" + (f" + {lab_spec}" if lab_spec else "")]
                              + [f"  {line}" for line in done.summary]
                              + [f"  written: {path}"]))
    return results
