"""`episeg tune`: a model's post-processing chosen again on annotated stacks, written to a copy."""

from __future__ import annotations

import numpy as np
import pytest

from core.checkpoint import load_model_file, model_info, read_model_summary, save_model_file
from core.cli.main import main
from core.errors import ConfigError, VolumeDataError
from core.io import read_volume, write_volume
from core.pipeline import PredictConfig, segment_params
from core.resources import default_model, sample_stack
from core.segment import SegmentParams
from core.tune import tune_model
from core.volume import Volume
from tests.core.test_segment_choice import box_cells, probabilities

VOXEL = (1.0, 1.0, 1.0)


def fake_network(probs):
    """Stands in for the network: writes ``probs`` (by channel name) where the
    pipeline stores the model's outputs; tissue everywhere."""
    names = model_info(load_model_file(default_model())).channels

    def network(model, image, *, out, channels=None, **kw):
        # the centre of the maps when the stack given is the centre of the stack
        centre = tuple(slice((n - m) // 2, (n - m) // 2 + m)
                       for n, m in zip(probs["cell"].shape, out.shape[1:]))
        for i, c in enumerate(channels if channels is not None else range(len(names))):
            out[i] = np.round(probs.get(names[c], np.ones_like(probs["cell"]))[centre] * 255)
    return network


@pytest.fixture
def model_file(tmp_path):
    """The bundled model's weights, saved without a voxel size (the stacks here
    are not resampled)."""
    data = load_model_file(default_model())
    data["voxel_size_um"] = None
    return save_model_file(tmp_path / "model.pt", data)


def write_pair(folder, labels, voxel=VOXEL):
    raw, lab = folder / "stack.tif", folder / "stack_labels.tif"
    write_volume(raw, Volume(labels.astype(np.float32), voxel, "stack"))
    write_volume(lab, Volume(labels, voxel, "stack_labels"))
    return str(raw), str(lab)


def test_tuning_on_faint_walls_writes_a_copy_that_keeps_every_cell(tmp_path, model_file):
    gt = box_cells()
    # relief 0.425 at the walls: the shipped merge threshold (0.5) joins every cell
    probs = probabilities(gt, wall_cell=0.5, wall_boundary=0.35)
    pair = write_pair(tmp_path, gt)
    model = model_file
    before = model.read_bytes()
    out = tmp_path / "tuned.pt"
    events = []
    result = tune_model(model, [pair], out, config=PredictConfig(flags=False),
                        network=fake_network(probs), progress=events.append)

    assert model.read_bytes() == before  # the model itself is never changed
    info = model_info(load_model_file(out), out)
    assert info.segment == result.choice.chosen and info.segment["merge_below"] < 0.425
    assert segment_params(PredictConfig(), info).merge_below < 0.425
    summary = read_model_summary(out)["segment_choice"]
    assert summary["tuned_on"] == [pair[0]] and summary["cells"] == gt.max()
    # 16 cells are few: the summary says so, and how to do better
    assert f"{gt.max()} cells" in result.summary() and "episeg tune" in result.summary()
    assert "the shipped settings" in result.summary()  # what the model had before
    assert any(getattr(e, "stage", None) == "post-processing" for e in events)


def test_clear_walls_write_a_copy_with_the_shipped_settings(tmp_path, model_file):
    gt = box_cells()
    probs = probabilities(gt, wall_cell=0.02, wall_boundary=0.98)
    out = tmp_path / "tuned.pt"
    result = tune_model(model_file, [write_pair(tmp_path, gt)], out,
                        network=fake_network(probs))
    assert result.choice.chosen == {}
    assert model_info(load_model_file(out), out).segment == {}
    assert segment_params(PredictConfig(), model_info(load_model_file(out))) == SegmentParams()
    # a stack larger than max_voxels: the search segments its centre only, and says so
    events = []
    small = tune_model(model_file, [write_pair(tmp_path, gt)], tmp_path / "small.pt",
                       network=fake_network(probs), max_voxels=10 * 24 * 24,
                       progress=events.append)
    assert small.choice.cells == 4  # the centre 24 x 24 of 48 x 48: 2 x 2 of the 12-voxel cells
    assert any("the search uses its centre, 10 x 24 x 24 voxels" in (e.message or "")
               for e in events)


def test_a_stack_given_its_own_voxel_size_is_measured_in_it(tmp_path, model_file, monkeypatch):
    """A third item in a pair is the stack's voxel size: the seeds and merging are then
    tried with lengths in that size (as episeg predict would measure them), not the file's."""
    import core.tune

    seen = []
    real = core.tune.choose_segment_params

    def spy(cases, *args, **kwargs):
        seen.extend(tuple(c.voxel_size_um) for c in cases)
        return real(cases, *args, **kwargs)

    monkeypatch.setattr(core.tune, "choose_segment_params", spy)
    gt = box_cells()
    probs = probabilities(gt, wall_cell=0.02, wall_boundary=0.98)
    raw, lab = write_pair(tmp_path, gt)
    tune_model(model_file, [(raw, lab, (2.0, 0.5, 0.5)), (raw, lab, None)], tmp_path / "t.pt",
               network=fake_network(probs))
    assert seen == [(2.0, 0.5, 0.5), VOXEL]
    assert read_model_summary(tmp_path / "t.pt")["segment_choice"]["tuned_on"] == [raw, raw]


def test_mistakes_are_refused_with_the_file_named(tmp_path, model_file):
    gt = box_cells()
    raw, lab = write_pair(tmp_path, gt)
    copy = model_file
    with pytest.raises(ConfigError, match="never overwritten"):
        tune_model(copy, [(raw, lab)], copy)
    with pytest.raises(ConfigError, match="at least one"):
        tune_model(copy, [], tmp_path / "out.pt")
    other = tmp_path / "other_labels.tif"
    write_volume(other, Volume(gt[:, :40].copy(), VOXEL, "other"))
    with pytest.raises(VolumeDataError, match="other_labels.tif"):
        tune_model(copy, [(raw, str(other))], tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_the_command_tunes_the_bundled_model_on_a_sample_stack(tmp_path, capsys):
    crop = np.s_[:24, :96, :96]
    for name in ("raw", "labels"):
        stack = read_volume(sample_stack(f"synthetic_epithelium_{name}.tif"))
        write_volume(tmp_path / f"{name}.tif",
                     Volume(stack.data[crop].copy(), stack.voxel_size, name))
    out = tmp_path / "tuned.pt"
    assert main(["tune", "--model", str(default_model()), "--pair", str(tmp_path / "raw.tif"),
                 str(tmp_path / "labels.tif"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "post-processing" in printed and str(out) in printed
    choice = read_model_summary(out)["segment_choice"]
    assert choice["settings_tried"] > 20 and choice["cells"] > 10
