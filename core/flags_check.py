"""How well a prediction's flags CSV ranked its truly wrong cells, once the ground truth is known.

``episeg predict`` writes ``STEM_cells_flags.csv`` beside ``STEM_cells.<ext>``:
the cells ranked by how likely they are to be wrong (core.flags). When a lab
corrects such a stack and evaluates the prediction against the correction
(``episeg evaluate``, the Evaluate tab), this module says how many of the
wrong cells the first rows of that CSV held: the figure that tells whether
checking only the first rows is enough on the lab's own stacks.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from core.errors import VolumeDataError
from core.flags import face_sliver_merges, first_rows, flag_precision, wrong_predicted_cells
from core.io import split_spec
from core.metrics import EvaluationResult

#: Shares of the CSV's rows whose recall is reported (the first 10 % and 20 %).
SHARES = (0.1, 0.2)


def flags_beside(pred_spec: Union[str, Path]) -> Path:
    """Where ``episeg predict`` puts the flags of a label stack:
    ``STEM_cells_flags.csv`` beside ``STEM_cells.<ext>`` (.tif, .mat, .h5; a
    dataset name after ':' is ignored)."""
    path, _ = split_spec(pred_spec)
    return path.with_name(f"{path.stem}_flags.csv")


def read_flags_csv(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The rows of a flags CSV (core.flags.COLUMNS), most suspicious first.

    Needs the columns ``rank`` and ``cell_id``; ``touches_border`` is read when
    present. Raises VolumeDataError naming the file otherwise.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"rank", "cell_id"} - set(reader.fieldnames or ())
            if missing:
                raise VolumeDataError(
                    f"{path} is not a flags CSV of episeg predict: it has no column "
                    f"{', '.join(sorted(missing))}.")
            rows = []
            for i, r in enumerate(reader, start=2):
                try:
                    rows.append({"rank": int(r["rank"]), "cell_id": int(r["cell_id"]),
                                 "touches_border": r.get("touches_border") == "True"})
                except (TypeError, ValueError):
                    raise VolumeDataError(f"{path}, line {i}: rank and cell_id must be whole "
                                          f"numbers, got {r.get('rank')!r} and "
                                          f"{r.get('cell_id')!r}.") from None
    except OSError as exc:
        raise VolumeDataError(f"Cannot read the flags CSV {path}: {exc.strerror or exc}.") from exc
    return sorted(rows, key=lambda r: r["rank"])


@dataclass
class FlagCheck:
    """The flags' ranking against the wrong predicted cells of one evaluation.

    ``recall``: share of the wrong cells in the first ``share`` of the rows, per
    share; ``recall_other``: the same for the wrong cells that are not only a
    face sliver merge (None when the voxel size is unknown); ``rows_checked``:
    how many rows each share is; ``ranks``: each listed predicted cell's rank;
    ``figures``: all of :func:`core.flags.flag_precision`'s, for the JSON.
    """

    path: Path
    n_rows: int
    n_wrong: int
    recall: Dict[float, float]
    rows_checked: Dict[float, int]
    n_face_sliver: Optional[int] = None
    recall_other: Optional[Dict[float, float]] = None
    figures: Dict[str, float] = field(default_factory=dict, repr=False)
    ranks: Dict[int, int] = field(default_factory=dict, repr=False)

    def lines(self) -> List[str]:
        """The check in a few sentences, for a report or a log."""
        if self.n_wrong == 0:
            return [f"no predicted cell is wrong, so the flags ({self.path.name}) had nothing to find"]
        out = [f"{self.n_wrong} of the {self.n_rows} predicted cells are wrong (merged, split, "
               f"or matching no ground-truth cell)"]
        first, *more = [(f"{100 * share:g} %", self.rows_checked[share],
                         int(round(self.recall[share] * self.n_wrong)), self.recall[share])
                        for share in sorted(self.recall)]
        pct, rows, found, recall = first
        text = (f"of the first {rows} rows of {self.path.name} ({pct}), {found} are wrong cells: "
                f"{recall:.2f} of them")
        out.append(text + "".join(f"; of the first {rows} ({pct}), {found}: {recall:.2f}"
                                  for pct, rows, found, recall in more))
        if self.recall_other is not None and self.n_face_sliver is not None:
            other = self.n_wrong - self.n_face_sliver
            if self.n_face_sliver and other:
                share = min(self.recall_other)
                found = int(round(self.recall_other[share] * other))
                out.append(f"{self.n_face_sliver} of the wrong cells only took in a thin cap of a "
                           f"cell cut off by the stack's faces, which the flags do not see; the "
                           f"first {100 * share:g} % hold {found} of the other {other} "
                           f"({self.recall_other[share]:.2f})")
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"flags_csv": str(self.path), **self.figures}


def check_flags(path: Union[str, Path], result: EvaluationResult, gt: np.ndarray,
                pred: np.ndarray, voxel_size: Optional[Sequence[float]] = None,
                shares: Sequence[float] = SHARES) -> FlagCheck:
    """Score the ranking of the flags CSV at ``path`` against ``result``
    (:func:`core.metrics.evaluate` of ``gt`` and ``pred``, ZYX labels).

    voxel_size: (z, y, x) um, to tell face-sliver merges apart; None skips that.
    Raises VolumeDataError when the CSV lists cells the prediction does not
    hold (flags of another stack).
    """
    path = Path(path)
    rows = read_flags_csv(path)
    ids = {int(i) for i in (result.table.pred_ids if result.table is not None else ())} - {0}
    listed = {r["cell_id"] for r in rows}
    another = ("it was written for another label stack. Choose the flags CSV that episeg "
               "predict wrote with this prediction, or none.")
    if ids and not listed:
        raise VolumeDataError(f"{path} lists no cells, but the prediction holds {len(ids)}: "
                              + another)
    if not listed <= ids:
        strangers = sorted(listed - ids)
        raise VolumeDataError(f"{path} lists {len(strangers)} cells that the prediction does "
                              f"not hold (e.g. id {strangers[0]}): " + another)
    wrong = wrong_predicted_cells(result.cells)
    slivers = None
    if voxel_size is not None:
        slivers = face_sliver_merges(gt, pred, wrong, voxel_size=voxel_size, table=result.table)
    figures = flag_precision(rows, wrong, ks=(10,), face_slivers=slivers, shares=shares)
    pct = {share: f"recall_top{int(round(100 * share))}pct" for share in shares}
    return FlagCheck(
        path=path, n_rows=len(rows), n_wrong=len(wrong),
        recall={s: figures[k] for s, k in pct.items()},
        rows_checked={s: first_rows(len(rows), s) for s in shares},
        n_face_sliver=None if slivers is None else int(figures["n_face_sliver"]),
        recall_other=None if slivers is None else {s: figures[k + "_other"] for s, k in pct.items()},
        figures={f"flags_{k}": v for k, v in figures.items()},
        ranks={r["cell_id"]: r["rank"] for r in rows})
