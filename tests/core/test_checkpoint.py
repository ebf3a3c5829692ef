"""The model file: round trip, atomic writes, safe loading, refusal of foreign files."""

from __future__ import annotations

import pickle

import pytest
import torch

from core.checkpoint import (FORMAT_VERSION, REQUIRED, load_model_file, load_model_for_inference,
                             read_model_summary, save_model_file, set_test_metrics)
from core.errors import ModelFileError
from core.model import build_model, preset_config


def _state(model, **extra):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    state = {
        "epochs": 2, "best_epoch": 1, "best_metric": {"name": "ap50", "value": 0.5, "mode": "max"},
        "best_model_state_dict": sd, "model_state_dict": sd,
        "optimizer_state_dict": opt.state_dict(), "scheduler_state_dict": {"iteration": 4},
        "scaler_state_dict": {}, "rng_state": {"torch": torch.get_rng_state()},
        "train_losses": [0.9, 0.8], "valid_losses": [0.85, 0.82],
        "valid_metrics": [{"ap50": 0.5}, {"ap50": 0.4}], "test_metrics": {},
        "config": {"epochs": 2}, "model_config": model.cfg.to_dict(), "target": model.cfg.target,
        "channels": list(model.cfg.channel_names),
        "normalisation": {"mode": "zscore", "mask": "all"}, "voxel_size_um": [1.0, 0.5, 0.5],
        "patch_size": [8, 16, 16],
    }
    state.update(extra)
    return state


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset_config("small", target="both", depth=2, base_features=4))


def test_round_trip_and_inference_model_uses_the_best_weights(tmp_path, model):
    path = save_model_file(tmp_path / "m.pt", _state(model))
    data = load_model_file(path)
    assert data["format"] == "episeg-model" and data["format_version"] == FORMAT_VERSION
    assert data["epochs"] == 2 and data["valid_metrics"][0]["ap50"] == 0.5
    assert data["created"] and data["episeg_version"]
    net, info = load_model_for_inference(path, "cpu")
    assert not net.training
    assert info.target == "both" and info.channels == ("cell", "boundary")
    assert info.voxel_size_um == (1.0, 0.5, 0.5) and info.patch_size == (8, 16, 16)
    assert info.normalisation == {"mode": "zscore", "mask": "all"}
    assert info.best_epoch == 1 and info.valid_metrics == {"ap50": 0.5}
    x = torch.randn(1, 1, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net(x), model.eval()(x))
    summary = read_model_summary(path)
    assert summary["epochs"] == 2 and summary["target"] == "both"
    set_test_metrics(path, {"ap50": 0.9, "cell_iou": 0.95, "cells": [1, 2]})
    again = load_model_file(path)
    assert again["test_metrics"] == {"ap50": 0.9, "cell_iou": 0.95}
    assert again["created"] == data["created"] and again["epochs"] == 2


def test_saving_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, model):
    path = tmp_path / "m.pt"
    save_model_file(path, _state(model))
    before = path.read_bytes()
    bad = _state(model)
    del bad["best_model_state_dict"]
    with pytest.raises(ValueError):
        save_model_file(path, bad)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left


def test_every_required_field_is_checked(tmp_path, model):
    state = _state(model)
    for key in REQUIRED:
        assert key in state or key in ("format", "format_version", "episeg_version", "created")
    data = dict(state, format="episeg-model", format_version=1, episeg_version="x", created="now")
    del data["normalisation"]
    path = tmp_path / "partial.pt"
    torch.save(data, path)
    with pytest.raises(ModelFileError, match="normalisation"):
        load_model_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model_file(tmp_path / "nothing.pt")


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelFileError, match="noise.pt"):
        load_model_file(path)


class _Evil:
    def __reduce__(self):
        return (print, ("this code must never run",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "episeg-model", "payload": _Evil()}, path)
    with pytest.raises(ModelFileError, match="evil.pt.*(code|objects)"):
        load_model_file(path)
    assert "must never run" not in capsys.readouterr().out
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ModelFileError, match="plain.pkl"):
        load_model_file(plain)
    assert "must never run" not in capsys.readouterr().out


def test_a_whole_pickled_model_is_refused(tmp_path, model):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ModelFileError, match="whole.pt"):
        load_model_file(path)


def test_a_bare_state_dict_is_refused_with_a_hint(tmp_path, model):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelFileError, match="state_dict"):
        load_model_file(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    with pytest.raises(ModelFileError, match="TorchScript"):
        load_model_file(path)


def test_a_newer_format_is_refused(tmp_path, model):
    path = save_model_file(tmp_path / "m.pt", _state(model))
    data = torch.load(path, weights_only=True)
    data["format_version"] = FORMAT_VERSION + 1
    torch.save(data, path)
    with pytest.raises(ModelFileError, match="newer"):
        load_model_file(path)


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path, model):
    other = build_model(preset_config("small", target="both", depth=2, base_features=8))
    state = _state(model, best_model_state_dict=other.state_dict())
    path = save_model_file(tmp_path / "m.pt", state)
    with pytest.raises(ModelFileError, match="damaged"):
        load_model_for_inference(path, "cpu")
