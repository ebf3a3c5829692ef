"""``episeg demo`` end to end at a tiny size: what a first-time user gets on disk."""

from __future__ import annotations

import json

from PIL import Image

from core.cli.main import main
from core.resources import default_model


def test_the_demo_writes_its_figure_labels_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.1", "--shape", "16,64,64",
                 "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "EpiSeg demo finished" in said and "real C. elegans stack" in said
    names = sorted(p.name for p in (out / "cells").iterdir())
    assert "celegans_membrane_raw_cells.mat" in names and "celegans_membrane_raw_cells.tif" in names
    assert sum(n.endswith(".mat") for n in names) == 3  # two unseen stacks and the real one
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["test_stacks"]) == 2 and 0 <= metrics["mean"]["ap50"] <= 1
    real = metrics["real_stack"]
    assert real["cells"] > 0
    if default_model() is not None:  # fine-tuned from it: the figure shows both on the real stack
        assert real["cells_before_fine_tuning"] > 0
        assert f"{real['cells_before_fine_tuning']} with the model before fine-tuning" in said
    with Image.open(out / "demo.png") as im:
        assert im.width > 1000 and im.height > 600
