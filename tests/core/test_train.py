"""Training: it learns, stops on time or cancel with a usable model, resumes exactly,
fine-tunes, and `episeg train` runs end to end."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from core.checkpoint import load_model_file, load_model_for_inference, model_info
from core.cli.main import main
from core.config import from_dict, to_dict
from core.errors import ConfigError, JobCancelled, ModelFileError
from core.io import write_volume
from core.train import TrainConfig, load_train_config, train
from core.volume import Volume

REPO = Path(__file__).resolve().parents[2]
VOXEL = (1.0, 0.5, 0.5)


def epithelium(seed: int, shape=(8, 40, 40), n_cells=6, lumen=4):
    """Columnar cells (a 2D Voronoi in YX drifting along Z) with bright blurred membranes."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    pts = rng.uniform([0, lumen], [y, x], (n_cells, 2))
    drift = rng.normal(0, 0.15, (n_cells, 2))
    yy, xx = np.mgrid[0:y, 0:x]
    labels = np.zeros(shape, np.uint16)
    for k in range(z):
        p = pts + drift * k
        d = (yy[..., None] - p[:, 0]) ** 2 + (xx[..., None] - p[:, 1]) ** 2
        labels[k] = d.argmin(-1) + 1
    labels[:, :, :lumen] = 0
    membrane = find_boundaries(labels, mode="inner").astype(np.float32)
    image = 0.15 + 2.0 * ndi.gaussian_filter(membrane, (0.7, 1.0, 1.0))
    image[labels == 0] = 0.05
    image += rng.normal(0, 0.05, shape)
    return (image * 1000).astype(np.float32), labels


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """Three tiny stacks as TIFFs: train, val, test -> {name: (raw path, labels path)}."""
    folder = tmp_path_factory.mktemp("stacks")
    out = {}
    for i, name in enumerate(("train", "val", "test")):
        image, labels = epithelium(i)
        raw, lab = folder / f"{name}_raw.tif", folder / f"{name}_labels.tif"
        write_volume(raw, Volume(image, VOXEL, name=name))
        write_volume(lab, Volume(labels, VOXEL, name=name), labels=True)
        out[name] = (str(raw), str(lab))
    return out


def config(stacks, **kw) -> TrainConfig:
    data = {"train": [{"raw": stacks["train"][0], "labels": stacks["train"][1]}],
            "val": [{"raw": stacks["val"][0], "labels": stacks["val"][1]}]}
    base = {"data": data, "epochs": 3, "iterations_per_epoch": 20, "batch_size": 2,
            "patch_size": [8, 32, 32], "target": "cells_with_gaps", "threads": 1,
            "optimizer": {"lr": 0.01}, "schedule": {"warmup_iterations": 5},
            "model": {"depth": 3}}  # 60 iterations: the shallow net learns fastest
    for key, value in kw.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return from_dict(TrainConfig, base)


@pytest.fixture(scope="module")
def trained(stacks, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    events = []
    result = train(config(stacks), path, progress=events.append)
    return path, result, events


def _cells_and_scores(stacks, model, info):
    """Predict the test stack as a user would: normalise as the model says, sliding
    window, cells, then compare with the ground truth."""
    from core.io import read_labels, read_volume
    from core.metrics import evaluate
    from core.pipeline import normalised_view
    from core.predict import predict_probabilities
    from core.segment import cells_from_probabilities

    raw = read_volume(stacks["test"][0])
    gt = read_labels(stacks["test"][1])
    image = normalised_view(raw.data, info.normalisation)[...]
    prob = predict_probabilities(model, image, device="cpu", out_dtype=np.float32)
    cells = cells_from_probabilities(prob[0], None, voxel_size=raw.voxel_size)
    return evaluate(gt.data, cells)


def test_training_learns_to_find_cells_better_than_an_untrained_model(trained, stacks):
    from core.model import build_model

    path, result, events = trained
    assert result.stopped == "finished" and result.epochs == 3
    assert len(result.train_losses) == 3 and result.train_losses[-1] < result.train_losses[0]
    assert "ap50" in result.valid_metrics[-1] and 1 <= result.best_epoch <= 3
    # cell-level metrics at the first and last epoch and every 5th (the steps get the
    # rest), and for the kept epoch, so that the model file reports them
    has = [bool(m) for m in result.valid_metrics]
    assert has[0] and has[2] and has[result.best_epoch - 1]
    assert has[1] == (result.best_epoch == 2)
    assert model_info(load_model_file(path), path).valid_metrics.get("ap50") is not None
    # progress: one event per iteration with loss and ETA, one summary per epoch
    it_events = [e for e in events if e.stage == "train" and e.total]
    assert len(it_events) == 60 and it_events[-1].done == 60 and "loss" in it_events[-1].data
    assert it_events[5].eta_s is not None
    assert sum(e.stage == "epoch" for e in events) == 3

    model, info = load_model_for_inference(path, "cpu")
    assert info.voxel_size_um == VOXEL and info.target == "cells_with_gaps"
    learned = _cells_and_scores(stacks, model, info)
    torch.manual_seed(0)
    untrained = _cells_and_scores(stacks, build_model(model.cfg).eval(), info)
    assert learned.ap >= 0.5
    assert learned.ap >= untrained.ap + 0.3
    assert learned.cell_iou > untrained.cell_iou or learned.ap > untrained.ap + 0.5


def test_max_minutes_stops_cleanly_with_a_usable_model(stacks, tmp_path):
    path = tmp_path / "timed.pt"
    result = train(config(stacks, epochs=1000, max_minutes=0.04), path)  # 2.4 s
    assert result.stopped == "time" and 1 <= result.epochs < 1000
    data = load_model_file(path)
    assert data["epochs"] == result.epochs and not data["finished"]
    assert data["elapsed_s"] < 2.4 + 5.0
    load_model_for_inference(path, "cpu")


def test_cancel_keeps_a_usable_model(stacks, tmp_path):
    path = tmp_path / "cancelled.pt"
    stop = threading.Event()

    def progress(event):
        if event.stage == "train" and event.total and event.done >= 3:
            stop.set()

    with pytest.raises(JobCancelled, match="resume"):
        train(config(stacks, epochs=5), path, progress=progress, cancel=stop)
    data = load_model_file(path)  # nothing finished yet: the partial epoch was saved
    assert data["epochs"] == 1 and data["history"][0]["iterations"] == 3
    load_model_for_inference(path, "cpu")


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_exactly_like_an_uninterrupted_run(stacks, tmp_path, ema_decay):
    cfg = config(stacks, epochs=3, iterations_per_epoch=3, ema_decay=ema_decay)
    whole = train(cfg, tmp_path / "whole.pt")

    part = tmp_path / "part.pt"
    stop = threading.Event()

    def after_two_epochs(event):
        if event.stage == "epoch" and event.data.get("epoch") == 2:
            stop.set()

    with pytest.raises(JobCancelled):
        train(cfg, part, progress=after_two_epochs, cancel=stop)
    assert load_model_file(part)["epochs"] == 2
    resumed = train(cfg, part, resume=True)
    assert resumed.epochs == 3
    assert resumed.train_losses == whole.train_losses
    assert resumed.valid_losses == whole.valid_losses
    a, b = load_model_file(tmp_path / "whole.pt"), load_model_file(part)
    for key in ("model_state_dict", "best_model_state_dict"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a["best_epoch"] == b["best_epoch"]
    if ema_decay:
        assert a["weight_average"]["updates"] == b["weight_average"]["updates"] == 9
        for name, tensor in a["weight_average"]["weights"].items():
            assert torch.equal(tensor, b["weight_average"]["weights"][name]), name


def test_a_weight_averaged_run_saves_and_predicts_with_the_average(stacks, tmp_path):
    path = tmp_path / "ema.pt"
    result = train(config(stacks, epochs=1, iterations_per_epoch=10, ema_decay=0.9), path)
    assert result.best_epoch == 1
    data = load_model_file(path)
    average = data["weight_average"]["weights"]
    raw = data["model_state_dict"]
    conv = next(k for k, v in raw.items() if v.ndim == 5)
    assert torch.equal(data["best_model_state_dict"][conv], average[conv])
    assert not torch.equal(raw[conv], average[conv])  # the average lags the raw weights
    model, info = load_model_for_inference(path, "cpu")
    assert torch.equal(model.state_dict()[conv], average[conv])


def test_the_weight_average_follows_the_weights_with_a_short_memory_at_first():
    from core.ema import WeightAverage

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    start = net[0].weight.detach().clone()
    avg = WeightAverage(net, decay=0.99)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 5
    avg.update(net)  # first update: decay (1 + 1) / (10 + 1), not 0.99
    d = 2 / 11
    assert torch.allclose(avg.model[0].weight, d * start + (1 - d) * (start + 1.0))
    assert int(avg.model[1].num_batches_tracked) == 5
    for _ in range(2000):
        avg.update(net)
    assert torch.allclose(avg.model[0].weight, net[0].weight, atol=1e-5)
    assert not avg.model[0].weight.requires_grad
    with pytest.raises(ValueError):
        WeightAverage(net, decay=1.0)


def test_resume_refuses_other_settings_a_missing_file_and_a_finished_run(stacks, tmp_path, trained):
    path = trained[0]
    with pytest.raises(ConfigError, match="loss.name"):
        train(config(stacks, loss={"name": "dice"}), path, resume=True)
    with pytest.raises(ModelFileError, match="does not exist"):
        train(config(stacks), tmp_path / "none.pt", resume=True)
    with pytest.raises(ConfigError, match="--epochs"):
        train(config(stacks), path, resume=True)


def test_init_fine_tunes_an_existing_model(stacks, tmp_path, trained):
    start = load_model_file(trained[0])
    path = tmp_path / "tuned.pt"
    # a vanishing learning rate leaves the weights where the initial model had them
    cfg = config(stacks, epochs=1, iterations_per_epoch=1, optimizer={"lr": 1e-12},
                 model={"preset": "standard"}, target=None)
    result = train(cfg, path, init=trained[0])
    tuned = load_model_file(path)
    assert result.target == "cells_with_gaps"
    assert tuned["model_config"] == start["model_config"]  # the init model's architecture
    for name, tensor in start["best_model_state_dict"].items():
        if "running_" in name or "num_batches" in name:
            continue  # batch-norm statistics follow the new data by design; weights must not move
        assert torch.allclose(tensor, tuned["model_state_dict"][name], atol=1e-6)
    with pytest.raises(ConfigError, match="target"):
        train(replace(cfg, target="boundaries"), tmp_path / "other.pt", init=trained[0])


def test_on_a_cpu_a_new_model_trains_on_a_coarser_yx_grid_where_stacks_are_far_finer_than_z(
        tmp_path):
    image, labels = epithelium(0, shape=(8, 48, 48))
    fine = (1.0, 0.3, 0.3)  # as the lab's confocal stacks: Y/X 3.3x finer than Z
    raw, lab = tmp_path / "raw.tif", tmp_path / "labels.tif"
    write_volume(raw, Volume(image, fine, name="fine"))
    write_volume(lab, Volume(labels, fine, name="fine"), labels=True)
    pair = (str(raw), str(lab))
    cfg = config({"train": pair, "val": pair}, epochs=1, iterations_per_epoch=1,
                 patch_size=[8, 24, 24])
    events = []
    train(cfg, tmp_path / "new.pt", progress=events.append)
    info = model_info(load_model_file(tmp_path / "new.pt"), tmp_path / "new.pt")
    assert info.voxel_size_um == pytest.approx((1.0, 0.45, 0.45))
    # a stack from the same microscope that records no voxel size is taken to have theirs
    assert info.assumed_voxel_size_um == pytest.approx(fine)
    assert any("training grid" in (e.message or "") and "--training-voxel-size" in (e.message or "")
               for e in events)
    # a grid the user gives wins
    chosen = replace(cfg, data=replace(cfg.data, target_voxel_size_um=fine))
    train(chosen, tmp_path / "full.pt")
    assert model_info(load_model_file(tmp_path / "full.pt"), tmp_path / "full.pt").voxel_size_um \
        == pytest.approx(fine)
    assert model_info(load_model_file(tmp_path / "full.pt"), tmp_path / "full.pt") \
        .stack_voxel_size_um is None
    # on a GPU, which trains either grid out, a new model keeps the stacks' own grid
    from core.train import _new_model_grid, _Run
    run = _Run(cfg, tmp_path / "gpu.pt", None, None)
    assert _new_model_grid(run, cfg.data.train, torch.device("cuda")) == (None, None)
    assert _new_model_grid(run, cfg.data.train, torch.device("cpu"))[0] == pytest.approx(
        (1.0, 0.45, 0.45))
    # stacks that record no voxel size (.npy, most .mat): the microscope's, given apart
    # from the grid, lets the grid be chosen from it
    np.save(tmp_path / "raw.npy", image)
    np.save(tmp_path / "labels.npy", labels)
    bare = ["--pair", str(tmp_path / "raw.npy"), str(tmp_path / "labels.npy")]
    assert main(["train", *bare, "--val-pair", *bare[1:], "--out", str(tmp_path / "npy.pt"),
                 "--stack-voxel-size", "1,0.3,0.3", "--device", "cpu", "--epochs", "1",
                 "--iterations", "1", "--patch-size", "8,24,24", "--quiet"]) == 0
    npy = model_info(load_model_file(tmp_path / "npy.pt"), tmp_path / "npy.pt")
    assert npy.voxel_size_um == pytest.approx((1.0, 0.45, 0.45))
    assert npy.assumed_voxel_size_um == pytest.approx(fine)
    # fine-tuning keeps the grid of the model it starts from
    train(cfg, tmp_path / "tuned_new.pt", init=tmp_path / "new.pt")
    tuned = model_info(load_model_file(tmp_path / "tuned_new.pt"), tmp_path / "tuned_new.pt")
    assert tuned.voxel_size_um == pytest.approx((1.0, 0.45, 0.45))
    assert tuned.assumed_voxel_size_um == pytest.approx(fine)
    train(cfg, tmp_path / "tuned.pt", init=tmp_path / "full.pt")
    assert model_info(load_model_file(tmp_path / "tuned.pt"), tmp_path / "tuned.pt").voxel_size_um \
        == pytest.approx(fine)


def test_other_targets_losses_and_preprocessed_inputs(stacks, tmp_path):
    from core.io import read_labels, read_volume
    from core.preprocess import PreprocessConfig, preprocess_volume, write_preprocessed

    h5 = tmp_path / "train.h5"
    res = preprocess_volume(read_volume(stacks["train"][0]), read_labels(stacks["train"][1]),
                            PreprocessConfig())
    write_preprocessed(h5, res)
    cfg = from_dict(TrainConfig, {**to_dict(config(stacks)), "epochs": 1,
                                  "iterations_per_epoch": 2, "target": "both",
                                  "loss": {"name": "weighted_bce"},
                                  "data": {"train": [{"h5": str(h5)}], "val": []},
                                  "augment": {"level": "strong"}})
    result = train(cfg, tmp_path / "both.pt")
    data = load_model_file(tmp_path / "both.pt")
    assert data["channels"] == ["cell", "boundary"] and result.epochs == 1
    assert data["normalisation"]["mode"] == "zscore"
    assert np.isfinite(result.train_losses[0]) and result.valid_metrics[0]  # held-out part


def test_a_wall_band_model_trains_and_predicts_cells(stacks, tmp_path):
    """Target all_walls: six outputs, and `episeg predict`'s path re-grows the walls."""
    from core.config import from_dict as conf
    from core.io import read_volume
    from core.pipeline import PredictConfig, segment_stack

    cfg = from_dict(TrainConfig, {**to_dict(config(stacks)), "epochs": 1,
                                  "iterations_per_epoch": 2, "target": "all_walls"})
    train(cfg, tmp_path / "walls.pt")
    data = load_model_file(tmp_path / "walls.pt")
    assert data["channels"] == ["cell", "boundary", "tissue", "wall_z", "wall_y", "wall_x"]
    model, info = load_model_for_inference(tmp_path / "walls.pt", "cpu")
    raw = read_volume(stacks["test"][0])
    res = segment_stack(raw, model, info, config=conf(PredictConfig, {"save_probabilities": True}))
    assert res.channels == tuple(data["channels"]) and len(res.probabilities) == 6
    assert res.labels.data.shape == raw.data.shape
    # Without saved probabilities the bands are not kept (the default post-processing
    # does not read them): half the scratch space, the same cells.
    lean = segment_stack(raw, model, info, config=conf(PredictConfig, {}))
    assert lean.channels == ("cell", "boundary", "tissue")
    np.testing.assert_array_equal(lean.labels.data, res.labels.data)
    regrown = segment_stack(raw, model, info,
                            config=conf(PredictConfig, {"segment": {"wall_core_um": 0.6}}))
    assert regrown.channels == tuple(data["channels"])   # the re-growing reads the bands


def test_a_robust_normalised_model_normalises_new_stacks_the_same_way(stacks, tmp_path):
    from core.io import read_volume
    from core.pipeline import normalised_view

    cfg = from_dict(TrainConfig, {**to_dict(config(stacks)), "epochs": 1,
                                  "iterations_per_epoch": 2,
                                  "data": {**to_dict(config(stacks))["data"],
                                           "normalisation": {"mode": "robust"}}})
    train(cfg, tmp_path / "robust.pt")
    data = load_model_file(tmp_path / "robust.pt")
    assert data["normalisation"] == {"mode": "robust"}
    raw = read_volume(stacks["test"][0]).data
    image = normalised_view(raw, data["normalisation"])[...]
    assert abs(float(np.median(image))) < 1e-3  # the median goes to 0
    assert 0.5 < 1.4826 * float(np.median(np.abs(image))) < 1.5


def test_the_example_config_loads_with_its_paths_next_to_it():
    cfg = load_train_config(REPO / "resources" / "configs" / "train.yaml")
    assert cfg.data.train[0].raw == str(REPO / "resources" / "configs" / "gland01_raw.tif")
    assert cfg.data.train[1].raw.endswith("gland02.mat:I")
    defaults = to_dict(TrainConfig())
    loaded = to_dict(cfg)
    loaded["data"]["train"] = []
    assert loaded == defaults  # the example shows the defaults


def test_training_keeps_post_processing_chosen_on_the_held_out_part(stacks, tmp_path):
    """One stack, no validation stack: the held-out part (segmented within its context)
    decides the seeds and merging the model keeps; prediction reads them back."""
    from core.segment_choice import CHOSEN_KEYS

    events = []
    path = tmp_path / "chosen.pt"
    t0 = time.monotonic()
    result = train(config(stacks, data={"val": []}, epochs=2), path, progress=events.append)
    wall = time.monotonic() - t0
    report = result.segment_choice
    # the search is not training time (a --max-minutes budget, a resumed run's clock)
    assert result.seconds <= wall - 0.9 * report["seconds"]
    assert report is not None and report["stacks"] == 1 and report["settings_tried"] > 20
    assert report["best_score"] >= report["shipped_score"]
    saved = load_model_file(path)
    assert saved["segment_choice"] == report and saved["segment"] == report["chosen"]
    assert set(saved["segment"]) <= set(CHOSEN_KEYS)
    assert model_info(saved, path).segment == report["chosen"]
    searched = [e for e in events if e.stage == "post-processing" and e.total]
    assert len(searched) == report["settings_tried"]
    assert "post-processing" in [e for e in events if e.stage == "post-processing"][-1].message

    off = train(config(stacks, data={"val": []}, epochs=1,
                       validation={"choose_post_processing": False}), tmp_path / "off.pt")
    assert off.segment_choice is None and load_model_file(tmp_path / "off.pt")["segment"] == {}
    # resumed without the search, the weights change: the old choice is not kept for them
    resumed = train(config(stacks, data={"val": []}, epochs=3,
                           validation={"choose_post_processing": False}), path, resume=True)
    assert resumed.epochs == 3 and resumed.segment_choice is None
    assert load_model_file(path)["segment_choice"] is None


def test_cli_train_resume_and_errors(stacks, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    args = ["train", "--pair", *stacks["train"], "--val-pair", *stacks["val"], "--out", str(out),
            "--epochs", "1", "--iterations", "2", "--patch-size", "8,32,32", "--threads", "1",
            "--target", "cells_with_gaps", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "best epoch 1" in text and str(out) in text and "post-processing" in text
    assert load_model_file(out)["epochs"] == 1
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert load_model_file(out)["epochs"] == 2
    assert main(["train", "--out", str(tmp_path / "missing.pt"), "--resume", "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x.pt"), "--quiet"]) == 2
    assert "No training data" in capsys.readouterr().err


def test_forcing_mixed_precision_on_a_cpu_without_bf16_hardware_warns(stacks, tmp_path, monkeypatch):
    """Mixed precision 'on' on a CPU that emulates bf16 (35x slower on an AVX2 CPU): the
    run says so, in its messages and its result; 'auto' trains in float32 without a word."""
    monkeypatch.setenv("EPISEG_CPU_BF16", "0")  # this CPU, as far as EPISEG can tell: no bf16
    quick = dict(epochs=1, iterations_per_epoch=2, validation={"metrics_every": 0})
    events = []
    forced = train(config(stacks, amp="on", **quick), tmp_path / "on.pt", progress=events.append)
    said = [e.message for e in events if e.message]
    assert any("no bf16 hardware" in w and "'auto' or 'off'" in w for w in forced.warnings)
    assert any("no bf16 hardware" in m for m in said)
    plain = train(config(stacks, amp="auto", **quick), tmp_path / "auto.pt")
    assert not any("bf16" in w for w in plain.warnings)
