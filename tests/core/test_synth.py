"""Synthetic stacks: what a user of the generated training data would notice."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries

from core.cli.main import main
from core.errors import ConfigError, JobCancelled, VolumeWriteError
from core.io import read_labels, read_volume
from core.synth import (
    SynthParams, make_epithelium, medium_params, preview_image, save_preview_png, stack_seed,
    write_synthetic_dataset,
)

SHAPE = (24, 80, 80)
PARAMS = SynthParams(shape=SHAPE)
FACE = ndimage.generate_binary_structure(3, 1)


@pytest.fixture(scope="module")
def stack():
    return make_epithelium(PARAMS, seed=7)


def _bright_precise(params: SynthParams) -> SynthParams:
    """Nearly noise-free imaging, so structure dominates the statistics."""
    return replace(params, photons=1e5, read_noise_adu=0.0, puncta_per_cell=0.0)


def _membrane_and_interior(labels: np.ndarray, voxel_size):
    """Voxels on cell boundaries, and cell voxels at least 1.2 um from any boundary."""
    boundary = find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)
    edges = find_boundaries(labels, connectivity=1, mode="thick")
    depth = ndimage.distance_transform_edt(~edges, sampling=voxel_size)
    interior = (labels > 0) & (depth >= 1.2)
    return boundary, interior


def test_same_seed_gives_same_stack_and_other_seed_differs(stack):
    raw, labels = stack
    raw2, labels2 = make_epithelium(PARAMS, seed=7)
    np.testing.assert_array_equal(raw.data, raw2.data)
    np.testing.assert_array_equal(labels.data, labels2.data)
    raw3, labels3 = make_epithelium(PARAMS, seed=8)
    assert not np.array_equal(labels.data, labels3.data)
    assert np.mean(raw.data != raw3.data) > 0.5


def test_labels_are_cells_1_to_n_with_background_0(stack):
    raw, labels = stack
    lab = labels.data
    assert lab.shape == raw.data.shape == SHAPE
    assert lab.dtype.kind == "u"
    ids = np.unique(lab)
    assert ids[0] == 0 and (lab == 0).any()
    n = int(ids[-1])
    assert n >= 10
    np.testing.assert_array_equal(ids, np.arange(n + 1))
    assert raw.meta["synth"]["tube"]["n_cells"] == n
    assert labels.voxel_size == raw.voxel_size == PARAMS.voxel_size_um


def test_touching_cells_have_no_gap_between_them(stack):
    raw, labels = stack
    lab = labels.data
    # Inside the epithelium (away from the lumen and the outside) there is no
    # background voxel between two cells, unlike labels with 1-voxel gaps.
    rho = _tube_height(raw.meta["synth"]["tube"], lab.shape, PARAMS.voxel_size_um)
    inner = (rho > 0.2) & (rho < 0.8)
    assert (lab[inner] == 0).sum() == 0
    sandwiched = contacts = 0
    for axis in range(3):
        n = lab.shape[axis]
        before = np.take(lab, range(0, n - 2), axis=axis)
        middle = np.take(lab, range(1, n - 1), axis=axis)
        after = np.take(lab, range(2, n), axis=axis)
        sandwiched += ((middle == 0) & (before > 0) & (after > 0) & (before != after)).sum()
        a, b = np.take(lab, range(n - 1), axis=axis), np.take(lab, range(1, n), axis=axis)
        contacts += ((a > 0) & (b > 0) & (a != b)).sum()
    # Cells touch face to face; background between two cells happens only where a
    # curved surface is cut obliquely (a sliver of lumen), never as a network.
    assert contacts > 1000
    assert sandwiched < 0.02 * contacts


def test_every_cell_is_one_connected_piece(stack):
    lab = stack[1].data
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        assert sl is not None, f"label {i} is missing"
        _, pieces = ndimage.label(lab[sl] == i, FACE)
        assert pieces == 1, f"cell {i} is split into {pieces} pieces"


def test_raw_is_12_bit_with_dim_but_not_zero_background(stack):
    raw, labels = stack
    data = raw.data
    assert data.dtype == np.uint16
    assert int(data.max()) <= 4095
    assert int(data.max()) > 1000            # a real dynamic range, not a faint image
    background = data[labels.data == 0]
    assert 10 < np.median(background) < 400  # dark offset + background, like real stacks


def test_membranes_are_brighter_than_cell_interiors(stack):
    raw, labels = stack
    boundary, interior = _membrane_and_interior(labels.data, labels.voxel_size)
    assert boundary.sum() > 1000 and interior.sum() > 1000
    assert raw.data[boundary].mean() > 1.8 * raw.data[interior].mean()


def test_blur_is_stronger_along_z_than_in_xy():
    # Isotropic voxels, so gradients along Z and X compare directly.
    base = _bright_precise(SynthParams(shape=(40, 64, 64), voxel_size_um=(0.4, 0.4, 0.4)))

    def ratio(psf):
        raw, _ = make_epithelium(replace(base, psf_sigma_um=psf), seed=3)
        d = raw.data.astype(float)
        gz = np.mean(np.diff(d, axis=0) ** 2)
        gx = np.mean(np.diff(d, axis=2) ** 2)
        return gz / gx

    anisotropic = ratio((1.5, 0.4, 0.4))
    isotropic = ratio((0.4, 0.4, 0.4))
    assert anisotropic < 0.5 * isotropic


def test_signal_fades_with_depth():
    # Same tube with and without fading; low gain so nothing saturates.
    base = _bright_precise(SynthParams(shape=(30, 64, 64), peak_adu=400.0))

    def membrane_profile(attenuation_um):
        raw, labels = make_epithelium(replace(base, depth_attenuation_um=attenuation_um), seed=5)
        boundary, _ = _membrane_and_interior(labels.data, labels.voxel_size)
        d = raw.data.astype(float) - base.offset_adu
        return np.array([d[z][boundary[z]].mean() if boundary[z].sum() > 50 else np.nan
                         for z in range(d.shape[0])])

    flat = membrane_profile(float("inf"))
    ok = np.isfinite(flat)
    assert ok.sum() >= 15
    depth_um = np.arange(flat.size)[ok] * base.voxel_size_um[0]
    slope = np.polyfit(depth_um, np.log(membrane_profile(20.0)[ok] / flat[ok]), 1)[0]
    assert -1.0 / slope == pytest.approx(20.0, rel=0.1)
    default = (membrane_profile(PARAMS.depth_attenuation_um) / flat)[ok]
    assert default[-1] < 0.85 * default[0]


def test_cells_change_neighbours_between_apical_and_basal_side():
    def pairs_on_one_side_only(params):
        """Pairs of cells touching broadly on one side (apical or basal third) only."""
        raw, labels = make_epithelium(params, seed=11)
        rho = _tube_height(raw.meta["synth"]["tube"], labels.shape, params.voxel_size_um)
        lab = _drop_cells_cut_by_the_border(labels.data)
        apical = _contacts(lab, rho < 1 / 3)
        basal = _contacts(lab, rho > 2 / 3)
        enough = 0.25 * np.median(list(apical.values()) + list(basal.values()))
        one_side = {p for p, n in apical.items() if n >= enough and basal[p] == 0}
        one_side |= {p for p, n in basal.items() if n >= enough and apical[p] == 0}
        touching = {p for p, n in (apical + basal).items() if n >= enough}
        return len(one_side), len(touching)

    base = SynthParams(shape=(40, 112, 112), voxel_size_um=(0.6, 0.3, 0.3), cells_around=16.0)
    scutoids, pairs = pairs_on_one_side_only(replace(base, scutoid_strength=0.5))
    prisms, prism_pairs = pairs_on_one_side_only(replace(
        base, scutoid_strength=0.0, geometric_scutoids=0.0, membrane_wiggle=0.0))
    assert pairs > 40 and prism_pairs > 40
    assert scutoids >= 0.1 * pairs
    assert prisms <= 1


def _tube_height(tube: dict, shape, voxel_size):
    """Normalised height in the epithelium (0 apical, 1 basal) from the recorded geometry."""
    grid = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, voxel_size)], indexing="ij")
    p = np.stack(grid, -1) - np.array(tube["centre_um"])
    s = p @ np.array(tube["axis"])
    u = (p @ np.array(tube["up"])) / (1 - tube["flatten"])
    v = (p @ np.array(tube["across"]) - 0.5 * tube["bend_per_um"] * s ** 2) / (1 + tube["flatten"])
    r = np.hypot(u, v)
    return (r - tube["inner_radius_um"]) / (tube["outer_radius_um"] - tube["inner_radius_um"])


def _drop_cells_cut_by_the_border(lab):
    faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
    cut = np.unique(np.concatenate([f.ravel() for f in faces]))
    return np.where(np.isin(lab, cut), 0, lab)


def _contacts(lab, region) -> Counter:
    """Number of face contacts of each pair of cells inside ``region``."""
    counts: Counter = Counter()
    for axis in range(3):
        n = lab.shape[axis]
        a, b = np.take(lab, range(n - 1), axis=axis), np.take(lab, range(1, n), axis=axis)
        ra, rb = np.take(region, range(n - 1), axis=axis), np.take(region, range(1, n), axis=axis)
        touch = (a > 0) & (b > 0) & (a != b) & ra & rb
        lo = np.minimum(a[touch], b[touch]).astype(int).tolist()
        hi = np.maximum(a[touch], b[touch]).astype(int).tolist()
        counts.update(zip(lo, hi))
    return counts


def test_difficulty_presets_differ_in_image_quality():
    def contrast(difficulty):
        raw, labels = make_epithelium(SynthParams.for_difficulty(difficulty, shape=SHAPE), seed=2)
        boundary, interior = _membrane_and_interior(labels.data, labels.voxel_size)
        d = raw.data.astype(float)
        return (d[boundary].mean() - d[interior].mean()) / d[interior].std()

    assert contrast("easy") > 1.5 * contrast("hard")
    with pytest.raises(ConfigError, match="easy, medium, hard"):
        SynthParams.for_difficulty("impossible")


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="too small"):
        make_epithelium(SynthParams(shape=(4, 64, 64)))
    with pytest.raises(ConfigError, match="voxel_size_um"):
        make_epithelium(SynthParams(shape=SHAPE, voxel_size_um=(1.0, 0.0, 0.3)))
    with pytest.raises(ConfigError, match="smaller than"):
        make_epithelium(SynthParams(shape=SHAPE, tube_outer_radius_um=5, tube_inner_radius_um=8))


def test_progress_is_reported_and_cancel_stops():
    events = []
    make_epithelium(SynthParams(shape=(10, 32, 32)), seed=1, progress=events.append)
    assert events and events[-1].stage == "synth" and events[-1].fraction == 1.0
    stop = threading.Event()
    stop.set()
    with pytest.raises(JobCancelled):
        make_epithelium(SynthParams(shape=(10, 32, 32)), seed=1, cancel=stop)


def test_dataset_files_hold_the_stacks_and_the_voxel_size(tmp_path):
    params = SynthParams(shape=(12, 40, 40), voxel_size_um=(0.8, 0.25, 0.25))
    pairs = write_synthetic_dataset(tmp_path, 2, seed=4, params=params, preview=True)
    assert [(p.name, q.name) for p, q in pairs] == [
        ("synth_000_raw.tif", "synth_000_labels.tif"),
        ("synth_001_raw.tif", "synth_001_labels.tif"),
    ]
    raw = read_volume(pairs[1][0])
    labels = read_labels(pairs[1][1])
    assert raw.voxel_size == pytest.approx((0.8, 0.25, 0.25))
    assert labels.voxel_size == pytest.approx((0.8, 0.25, 0.25))
    expected_raw, expected_labels = make_epithelium(params, stack_seed(4, 1))
    np.testing.assert_array_equal(raw.data, expected_raw.data)
    np.testing.assert_array_equal(labels.data, expected_labels.data)
    first = read_volume(pairs[0][0])
    assert not np.array_equal(first.data, raw.data)
    assert (tmp_path / "synth_000_preview.png").stat().st_size > 1000
    with pytest.raises(VolumeWriteError, match="already exists"):
        write_synthetic_dataset(tmp_path, 1, seed=4, params=params)


def test_a_set_written_in_parts_and_a_brighter_medium(tmp_path, capsys):
    params = SynthParams(shape=(12, 40, 40))
    whole = write_synthetic_dataset(tmp_path / "whole", 3, seed=4, params=params)
    part = write_synthetic_dataset(tmp_path / "part", 1, seed=4, params=params, first=2)
    assert part[0][0].name == "synth_002_raw.tif"
    np.testing.assert_array_equal(read_volume(part[0][0]).data, read_volume(whole[2][0]).data)
    # the medium and lumen get their own brightness; cells, geometry and noise draws stay
    lit = write_synthetic_dataset(tmp_path / "lit", 1, seed=4, params=params, first=2,
                                  medium_brightness=(0.25, 0.3))
    labels = read_labels(lit[0][1]).data
    np.testing.assert_array_equal(labels, read_labels(whole[2][1]).data)
    dark, bright = read_volume(whole[2][0]).data, read_volume(lit[0][0]).data
    outside = labels == 0
    # ~0.25 brighter relative to a membrane's 1500 counts, less haze and vignetting
    assert np.median(bright[outside]) > np.median(dark[outside]) + 100
    drawn = medium_params(params, 4, 2, (0.25, 0.3))
    assert 0.25 <= drawn.background <= 0.3 and 0.25 <= drawn.lumen <= 0.3
    with pytest.raises(ConfigError, match="medium brightness"):
        medium_params(params, 4, 2, (0.3, 0.1))
    # the command line writes the same stack; a reversed range is refused before any write
    assert main(["synth", str(tmp_path / "cli"), "--shape", "12,40,40", "--seed", "4",
                 "--first", "2", "--medium", "0.25,0.3", "--quiet"]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "cli" / "synth_002_raw.tif").data, bright)
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "never"), "--shape", "12,40,40", "--medium", "0.3,0.1",
                 "--quiet"]) == 2
    assert "medium brightness range (0.3, 0.1)" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert main(["synth", str(tmp_path / "never"), "--medium", "0.3", "--quiet"]) == 2
    assert "--medium expects 2" in capsys.readouterr().err


def test_preview_shows_xy_slices_and_sections(tmp_path, stack):
    raw, labels = stack
    image = preview_image(raw, labels)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # Three XY slices side by side; sections stretched to square pixels (Z x 1.0/0.3).
    assert image.shape[1] >= 3 * SHAPE[2]
    assert image.shape[0] >= 2 * (SHAPE[1] + round(SHAPE[0] * 1.0 / 0.3))
    path = save_preview_png(raw, labels, tmp_path / "p.png")
    from skimage.io import imread
    np.testing.assert_array_equal(imread(path), image)


def test_cli_writes_n_pairs_and_lists_them(tmp_path, capsys):
    rc = main(["synth", str(tmp_path / "out"), "--n", "2", "--shape", "12,40,40", "--seed", "5",
               "--voxel-size", "1,0.4,0.4", "--difficulty", "hard", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["synth_000_labels.tif", "synth_000_raw.tif",
                     "synth_001_labels.tif", "synth_001_raw.tif"]
    assert "synth_001_labels.tif" in out
    assert read_volume(tmp_path / "out" / "synth_000_raw.tif").voxel_size == pytest.approx((1, 0.4, 0.4))


@pytest.mark.parametrize("shape, message", [("12,40", "--shape"), ("2,40,40", "too small"),
                                            ("12,x,40", "--shape")])
def test_cli_rejects_bad_shapes(tmp_path, capsys, shape, message):
    rc = main(["synth", str(tmp_path), "--shape", shape, "--quiet"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
