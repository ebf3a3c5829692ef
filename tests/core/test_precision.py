"""CPU precision: bf16 only where the CPU computes it natively, and a bf16
network's probabilities agree with float32 to what a user could never see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import precision
from core.errors import ConfigError
from core.precision import ENV_OVERRIDE, cpu_has_native_bf16, cpu_runs_bf16_convolutions
from core.predict import predict_probabilities
from core.train import amp_settings
from tests.core.test_predict import local_net, whole_volume


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True), ("off", False), ("yes", True)])
def test_the_environment_overrides_the_cpu_detection(monkeypatch, value, expected):
    monkeypatch.setenv(ENV_OVERRIDE, value)
    assert cpu_has_native_bf16() is expected


def test_training_on_a_cpu_uses_bf16_only_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    assert amp_settings("auto", cpu)[:3] == (False, None, False)
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    assert amp_settings("auto", cpu)[:3] == (True, torch.bfloat16, False)
    assert amp_settings("off", cpu)[0] is False  # off is float32 on any CPU
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    assert amp_settings("on", cpu)[:2] == (True, torch.bfloat16)  # on forces it


def test_bf16_cpu_prediction_agrees_with_the_float32_reference(monkeypatch):
    """The bf16 network (forced here, so it runs on any CPU with AVX-512) differs from the
    float32 whole-volume pass by far less than a uint8 probability step can
    change a segmentation; amp=False stays exact."""
    if not cpu_runs_bf16_convolutions():
        pytest.skip("this CPU cannot run bf16 convolutions at all (AVX2 only), so the bf16 "
                    "network cannot be forced here; EPISEG keeps float32 on such CPUs")
    model = local_net("batch", target="all")
    image = np.random.default_rng(4).normal(size=(30, 45, 50)).astype(np.float32)
    ref = whole_volume(model, image)
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    bf16 = predict_probabilities(model, image, tile_shape=(32, 48, 52), out_dtype=np.float32,
                                 device="cpu")
    exact = predict_probabilities(model, image, tile_shape=(32, 48, 52), out_dtype=np.float32,
                                  device="cpu", amp=False)
    diff = np.abs(bf16 - ref)
    assert 0 < diff.max() < 2e-2, diff.max()  # really bf16, and close
    assert diff.mean() < 2e-3, diff.mean()
    np.testing.assert_allclose(exact, ref, atol=1e-5, rtol=0)  # one tile: float32 is exact
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_bf16_steps_with_non_finite_gradients_are_skipped_then_float32_takes_over(
        monkeypatch, tmp_path):
    """A bf16 step whose gradients are NaN (oneDNN's bf16 backward pass gave such
    gradients now and then for a level one voxel deep) must not reach the weights:
    it is skipped, and after a few the run goes on in float32 and says so."""
    import core.train as train_module
    from core.io import write_volume
    from core.volume import Volume
    from tests.core.test_train import VOXEL, config, epithelium

    stacks = {}
    for i, name in enumerate(("train", "val")):
        image, labels = epithelium(i)
        raw, lab = tmp_path / f"{name}_raw.tif", tmp_path / f"{name}_labels.tif"
        write_volume(raw, Volume(image, VOXEL, name=name))
        write_volume(lab, Volume(labels, VOXEL, name=name), labels=True)
        stacks[name] = (str(raw), str(lab))
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    calls = []

    def nan_for_the_first_four(model):
        calls.append(1)
        return len(calls) > 4

    monkeypatch.setattr(train_module, "_gradients_finite", nan_for_the_first_four)
    result = train_module.train(config(stacks, epochs=1, iterations_per_epoch=10),
                                tmp_path / "model.pt")
    assert any("non-finite gradients in 3 steps" in w for w in result.warnings), result.warnings
    assert len(calls) == 3  # checked while bf16 ran; float32 after the third skip
    state = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    weights = state["model_state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_forcing_bf16_on_a_cpu_without_bf16_convolutions_names_the_variable(monkeypatch):
    """EPISEG_CPU_BF16=1 on an AVX2-only CPU: a message that says what to do, not
    oneDNN's error at the first tile; without the variable the same CPU predicts."""
    monkeypatch.setattr(precision, "cpu_runs_bf16_convolutions", lambda: False)
    model = local_net("batch", target="all")
    image = np.random.default_rng(5).normal(size=(12, 20, 20)).astype(np.float32)
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    with pytest.raises(ConfigError, match=f"{ENV_OVERRIDE}=1 .*Unset {ENV_OVERRIDE}"):
        predict_probabilities(model, image, device="cpu")
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    probs = predict_probabilities(model, image, device="cpu", out_dtype=np.float32)
    assert probs.shape[1:] == image.shape and np.isfinite(probs).all()
