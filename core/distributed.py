"""Spread the network over many processes or machines with dask.distributed.

``episeg predict --workers N`` (a local cluster of N processes) or
``--scheduler ADDRESS`` (a cluster already running, e.g. on SLURM with
dask-jobqueue) hands each stack's network pass to :class:`DaskPredictor`:

1. the normalised (and, if needed, resampled) image is written once to a
   chunked zarr store in the work folder, slab by slab, so workers on other
   machines read only the parts they need and no process holds the stack;
2. the tile grid of a single-process run (:func:`core.predict.plan_grid`) is
   cut into blocks of whole tile rows (:func:`core.predict.row_blocks`); each
   block is one task: a worker loads the model once, runs the tiles of its
   rows and the row before, and saves the probabilities it owns as one small
   ``.npy`` file (atomic). A block is bit for bit what the single-process run
   writes there, so the cells are identical too;
3. the client copies the blocks into the probability array and the cells are
   found as usual (:func:`core.segment.cells_from_probabilities`, on the
   client, slab by slab).

Finished blocks stay in ``WORK/episeg-blocks-<key>/`` until the stack is done:
a run that was interrupted (cancel, crash, a lost worker) starts again where
it stopped. The key covers the model file, the image and the settings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from core.errors import ConfigError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled, is_cancelled

#: Z slices per slab when the image is written to the zarr store.
SLAB_Z = 16


def _need_dask():
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
        import zarr  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"Spreading prediction over workers needs dask.distributed and zarr ({err.name} is "
            "missing): pip install 'dask[distributed]' zarr (or episeg[cluster]).") from None


def make_client(workers: Optional[int] = None, scheduler: Optional[str] = None,
                threads_per_worker: int = 1):
    """A dask client: to the scheduler at ``scheduler``, or a local cluster of ``workers``
    processes (each with ``threads_per_worker`` threads for PyTorch)."""
    _need_dask()
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise ConfigError(f"Cannot reach the dask scheduler at {scheduler} ({err}); check the "
                              "address (tcp://HOST:8786) and that the scheduler runs.") from None
    if not workers or workers < 1:
        raise ConfigError(f"--workers {workers}: give 1 or more worker processes.")
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=int(threads_per_worker),
                           processes=True, dashboard_address=":0")
    return Client(cluster)


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _image_digest(image, n_samples: int = 64) -> str:
    """A cheap fingerprint of a stack: its shape and a few strided slices."""
    h = hashlib.sha1(repr(tuple(image.shape)).encode())
    step = max(1, image.shape[0] // n_samples)
    for z in range(0, image.shape[0], step):
        h.update(np.ascontiguousarray(np.asarray(image[z][::7, ::7], dtype=np.float32)).tobytes())
    return h.hexdigest()[:12]


def write_zarr(image, path: Path, chunks: Sequence[int], *, cancel: CancelFlag = None):
    """Copy a ZYX array-like (float32 values) into a zarr array at ``path``, slab by slab."""
    import zarr

    z = zarr.open_array(str(path), mode="w", shape=tuple(image.shape), dtype="float32",
                        chunks=tuple(int(c) for c in chunks))
    for z0 in range(0, image.shape[0], SLAB_Z):
        check_cancelled(cancel, "Prediction")
        z[z0:z0 + SLAB_Z] = np.asarray(image[z0:z0 + SLAB_Z], dtype=np.float32)
    return z


@lru_cache(maxsize=2)
def _worker_model(model_path: str, mtime: float, device: str, threads: int):
    """The model, loaded once per worker process (cached by path and file time)."""
    import torch

    from core.checkpoint import load_model_for_inference

    if threads > 0:
        torch.set_num_threads(threads)
    model, _info = load_model_for_inference(model_path, device)
    return model


def run_block(model_path: str, image_path: str, block_file: str, z_rows: Tuple[int, int],
              y_rows: Tuple[int, int], tile_shape: Tuple[int, int, int], overlap, device: str,
              tta: bool, batch_size: Optional[int], n_channels: int, threads: int = 0,
              channels: Optional[Sequence[int]] = None) -> str:
    """One task, on a worker: the probabilities (uint8) of one block of tile rows -> ``block_file``."""
    import zarr

    from core.io.atomic import atomic_path
    from core.predict import block_extent, plan_grid, predict_probabilities

    if os.path.exists(block_file):
        return block_file
    from core.predict import resolve_device

    device = str(resolve_device(None if device == "auto" else device))
    image = zarr.open_array(image_path, mode="r")
    model = _worker_model(model_path, os.path.getmtime(model_path), device, threads)
    grid = plan_grid(model, tuple(image.shape), tile_shape=tile_shape, overlap=overlap)
    zs, ys = block_extent(grid, z_rows, y_rows)
    out = _BlockOut((n_channels,) + tuple(image.shape), zs, ys)
    predict_probabilities(model, image, tile_shape=tile_shape, overlap=overlap, device=device,
                          tta=tta, batch_size=batch_size, out=out, z_rows=z_rows, y_rows=y_rows,
                          channels=channels)
    with atomic_path(block_file) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, out.data)
    return block_file


class _BlockOut:
    """An ``out`` for :func:`predict_probabilities` that keeps only one block (uint8)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, shape, zs: slice, ys: slice):
        self.shape, self.zs, self.ys = shape, zs, ys
        self.data = np.zeros((shape[0], zs.stop - zs.start, ys.stop - ys.start, shape[3]), np.uint8)

    def __setitem__(self, index, value) -> None:
        _, zsl, ysl, _ = index
        z0, z1 = zsl.start - self.zs.start, zsl.stop - self.zs.start
        y0, y1 = ysl.start - self.ys.start, ysl.stop - self.ys.start
        if z0 < 0 or y0 < 0 or z1 > self.data.shape[1] or y1 > self.data.shape[2]:
            raise RuntimeError("a block wrote outside the part it owns")
        self.data[:, z0:z1, y0:y1, :] = value


class DaskPredictor:
    """Drop-in for :func:`core.predict.predict_probabilities` that runs blocks on a dask cluster.

    ``client``: a ``distributed.Client``; ``model_path``: the model file the
    workers load (the same one the caller's model came from); ``work_dir``:
    where the zarr image and the finished blocks live (shared by all workers:
    on a cluster, a shared file system); ``z_rows_per_block``: tile rows per task.
    """

    def __init__(self, client, model_path, work_dir: Optional[Path] = None,
                 z_rows_per_block: int = 2, threads_per_task: int = 0):
        _need_dask()
        self.client = client
        self.model_path = str(Path(model_path).resolve())
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
        self.z_rows_per_block = int(z_rows_per_block)
        self.threads = int(threads_per_task)
        self.last_run: Dict[str, Any] = {}

    def __call__(self, model, image, *, tile_shape=None, overlap=None, batch_size=None,
                 device=None, tta=False, out=None, channels=None, progress: ProgressFn = None,
                 cancel: CancelFlag = None, **_ignored):
        from core.predict import DEFAULT_OVERLAP, block_extent, plan_grid, row_blocks

        overlap = DEFAULT_OVERLAP if overlap is None else overlap
        # "auto": each worker takes its GPU when it has one; the tiles are planned for a CPU
        device = "auto" if device in (None, "auto") else str(device)
        rep = ProgressReporter(progress, "predict")
        grid = plan_grid(model, image.shape, tile_shape=tile_shape, overlap=overlap,
                         device="cpu" if device == "auto" else device)
        tile = tuple(int(t) for t in grid.tile_shape)
        blocks = row_blocks(grid, self.z_rows_per_block)
        n_ch = int(out.shape[0])
        channels = None if channels is None else [int(c) for c in channels]
        key = hashlib.sha1(repr((_file_digest(Path(self.model_path)), _image_digest(image), tile,
                                 overlap, bool(tta), batch_size, device, channels)
                                ).encode()).hexdigest()[:16]
        folder = self.work_dir / f"episeg-blocks-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        image_path = folder / "image.zarr"
        if not (folder / "image.done").exists():
            rep.message(f"writing the image to {image_path} for the workers")
            write_zarr(image, image_path, (min(tile[0], image.shape[0]),) + tuple(image.shape[1:]),
                       cancel=cancel)
            (folder / "image.done").write_text("ok\n")
        files = [str(folder / f"block_{i:04d}.npy") for i in range(len(blocks))]
        todo = [i for i, f in enumerate(files) if not os.path.exists(f)]
        n_workers = len(self.client.scheduler_info().get("workers", {}))
        rep.message(f"{len(blocks)} blocks of tile rows ({len(blocks) - len(todo)} already done) "
                    f"on {n_workers} dask workers")
        futures = [self.client.submit(run_block, self.model_path, str(image_path), files[i],
                                      blocks[i][0], blocks[i][1], tile, overlap, device, bool(tta),
                                      batch_size, n_ch, self.threads, channels, pure=False)
                   for i in todo]
        from distributed import as_completed

        done = len(blocks) - len(todo)
        counter = ProgressReporter(progress, "predict", total=len(blocks))
        counter.update(done, message="")
        try:
            for fut in as_completed(futures):
                if is_cancelled(cancel):
                    break
                fut.result()  # raises a worker's error here
                done += 1
                counter.update(done, message=f"block {done}/{len(blocks)}")
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:
                self.client.cancel(pending)
        check_cancelled(cancel, "Prediction")
        for (zr, yr), f in zip(blocks, files):
            zs, ys = block_extent(grid, zr, yr)
            out[:, zs, ys, :] = np.load(f)
        shutil.rmtree(folder, ignore_errors=True)  # the stack is done: nothing to resume
        self.last_run = {"blocks": len(blocks), "resumed": len(blocks) - len(todo),
                         "workers": n_workers, "tile": tile}
        return out


def close_client(client) -> None:
    """Close a client and the local cluster it started (if any)."""
    cluster = getattr(client, "cluster", None)
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()

