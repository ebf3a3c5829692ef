"""Probabilities -> cells: touching cells come back as separate, touching cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from core.errors import ConfigError, VolumeDataError
from core.segment import SegmentParams, ball_um, cells_from_probabilities


def voronoi_tissue(shape=(20, 64, 64), n=8, seed=0):
    """Touching Voronoi cells filling a slab, background 0 above and below."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform([2, 0, 0], [shape[0] - 2, shape[1], shape[2]], size=(n, 3))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    d = ((grid[..., None, :] - pts) ** 2).sum(-1)
    labels = d.argmin(-1).astype(np.int32) + 1
    labels[:2] = 0
    labels[-2:] = 0
    return labels


def probabilities_from(labels):
    """What a perfect cells-with-gaps / boundary network would output (smoothed)."""
    boundary = find_boundaries(labels, connectivity=3, mode="outer")
    cells = ((labels > 0) & ~boundary).astype(np.float32)
    between = find_boundaries(labels, mode="inner") & (labels > 0)
    return (ndi.gaussian_filter(cells, 0.7), ndi.gaussian_filter(between.astype(np.float32), 0.7))


def n_cells(labels):
    return len(np.unique(labels[labels > 0]))


def best_iou(gt, pred):
    ious = []
    for i in np.unique(gt[gt > 0]):
        m = gt == i
        ids, counts = np.unique(pred[m], return_counts=True)
        j = ids[np.argmax(counts)]
        if j == 0:
            ious.append(0.0)
            continue
        inter = counts.max()
        ious.append(inter / np.count_nonzero(m | (pred == j)))
    return np.array(ious)


@pytest.mark.parametrize("use", ["cells", "both"])
def test_touching_cells_are_recovered_without_gaps(use):
    gt = voronoi_tissue()
    cp, bp = probabilities_from(gt)
    pred = cells_from_probabilities(cp, bp if use == "both" else None,
                                    voxel_size=(1, 1, 1),
                                    params=SegmentParams(min_cell_size_um3=10))
    assert n_cells(pred) == n_cells(gt)
    assert best_iou(gt, pred).min() > 0.85
    # touching again: inside the tissue no background voxel remains between cells
    assert np.count_nonzero((pred == 0) & (gt > 0)) < 0.02 * np.count_nonzero(gt)
    # background stays background
    assert np.count_nonzero(pred[gt == 0]) < 0.02 * np.count_nonzero(gt == 0) + 1


def test_output_ids_are_consecutive_and_small_dtype():
    gt = voronoi_tissue()
    cp, _ = probabilities_from(gt)
    pred = cells_from_probabilities(cp, voxel_size=(1, 1, 1),
                                    params=SegmentParams())
    ids = np.unique(pred)
    assert ids[0] == 0
    assert np.array_equal(ids[1:], np.arange(1, len(ids)))
    assert pred.dtype == np.uint8


def test_slabs_give_the_same_cells_as_one_block():
    gt = voronoi_tissue()
    cp, bp = probabilities_from(gt)
    # seeds must reach every slab (+ halo) their cell is in: a small erosion here
    whole = cells_from_probabilities(cp, bp, params=SegmentParams(slab_z=100, seed_erosion_um=0.6))
    slabs = cells_from_probabilities(cp, bp, params=SegmentParams(slab_z=3, seed_erosion_um=0.6))
    assert (whole == slabs).mean() > 0.999


def test_uint8_probabilities_equal_float_probabilities():
    gt = voronoi_tissue()
    cp, bp = probabilities_from(gt)
    a = cells_from_probabilities(cp, bp)
    b = cells_from_probabilities(np.round(cp * 255).astype(np.uint8),
                                 np.round(bp * 255).astype(np.uint8))
    assert n_cells(a) == n_cells(b)
    assert (a == b).mean() > 0.995


def test_tiny_cells_are_given_to_neighbours():
    gt = voronoi_tissue()
    cp, bp = probabilities_from(gt)
    plain = cells_from_probabilities(cp, bp, params=SegmentParams(min_cell_size_um3=0))
    sizes = np.sort(np.bincount(plain.ravel())[1:])
    limit = float(sizes[1]) + 0.5  # the two smallest cells are "too small"
    big = cells_from_probabilities(cp, bp, params=SegmentParams(min_cell_size_um3=limit))
    assert n_cells(big) == n_cells(plain) - 2
    # their voxels went to the neighbours, not to the background
    assert np.count_nonzero(big) > 0.97 * np.count_nonzero(gt)


def test_boundary_only_model_labels_regions_between_boundaries():
    gt = voronoi_tissue()
    _, bp = probabilities_from(gt)
    pred = cells_from_probabilities(boundary_prob=bp,
                                    params=SegmentParams(seed_threshold=0.3, merge_below=0))
    assert n_cells(pred) >= n_cells(gt)


def test_anisotropic_ball_has_fewer_slices_in_z():
    fp = ball_um(1.0, (1.0, 0.25, 0.25))
    assert fp.shape == (3, 9, 9)
    assert ball_um(0.1, (1.0, 1.0, 1.0)) is None


def test_bad_parameters_and_inputs_are_named():
    with pytest.raises(ConfigError, match="cell_threshold"):
        cells_from_probabilities(np.zeros((4, 4, 4)), params=SegmentParams(cell_threshold=1.5))
    with pytest.raises(VolumeDataError, match="3D"):
        cells_from_probabilities(np.zeros((4, 4)))
    with pytest.raises(VolumeDataError, match="needs"):
        cells_from_probabilities()


def test_small_memory_blocks_give_the_same_cells(monkeypatch):
    """A full lab stack is processed in blocks; blocks must not change the result."""
    import core.segment as seg

    gt = voronoi_tissue()
    cp, bp = probabilities_from(gt)
    whole = cells_from_probabilities(cp, bp)
    tissue = cp > 0.5
    closed_whole = seg.close_gaps(tissue, 2)
    monkeypatch.setattr(seg, "SLAB_VOXELS", 3 * 64 * 64)  # 3-slice blocks
    assert np.array_equal(seg.close_gaps(tissue, 2), closed_whole)
    blocks = cells_from_probabilities(cp, bp)
    assert (whole == blocks).mean() > 0.999
    # blocks flooded one at a time or several at once (threads) give the same cells
    monkeypatch.setattr(seg, "watershed_workers", lambda voxels: 1)
    np.testing.assert_array_equal(cells_from_probabilities(cp, bp), blocks)
    monkeypatch.setattr(seg, "watershed_workers", lambda voxels: 4)
    np.testing.assert_array_equal(cells_from_probabilities(cp, bp), blocks)


def test_a_tissue_channel_gives_the_exact_outline_of_the_tissue():
    """With a tissue probability the cells fill exactly the tissue, gaps and surface included."""
    gt = voronoi_tissue()
    cp, bp = probabilities_from(gt)
    # a network that sees cell interiors poorly near the tissue surface
    cp[2:4] *= 0.3
    cp[-4:-2] *= 0.3
    tissue = ndi.gaussian_filter((gt > 0).astype(np.float32), 0.5)
    with_tissue = cells_from_probabilities(cp, bp, tissue_prob=tissue, voxel_size=(1, 1, 1))
    without = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1))
    np.testing.assert_array_equal(with_tissue > 0, gt > 0)
    assert np.count_nonzero((without > 0) != (gt > 0)) > 0
    assert n_cells(with_tissue) == n_cells(gt)



def test_cells_keep_the_outermost_tissue_layer_the_network_is_unsure_of():
    """A trained network gives the outermost voxel layer of the tissue a tissue
    probability of ~0.4 (it is unsure where the surface is); the cells still
    reach the tissue surface, and nothing outside it becomes a cell."""
    gt = voronoi_tissue()
    cp, bp = probabilities_from(gt)
    inside = gt > 0
    surface = inside & ~ndi.binary_erosion(inside, border_value=1)
    tissue = np.where(inside, 0.95, 0.05).astype(np.float32)
    tissue[surface] = 0.4
    tissue[~inside & ndi.binary_dilation(inside)] = 0.25  # first layer outside
    cells = cells_from_probabilities(cp, bp, tissue_prob=tissue, voxel_size=(1, 1, 1))
    np.testing.assert_array_equal(cells > 0, inside)
    assert n_cells(cells) == n_cells(gt)
    at_half = cells_from_probabilities(cp, bp, tissue_prob=tissue, voxel_size=(1, 1, 1),
                                       params=SegmentParams(tissue_threshold=0.5))
    assert np.count_nonzero(inside & (at_half == 0)) >= np.count_nonzero(surface) // 2


def test_a_seeded_patch_of_doubtful_tissue_outside_the_cells_is_background():
    """A small bright blob in the lumen that the network half believes is tissue
    (a seed of its own, tissue probability ~0.7) is not a cell; the real cells
    stay, even one the tissue channel is as unsure of."""
    gt = voronoi_tissue((26, 64, 64))
    gt[:8] = 0  # a lumen above the cells
    cp, bp = probabilities_from(gt)
    tissue = ndi.gaussian_filter((gt > 0).astype(np.float32), 0.5)
    blob = np.zeros(gt.shape, bool)
    blob[1:5, 20:30, 20:30] = True
    cp[blob] = 0.9
    tissue[blob] = 0.7
    kept = cells_from_probabilities(cp, bp, tissue_prob=tissue, voxel_size=(1, 1, 1))
    assert not kept[blob].any()
    np.testing.assert_array_equal(kept > 0, gt > 0)
    assert n_cells(kept) == n_cells(gt)
    # a whole cell the tissue channel is unsure of is large: it stays
    unsure = gt == gt[15, 32, 32]
    tissue[unsure] = 0.7
    kept = cells_from_probabilities(cp, bp, tissue_prob=tissue, voxel_size=(1, 1, 1))
    assert (kept[unsure] > 0).all() and not kept[blob].any()
    off = cells_from_probabilities(cp, bp, tissue_prob=tissue, voxel_size=(1, 1, 1),
                                   params=SegmentParams(min_cell_tissue=0))
    assert off[blob].all() and n_cells(off) == n_cells(gt) + 1
    with pytest.raises(ConfigError, match="min_cell_tissue"):
        SegmentParams(min_cell_tissue=1.5).validate()

def lumen_lined_by_cells(shape=(8, 72, 72), n=20, r_lumen=12, r_out=32):
    """A ring of ``n`` wedge cells around a central lumen (ZYX, background 0):
    the labels, and the labels of a network that took the lumen for a cell."""
    _, y, x = np.indices(shape)
    cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    r = np.hypot(y - cy, x - cx)
    angle = np.arctan2(y - cy, x - cx)
    gt = np.where((r >= r_lumen) & (r < r_out),
                  1 + ((angle + np.pi) / (2 * np.pi) * n).astype(np.int32) % n, 0)
    seen = gt.copy()
    seen[r < r_lumen] = n + 1
    return gt.astype(np.int32), seen.astype(np.int32)


def test_a_lumen_taken_for_a_cell_becomes_background():
    from core.segment import many_neighbour_segments

    gt, seen = lumen_lined_by_cells()
    lumen = seen == seen.max()
    many = many_neighbour_segments(seen, 3.0)
    assert np.flatnonzero(many).tolist() == [seen.max()]  # it touches all 20 cells, a cell 3
    assert not many_neighbour_segments(gt, 3.0).any()
    cp, bp = probabilities_from(seen)
    tissue = (seen > 0).astype(np.float32)
    args = dict(tissue_prob=tissue, voxel_size=(1, 1, 1))
    said = []
    on = cells_from_probabilities(cp, bp, **args,  # the default: max_neighbours_factor 3
                                  params=SegmentParams(min_cell_size_um3=10, merge_below=0),
                                  progress=lambda event: said.append(event.message))
    assert any("1 segment(s) touching more than 3x" in m for m in said if m)
    off = cells_from_probabilities(cp, bp, **args,
                                   params=SegmentParams(min_cell_size_um3=10, merge_below=0,
                                                        max_neighbours_factor=0))
    # off, the lumen is a cell; on, that one segment is background, the rest stays
    lumen_cell = np.bincount(off[lumen]).argmax()
    assert lumen_cell > 0 and (off[lumen] == lumen_cell).mean() > 0.9
    assert not on[lumen].any()
    np.testing.assert_array_equal(on > 0, (off > 0) & (off != lumen_cell))
    assert n_cells(on) == n_cells(off) - 1
    with pytest.raises(ConfigError, match="max_neighbours_factor"):
        SegmentParams(max_neighbours_factor=1.0).validate()


def test_cells_cut_by_the_stack_border_keep_their_seeds():
    """Seed erosion treats the outside of the stack as cell, so edge fragments survive."""
    gt = np.zeros((12, 40, 40), np.int32)
    gt[:, :, :5] = 1  # a sliver of a cell cut by the X face (1.5 um)
    gt[:, :, 5:] = 2
    cp, bp = probabilities_from(gt)
    pred = cells_from_probabilities(cp, bp, voxel_size=(1.0, 0.3, 0.3),
                                    params=SegmentParams(seed_erosion_um=0.6,
                                                         min_seed_size_um3=1,
                                                         min_cell_size_um3=1))
    assert n_cells(pred) == 2


def test_tissue_probability_of_another_shape_is_refused():
    cp = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(VolumeDataError, match="tissue_prob"):
        cells_from_probabilities(cp, cp, tissue_prob=np.zeros((4, 8, 9), np.float32))


def test_distance_seeds_split_cells_joined_by_a_thick_neck():
    """Two balls joined by a neck the network saw as interior: distance seeds split them
    (no merging across weak walls here: there is no wall at all)."""
    shape = (24, 48, 80)
    zz, yy, xx = np.indices(shape)
    a = (zz - 12) ** 2 + (yy - 24) ** 2 + (xx - 20) ** 2 <= 11 ** 2
    b = (zz - 12) ** 2 + (yy - 24) ** 2 + (xx - 60) ** 2 <= 11 ** 2
    neck = (abs(zz - 12) <= 3) & (abs(yy - 24) <= 3) & (xx > 20) & (xx < 60)
    cell = (a | b | neck).astype(np.float32)
    boundary = np.zeros(shape, np.float32)
    common = dict(voxel_size=(1, 1, 1), tissue_prob=cell)
    interior = cells_from_probabilities(cell, boundary, **common,
                                        params=SegmentParams(seed_erosion_um=0))
    distance = cells_from_probabilities(cell, boundary, **common,
                                        params=SegmentParams(seed_method="distance", seed_h_um=1.0,
                                                              merge_below=0))
    assert n_cells(interior) == 1
    assert n_cells(distance) == 2
    assert len({distance[12, 24, 20], distance[12, 24, 60]}) == 2


def test_distance_seeds_in_slabs_equal_one_block(monkeypatch):
    """A stack much taller than the slabs: the same cells (ties may move a few voxels)."""
    gt = voronoi_tissue(shape=(72, 32, 32), n=24, seed=2)
    cp, bp = probabilities_from(gt)
    params = SegmentParams(seed_method="distance", seed_h_um=0.5)
    whole = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1), params=params)
    assert n_cells(whole) >= 20
    import core.segment
    monkeypatch.setattr(core.segment, "SLAB_VOXELS", 32 * 32 * 6)
    slabs = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1), params=params)
    assert n_cells(slabs) == n_cells(whole)
    assert np.count_nonzero(slabs != whole) < 1e-3 * whole.size


def test_cascade_seeds_split_large_cells_and_keep_small_ones():
    """One setting for all sizes: two large cells joined by a bridge are cut by the deep
    erosion, a small cell the deep erosion would erase keeps its seed, and a sliver cut
    by the stack face keeps its seed too (no merging: these cells have no walls)."""
    shape = (24, 60, 120)
    zz, yy, xx = np.indices(shape)
    big_a = (zz - 12) ** 2 + (yy - 30) ** 2 + (xx - 25) ** 2 <= 10 ** 2
    big_b = (zz - 12) ** 2 + (yy - 30) ** 2 + (xx - 60) ** 2 <= 10 ** 2
    bridge = (abs(zz - 12) <= 1) & (abs(yy - 30) <= 1) & (xx > 25) & (xx < 60)
    small = (zz - 12) ** 2 + (yy - 30) ** 2 + (xx - 95) ** 2 <= 3 ** 2
    sliver = (xx < 2) & (abs(zz - 12) <= 6) & (abs(yy - 10) <= 6)
    cell = (big_a | big_b | bridge | small | sliver).astype(np.float32)
    boundary = np.zeros(shape, np.float32)
    common = dict(voxel_size=(1, 1, 1), tissue_prob=cell)
    tiny = dict(min_seed_size_um3=1, min_cell_size_um3=1, merge_below=0)
    cascade = cells_from_probabilities(cell, boundary, **common,
                                       params=SegmentParams(seed_erosion_um=4, **tiny))
    deep = cells_from_probabilities(cell, boundary, **common,
                                    params=SegmentParams(seed_method="interior",
                                                         seed_erosion_um=4, **tiny))
    shallow = cells_from_probabilities(cell, boundary, **common,
                                       params=SegmentParams(seed_method="interior",
                                                            seed_erosion_um=1, **tiny))
    centres = [(12, 30, 25), (12, 30, 60), (12, 30, 95), (12, 10, 0)]
    assert len({int(cascade[c]) for c in centres}) == 4 and n_cells(cascade) == 4
    assert int(deep[12, 30, 95]) == 0  # a fixed deep erosion loses the small cell
    assert int(shallow[12, 30, 25]) == int(shallow[12, 30, 60])  # the bridge survives 1 voxel


def test_cascade_seeds_do_not_depend_on_the_number_of_cpus(monkeypatch):
    """The pieces run in threads, large boxes alone: the seeds and their numbers are
    the same on one CPU as on many, whichever boxes ran together."""
    import core.segment
    from core.segment import cascade_seeds

    rng = np.random.default_rng(3)
    interior = ndi.gaussian_filter(rng.random((20, 96, 96)), 2) > 0.53
    assert ndi.label(interior)[1] > 20  # many pieces, so that threads overlap
    vs = (1.0, 0.3, 0.3)
    monkeypatch.setattr(core.segment.os, "cpu_count", lambda: 1)
    one, n_one = cascade_seeds(interior, vs, 3.0, 5.0)
    monkeypatch.setattr(core.segment.os, "cpu_count", lambda: 8)
    many, n_many = cascade_seeds(interior, vs, 3.0, 5.0)
    # a memory share so small that the larger pieces' boxes run alone between the others
    monkeypatch.setattr(core.segment, "CASCADE_MEMORY_BYTES", 8 * 32 * 300)  # 300 voxels
    mixed, n_mixed = cascade_seeds(interior, vs, 3.0, 5.0)
    assert n_one > 20 and n_one == n_many == n_mixed
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(one, mixed)


def test_cascade_levels_reach_the_deepest_erosion():
    from core.segment import cascade_levels

    assert cascade_levels(2.0) == (0.0, 0.6, 1.0, 1.5, 2.0)
    assert cascade_levels(0.0) == (0.0,)


def test_releasing_a_memory_mapped_map_keeps_its_values(tmp_path):
    """The pages a large probability map leaves behind are given back, the data stay."""
    from core.scratch import release_pages

    probs = np.memmap(tmp_path / "p.u8", dtype=np.uint8, mode="w+", shape=(3, 8, 16, 16))
    probs[:] = np.arange(probs.size, dtype=np.uint64).reshape(probs.shape) % 251
    expected = np.asarray(probs).copy()
    release_pages(probs[1])  # a channel view shares the mapping
    np.testing.assert_array_equal(np.asarray(probs), expected)
    gt = voronoi_tissue(shape=(8, 32, 32), n=6, seed=1)
    cp, bp = probabilities_from(gt)
    mm = np.memmap(tmp_path / "c.u8", dtype=np.uint8, mode="w+", shape=(2,) + gt.shape)
    mm[0], mm[1] = np.round(cp * 255), np.round(bp * 255)
    a = cells_from_probabilities(mm[0], mm[1], voxel_size=(1, 1, 1))
    b = cells_from_probabilities(np.array(mm[0]), np.array(mm[1]), voxel_size=(1, 1, 1))
    np.testing.assert_array_equal(a, b)


def _rss_file_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile"):
                return int(line.split()[1]) / 1024
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc")
def test_the_cell_step_gives_back_the_pages_of_a_memory_mapped_map(tmp_path):
    """A 96 MiB memory-mapped probability map does not stay in the process' memory
    after the cells are made (a full stack's maps would otherwise add ~750 MiB)."""
    from core.segment import _Prob

    shape = (3, 24, 1024, 1365)  # 3 channels of 32 MiB
    mm = np.memmap(tmp_path / "p.u8", dtype=np.uint8, mode="w+", shape=shape)
    mm[:] = 7
    mm.flush()
    del mm
    probs = np.memmap(tmp_path / "p.u8", dtype=np.uint8, mode="r", shape=shape)
    before = _rss_file_mib()
    prob = _Prob(probs[1], "boundary_prob")
    assert int(prob.above(0.01).sum()) == prob.a.size  # reads every page of the channel
    assert _rss_file_mib() - before > 24
    prob.release()
    assert _rss_file_mib() - before < 8


def test_label_counts_equal_a_bincount_of_the_whole_stack(monkeypatch):
    import core.volume as volume

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 300, size=(9, 17, 23)).astype(np.uint16)
    monkeypatch.setattr(volume, "COUNT_BLOCK_VOXELS", 2 * 17 * 23)  # blocks of 2 slices
    np.testing.assert_array_equal(volume.label_counts(labels), np.bincount(labels.ravel()))
    counts = volume.label_counts(labels, minlength=1000)
    assert len(counts) == 1000 and counts.sum() == labels.size
    assert volume.label_counts(np.zeros((2, 3, 4), np.uint8)).tolist() == [24]


@pytest.mark.parametrize("method", ["cascade", "interior"])
def test_working_arrays_on_disk_give_the_same_cells_and_leave_no_files(tmp_path, monkeypatch,
                                                                       method):
    """A large stack's masks, seeds and labels live in unlinked files (core.scratch):
    the cells and their flags are the same as in memory, and the folder stays empty."""
    import core.components as components
    import core.scratch as scratch
    from core.flags import cell_flags

    gt = voronoi_tissue(shape=(16, 48, 48), n=10, seed=4)
    cp, bp = probabilities_from(gt)
    params = SegmentParams(seed_method=method, min_cell_size_um3=30.0, seed_erosion_um=2.0,
                           merge_below=0)
    in_memory = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1), params=params)
    monkeypatch.setattr(scratch, "SCRATCH_ABOVE_BYTES", 0)
    monkeypatch.setattr(components, "BLOCK_VOXELS", 3 * 48 * 48)  # pieces labelled in slabs
    on_disk = cells_from_probabilities(cp, bp, voxel_size=(1, 1, 1), params=params,
                                       work_dir=tmp_path)
    assert isinstance(on_disk, np.memmap)
    np.testing.assert_array_equal(np.asarray(on_disk), in_memory)
    assert cell_flags(on_disk, bp, cp, voxel_size=(1, 1, 1)) == cell_flags(
        in_memory, bp, cp, voxel_size=(1, 1, 1))
    assert list(tmp_path.iterdir()) == []
    assert n_cells(in_memory) == 10



def test_no_room_for_a_working_file_is_a_clear_error(tmp_path, monkeypatch):
    """A full disk (or a folder that is gone) is named, with what to do, before any work."""
    import core.scratch as scratch
    from core.errors import VolumeWriteError

    monkeypatch.setattr(scratch, "SCRATCH_ABOVE_BYTES", 0)
    with pytest.raises(VolumeWriteError, match="free space there or choose another output folder"):
        scratch.scratch_array((4, 8, 8), np.uint8, tmp_path / "missing")


def test_the_cell_channel_corrects_a_boundary_channel_unsure_where_the_wall_is():
    # two cells meet between x = 19 and x = 20; the boundary channel sees a wide
    # flat wall two voxels off (x 14..21), the cell channel's gap is right (x 18..21)
    shape = (4, 8, 40)
    x = np.arange(shape[2])[None, None, :]
    boundary = np.broadcast_to(((x >= 14) & (x <= 21)).astype(np.float32), shape)
    cell = np.broadcast_to(((x <= 17) | (x >= 22)).astype(np.float32), shape)
    labels = cells_from_probabilities(cell, boundary, tissue_prob=np.ones(shape, np.float32),
                                      voxel_size=(1.0, 1.0, 1.0))
    row = labels[2, 4]
    assert len(np.unique(labels)) == 2 and row[0] != row[39]
    assert (row[:20] == row[0]).all() and (row[20:] == row[39]).all()


@pytest.mark.parametrize("voxel_size", [(1.0, 0.3, 0.3), (0.8, 0.25, 0.25), (1.0, 1.0, 1.0)])
def test_the_fast_erosions_keep_exactly_the_voxels_of_the_footprint(voxel_size):
    """erode_ball (one distance transform, for very large radii) and erode_by_rows
    (1-D minimum filters, the cascade's usual way) keep the same voxels as
    binary_erosion with ball_um's footprint, the stack's faces not eroding."""
    from core.segment import erode_ball, erode_by_rows

    rng = np.random.default_rng(5)
    for trial in range(6):
        mask = ndi.gaussian_filter(rng.random((14, 40, 40)), 2) > 0.5 - 0.02 * trial
        mask[:, :, :3] = True  # pieces cut by the faces
        mask[-2:] = True
        for radius in (0.6, 1.0, 2.0, 3.0):
            footprint = ball_um(radius, voxel_size)
            if footprint is None:  # under half a voxel: the cascade skips the level
                continue
            want = ndi.binary_erosion(mask, structure=footprint, border_value=1)
            np.testing.assert_array_equal(erode_ball(mask, radius, voxel_size), want)
            np.testing.assert_array_equal(erode_by_rows(mask, footprint), want)
    assert erode_ball(np.ones((3, 4, 5), bool), 3.0, voxel_size).all()
    assert erode_by_rows(np.ones((3, 4, 5), bool), ball_um(3.0, voxel_size)).all()


def test_an_erosion_footprint_of_other_rows_is_still_exact():
    """A footprint whose X rows are not centred runs falls back to binary_erosion."""
    from core.segment import erode_by_rows

    mask = ndi.gaussian_filter(np.random.default_rng(1).random((8, 30, 30)), 2) > 0.5
    footprint = np.zeros((3, 3, 5), bool)
    footprint[1, 1, 2:] = True  # a run off the middle
    footprint[0, 0, 0] = footprint[2, 2, 4] = True
    want = ndi.binary_erosion(mask, structure=footprint, border_value=1)
    np.testing.assert_array_equal(erode_by_rows(mask, footprint), want)
