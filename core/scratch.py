"""Working arrays of a whole stack that live on disk when they are large.

A 234 x 1024 x 1024 stack needs several stack-sized working arrays on its way
to cells (probabilities, masks, seeds, labels: 1-2 bytes per voxel each). Kept
in the heap they make memory grow with the stack; here each one larger than
:data:`SCRATCH_ABOVE_BYTES` is a memory-mapped file that is unlinked at once
(nothing is left behind on a crash, POSIX), and :func:`release_pages` hands
the pages a pass has touched back to the OS. The data stay in the file, so the
process holds a slab's worth of memory, and a stack larger than the memory
still finishes: the OS writes such pages out instead of running out.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from core.errors import VolumeWriteError

#: Working arrays above this many bytes go to a memory-mapped temporary file.
SCRATCH_ABOVE_BYTES = 128 * 1024 ** 2


def scratch_array(shape: Tuple[int, ...], dtype, folder: Optional[Union[str, Path]] = None,
                  above_bytes: Optional[int] = None) -> np.ndarray:
    """A zero-filled array of ``shape`` and ``dtype``: in memory when small, otherwise a
    memory-mapped unlinked file in ``folder`` (default: the system's temporary folder).

    ``above_bytes`` overrides :data:`SCRATCH_ABOVE_BYTES`.
    """
    dtype = np.dtype(dtype)
    limit = SCRATCH_ABOVE_BYTES if above_bytes is None else int(above_bytes)
    if int(np.prod(shape)) * dtype.itemsize <= limit:
        return np.zeros(shape, dtype=dtype)
    folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    nbytes = int(np.prod(shape)) * dtype.itemsize
    try:
        # an anonymous temporary file: unlinked at once on POSIX, deleted when the last
        # handle (the mapping's own) closes on Windows; nothing is left behind on a crash
        with tempfile.TemporaryFile(prefix=".episeg-", dir=folder) as handle:
            if hasattr(os, "posix_fallocate"):
                # reserve the blocks now: a sparse file on a full disk would crash the
                # process later (SIGBUS) instead of failing here with a message
                os.posix_fallocate(handle.fileno(), 0, nbytes)
            return np.memmap(handle, dtype=dtype, mode="w+", shape=tuple(shape))
    except OSError as err:
        raise VolumeWriteError(
            f"Could not make a {nbytes / 1024 ** 3:.1f} GiB working file in {folder} "
            f"({err.strerror or err}). Large stacks keep their working arrays on disk "
            "beside the outputs: free space there or choose another output folder.") from err


def release_pages(*arrays) -> None:
    """Let the OS take back the pages of memory-mapped arrays that this process touched.

    The data stay in the file (and the page cache); the next read maps them
    again. No-op for arrays in memory and for views that lost their mapping
    (``np.asarray`` of a memmap: keep the memmap itself to release it).
    """
    for array in arrays:
        if getattr(array, "mode", None) == "c":
            continue  # copy-on-write: dropping the pages would drop the changes
        mm = getattr(array, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass
