"""The 3D U-Net: shapes, configuration round trip, anisotropy, receptive field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ConfigError, VolumeDataError
from core.model import (
    ModelConfig,
    anisotropic_pooling,
    build_model,
    count_parameters,
    fuse_batchnorm,
    out_channels_for_target,
    preset_config,
    receptive_field,
    required_divisor,
    small_config,
    standard_config,
    target_channels,
)


def tiny(**kw) -> ModelConfig:
    kw.setdefault("base_features", 4)
    kw.setdefault("depth", 2)
    kw.setdefault("num_groups", 2)
    return ModelConfig(**kw)


@pytest.mark.parametrize("target,channels", [("cells_with_gaps", 1), ("boundaries", 1), ("both", 2), ("all", 3)])
@pytest.mark.parametrize("norm", ["group", "batch", "instance", "none"])
@pytest.mark.parametrize("upsampling", ["transposed", "trilinear"])
def test_output_has_one_logit_channel_per_target_channel(target, channels, norm, upsampling):
    cfg = tiny(target=target, norm=norm, upsampling=upsampling)
    assert cfg.out_channels == channels == out_channels_for_target(target)
    model = build_model(cfg).eval()
    with torch.inference_mode():
        y = model(torch.randn(2, 1, 8, 12, 16))
    assert y.shape == (2, channels, 8, 12, 16)
    assert torch.isfinite(y).all()
    # logits, not probabilities: an untrained net gives values outside [0, 1] somewhere
    assert model.cfg.channel_names == target_channels(target)


def test_both_target_orders_cell_then_boundary():
    assert target_channels("both") == ("cell", "boundary")
    assert target_channels("all") == ("cell", "boundary", "tissue")
    with pytest.raises(ConfigError, match="cells_with_gaps"):
        target_channels("membranes")


def test_anisotropic_pooling_follows_nnunet_rule():
    pools, kernels = anisotropic_pooling((1.0, 0.25, 0.25), 4)
    assert pools == ((1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert kernels == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
    # twice the XY spacing is not "comparable" yet: one XY-only step
    pools, kernels = anisotropic_pooling((0.5, 0.25, 0.25), 3)
    assert pools == ((1, 2, 2), (2, 2, 2))
    assert kernels == ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    assert anisotropic_pooling(None, 3) == (((2, 2, 2),) * 2, ((3, 3, 3),) * 3)
    assert anisotropic_pooling((0.3, 0.25, 0.25), 2) == (((2, 2, 2),), ((3, 3, 3),) * 2)


def test_anisotropic_model_runs_on_odd_shapes_after_padding():
    cfg = small_config(voxel_size_um=(1.0, 0.25, 0.25), target="both", depth=3)
    div = required_divisor(cfg)
    assert div == (1, 4, 4)
    model = build_model(cfg).eval()
    img = np.random.default_rng(0).normal(size=(7, 21, 30)).astype(np.float32)
    with pytest.raises(VolumeDataError, match="multiple of"):
        model(torch.from_numpy(img)[None, None])
    padded = np.pad(img, [(0, -s % d) for s, d in zip(img.shape, div)], mode="reflect")
    assert padded.shape == (7, 24, 32)
    with torch.inference_mode():
        y = model(torch.from_numpy(padded)[None, None])[..., :7, :21, :30]
    assert y.shape == (1, 2, 7, 21, 30)


def _plain(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool))


def test_config_round_trips_through_plain_dict():
    cfg = preset_config("standard", target="both", voxel_size_um=(0.8, 0.2, 0.2), dropout=0.1,
                        upsampling="trilinear", max_features=128)
    d = cfg.to_dict()
    assert _plain(d)
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="'f_maps'"):
        ModelConfig.from_dict({**d, "f_maps": 16})
    with pytest.raises(ConfigError, match="out_channels"):
        ModelConfig.from_dict({**d, "out_channels": 1})


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(depth=0), "depth"),
        (dict(norm="layer"), "norm"),
        (dict(kernels=((3, 3, 3), (2, 3, 3))), "odd"),
        (dict(pooling=((2, 2, 2),) * 3), "pooling"),
        (dict(dropout=1.5), "dropout"),
        (dict(upsampling="nearest"), "upsampling"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_weights_and_config_load_with_weights_only(tmp_path):
    cfg = small_config(target="both", norm="batch")
    model = build_model(cfg).eval()
    path = tmp_path / "model.pt"
    torch.save({"model_config": cfg.to_dict(), "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    again = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    again.load_state_dict(ckpt["state_dict"])
    again.eval()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


def test_presets_small_is_much_lighter_than_standard():
    small, standard = small_config(), standard_config()
    assert (small.depth, small.base_features) == (4, 8)
    assert (standard.depth, standard.base_features) == (4, 32)
    n_small = count_parameters(build_model(small))
    n_std = count_parameters(build_model(standard))
    assert n_small < 500_000 and n_std > 10 * n_small
    with pytest.raises(ConfigError, match="small"):
        preset_config("huge")


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(norm="none"),
        tiny(norm="none", depth=3, base_features=2, upsampling="trilinear"),
        tiny(norm="none", depth=3, base_features=2, pooling=((1, 2, 2), (2, 2, 2)), kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3))),
    ],
)
def test_receptive_field_halo_is_exactly_what_the_gradient_reaches(cfg):
    """The halo is what makes tiled prediction exact, so it must not be underestimated."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.parameters():  # positive weights: every path is active, nothing cancels
        p.data.uniform_(0.1, 1.0)
    _, halo = receptive_field(cfg)
    div = required_divisor(cfg)
    reach = [0, 0, 0]
    for ax in range(3):  # a volume long along one axis: the reach along it is not truncated
        size = [2 * d for d in div]
        size[ax] = -(-(2 * halo[ax] + 2 * div[ax]) // div[ax]) * div[ax]
        for off in range(div[ax]):
            x = torch.zeros(1, 1, *size, requires_grad=True)
            centre = [s // 2 for s in size]
            centre[ax] += off
            model(x + 0.01)[0, 0, centre[0], centre[1], centre[2]].backward()
            support = (x.grad[0, 0] != 0).numpy()
            idx = np.flatnonzero(support.any(axis=tuple(a for a in range(3) if a != ax)))
            reach[ax] = max(reach[ax], centre[ax] - idx.min(), idx.max() - centre[ax])
    assert tuple(reach) == halo


def test_folding_batch_norm_keeps_the_outputs():
    torch.manual_seed(0)
    model = build_model(tiny(norm="batch", depth=3)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(model(x), fused(x), atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())  # original untouched
