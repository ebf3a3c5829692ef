"""The network spread over a local dask cluster gives the same cells as one process."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("zarr")

from core.cli.main import main  # noqa: E402
from core.config import from_dict  # noqa: E402
from core.errors import JobCancelled  # noqa: E402
from core.io import read_labels  # noqa: E402
from core.pipeline import PredictConfig, predict_files  # noqa: E402


@pytest.fixture(scope="module")
def model_and_stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask")
    assert main(["synth", str(d), "--n", "2", "--shape", "40,64,64", "--seed", "4"]) == 0
    raw, lab = d / "synth_000_raw.tif", d / "synth_000_labels.tif"
    assert main(["train", "--pair", str(raw), str(lab), "--out", str(d / "model.pt"),
                 "--epochs", "1", "--iterations", "4", "--patch-size", "8,32,32", "--quiet"]) == 0
    # four iterations find no cells yet: shift the head so that cell and tissue are
    # everywhere and the (input-dependent) boundary probability is below the seed
    # ceiling in about half of the stack: its low places become cells
    import torch

    from core.checkpoint import load_model_file, load_model_for_inference, save_model_file
    from core.io import read_volume
    from core.pipeline import segment_stack

    net, info = load_model_for_inference(str(d / "model.pt"), "cpu")
    probs = segment_stack(read_volume(str(d / "synth_001_raw.tif")), net, info,
                          config=config()).probabilities
    median = float(np.median(probs[1])) / 255.0
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    data = load_model_file(d / "model.pt")
    for key in ("model_state_dict", "best_model_state_dict"):
        if data.get(key):
            shift = torch.zeros_like(data[key]["head.bias"])  # cell, boundary, tissue first
            shift[:3] = torch.tensor([8.0, logit(0.4) - logit(median), 8.0])
            data[key]["head.bias"].add_(shift)
    save_model_file(d / "model.pt", data)
    return d, d / "model.pt", d / "synth_001_raw.tif"


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 worker processes for the module (starting one takes seconds)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as c:
        yield c.scheduler_address


def config(**kw):
    # small tiles: several Z rows, so the stack is cut into several blocks; no
    # merging across weak walls: the shifted head makes every wall faint
    return from_dict(PredictConfig, {"tile_shape": [16, 32, 32], "flags": False,
                                     "save_probabilities": True,
                                     "segment": {"merge_below": 0.0}, **kw})


def test_two_workers_give_the_single_process_result_bit_for_bit(model_and_stack, cluster):
    d, model, stack = model_and_stack
    one = predict_files(str(model), [str(stack)], d / "one", config())
    two = predict_files(str(model), [str(stack)], d / "two", config(), scheduler=cluster)
    a = read_labels(str(one[0].outputs[0])).data
    b = read_labels(str(two[0].outputs[0])).data
    assert a.max() > 3
    np.testing.assert_array_equal(a, b)
    for name in ("cell", "boundary", "tissue"):
        pa = d / "one" / f"synth_001_raw_{name}_probability.tif"
        pb = d / "two" / f"synth_001_raw_{name}_probability.tif"
        np.testing.assert_array_equal(read_labels(str(pa)).data, read_labels(str(pb)).data)
    assert not list((d / "two").glob("episeg-blocks-*"))  # finished: no blocks left behind


def test_an_interrupted_run_resumes_from_its_finished_blocks(model_and_stack, cluster):
    from core.checkpoint import load_model_for_inference
    from core.distributed import DaskPredictor, close_client, make_client
    from core.io import read_volume
    from core.pipeline import segment_stack

    d, model, stack = model_and_stack
    net, info = load_model_for_inference(str(model), "cpu")
    client = make_client(scheduler=cluster)
    try:
        predictor = DaskPredictor(client, model, d / "work", z_rows_per_block=1,
                                  threads_per_task=1)
        cancel = threading.Event()

        def progress(event):
            if event.message.startswith("block 1/"):
                cancel.set()

        with pytest.raises(JobCancelled):
            segment_stack(read_volume(str(stack)), net, info, config=config(), work_dir=d / "work",
                          network=predictor, progress=progress, cancel=cancel)
        assert list((d / "work").glob("episeg-blocks-*/block_*.npy"))
        again = segment_stack(read_volume(str(stack)), net, info, config=config(),
                              work_dir=d / "work", network=predictor)
        assert predictor.last_run["resumed"] >= 1 and predictor.last_run["blocks"] >= 3
        assert predictor.last_run["workers"] == 2
    finally:
        close_client(client)
    single = segment_stack(read_volume(str(stack)), net, info, config=config())
    np.testing.assert_array_equal(again.labels.data, single.labels.data)


def test_the_command_line_runs_a_local_cluster(model_and_stack, capsys):
    d, model, stack = model_and_stack
    assert main(["predict", str(stack), "--model", str(model), "--out", str(d / "cli"),
                 "--workers", "2", "--tile-shape", "16,32,32", "--quiet"]) == 0
    assert (d / "cli" / "synth_001_raw_cells.tif").exists()
    assert main(["predict", str(stack), "--model", str(model), "--out", str(d / "cli"),
                 "--workers", "2", "--scheduler", "tcp://nowhere:1"]) == 2
    assert "not both" in capsys.readouterr().err
