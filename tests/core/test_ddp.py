"""Training spread over 2 processes with torchrun (DistributedDataParallel, gloo on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.checkpoint import read_model_summary
from core.cli.main import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("budget", [None, "0.1"])
def test_torchrun_two_cpu_processes_train_one_model(tmp_path, budget):
    assert main(["synth", str(tmp_path), "--n", "2", "--shape", "16,64,64", "--seed", "3"]) == 0
    out = tmp_path / "model.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000 + (7 if budget else 0)),
           "-m", "core.cli.main", "train",
           "--pair", str(tmp_path / "synth_000_raw.tif"), str(tmp_path / "synth_000_labels.tif"),
           "--val-pair", str(tmp_path / "synth_001_raw.tif"), str(tmp_path / "synth_001_labels.tif"),
           "--out", str(out), "--patch-size", "8,32,32", "--quiet"]
    # with a time budget every process must stop on the same iteration (else it hangs)
    cmd += ["--epochs", "1000", "--iterations", "4", "--max-minutes", budget] if budget else \
        ["--epochs", "2", "--iterations", "3"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "TMPDIR": str(tmp_path)})  # torchrun's log folders
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # process 0 reports and writes, once
    summary = read_model_summary(out)
    assert summary["epochs"] == 2 if budget is None else summary["epochs"] >= 1
