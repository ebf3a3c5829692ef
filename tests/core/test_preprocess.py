"""Preprocessing: targets, resampling, normalisation, the HDF5 file and `episeg preprocess`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile
import yaml

from core.config import from_dict
from core.errors import ConfigError, JobCancelled, VolumeDataError
from core.preprocess import (PreprocessConfig, axis_wall_target, boundary_target, cells_with_gaps_target,
                             check_cell_counts, normalise, percentile_normalise,
                             preprocess_volume, read_preprocessed, resample_image,
                             resample_labels, write_preprocessed, zscore)
from core.volume import Volume

DATASETS = {"raw", "label", "cells_with_gaps", "boundaries"}


def two_cubes() -> np.ndarray:
    """Cells 1 and 2 touch along the plane between x = 9 and x = 10; background around."""
    lab = np.zeros((10, 12, 20), np.uint8)
    lab[2:8, 2:10, 2:10] = 1
    lab[2:8, 2:10, 10:18] = 2
    return lab


def neighbourhood_values(lab: np.ndarray, connectivity: int):
    """Every neighbour's value (incl. the voxel itself) by brute-force shifting."""
    fp = ndi.generate_binary_structure(3, connectivity)
    pad = np.pad(lab, 1, mode="edge")
    z, y, x = lab.shape
    return [pad[1 + dz:1 + dz + z, 1 + dy:1 + dy + y, 1 + dx:1 + dx + x]
            for dz, dy, dx in np.argwhere(fp) - 1]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------- targets
def test_gaps_target_separates_touching_cells_as_the_thesis():
    lab = two_cubes()
    target = cells_with_gaps_target(lab, connectivity=3, mode="outer")
    assert target.dtype == np.uint8 and set(np.unique(target)) == {0, 1}
    expected = (lab > 0).astype(np.uint8)
    expected[:, :, 9:11] = 0  # one voxel taken from each side of the interface
    np.testing.assert_array_equal(target, expected)
    # the thesis check: as one mask the cells merge; with gaps both survive
    assert ndi.label(lab > 0)[1] == 1
    report = check_cell_counts(lab, target, connectivity=3)
    assert (report.n_cells, report.n_components, report.n_lost, report.n_merged) == (2, 2, 0, 0)
    assert report.ok and "2 cells in labels" in report.summary()


def test_boundary_target_is_exactly_around_interfaces():
    lab = two_cubes()
    bnd = boundary_target(lab, connectivity=2, mode="thick")
    values = neighbourhood_values(lab, 2)
    expected = np.zeros(lab.shape, bool)
    for v in values:
        expected |= v != lab
    assert bnd.dtype == np.uint8
    np.testing.assert_array_equal(bnd.astype(bool), expected)
    assert bnd[5, 5, 9] == bnd[5, 5, 10] == 1 and bnd[5, 5, 5] == 0 and bnd[5, 5, 8] == 0
    assert bnd[5, 1, 5] == bnd[5, 2, 5] == 1  # tissue/background border included

    inner = boundary_target(lab, include_background=False)
    assert inner[:, :, 9:11][lab[:, :, 9:11] > 0].all()  # the cell-cell interface
    zs, ys, xs = np.nonzero(inner)
    assert set(xs) <= {9, 10} and inner[5, 1, 5] == 0

    soft = boundary_target(lab, sigma=1.0, blur="soft")
    assert soft.dtype == np.float32 and soft.min() >= 0 and soft.max() == 1.0
    assert np.all(soft[expected] == 1.0) and 0 < soft[5, 5, 7] < 1
    hard = boundary_target(lab, sigma=1.0, blur="threshold")
    assert hard.dtype == np.uint8 and hard[5, 5, 9] == 1 and hard[5, 5, 5] == 0


def test_wall_bands_mark_the_voxel_pair_across_each_wall_along_their_axis():
    lab = two_cubes()
    lab[5:8, 2:10, 2:10] = 3          # a wall across Z inside the first cube
    wx, wy, wz = (axis_wall_target(lab, a) for a in (2, 1, 0))
    assert wx.dtype == np.uint8
    # the X band is exactly the pair x = 9, 10 (both cubes' layers touch there)
    zs, ys, xs = np.nonzero(wx)
    assert set(xs) == {9, 10} and wx[3, 5, 9] == wx[3, 5, 10] == 1 and wx[3, 5, 8] == 0
    # the Z band is the pair z = 4, 5 inside the first cube only; Y has no cell-cell wall
    assert set(np.nonzero(wz)[0]) == {4, 5} and not wz[:, :, 10:].any()
    assert not wy.any()
    # borders with the background are not walls
    assert wx[5, 5, 2] == 0 and wz[2, 5, 5] == 0


def test_count_check_reports_lost_merged_and_split_ground_truth():
    lab = np.zeros((8, 12, 24), np.uint16)
    lab[1:7, 1:11, 1:10] = 1
    lab[1:7, 1:11, 10] = 5  # a cell one voxel thick: the gaps remove all of it
    lab[1:7, 1:11, 11:20] = 2
    lab[2:4, 2:4, 21:23] = 9  # id 9 in two pieces in the ground truth itself
    lab[5:7, 8:10, 21:23] = 9
    report = check_cell_counts(lab, cells_with_gaps_target(lab))
    assert report.lost_ids == (5,) and not report.merged and not report.ok
    assert report.n_cells == 4 and report.n_components == 4  # 1, 2 and both pieces of 9
    assert report.split_ids == () and report.split_in_labels_ids == (9,)
    assert "1 more in several pieces already in the labels" in report.summary()
    cut = lab.copy()
    cut[1:7, 1:11, 15] = 7  # a thin cell cuts cell 2 in two halves ...
    cut[4, 5, 15] = 2  # ... joined by a one-voxel bridge, which the gaps remove
    report = check_cell_counts(cut, cells_with_gaps_target(cut))
    assert 2 in report.split_ids and 7 in report.lost_ids
    merged = check_cell_counts(lab, (lab > 0).astype(np.uint8))
    assert merged.merged == ((1, 2, 5),) and merged.n_components == 3
    assert "1 merged" in merged.summary() and "1+2+5" in merged.summary()

    cfg = from_dict(PreprocessConfig, {"check": {"counts": "error"}})
    raw = Volume(np.random.default_rng(0).random(lab.shape), None, "thin", "thin.tif")
    with pytest.raises(VolumeDataError, match="1 cells lost.*check.counts: warn"):
        preprocess_volume(raw, Volume(lab, None, "thin_l", "thin_l.tif"), cfg)
    res = preprocess_volume(raw, Volume(lab, None, "thin_l", "thin_l.tif"), PreprocessConfig())
    assert res.cell_check.lost_ids == (5,) and any("1 cells lost" in w for w in res.warnings)


# -------------------------------------------------------------------- resampling
def test_resample_labels_keeps_ids_and_alignment():
    rng = np.random.default_rng(1)
    lab = rng.choice(np.array([0, 3, 7, 200], np.uint8), size=(6, 8, 10))
    up, rep = resample_labels(lab, (2, 2, 2))
    assert up.dtype == np.uint8 and up.shape == (12, 16, 20) and rep.lost_ids == ()
    np.testing.assert_array_equal(up, lab.repeat(2, 0).repeat(2, 1).repeat(2, 2))

    idx = resample_labels(np.arange(16, dtype=np.uint8).reshape(16, 1, 1) + 1,
                          (0.5, 1, 1))[0].ravel() - 1  # which input slices are sampled
    skipped = sorted(set(range(16)) - set(idx.tolist()))[0]
    lab = np.zeros((16, 9, 9), np.uint16)
    lab[:, :4] = 40
    lab[:, 5:] = 41
    lab[skipped, 4, 4] = 42  # a one-voxel cell on a slice that is not sampled
    down, rep = resample_labels(lab, (0.5, 0.5, 0.5))
    assert down.shape == (8, 4, 4) == rep.shape_after  # round(9 * 0.5) = 4
    assert set(np.unique(down)) <= {0, 40, 41}
    assert rep.lost_ids == (42,) and (rep.n_ids_before, rep.n_ids_after) == (3, 2)


def test_resample_image_matches_whole_volume_zoom_and_shapes():
    img = np.random.default_rng(2).random((23, 17, 19)).astype(np.float32)
    for factors in [(0.5, 0.5, 0.5), (1.7, 1.0, 0.3), (1.0, 0.6, 0.3)]:
        out = resample_image(img, factors, anti_aliasing=False, max_slab_voxels=300)
        ref = ndi.zoom(img, factors, order=3, mode="reflect", grid_mode=True)
        assert out.dtype == np.float32 and out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4  # slabs + halo == one zoom
    out = resample_image(img, voxel_size=(2.0, 0.5, 0.5), target_voxel_size=(1.0, 1.0, 1.0))
    assert out.shape == (46, 8, 10)  # round(23*2), round(17/2), round(19/2)
    smooth = resample_image(img, (1, 0.25, 0.25))
    raw = resample_image(img, (1, 0.25, 0.25), anti_aliasing=False)
    assert smooth.std() < raw.std()  # anti-aliasing removes noise that would alias


# ----------------------------------------------------------------- normalisation
def test_new_models_train_on_a_grid_no_finer_than_the_z_step_allows():
    from core.preprocess import training_grid_um
    # the lab's kind of stack: Y/X 3.3x finer than Z -> 1.5x coarser in Y and X, Z kept
    assert training_grid_um((1.0, 0.3, 0.3)) == pytest.approx((1.0, 0.45, 0.45))
    assert training_grid_um((2.0, 0.2, 0.2)) == pytest.approx((2.0, 0.3, 0.3))  # at most 1.5x
    # only as far as the Z step allows
    assert training_grid_um((0.8, 0.25, 0.25)) == pytest.approx((0.8, 0.8 / 2.2, 0.8 / 2.2))
    # isotropic, mildly anisotropic or already coarse stacks keep their grid
    for kept in [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (1.0, 0.45, 0.45), (0.3, 0.3, 0.3)]:
        assert training_grid_um(kept) == kept


def test_zscore_mean_0_std_1():
    # torchio ZNormalization: (x - mean) / std with the unbiased std, over every voxel
    img = np.random.default_rng(3).gamma(2.0, 300.0, (8, 20, 20)).astype(np.uint16)
    z = zscore(img)
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-5 and abs(z.std(ddof=1) - 1) < 1e-5
    np.testing.assert_allclose(z, (img - img.mean()) / img.std(ddof=1), atol=1e-5)
    fg = zscore(img, "above_mean")
    sel = img > img.mean()
    assert abs(fg[sel].mean()) < 1e-5 and abs(fg[sel].std(ddof=1) - 1) < 1e-5
    with pytest.raises(VolumeDataError, match="constant"):
        zscore(np.full((4, 4, 4), 7, np.uint16))


def test_percentile_normalisation():
    img = np.random.default_rng(4).normal(500, 80, (8, 24, 24)).astype(np.float32)
    out = percentile_normalise(img, 1, 99.8)
    assert out.dtype == np.float32
    assert abs(np.percentile(out, 1)) < 1e-5 and abs(np.percentile(out, 99.8) - 1) < 1e-5
    assert out.min() < 0 and out.max() > 1  # not clipped by default
    cfg = from_dict(PreprocessConfig, {"normalisation": {"mode": "percentile", "clip": True}})
    clipped, info = normalise(img, cfg.normalisation)
    assert clipped.min() == 0 and clipped.max() == 1 and info["mode"] == "percentile"
    assert info["p_low"] == pytest.approx(np.percentile(img, 1), rel=1e-5)


def test_robust_normalisation_ignores_a_bright_spot():
    """A saturated nucleus (~1 % of the stack) doubles the std but not the robust spread."""
    rng = np.random.default_rng(5)
    img = rng.normal(100, 10, (16, 64, 64)).astype(np.float32)
    spotted = img.copy()
    spotted[6:10, 10:20, 10:20] = 4000  # 0.6 % of the voxels
    cfg = from_dict(PreprocessConfig, {"normalisation": {"mode": "robust"}})
    clean_out, clean = normalise(img, cfg.normalisation)
    spot_out, spot = normalise(spotted, cfg.normalisation)
    assert clean["mode"] == "robust" and clean["spread"] == pytest.approx(10, rel=0.03)
    assert spot["spread"] == pytest.approx(clean["spread"], rel=0.03)
    assert spotted.std() > 20 * img.std()  # a plain z-score would shrink the contrast 20x
    away = np.ones(img.shape, bool)
    away[6:10, 10:20, 10:20] = False
    np.testing.assert_allclose(spot_out[away], clean_out[away], atol=0.05)
    flat = np.zeros((4, 8, 8), np.float32)
    flat[0, 0, :4] = 1  # MAD 0 (most voxels equal): falls back to the standard deviation
    out, info = normalise(flat, cfg.normalisation)
    assert info["spread"] == pytest.approx(flat.std()) and np.isfinite(out).all()


# ------------------------------------------------------------- volume + HDF5 file
def make_volume(rng, max_id=3):
    lab = np.zeros((12, 32, 32), np.int64)
    lab[2:10, 2:16, 2:30] = 1
    lab[2:10, 16:30, 2:16] = 2
    lab[2:10, 16:30, 16:30] = max_id
    raw = (rng.normal(800, 50, lab.shape) + 400 * (lab > 0)).astype(np.uint16)
    return (Volume(raw, (2.0, 0.5, 0.5), "vol", "vol.tif"),
            Volume(lab, (2.0, 0.5, 0.5), "vol_labels", "vol_labels.tif"))


def test_preprocess_volume_dtypes_and_inputs_untouched(rng):
    raw, lab = make_volume(rng)
    raw_copy, lab_copy = raw.data.copy(), lab.data.copy()
    res = preprocess_volume(raw, lab, PreprocessConfig())
    assert res.raw.dtype == np.float32 and abs(res.raw.mean()) < 1e-4
    assert res.labels.dtype == np.uint8 and res.cells_with_gaps.dtype == np.uint8
    assert res.cell_check.ok and res.cell_check.n_cells == 3
    np.testing.assert_array_equal(raw.data, raw_copy)
    np.testing.assert_array_equal(lab.data, lab_copy)
    assert preprocess_volume(*make_volume(rng, 300), PreprocessConfig()).labels.dtype == np.uint16

    cfg = from_dict(PreprocessConfig, {"resample": {"target_voxel_size_um": [1, 1, 1]}})
    res = preprocess_volume(raw, lab, cfg)
    assert res.raw.shape == res.labels.shape == (24, 16, 16)
    assert res.voxel_size == (1.0, 1.0, 1.0) and res.factors == (2.0, 0.5, 0.5)
    assert set(np.unique(res.labels)) == {0, 1, 2, 3}
    with pytest.raises(JobCancelled):
        preprocess_volume(raw, lab, cfg, cancel=lambda: True)
    nosize = Volume(raw.data, None, "vol", "vol.tif")
    with pytest.raises(ConfigError, match="input_voxel_size_um"):
        preprocess_volume(nosize, None, cfg)


def test_hdf5_file_has_datasets_compression_and_metadata(tmp_path, rng):
    raw, lab = make_volume(rng)
    cfg = from_dict(PreprocessConfig, {"resample": {"factors": [1, 0.5, 0.5]}})
    events = []
    res = preprocess_volume(raw, lab, cfg, progress=events.append)
    assert events[-1].done == events[-1].total
    out = write_preprocessed(tmp_path / "out.h5", res)
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]
    with h5py.File(out, "r") as f:
        assert set(f) == DATASETS
        for name in DATASETS:
            ds = f[name]
            assert ds.compression == "gzip" and ds.compression_opts == 4 and ds.chunks
            assert ds.shape == (12, 16, 16)
            np.testing.assert_allclose(ds.attrs["element_size_um"], [2.0, 1.0, 1.0])
        assert f["raw"].dtype == np.float32 and f["label"].dtype == np.uint8
        assert f["cells_with_gaps"].dtype == np.uint8
        a = f.attrs
        assert a["source_raw"] == "vol.tif" and a["source_labels"] == "vol_labels.tif"
        np.testing.assert_allclose(a["voxel_size_um"], [2.0, 1.0, 1.0])
        np.testing.assert_allclose(a["original_voxel_size_um"], [2.0, 0.5, 0.5])
        np.testing.assert_allclose(a["resample_factors"], [1.0, 0.5, 0.5])
        norm = json.loads(a["normalisation"])
        assert norm["mode"] == "zscore" and norm["std"] > 0
        assert a["n_cells"] == 3 and a["n_lost"] == 0 and a["n_merged"] == 0
        assert a["episeg_version"]
        assert from_dict(PreprocessConfig, yaml.safe_load(a["config"])) == cfg
    back = read_preprocessed(out)
    assert DATASETS <= set(back) and back["voxel_size_um"] == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(back["label"], res.labels)
    assert back["cell_check"]["n_cells"] == 3 and back["normalisation"] == res.normalisation


# ------------------------------------------------------------------------- CLI
@pytest.fixture
def episeg(monkeypatch, capsys):
    """Run `episeg ARGS...` in-process; returns (exit code, stdout, stderr)."""
    import core.cli.main as cli_main

    if any(importlib.util.find_spec(m) is None for m in cli_main.COMMAND_MODULES):
        # other subcommands still being written: build `episeg` with this one only
        monkeypatch.setattr(cli_main, "COMMAND_MODULES", ["core.cli.cmd_preprocess"])

    def run(*args):
        code = cli_main.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def write_inputs(tmp_path, rng, name="a"):
    raw, lab = make_volume(rng)
    tif = tmp_path / f"{name}.tif"
    tifffile.imwrite(tif, raw.data)
    h5 = tmp_path / f"{name}_labels.h5"
    with h5py.File(h5, "w") as f:
        f["cells"] = lab.data
    return tif, h5


def test_cli_single_volume_leaves_inputs_unchanged(tmp_path, rng, episeg):
    tif, h5 = write_inputs(tmp_path, rng)
    before = sha(tif), sha(h5)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("normalisation:\n  mode: percentile\ntargets:\n  boundaries: false\n")
    code, out, err = episeg("preprocess", "--raw", tif, "--labels", f"{h5}:cells", "--out",
                            tmp_path / "o.h5", "--config", cfg, "--normalise", "zscore",
                            "--quiet")
    assert code == 0, err
    assert (sha(tif), sha(h5)) == before
    assert "3 cells in labels" in out and "0 lost" in out and str(tmp_path / "o.h5") in out
    back = read_preprocessed(tmp_path / "o.h5")
    assert back["normalisation"]["mode"] == "zscore"  # the flag beats the file
    assert "boundaries" not in back and "cells_with_gaps" in back


def test_cli_batch_and_errors(tmp_path, rng, episeg):
    a = write_inputs(tmp_path, rng, "a")
    b = write_inputs(tmp_path, rng, "b")
    code, out, err = episeg("preprocess", "--pair", a[0], a[1], "--pair", b[0], b[1],
                            "--out-dir", tmp_path / "prep", "--factors", "1,0.5,0.5", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == [
        "a_preprocessed.h5", "b_preprocessed.h5"]
    assert read_preprocessed(tmp_path / "prep" / "b_preprocessed.h5")["raw"].shape == (12, 16, 16)

    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  conectivity: 2\n")
    code, out, err = episeg("preprocess", "--raw", a[0], "--out", tmp_path / "x.h5",
                            "--config", bad)
    assert code == 2 and str(bad) in err and "'targets.conectivity'" in err
    assert "Did you mean 'connectivity'" in err and "Traceback" not in err
    code, out, err = episeg("preprocess", "--raw", a[0], "--out", tmp_path / "x.h5",
                            "--factors=-1,1,1")
    assert code == 2 and "resample.factors" in err and "greater than 0" in err
    code, out, err = episeg("preprocess", "--raw", a[0], "--out", a[0].with_suffix(".h5"))
    assert code == 0  # a different file
    copy_in = tmp_path / "in.h5"
    with h5py.File(copy_in, "w") as f:
        f["raw"] = np.ones((4, 8, 8), np.float32) + np.arange(8)
    before = sha(copy_in)
    code, out, err = episeg("preprocess", "--raw", f"{copy_in}:raw", "--out", copy_in)
    assert code == 2 and "never overwritten" in err and sha(copy_in) == before
    assert not (tmp_path / "x.h5").exists()


def test_real_sample_patch(tmp_path, shared_data, episeg):
    src = shared_data / "sample_patch.h5"
    before = sha(src)
    out = tmp_path / "sample.h5"
    code, stdout, err = episeg("preprocess", "--raw", f"{src}:raw", "--labels", f"{src}:label",
                               "--out", out, "--quiet")
    assert code == 0, err
    assert sha(src) == before
    assert "106 cells in labels" in stdout and "lost" in stdout
    assert "already in the labels" in stdout  # ids split in this ground truth are explained
    back = read_preprocessed(out)
    chk = back["cell_check"]
    assert chk["n_cells"] == 106 and len(chk["split_in_labels_ids"]) > 0
    assert chk["n_merged"] == 0 and chk["n_lost"] == len(chk["lost_ids"]) < 106
    assert back["raw"].dtype == np.float32 and back["raw"].shape == (64, 200, 200)
    assert back["label"].dtype == np.uint16 and back["voxel_size_um"] is None
