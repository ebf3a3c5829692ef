"""Training data: loading pairs, patch sampling, augmentation, patch size."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from core.data import (CPU_MAX_PATCH_VOXELS, PATCH_MAX_SHARE, AugmentConfig, Augmenter, Batch,
                       PatchSampler, auto_patch_size, check_patch_size, load_pair,
                       validation_patches, volume_from_arrays,
                       wall_yx_channels)
from core.errors import ConfigError
from core.model import preset_config, required_divisor
from core.volume import Volume


def one_cell_volume(shape=(16, 64, 64), box=(slice(6, 11), slice(40, 46), slice(8, 14))):
    """A dark volume with one small bright cell: random patches rarely meet it."""
    labels = np.zeros(shape, np.uint8)
    labels[box] = 1
    image = np.random.default_rng(0).normal(0, 0.1, shape).astype(np.float32)
    image[labels > 0] += 1.0
    return volume_from_arrays(image, labels, target="cells_with_gaps", name="one cell")


def _contains_cell(target):
    return bool((target[0] > 0.5).any())


def test_patches_are_centred_on_cells_at_the_configured_rate():
    vol = one_cell_volume()
    size = (8, 16, 16)
    rates = {}
    for p in (0.0, 0.5, 1.0):
        sampler = PatchSampler([vol], size, rng=np.random.default_rng(1), foreground_probability=p)
        draws = [sampler.sample() for _ in range(300)]
        assert all(d[0].shape == (1,) + size and d[1].shape == (1,) + size for d in draws)
        rates[p] = np.mean([_contains_cell(d[1]) for d in draws])
        centred = np.mean([d[3] for d in draws])
        assert centred == pytest.approx(p, abs=0.08)
    assert rates[1.0] == 1.0           # every cell-centred patch shows the cell
    assert rates[0.0] < 0.25           # uniform patches mostly miss it
    assert rates[0.5] == pytest.approx(0.5 + 0.5 * rates[0.0], abs=0.1)


def test_rotations_keep_image_and_target_aligned_for_non_square_patches():
    rng = np.random.default_rng(2)
    labels = (rng.random((12, 40, 56)) > 0.5).astype(np.uint8) * 7
    image = labels.astype(np.float32) + 0.0
    vol = volume_from_arrays(image, labels, target="cells_with_gaps", normalised=True,
                             targets_config=None)
    vol.targets = (labels > 0).astype(np.uint8)[None]  # target == image > 0.5, voxel by voxel
    sampler = PatchSampler([vol], (4, 8, 24), rng=np.random.default_rng(3))
    turns = []
    for _ in range(20):
        img, tgt, _, _ = sampler.sample()
        assert img.shape == (1, 4, 8, 24)
        assert np.array_equal(tgt[0] > 0.5, img[0] > 0.5)
        turns.append(_quarter_turns(image, img[0]))
    assert None not in turns           # every patch is a rotated crop of the volume
    assert {1, 3} & set(turns) and {0, 2} & set(turns)


def test_rotations_trade_the_y_and_x_wall_bands():
    labels = np.zeros((6, 24, 24), np.uint8)
    labels[1:5, 2:22, 4:12] = 1
    labels[1:5, 2:22, 12:20] = 2       # one wall, across X; the tissue is taller than wide
    vol = volume_from_arrays(labels.astype(np.float32), labels, target="all_walls",
                             normalised=True)
    names = ("cells_with_gaps", "boundaries", "tissue", "wall_z", "wall_y", "wall_x")
    assert vol.targets.shape[0] == len(names)
    sampler = PatchSampler([vol], (6, 24, 24), rng=np.random.default_rng(0),
                           swap_on_rotate=wall_yx_channels("all_walls"))
    seen = set()
    for _ in range(20):
        img, tgt, _, _ = sampler.sample()
        where = np.argwhere(img[0] > 0)
        turned = np.ptp(where[:, 1]) < np.ptp(where[:, 2])
        wall_y, wall_x = tgt[4] > 0.5, tgt[5] > 0.5
        # the wall runs along Y in the stack; turned patches show it along X
        # and its band must then be the Y band
        assert (wall_y.any(), wall_x.any()) == ((True, False) if turned else (False, True))
        seen.add(bool(turned))
    assert seen == {True, False}


def _quarter_turns(volume, patch):
    """k such that patch == rot90(crop of volume, k) in YX, or None."""
    from numpy.lib.stride_tricks import sliding_window_view

    for k in range(4):
        crop = np.rot90(patch, -k, axes=(1, 2))
        windows = sliding_window_view(volume, crop.shape)
        if (windows == crop).all(axis=(3, 4, 5)).any():
            return k
    return None


def _flips_of(a):
    return {axes: (a.flip(list(axes)) if axes else a)
            for r in range(4) for axes in itertools.combinations((-3, -2, -1), r)}


def test_flips_hit_image_target_and_weight_identically():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 6, 8, 10, generator=g)        # asymmetric everywhere
    target = torch.stack([(base[:, 0] > 0.5).float(), torch.rand(1, 6, 8, 10, generator=g)], 1)
    weight = torch.rand(1, 1, 6, 8, 10, generator=g)
    aug = Augmenter(AugmentConfig(level="default"))
    seen = set()
    for _ in range(60):
        out = aug(Batch(base.clone(), target.clone(), weight.clone()))
        flips_t = [k for k, v in _flips_of(target).items() if torch.equal(out.target, v)]
        flips_w = [k for k, v in _flips_of(weight).items() if torch.equal(out.weight, v)]
        assert len(flips_t) == 1 and flips_t == flips_w
        # the image had intensity changes too: it is closest to the same flip of the input
        corr = {k: float(torch.corrcoef(torch.stack([out.image.flatten(), v.flatten()]))[0, 1])
                for k, v in _flips_of(base).items()}
        assert max(corr, key=corr.get) == flips_t[0]
        seen.add(flips_t[0])
    assert len(seen) == 8  # all flip combinations of the three axes occur


def test_intensity_changes_touch_only_the_image_and_off_changes_nothing():
    torch.manual_seed(1)
    img = torch.randn(4, 1, 4, 8, 8)
    tgt = (torch.rand(4, 2, 4, 8, 8) > 0.5).float()
    off = Augmenter(AugmentConfig(level="off"))(Batch(img.clone(), tgt.clone()))
    assert torch.equal(off.image, img) and torch.equal(off.target, tgt)
    strong = Augmenter(AugmentConfig(level="strong", elastic=False))
    changed = 0
    for _ in range(5):
        out = strong(Batch(img.clone(), tgt.clone()))
        assert set(out.target.unique().tolist()) <= {0.0, 1.0}
        flips = _flips_of(img)
        changed += sum(not any(torch.allclose(out.image[i], f[i]) for f in flips.values())
                       for i in range(4))
    assert changed > 5


def test_elastic_deformation_keeps_shapes_and_binary_targets():
    torch.manual_seed(2)
    img = torch.randn(2, 1, 8, 24, 24)
    tgt = torch.zeros(2, 1, 8, 24, 24)
    tgt[:, :, 2:6, 6:18, 6:18] = 1
    aug = Augmenter(AugmentConfig(level="light", elastic=True))
    aug.p["p_elastic"] = 1.0
    out = aug(Batch(img, tgt))
    assert out.image.shape == img.shape and out.target.shape == tgt.shape
    assert set(out.target.unique().tolist()) <= {0.0, 1.0}
    assert float(out.target.sum()) > 0 and not torch.equal(out.target, tgt)


def _stripe_period(row: np.ndarray) -> float:
    """Mean distance (voxels) between the rising edges of a 0/1 profile."""
    edges = np.flatnonzero(np.diff((row > 0.5).astype(int)) == 1)
    return float(np.diff(edges).mean())


def test_zoom_shows_cells_smaller_and_larger_with_image_and_targets_aligned():
    # walls every 12 voxels along X: zoomed patches show them closer or further apart
    shape = (16, 64, 480)
    labels = (np.arange(shape[2]) // 12 + 1)[None, None, :].repeat(16, 0).repeat(64, 1)
    labels = labels.astype(np.uint16)
    vol = volume_from_arrays(labels.astype(np.float32), labels, target="boundaries",
                             normalised=True)
    vol.targets = (labels % 2).astype(np.uint8)[None]  # alternate cells: target == image parity
    vol.image = vol.targets[0].astype(np.float32)
    size = (8, 16, 96)
    plain = PatchSampler([vol], size, rng=np.random.default_rng(4), rotate90=False)
    zoomed = PatchSampler([vol], size, rng=np.random.default_rng(4), rotate90=False,
                          zoom=(1.0, 1.4))
    periods = []
    for _ in range(40):
        img, tgt, _, _ = zoomed.sample()
        assert img.shape == (1,) + size and tgt.shape == (1,) + size
        assert np.allclose(img[0], tgt[0])          # the image and its targets move together
        periods.append(_stripe_period(img[0, 4, 8]))
    assert _stripe_period(plain.sample()[0][0, 4, 8]) == pytest.approx(24.0)
    assert min(periods) < 24 * 0.85 and max(periods) > 24 * 1.15   # smaller and larger cells
    assert 24 / 1.45 <= min(periods) and max(periods) <= 24 * 1.45  # within the factor
    # the training config names the setting and refuses a nonsense factor
    assert Augmenter(AugmentConfig(zoom=1.4)).zoom == (pytest.approx(0.3), 1.4)
    assert Augmenter(AugmentConfig()).zoom == (0.0, 1.0)
    with pytest.raises(ConfigError, match="augment.zoom"):
        Augmenter(AugmentConfig(zoom=0.5))


def test_auto_patch_size_fits_model_volumes_memory_and_anisotropy():
    cfg = preset_config("small", target="both", voxel_size_um=(1.0, 0.25, 0.25))
    div = required_divisor(cfg)
    shapes = [(40, 300, 300), (30, 200, 500)]
    ps = auto_patch_size(cfg, volume_shapes=shapes, voxel_size=(1.0, 0.25, 0.25), device="cpu")
    assert all(p % d == 0 and p >= d for p, d in zip(ps, div))
    assert all(p <= min(s[a] for s in shapes) for a, p in enumerate(ps))
    assert ps[1] == ps[2] and 2 * ps[0] < ps[1]  # Z voxels are 4x coarser: fewer of them
    assert np.prod(ps) <= CPU_MAX_PATCH_VOXELS
    # on a GPU memory decides: more memory, bigger patches; little memory, small ones
    big = auto_patch_size(cfg, volume_shapes=shapes, voxel_size=(1.0, 0.25, 0.25),
                          device="cuda", memory_bytes=8 * 2**30)
    small = auto_patch_size(cfg, volume_shapes=shapes, voxel_size=(1.0, 0.25, 0.25),
                            device="cuda", memory_bytes=64 * 2**20)
    assert np.prod(small) < np.prod(ps) and np.prod(small) < np.prod(big)
    assert big[0] <= 30 and all(b % d == 0 for b, d in zip(big, div))
    # however much memory: a patch leaves random patches room to differ
    assert np.prod(big) <= PATCH_MAX_SHARE * min(np.prod(s) for s in shapes)
    huge = auto_patch_size(cfg, volume_shapes=[(64, 1024, 1024)], voxel_size=(1.0, 0.25, 0.25),
                           device="cuda", memory_bytes=8 * 2**30)
    assert np.prod(huge) > np.prod(big)
    tiny_volume = auto_patch_size(cfg, volume_shapes=[(16, 40, 40)], device="cpu")
    assert tiny_volume[0] <= 16 and tiny_volume[1] <= 40 and tiny_volume[2] <= 40


def test_a_patch_size_that_does_not_fit_the_pooling_is_refused():
    cfg = preset_config("small", target="both")  # pooling (2, 2, 2) twice -> multiples of 4
    assert check_patch_size((8, 16, 16), cfg) == (8, 16, 16)
    with pytest.raises(ConfigError, match="multiple of"):
        check_patch_size((10, 16, 16), cfg)


def test_load_pair_normalises_computes_targets_and_resamples(tmp_path):
    from core.io import write_volume

    labels = np.zeros((8, 24, 24), np.uint16)
    labels[:, 2:12, 2:12], labels[:, 2:12, 12:22], labels[:, 12:22, 2:22] = 1, 2, 3
    rng = np.random.default_rng(0)
    raw = (100 + 50 * rng.random(labels.shape)).astype(np.uint16)
    write_volume(tmp_path / "raw.tif", Volume(raw, (1.0, 0.5, 0.5)))
    write_volume(tmp_path / "lab.tif", Volume(labels, (1.0, 0.5, 0.5)), labels=True)
    vol = load_pair(str(tmp_path / "raw.tif"), str(tmp_path / "lab.tif"), target="both",
                    weight_map={"w0": 10.0, "sigma_vox": 3.0})
    assert vol.image.dtype == np.float32 and abs(vol.image.mean()) < 1e-3
    assert vol.image.std() == pytest.approx(1.0, rel=0.01)
    assert vol.targets.shape == (2, 8, 24, 24)
    assert vol.targets[0, 4, 11, 5] == 0 and vol.targets[0, 4, 5, 5] == 1  # gap between cells
    assert vol.targets[1, 4, 11, 5] == 1 and vol.targets[1, 4, 5, 5] == 0  # boundary there
    assert vol.weight is not None and vol.weight[4, 11, 5] > vol.weight[4, 5, 5]
    assert vol.voxel_size == (1.0, 0.5, 0.5) and vol.foreground.size > 0
    # another voxel size: resampled to the training one
    half = load_pair(str(tmp_path / "raw.tif"), str(tmp_path / "lab.tif"),
                     target="cells_with_gaps", voxel_size_um=(1.0, 1.0, 1.0))
    assert half.shape == (8, 12, 12) and half.voxel_size == (1.0, 1.0, 1.0)
    assert set(np.unique(half.labels)) == {0, 1, 2, 3}


def test_split_and_validation_patches_are_disjoint_and_reproducible():
    vol = one_cell_volume()
    tr, va = vol.split(0.25)
    assert tr.shape[1] + va.shape[1] == 64 and tr.shape[0] == va.shape[0] == 16
    assert np.array_equal(np.concatenate([tr.image, va.image], axis=1), vol.image)
    # the held-out part within as many training voxels beside it (for the post-processing search)
    image, region = va.context
    assert image.shape[1] == 2 * va.shape[1] and np.array_equal(image[region], va.image)
    assert np.array_equal(image, vol.image[:, -image.shape[1]:])
    assert tr.context is None
    a = validation_patches([vol], (8, 16, 16), per_volume=3, seed=5)
    b = validation_patches([vol], (8, 16, 16), per_volume=3, seed=5)
    assert len(a) == 3
    assert all(torch.equal(x.image, y.image) for x, y in zip(a, b))
    clipped = validation_patches([va], (8, 32, 32), divisor=(4, 4, 4), per_volume=1)
    assert tuple(clipped[0].image.shape[2:]) == (8, 16, 32)


def test_target_all_adds_the_exact_tissue_mask(tmp_path):
    """Target 'all': cells with gaps, boundaries and the tissue (every labelled voxel)."""
    from core.io import write_volume

    labels = np.zeros((8, 24, 24), np.uint16)
    labels[:, 2:12, 2:12], labels[:, 2:12, 12:22] = 1, 2
    raw = (100 + 50 * np.random.default_rng(0).random(labels.shape)).astype(np.uint16)
    write_volume(tmp_path / "raw.tif", Volume(raw, (1.0, 0.5, 0.5)))
    write_volume(tmp_path / "lab.tif", Volume(labels, (1.0, 0.5, 0.5)), labels=True)
    vol = load_pair(str(tmp_path / "raw.tif"), str(tmp_path / "lab.tif"), target="all")
    assert vol.targets.shape == (3, 8, 24, 24)
    np.testing.assert_array_equal(vol.targets[2], labels > 0)
    assert vol.targets[0, 4, 5, 11] == 0 and vol.targets[2, 4, 5, 11] == 1  # gap is tissue
    assert vol.targets[2, 4, 20, 5] == 0  # outside the cells
