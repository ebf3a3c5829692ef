"""Time and peak memory of core.metrics.evaluate on a 234 x 1024 x 1024 uint16 pair."""
import sys, time, tracemalloc, resource
import numpy as np
from scipy.spatial import cKDTree
sys.path.insert(0, "/work/main")
from core.metrics import evaluate

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

rng = np.random.default_rng(0)
low = (117, 256, 256)
n_cells = int(sys.argv[1]) if len(sys.argv) > 1 else 800
pts = rng.uniform(0, 1, (n_cells, 3)) * low
t = time.time()
g = np.empty(low, np.uint16)
tree = cKDTree(pts)
grid_yx = np.stack(np.meshgrid(np.arange(low[1]), np.arange(low[2]), indexing="ij"), -1).reshape(-1, 2)
ids = rng.permutation(np.arange(1, 65535))[:n_cells].astype(np.uint16)  # non-consecutive
for z in range(low[0]):
    q = np.concatenate([np.full((len(grid_yx), 1), z), grid_yx], 1)
    g[z] = ids[tree.query(q)[1]].reshape(low[1:])
# a lumen (background tube) and background above/below the tissue
yy, xx = np.mgrid[:low[1], :low[2]]
g[:, (yy - 128) ** 2 + (xx - 128) ** 2 < 40 ** 2] = 0
g[:5] = 0; g[-5:] = 0
gt = np.repeat(np.repeat(np.repeat(g, 2, 0), 4, 1), 4, 2)
# prediction: shifted by 2 voxels in X, 20 merges, 20 splits, relabelled
pred = np.roll(gt, 2, axis=2)
present = np.unique(gt[gt > 0])
lut = np.zeros(65536, np.uint16)
lut[present] = rng.permutation(np.arange(1, 65535))[:len(present)]
for a, b in rng.choice(present, (20, 2), replace=False):
    lut[b] = lut[a]
pred = lut[pred]
for cid in rng.choice(present, 20, replace=False):
    new = lut.max() + 1
    m = pred[:, 512:, :] == lut[cid]
    pred[:, 512:, :][m] = new if new < 65535 else 1
print(f"built {gt.shape} {gt.dtype} with {len(present)} cells in {time.time()-t:.0f} s; rss {rss_mb():.0f} MB")
del g
rss0 = rss_mb()
t = time.time()
r = evaluate(gt, pred)
t_plain = time.time() - t
print(f"evaluate: {t_plain:.1f} s; max RSS {rss0:.0f} -> {rss_mb():.0f} MB")
t = time.time()
r3 = evaluate(gt, pred, components=False)
print(f"evaluate(components=False): {time.time()-t:.1f} s")
tracemalloc.start()
t = time.time()
r2 = evaluate(gt, pred)
cur, peak = tracemalloc.get_traced_memory()
print(f"evaluate under tracemalloc: {time.time()-t:.1f} s; peak traced {peak/2**20:.0f} MB "
      f"(one uint16 volume = {gt.nbytes/2**20:.0f} MB; slab 4 Mi voxels)")
d = r.to_dict()
for k in ("cell_iou", "background_iou", "n_gt_cells", "n_pred_cells", "wrong_cells", "wrong_components",
          "adapted_rand_error", "voi_split", "voi_merge", "ap50", "mean_matched_iou", "n_split", "n_merged"):
    print(k, d[k])
