"""Sliding-window prediction: probabilities for a whole stack, memory bounded by the tile.

Axes are ZYX; the result has shape (C, Z, Y, X) with one sigmoid probability
per output channel of the network (see :func:`core.model.target_channels`).

How it works (:func:`predict_probabilities`):

* The volume is covered by overlapping tiles (:mod:`core.tiling`) whose starts
  are multiples of the network's total pooling, so each tile sees the pooling
  grid a whole-volume pass would see. Tiles are read one by one from the input
  (a NumPy array, ``np.memmap``, h5py dataset, ...): the stack is never loaded.
* Each tile's probabilities are weighted by a separable Gaussian (sigma = 1/8
  of the tile, as nnU-Net and MONAI) and added to an accumulator; the sum of
  weights is known in closed form (product of three 1D sums), so the blend is
  an exact weighted average: no seams, no weight volume.
* Tiles run in Z rows, and within a row in Y rows. As soon as a block can get
  no more tiles it is normalised, cast to ``out_dtype`` and written to ``out``
  (which may be an ``np.memmap`` or h5py dataset), then dropped. Memory holds
  one Y row of one Z row plus the Z overlap of one Z row, never the stack.
* Optional flip test-time augmentation averages the probabilities of the
  flipped inputs.
* Precision (``amp``, :mod:`core.precision`): CUDA runs under
  ``torch.autocast`` (float16); a CPU that computes bfloat16 in hardware
  (AVX512-BF16 / AMX) runs a bfloat16 copy of the network (about 2x faster
  than float32 there); other CPUs stay in float32 (bf16 is emulated there and
  far slower). Probabilities are accumulated and blended in float32 either way.
"""

from __future__ import annotations

import copy
import itertools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from core.errors import ConfigError, VolumeDataError
from core.jobs import CancelFlag, ProgressFn, ProgressReporter, check_cancelled
from core.model import fuse_batchnorm, required_divisor
from core.precision import check_cpu_bf16_network, cpu_has_native_bf16
from core.scratch import release_pages
from core.tiling import OverlapSpec, TileGrid, auto_tile_shape, make_grid

Triple = Tuple[int, int, int]

#: Default overlap between neighbouring tiles (fraction of the tile per axis).
DEFAULT_OVERLAP = 0.125
#: Activation memory allowed per batch of tiles on a CPU (bytes).
CPU_TILE_BUDGET = 1 << 30


# -- model preparation -------------------------------------------------------------------
def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {str(device)!r} was asked for but no CUDA GPU is available; use 'cpu'.")
    return dev


class _MkldnnConv3d(nn.Conv3d):
    """Conv3d that always takes oneDNN's kernel on the CPU.

    PyTorch sends a batch of one to its slow im2col kernel whenever
    N*C*Z*Y <= 20480 (e.g. the 1-channel input conv and the deeper levels of
    a tile); oneDNN is 2-3x faster there. Same weights, same results.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


def _cpu_fast_path_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.aten, "mkldnn_convolution")


def prepare_model(model: nn.Module, device: torch.device, cpu_fast: bool = True,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """Eval-mode copy of ``model`` on ``device`` ready for inference.

    Batch norm is folded into the convolutions. On a CPU (``cpu_fast``) the
    copy uses the channels_last_3d memory layout and oneDNN for every Conv3d,
    which measured 2-2.6x faster for the small preset on a 2-core AVX2 CPU.
    ``dtype`` bfloat16 gives a bf16 copy (for CPUs with native bf16). The
    caller's model is left untouched (mode, device, dtype and weights).
    """
    net = fuse_batchnorm(model) if any(isinstance(m, nn.BatchNorm3d) for m in model.modules()) \
        else copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net = net.to(device=device, dtype=dtype)
    if cpu_fast and device.type == "cpu":
        if _cpu_fast_path_available():
            for mod in net.modules():
                if type(mod) is nn.Conv3d and mod.padding_mode == "zeros" and isinstance(mod.padding, tuple):
                    mod.__class__ = _MkldnnConv3d
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def _param_dtype(net: nn.Module) -> torch.dtype:
    """The dtype the network's weights (and so its input) are in; float32 without weights."""
    p = next(iter(net.parameters()), None)
    return torch.float32 if p is None else p.dtype


def activation_bytes_per_voxel(model: nn.Module) -> float:
    """Rough peak bytes of float32 activations per input voxel of one tile.

    The first level dominates: at the top decoder the skip, the upsampled
    features, their concatenation and two conv outputs are alive at once
    (about 6 x base_features channels, plus margin for the allocator).
    """
    cfg = getattr(model, "cfg", None)
    f0 = getattr(cfg, "base_features", 32)
    return 4.0 * (6 * f0 + 8)


def _flip_sets(tta: Union[bool, Sequence[Sequence[int]]]) -> List[Tuple[int, ...]]:
    """Spatial axes (0=Z, 1=Y, 2=X) flipped in each pass."""
    if tta is True:
        return [c for r in range(4) for c in itertools.combinations((0, 1, 2), r)]
    if tta is False or tta is None:
        return [()]
    sets = []
    for f in tta:
        f = tuple(int(a) for a in f)
        if any(a not in (0, 1, 2) for a in f):
            raise ConfigError(f"Flip axes {f!r} for test-time augmentation must be among 0 (Z), 1 (Y), 2 (X).")
        sets.append(f)
    return sets or [()]


# -- reading ------------------------------------------------------------------------------
def _read_tile(image, start: Sequence[int], tile: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Tile ``[start, start + tile)`` of ``image``; the part past the end is reflected.

    The reflection is the one ``np.pad(image, mode="reflect")`` of the whole
    volume would give, so tiles agree with a whole-volume pass.
    """
    lo, hi, pads = [], [], []
    for s, t, n in zip(start, tile, shape):
        pad = max(0, s + t - n)
        a = min(s, max(0, n - 1 - pad)) if pad else s
        lo.append(a)
        hi.append(min(s + t, n))
        pads.append(pad)
    block = np.asarray(image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    if any(pads):
        block = np.pad(block, [(0, p) for p in pads], mode="reflect")
    return block[tuple(slice(s - a, s - a + t) for s, a, t in zip(start, lo, tile))]


# -- the predictor ---------------------------------------------------------------------
def predict_probabilities(
    model: nn.Module,
    image,
    *,
    tile_shape: Optional[Sequence[int]] = None,
    overlap: OverlapSpec = DEFAULT_OVERLAP,
    halo: Union[int, Sequence[int]] = 0,
    blend: str = "gaussian",
    batch_size: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    amp: bool = True,
    tta: Union[bool, Sequence[Sequence[int]]] = False,
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    out=None,
    out_dtype=np.float16,
    channels: Optional[Sequence[int]] = None,
    memory_budget_mb: Optional[float] = None,
    z_rows: Optional[Tuple[int, int]] = None,
    y_rows: Optional[Tuple[int, int]] = None,
    progress: ProgressFn = None,
    cancel: CancelFlag = None,
):
    """Per-voxel sigmoid probabilities of ``model`` over a whole ZYX stack.

    Parameters
    ----------
    model : the network (e.g. :class:`core.model.UNet3D`), returning logits
        (N, C, Z, Y, X) for input (N, 1, Z, Y, X). It is copied, not modified.
    image : ZYX array-like (NumPy array, ``np.memmap``, h5py dataset...),
        normalised like the training data (or raw, with ``transform``). Read
        tile by tile.
    tile_shape : (Z, Y, X) voxels per tile, rounded down to the network's
        total pooling; None picks a chunky tile that fits the memory budget
        and wastes little on overlap (:func:`core.tiling.auto_tile_shape`).
        Networks with group or instance norm depend on the tile size: give
        them tiles at least as large as their training patches.
    overlap : overlap of neighbouring tiles: fraction of the tile (float < 1)
        or voxels (int), per axis or one for all. Actual overlaps are at least this.
    halo : voxels at each tile face inside the volume that are given no weight
        (they see the tile's zero padding). With ``halo`` >= the network's
        receptive-field halo and no group/instance norm, the tiled result equals
        a whole-volume pass. Needs ``overlap >= 2 * halo`` voxels.
    blend : "gaussian" (default) or "constant" (plain mean; shows seams).
    batch_size : tiles per forward pass (None: 1 on a CPU, up to 4 on CUDA
        within the memory budget).
    device : "cpu", "cuda", torch.device or None (CUDA when available).
    amp : reduced precision where the device computes it fast: ``torch.autocast``
        float16 on CUDA, a bfloat16 network on a CPU with native bf16
        (:func:`core.precision.cpu_has_native_bf16`; elsewhere the CPU keeps
        float32). False: float32 everywhere (exact tiling, reproducible).
    tta : flip test-time augmentation: True = all 8 flips of Z, Y, X; or a list
        of axis tuples, e.g. ``[(), (2,), (1,), (1, 2)]``; probabilities are averaged.
    transform : elementwise function applied to every tile as read (e.g. a
        z-score with the stack's mean and std), so a raw stack needs no
        normalised float32 copy in memory.
    out : writable array-like of shape (C, Z, Y, X) (NumPy array, ``np.memmap``,
        h5py dataset) that receives the result block by block; None allocates
        a NumPy array of ``out_dtype``. A uint8 ``out`` receives 0..255 for 0..1.
    out_dtype : dtype of the allocated result (ignored when ``out`` is given).
    channels : indices of the network's output channels to keep, in this order
        (C = their number); None keeps all. Channels left out cost no memory.
    memory_budget_mb : activation memory allowed for one batch of tiles (None:
        1 GiB on a CPU, a quarter of the free GPU memory on CUDA).
    z_rows, y_rows : only write the block owned by tile rows ``[a, b)`` along Z
        and ``[c, d)`` along Y of the grid (:func:`row_blocks`), all of X; the
        tiles of the rows just before are run too, so the block is bit for bit
        what a whole run writes there. Used to spread one stack over workers
        (:mod:`core.distributed`); None: the whole stack.
    progress, cancel : job protocol (:mod:`core.jobs`); one event per batch of
        tiles; cancelling raises :class:`core.errors.JobCancelled` between
        batches, after the finished blocks were written to ``out``.

    Returns
    -------
    ``out`` (or the new array) with shape (C, Z, Y, X), probabilities in [0, 1].
    """
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeDataError(
            f"Prediction needs a 3D image (Z, Y, X), got shape {shape}; "
            "pick one channel and one time point first."
        )
    dev = resolve_device(device)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "in_channels", 1) != 1:
        raise ConfigError(
            f"The model expects {cfg.in_channels} input channels; prediction supports one-channel images."
        )
    divisor = required_divisor(cfg) if cfg is not None else (1, 1, 1)
    flips = _flip_sets(tta)
    channels_last = dev.type == "cpu"
    cpu_bf16 = bool(amp) and dev.type == "cpu" and cpu_has_native_bf16()
    if cpu_bf16:
        check_cpu_bf16_network()
    net = prepare_model(model, dev, cpu_fast=channels_last,
                        dtype=torch.bfloat16 if cpu_bf16 else torch.float32)
    use_amp = bool(amp) and dev.type == "cuda"

    # -- memory budget, tile shape, batch size --
    bpv = activation_bytes_per_voxel(model)
    if memory_budget_mb is not None:
        budget = float(memory_budget_mb) * 2**20
    elif dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = free / 4
    else:
        budget = CPU_TILE_BUDGET
    if use_amp:
        bpv /= 2
    if tile_shape is None:
        tile_shape = plan_grid(model, shape, overlap=overlap, device=dev,
                               memory_budget_mb=memory_budget_mb, amp=amp).tile_shape
    grid = make_grid(shape, tile_shape, overlap, divisor, halo=halo, blend=blend)
    tile = grid.tile_shape
    if batch_size is None:
        batch_size = 1 if dev.type == "cpu" else int(max(1, min(4, budget // (bpv * np.prod(tile)))))
    if int(batch_size) < 1:
        raise ConfigError(f"Batch size {batch_size!r} must be >= 1.")
    batch_size = int(batch_size)

    # -- output channels and the result array --
    n_ch = getattr(cfg, "out_channels", None)
    if n_ch is None:
        with torch.inference_mode():
            n_ch = int(net(torch.zeros((1, 1) + tuple(divisor), device=dev,
                                       dtype=_param_dtype(net))).shape[1])
    if channels is not None:
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 0 or max(channels) >= int(n_ch):
            raise ConfigError(f"Channels {channels} do not exist: the network has {n_ch} outputs.")
        n_ch = len(channels)
    full = (int(n_ch),) + shape
    if out is None:
        out = np.empty(full, dtype=out_dtype)
    elif tuple(getattr(out, "shape", ())) != full:
        raise ConfigError(
            f"The output array has shape {tuple(getattr(out, 'shape', ()))} but the prediction has "
            f"shape {full} (channels, Z, Y, X); allocate it with that shape."
        )

    rows = _check_rows(grid, z_rows, y_rows)
    n_run = (rows[1] - max(0, rows[0] - 1)) * (rows[3] - max(0, rows[2] - 1)) * len(grid.starts[2])
    _SlidingWindow(net, image, out, grid, dev, n_ch, flips, use_amp, channels_last, transform,
                   channels).run(
        batch_size, ProgressReporter(progress, "predict", total=n_run), cancel, rows
    )
    return out


def plan_grid(model: nn.Module, shape: Sequence[int], *, tile_shape=None,
              overlap: OverlapSpec = DEFAULT_OVERLAP, device=None,
              memory_budget_mb: Optional[float] = None, amp: bool = True) -> TileGrid:
    """The tile grid :func:`predict_probabilities` would use for a stack of ``shape``."""
    dev = resolve_device(device)
    cfg = getattr(model, "cfg", None)
    divisor = required_divisor(cfg) if cfg is not None else (1, 1, 1)
    if tile_shape is None:
        bpv = activation_bytes_per_voxel(model) / (2 if (amp and dev.type == "cuda") else 1)
        if memory_budget_mb is not None:
            budget = float(memory_budget_mb) * 2**20
        elif dev.type == "cuda":
            budget = torch.cuda.mem_get_info(dev)[0] / 4
        else:
            budget = CPU_TILE_BUDGET
        # keep every activation tensor below 2**31 elements (32-bit indexing in kernels)
        f0 = int(getattr(cfg, "base_features", 32))
        max_voxels = int(min(budget / bpv, 2**31 // (4 * f0)))
        tile_shape = auto_tile_shape(tuple(shape), divisor, max_voxels=max_voxels, overlap=overlap)
    return make_grid(tuple(shape), tile_shape, overlap, divisor)


def row_blocks(grid: TileGrid, z_rows_per_block: int = 2, y_rows_per_block: Optional[int] = None
               ) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Split a grid into blocks of whole tile rows, ``((a, b), (c, d))`` = Z rows x Y rows.

    Each block owns the voxels from the start of its first rows to the start of
    the rows after it (all of X); together the blocks cover the stack once. A
    block also runs the tile row before it (for its overlap), so fewer, larger
    blocks waste less: by default all of Y and ``z_rows_per_block`` Z rows.
    """
    nz, ny = len(grid.starts[0]), len(grid.starts[1])
    zs_per = max(1, int(z_rows_per_block))
    ys_per = ny if y_rows_per_block is None else max(1, int(y_rows_per_block))
    return [((a, min(nz, a + zs_per)), (c, min(ny, c + ys_per)))
            for a in range(0, nz, zs_per) for c in range(0, ny, ys_per)]


def block_extent(grid: TileGrid, z_rows: Tuple[int, int], y_rows: Tuple[int, int]
                 ) -> Tuple[slice, slice]:
    """The Z and Y voxel ranges a block of rows owns (all of X)."""
    out = []
    for ax, (a, b) in ((0, z_rows), (1, y_rows)):
        starts = grid.starts[ax]
        end = int(starts[b]) if b < len(starts) else grid.shape[ax]
        out.append(slice(int(starts[a]), min(end, grid.shape[ax])))
    return out[0], out[1]


def _check_rows(grid: TileGrid, z_rows, y_rows) -> Tuple[int, int, int, int]:
    nz, ny = len(grid.starts[0]), len(grid.starts[1])
    a, b = z_rows if z_rows is not None else (0, nz)
    c, d = y_rows if y_rows is not None else (0, ny)
    if not (0 <= a < b <= nz and 0 <= c < d <= ny):
        raise ConfigError(f"Tile rows z {z_rows}, y {y_rows} are outside the grid's {nz} x {ny} rows.")
    return int(a), int(b), int(c), int(d)


class _SlidingWindow:
    """One prediction run: accumulators and the block-by-block flushing."""

    def __init__(self, net, image, out, grid: TileGrid, dev, n_ch, flips, use_amp, channels_last, transform,
                 channels=None):
        self.net, self.image, self.out, self.grid, self.dev = net, image, out, grid, dev
        self.n_ch, self.flips, self.use_amp, self.cl = n_ch, flips, use_amp, channels_last
        self.transform = transform
        self.channels = None if channels is None else torch.as_tensor(channels, device=dev)
        self.in_dtype = _param_dtype(net)  # bfloat16 for a bf16 CPU network
        f32 = dict(dtype=torch.float32, device=dev)
        self.w1d = [[torch.as_tensor(w, **f32) for w in grid.axis_weights(ax)] for ax in range(3)]
        self.inv = [torch.as_tensor(1.0 / grid.normaliser(ax), **f32) for ax in range(3)]
        self.uniform = all(h == 0 for h in grid.halo)
        self._w_cache: Optional[torch.Tensor] = None

    # weights of tile (i, j, k) as a (Z, Y, X) tensor
    def weight(self, i: int, j: int, k: int) -> torch.Tensor:
        if self.uniform and self._w_cache is not None:
            return self._w_cache
        wz, wy, wx = self.w1d[0][i], self.w1d[1][j], self.w1d[2][k]
        w = (wz[:, None, None] * wy[None, :, None]) * wx[None, None, :]
        if self.uniform:
            self._w_cache = w
        return w

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """Mean sigmoid probabilities (B, C, Z, Y, X) over the flips, float32."""
        x = torch.from_numpy(batch).to(self.dev, non_blocking=True)[:, None]
        if self.in_dtype != torch.float32:
            x = x.to(self.in_dtype)
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        acc = None
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            for f in self.flips:
                dims = [a + 2 for a in f]
                xi = torch.flip(x, dims) if dims else x
                logits = self.net(xi)
                if self.channels is not None:
                    logits = logits.index_select(1, self.channels)
                p = torch.sigmoid(logits.float())
                if dims:
                    p = torch.flip(p, dims)
                acc = p if acc is None else acc.add_(p)
            if len(self.flips) > 1:
                acc.div_(len(self.flips))
        return acc

    def read(self, start) -> np.ndarray:
        t = _read_tile(self.image, start, self.grid.tile_shape, self.grid.shape)
        if self.transform is not None:
            t = self.transform(t)
        t = np.asarray(t, dtype=np.float32)
        if not np.isfinite(t).all():
            z, y, x = start
            raise VolumeDataError(
                f"The image has NaN or infinite values in the tile starting at z={z}, y={y}, x={x}; "
                "fix or mask them before predicting."
            )
        return t

    def flush(self, block: torch.Tensor, z0: int, y0: int) -> None:
        """Normalise ``block`` (C, z, y, Xp) at global (z0, y0) and write the part inside the volume."""
        Z, Y, X = self.grid.shape
        nz = min(block.shape[1], Z - z0)
        ny = min(block.shape[2], Y - y0)
        if nz <= 0 or ny <= 0:
            return
        b = block[:, :nz, :ny, :X]
        b = b * self.inv[0][z0:z0 + nz, None, None] * self.inv[1][y0:y0 + ny, None] * self.inv[2][:X]
        b = b.clamp_(0.0, 1.0)
        if np.dtype(self.out.dtype) == np.uint8:  # probabilities 0..1 stored as 0..255
            b = b.mul_(255.0).round_()
        b = b.cpu().numpy()
        self.out[:, z0:z0 + nz, y0:y0 + ny, :] = b.astype(self.out.dtype, copy=False)
        release_pages(self.out)  # a memory-mapped output's written pages leave the heap

    def run(self, batch_size: int, rep: ProgressReporter, cancel: CancelFlag,
            rows: Tuple[int, int, int, int]) -> None:
        """Tiles of Z rows [a - 1, b) x Y rows [c - 1, d); write what rows [a, b) x [c, d) own.

        The rows just before a block only add their overlap to it, with the same
        operations in the same order as a whole run: blocks are bit for bit equal.
        """
        g = self.grid
        tz, ty, tx = g.tile_shape
        Xp = g.padded_shape[2]
        C = self.n_ch
        zs_all, ys_all, xs_all = (list(map(int, s)) for s in g.starts)
        a, b, c, d = rows
        f32 = dict(dtype=torch.float32, device=self.dev)
        # carry_in: contributions of earlier Z rows to [zs_r, zs_r + len) x all Y, X
        carry_in: Optional[torch.Tensor] = None
        done = 0
        rep.update(0, message=f"{g.n_tiles} tiles of {tz}x{ty}x{tx} voxels")
        for r in range(max(0, a - 1), b):
            zs = zs_all[r]
            z_next = zs_all[r + 1] if r + 1 < len(zs_all) else zs + tz  # rows below start here
            keep = zs + tz - z_next  # voxels of this row that later rows still add to
            carry_out = torch.zeros((C, keep, g.padded_shape[1], Xp), **f32) if keep > 0 else None
            # work: this Z row, Y range [y_lo, y_lo + ty), all X
            work = torch.zeros((C, tz, ty, Xp), **f32)
            y_lo = ys_all[max(0, c - 1)]
            for j in range(max(0, c - 1), d):
                ys = ys_all[j]
                if ys != y_lo:  # shift the rolling Y buffer
                    s = ys - y_lo
                    work[:, :, : ty - s] = work[:, :, s:].clone()
                    work[:, :, ty - s:] = 0
                    y_lo = ys
                starts = [(zs, ys, xs) for xs in xs_all]
                for b0 in range(0, len(starts), batch_size):
                    check_cancelled(cancel, "Prediction")
                    chunk = starts[b0:b0 + batch_size]
                    probs = self.forward(np.stack([self.read(s) for s in chunk]))
                    for (_, _, xs), p in zip(chunk, probs):
                        k = xs_all.index(xs)
                        work[:, :, :, xs:xs + tx].addcmul_(p, self.weight(r, j, k))
                    done += len(chunk)
                    rep.update(done, message=f"tile {done}/{g.n_tiles}")
                # Y block [ys, y_next) of this Z row can get no more tiles from this row
                y_next = ys_all[j + 1] if j + 1 < len(ys_all) else ys + ty
                blk = work[:, :, : y_next - ys]
                if carry_in is not None:
                    blk[:, : carry_in.shape[1]] += carry_in[:, :, ys:y_next]
                if r >= a and j >= c:  # a row just before the block only lends its overlap
                    self.flush(blk[:, : z_next - zs], zs, ys)
                if carry_out is not None:
                    carry_out[:, :, ys:y_next] = blk[:, z_next - zs:]
            carry_in = carry_out
