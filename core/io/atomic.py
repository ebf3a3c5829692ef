"""Atomic writes: write to a hidden temporary file beside the target, then rename.

A crash, a full disk or a cancelled job never leaves half a file under the
target's name, and an existing file is replaced only once the new one is
complete. Errors from the operating system become :class:`VolumeWriteError`
with a message that says what to do.
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from core.errors import EpiSegError, VolumeWriteError

PathLike = Union[str, os.PathLike]

_NO_SPACE_TEXT = ("no space left", "disk full", "errno = 28", "not enough space")


def os_error_message(err: BaseException, target: Path) -> str:
    """A user-facing sentence for an OSError raised while writing ``target``."""
    code = getattr(err, "errno", None)
    text = str(err).lower()
    folder = target.parent
    if code == errno.ENOSPC or any(t in text for t in _NO_SPACE_TEXT):
        return (f"Not enough disk space to write {target}. Free some space on that "
                "disk or choose an output folder on another disk.")
    if code in (errno.EACCES, errno.EPERM) or "permission denied" in text:
        return (f"No permission to write {target}. Choose a folder you can write to, "
                "or check that the file is not open in another program (Fiji, MATLAB) "
                "and is not read-only.")
    if code == errno.EROFS or "read-only file system" in text:
        return (f"Cannot write {target}: the disk is read-only. Choose an output "
                "folder on a writable disk.")
    if code == errno.ENAMETOOLONG:
        return f"Cannot write {target}: the file name is too long. Use a shorter name."
    if code == errno.ENOENT and not folder.exists():
        return f"Cannot write {target}: the folder {folder} does not exist."
    return f"Cannot write {target}: {err}. Check the output path and the disk."


def _prepare_folder(target: Path) -> None:
    if target.is_dir():
        raise VolumeWriteError(
            f"Cannot write {target}: it is a folder. Give a file name inside it, "
            f"e.g. {target / 'volume.tif'}."
        )
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        raise VolumeWriteError(f"Cannot write {target}: {folder} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VolumeWriteError(os_error_message(err, target)) from err


@contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary file is named ``.NAME.tmp-XXXXXXXX`` in the target's folder
    (created if missing) and already exists (empty) when yielded. If the
    ``with`` block raises, the temporary file is removed and ``target`` is left
    as it was. OSErrors (no space, no permission, read-only disk) are re-raised
    as :class:`VolumeWriteError`.

    Example::

        with atomic_path("out.h5") as tmp:
            with h5py.File(tmp, "w") as f:
                f["raw"] = data
    """
    target = Path(os.fspath(target)).expanduser()
    _prepare_folder(target)
    while True:
        tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        except OSError as err:
            raise VolumeWriteError(os_error_message(err, target)) from err
        os.close(fd)
        break
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as err:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:  # pragma: no cover - best effort on exotic filesystems
            pass
        if isinstance(err, OSError) and not isinstance(err, EpiSegError):
            raise VolumeWriteError(os_error_message(err, target)) from err
        raise
