"""The one family of exceptions for problems a user can cause.

Every message says what is wrong, where (file, dataset, key or value) and what
to do about it. The command line prints the message without a traceback and
exits non-zero; the GUI shows it in a dialog and keeps running.
"""

from __future__ import annotations


class EpiSegError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the full message."""


class VolumeReadError(EpiSegError):
    """A file could not be read: missing, unreadable, corrupt, unsupported format."""


class VolumeDataError(EpiSegError):
    """A file was read but its data cannot be used: wrong dimensions, NaN, dtype..."""


class VolumeWriteError(EpiSegError):
    """An output could not be written: no permission, no space, bad extension."""


class ConfigError(EpiSegError):
    """A configuration value or key is wrong (YAML file, command-line flag, GUI form)."""


class ModelFileError(EpiSegError):
    """A model file is missing, corrupt or not a plain EpiSeg checkpoint."""


class JobCancelled(EpiSegError):
    """A long job was cancelled by the user; whatever it had finished is kept."""
