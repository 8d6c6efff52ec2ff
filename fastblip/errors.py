"""One base class for every error a user can fix (issue 15's error policy).

The CLI prints a ``FastblipError`` as one line naming the file and the reason (``-v`` shows the traceback);
anything else is a bug and prints its full traceback. Library code raises these; it never imports the CLI.

The kinds below are what a user sees; the modules define narrower classes under them (``SourceError`` under
``InputError``, ``CheckpointMismatchError`` under ``ConfigError``, ...). Each kind also derives from the
builtin exception that code written before this policy caught (``ValueError``, ``FileNotFoundError``,
``ImportError``), so ``except ValueError`` around a library call keeps working; the CLI itself catches only
``FastblipError``, so a stray ``ValueError`` from a bug is shown with its traceback instead of one line.
"""

from __future__ import annotations


class FastblipError(Exception):
    """Input the user can fix: a bad recipe key, a missing or wrong file, an unavailable backend."""


class ConfigError(FastblipError, ValueError):
    """A bad recipe key or value (or a model config that cannot be built): one line naming the key."""


class UsageError(FastblipError, ValueError):
    """A command line that cannot be run as given (missing argument, unknown option)."""


class InputError(FastblipError, ValueError):
    """A file or value the user gave that cannot be used: an image, an annotation file, a text, a shard list."""


class NotFoundError(FastblipError, FileNotFoundError):
    """A path the user named that does not exist."""


class CheckpointError(FastblipError, ValueError):
    """A checkpoint that does not fit or cannot be read: unknown key, wrong shape, not a checkpoint, NaN."""


class RunDirError(FastblipError):
    """An output directory that a run cannot own: in use, holding another run, not writable, disk full."""


class DeviceError(FastblipError, ValueError):
    """A device that is not there (``--device cuda`` on a machine without a GPU)."""


class MissingDependencyError(FastblipError, ImportError):
    """An optional extra that is not installed (``pip install 'fastblip[eval]'``)."""


__all__ = ["FastblipError", "ConfigError", "UsageError", "InputError", "NotFoundError", "CheckpointError",
           "RunDirError", "DeviceError", "MissingDependencyError"]
