"""Sliding-window prediction: equals a whole-volume pass, no seams, bounded output writing."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from core.errors import ConfigError, JobCancelled, VolumeDataError
from core.model import ModelConfig, build_model, receptive_field, required_divisor, small_config
from core.precision import ENV_OVERRIDE
from core.predict import predict_probabilities
from core.tiling import axis_starts, make_grid


@pytest.fixture(autouse=True)
def float32_network_on_any_cpu(monkeypatch):
    """These tests check the tiling and blending arithmetic, in float32 on every CPU;
    the bfloat16 network of CPUs with native bf16 is checked in test_precision.py."""
    monkeypatch.setenv(ENV_OVERRIDE, "0")


def whole_volume(model, image: np.ndarray) -> np.ndarray:
    """Reference: one forward pass over the reflect-padded volume, cropped back."""
    div = required_divisor(model.cfg)
    x = np.pad(image, [(0, -s % d) for s, d in zip(image.shape, div)], mode="reflect")
    with torch.inference_mode():
        y = torch.sigmoid(model.eval()(torch.from_numpy(x.astype(np.float32))[None, None]))[0].numpy()
    return y[(slice(None),) + tuple(slice(0, s) for s in image.shape)]


def local_net(norm: str = "none", target: str = "cells_with_gaps", seed: int = 0):
    """A small U-Net whose output depends only on its receptive field (no group/instance norm)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(base_features=4, depth=2, norm=norm, target=target))
    if norm == "batch":  # non-trivial running statistics, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def smooth_image(shape, seed=0, sigma=2.0) -> np.ndarray:
    img = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return ((img - img.mean()) / img.std()).astype(np.float32)


# -- the tile grid -----------------------------------------------------------------------
@pytest.mark.parametrize("length,tile,overlap,div", [(100, 32, 8, 4), (45, 32, 18, 1), (33, 4, 0, 4),
                                                      (7, 16, 4, 4), (1024, 192, 24, 8), (50, 48, 12, 2)])
def test_tiles_cover_the_axis_aligned_to_the_pooling_with_at_least_the_overlap(length, tile, overlap, div):
    starts, t, padded = axis_starts(length, tile, overlap, div)
    assert padded == -(-length // div) * div and padded - length < div
    assert t % div == 0 and t <= max(tile, div)
    assert starts[0] == 0 and starts[-1] + t == padded
    assert all(s % div == 0 for s in starts)
    if len(starts) > 1:
        assert (t - np.diff(starts)).min() >= overlap  # neighbours overlap by at least that


def test_blending_normaliser_is_the_exact_sum_of_all_tile_weights():
    grid = make_grid((20, 30, 26), (8, 12, 10), 4, (2, 2, 2), halo=1)
    total = np.zeros(grid.padded_shape)
    wz, wy, wx = (grid.axis_weights(a) for a in range(3))
    for i, z in enumerate(grid.starts[0]):
        for j, y in enumerate(grid.starts[1]):
            for k, x in enumerate(grid.starts[2]):
                w = wz[i][:, None, None] * wy[j][None, :, None] * wx[k][None, None, :]
                total[z:z + 8, y:y + 12, x:x + 10] += w
    separable = np.einsum("i,j,k->ijk", *(grid.normaliser(a) for a in range(3)))
    np.testing.assert_allclose(total, separable, rtol=1e-12)
    assert total.min() > 0  # every voxel gets weight even with a halo cut from inner faces


# -- equality with a whole-volume pass -------------------------------------------------------
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_tiled_prediction_equals_whole_volume_pass(norm):
    """With a halo covering the receptive field, every weighted tile value is exact.

    On the CPU, where float32 arithmetic is the reference's; a GPU's convolution
    algorithms (and autocast) differ per tile shape: see the CUDA test below."""
    model = local_net(norm)
    _, halo = receptive_field(model.cfg)
    h = max(halo)
    image = np.random.default_rng(1).normal(size=(30, 45, 50)).astype(np.float32)
    events = []
    tiled = predict_probabilities(model, image, tile_shape=(24, 32, 32), overlap=2 * h, halo=h,
                                  out_dtype=np.float32, progress=events.append, device="cpu")
    assert events[-1].total >= 8  # really tiled, in every axis
    ref = whole_volume(model, image)
    assert tiled.shape == (1, 30, 45, 50)
    np.testing.assert_allclose(tiled, ref, atol=1e-5, rtol=0)


def test_heavy_overlap_where_four_tiles_cover_a_voxel_per_axis_is_still_exact():
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_features=4, depth=1, norm="none")).eval()
    assert receptive_field(model.cfg)[1] == (2, 2, 2)
    image = np.random.default_rng(9).normal(size=(13, 14, 15)).astype(np.float32)
    tiled = predict_probabilities(model, image, tile_shape=(8, 8, 8), overlap=6, halo=2,
                                  out_dtype=np.float32, device="cpu")
    np.testing.assert_allclose(tiled, whole_volume(model, image), atol=1e-5, rtol=0)


def test_volume_smaller_than_a_tile_is_padded_and_cropped():
    model = local_net("none", target="both")
    image = np.random.default_rng(2).normal(size=(5, 13, 17)).astype(np.float32)
    tiled = predict_probabilities(model, image, tile_shape=(32, 64, 64), out_dtype=np.float32,
                                  device="cpu")
    assert tiled.shape == (2, 5, 13, 17)
    np.testing.assert_allclose(tiled, whole_volume(model, image), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_tiled_prediction_agrees_with_the_cpu_reference(amp):
    """On a GPU the tiled result matches the CPU's whole-volume pass to what a
    user could never see in a probability map (autocast: half precision)."""
    model = local_net("batch", target="all")
    _, halo = receptive_field(model.cfg)
    h = max(halo)
    image = np.random.default_rng(4).normal(size=(30, 45, 50)).astype(np.float32)
    tiled = predict_probabilities(model, image, tile_shape=(24, 32, 32), overlap=2 * h, halo=h,
                                  out_dtype=np.float32, device="cuda", amp=amp)
    diff = np.abs(tiled - whole_volume(model, image))
    assert diff.max() < (2e-2 if amp else 1e-3), diff.max()
    assert diff.mean() < (2e-3 if amp else 1e-4), diff.mean()


def test_group_norm_unet_tiled_close_to_whole_volume():
    """Group norm normalises with the statistics of whatever it is given, so a tile
    cannot match a whole-volume pass exactly (the tiles, not the whole volume, are
    what such a network saw in training). With tiles of 2/3 of the volume on a smooth
    image an untrained network still agrees closely and almost everywhere at 0.5."""
    torch.manual_seed(3)
    model = build_model(small_config(norm="group", depth=3)).eval()
    image = smooth_image((32, 96, 96), seed=3)
    tiled = predict_probabilities(model, image, tile_shape=(32, 64, 64), out_dtype=np.float32)
    ref = whole_volume(model, image)
    diff = np.abs(tiled - ref)
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())
    assert ((tiled > 0.5) == (ref > 0.5)).mean() > 0.995


def seam_ratio(prob: np.ndarray, grid) -> float:
    """Mean voxel-to-voxel step across the planes where tiles begin or end, relative to
    the median step over all planes (worst axis). A seam makes it large; ~1 means the
    tile borders are invisible."""
    worst = 0.0
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        step = np.abs(np.diff(prob[0].astype(np.float64), axis=ax)).mean(axis=other)
        edges = {e - 1 for s in grid.starts[ax] for e in (s, s + grid.tile_shape[ax]) if 0 < e < prob.shape[ax + 1]}
        if edges:
            worst = max(worst, max(step[k] for k in edges) / np.median(step))
    return worst


@pytest.mark.parametrize("net", ["local", "group_norm"])
def test_gaussian_blending_leaves_no_seams(net):
    torch.manual_seed(4)
    model = local_net("batch") if net == "local" else build_model(small_config(norm="group")).eval()
    image = smooth_image((24, 80, 80), seed=4, sigma=3.0)
    kw = dict(tile_shape=(16, 32, 32), overlap=0.125, out_dtype=np.float32)
    grid = make_grid(image.shape, kw["tile_shape"], kw["overlap"], required_divisor(model.cfg))
    assert all(len(s) > 1 for s in grid.starts)
    natural = seam_ratio(whole_volume(model, image), grid)  # the same planes without tiling
    blended = seam_ratio(predict_probabilities(model, image, **kw), grid)
    assert blended < 1.1 * natural + 0.05, (blended, natural)
    if net == "local":  # the measure does see seams when tiles are simply averaged
        plain = seam_ratio(predict_probabilities(model, image, blend="constant", **kw), grid)
        assert plain > 2.0 * natural, (plain, natural)


# -- outputs on disk, inputs read tile by tile ---------------------------------------------------
def test_only_the_asked_channels_are_predicted_in_the_asked_order():
    model = local_net(target="all_walls")
    image = smooth_image((12, 24, 20), seed=3)
    kw = dict(tile_shape=(8, 16, 16), overlap=4)
    every = predict_probabilities(model, image, **kw)
    assert every.shape[0] == 6
    some = predict_probabilities(model, image, channels=[2, 0], **kw)
    assert some.shape == (2,) + image.shape
    np.testing.assert_array_equal(some, every[[2, 0]])
    with pytest.raises(ConfigError, match="6 outputs"):
        predict_probabilities(model, image, channels=[6], **kw)


def test_results_written_to_memmap_and_hdf5_equal_in_memory_result(tmp_path):
    model = local_net("batch", target="both")
    image = np.random.default_rng(5).normal(size=(20, 40, 36)).astype(np.float32)
    kw = dict(tile_shape=(12, 16, 16), overlap=4)
    mem = predict_probabilities(model, image, **kw)
    assert mem.dtype == np.float16 and mem.shape == (2, 20, 40, 36)
    assert 0.0 <= mem.min() and mem.max() <= 1.0

    src = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.float32, shape=image.shape)
    src[:] = image
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float16, shape=mem.shape)
    assert predict_probabilities(model, src, out=mm, **kw) is mm
    np.testing.assert_array_equal(np.asarray(mm), mem)

    with h5py.File(tmp_path / "io.h5", "w") as f:
        f["raw"] = image
        ds = f.create_dataset("prob", shape=mem.shape, dtype=np.float16, chunks=(1, 8, 16, 16))
        predict_probabilities(model, f["raw"], out=ds, **kw)
        np.testing.assert_array_equal(ds[...], mem)


def test_transform_lets_a_raw_stack_be_normalised_per_tile():
    model = local_net("none")
    raw = np.random.default_rng(6).integers(20, 4095, size=(12, 24, 24)).astype(np.uint16)
    mean, std = float(raw.mean()), float(raw.std())
    kw = dict(tile_shape=(8, 16, 16), overlap=4, out_dtype=np.float32)
    direct = predict_probabilities(model, ((raw - mean) / std).astype(np.float32), **kw)
    on_the_fly = predict_probabilities(model, raw, transform=lambda t: (t - mean) / std, **kw)
    np.testing.assert_allclose(on_the_fly, direct, atol=1e-6)


# -- test-time augmentation -----------------------------------------------------------------
def test_flip_tta_makes_the_prediction_flip_equivariant():
    """Averaging over all 8 flips: predicting a flipped image gives the flipped prediction."""
    model = local_net("none", target="both")
    image = np.random.default_rng(7).normal(size=(8, 16, 16)).astype(np.float32)
    flipped = image[::-1, :, ::-1].copy()
    plain = predict_probabilities(model, image, out_dtype=np.float32)
    plain_f = predict_probabilities(model, flipped, out_dtype=np.float32)
    assert np.abs(plain_f[:, ::-1, :, ::-1] - plain).max() > 1e-3  # the net itself is not equivariant
    tta = predict_probabilities(model, image, tta=True, out_dtype=np.float32)
    tta_f = predict_probabilities(model, flipped, tta=True, out_dtype=np.float32)
    assert tta.shape == (2, 8, 16, 16)
    np.testing.assert_allclose(tta_f[:, ::-1, :, ::-1], tta, atol=1e-5)
    # a subset of flips (XY only) is accepted and differs from the full set
    xy = predict_probabilities(model, image, tta=[(), (1,), (2,), (1, 2)], out_dtype=np.float32)
    assert xy.shape == tta.shape and np.abs(xy - tta).max() > 1e-4


# -- job protocol -----------------------------------------------------------------------------
def test_progress_reports_every_tile_batch_with_eta():
    model = local_net("none")
    image = np.zeros((16, 24, 24), np.float32)
    events = []
    predict_probabilities(model, image, tile_shape=(8, 16, 16), overlap=4, batch_size=2,
                          progress=events.append)
    n = make_grid(image.shape, (8, 16, 16), 4, (2, 2, 2)).n_tiles
    assert n == 12  # 3 x 2 x 2 tiles
    done = [e.done for e in events]
    assert all(e.stage == "predict" for e in events)
    assert done == sorted(done) and done[-1] == events[-1].total == n
    assert len(events) == 1 + n // 2  # a start event, then one per batch of 2 tiles
    assert events[-1].eta_s is not None and events[-1].eta_s == pytest.approx(0.0)


def test_cancel_stops_between_tiles_and_keeps_finished_blocks():
    model = local_net("none")
    image = np.random.default_rng(8).normal(size=(24, 16, 16)).astype(np.float32)
    stop = threading.Event()
    seen = []

    def progress(ev):
        seen.append(ev.done)
        if ev.done >= 1:
            stop.set()

    out = np.full((1, 24, 16, 16), np.nan, np.float32)
    with pytest.raises(JobCancelled):
        predict_probabilities(model, image, tile_shape=(8, 16, 16), overlap=2, out=out,
                              progress=progress, cancel=stop)
    assert max(seen) == 1  # stopped right after the first tile, not at the end
    starts = make_grid(image.shape, (8, 16, 16), 2, (2, 2, 2)).starts[0]
    finished = int(starts[1])  # slices before the second tile row could get no more tiles
    assert np.isfinite(out[:, :finished]).all() and np.isnan(out[:, finished:]).all()


# -- errors a user can cause ------------------------------------------------------------------
def test_bad_inputs_are_refused_with_clear_errors():
    model = local_net("none")
    with pytest.raises(VolumeDataError, match="3D"):
        predict_probabilities(model, np.zeros((16, 16), np.float32))
    bad = np.zeros((8, 16, 16), np.float32)
    bad[3, 4, 5] = np.nan
    with pytest.raises(VolumeDataError, match="NaN"):
        predict_probabilities(model, bad)
    with pytest.raises(ConfigError, match="shape"):
        predict_probabilities(model, np.zeros((8, 16, 16), np.float32), out=np.zeros((2, 8, 16, 16)))
    with pytest.raises(ConfigError, match="overlap"):
        predict_probabilities(model, np.zeros((8, 40, 40), np.float32), tile_shape=(8, 16, 16),
                              overlap=4, halo=4)


def test_the_callers_model_is_left_untouched():
    model = local_net("batch")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict_probabilities(model, np.zeros((8, 16, 16), np.float32))
    assert model.training
    assert all(type(m) is torch.nn.Conv3d for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_uint8_output_holds_probabilities_as_0_to_255():
    """Compact uint8 results (used for whole lab stacks) keep the probabilities."""
    model = local_net("batch")
    image = smooth_image((8, 24, 24))
    exact = predict_probabilities(model, image, tile_shape=(8, 16, 16), out_dtype=np.float32)
    compact = predict_probabilities(model, image, tile_shape=(8, 16, 16),
                                    out=np.zeros(exact.shape, np.uint8))
    assert compact.max() > 1  # not truncated to 0/1
    assert np.abs(compact.astype(np.float32) / 255 - exact).max() <= 0.5 / 255 + 1e-6
