"""Exceptions raised by `dalle`.

Every error the library raises on bad input derives from :class:`DalleError`, so callers (and the CLI) can
tell a user mistake from a bug. Each also derives from the matching built-in exception (``ValueError``,
``OSError``, ...) so that generic ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class DalleError(Exception):
    """Base class of every error `dalle` raises on purpose."""


class ModelLoadError(DalleError, ValueError):
    """A weight file or model directory is missing, corrupt, truncated or of an unknown kind."""


class UnsafePickleError(ModelLoadError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


class DownloadError(DalleError, OSError):
    """A download failed (network, HTTP status, checksum) or network access is disabled."""


class ImageError(DalleError, ValueError):
    """An image could not be read or does not meet the requirements (size, mode, shape)."""


class TokenizerError(DalleError, ValueError):
    """A tokenizer model is missing or corrupt, or a caption cannot be encoded as asked."""


class ConfigError(DalleError, ValueError):
    """A configuration value is invalid or inconsistent."""


class CheckpointError(DalleError, RuntimeError):
    """A training checkpoint is missing, corrupt or incompatible, or training cannot continue."""


class OutOfMemoryError(DalleError, MemoryError):
    """A batch did not fit in memory; the message names the batch size that failed and what to try."""


__all__ = [
    "DalleError",
    "ModelLoadError",
    "UnsafePickleError",
    "DownloadError",
    "ImageError",
    "TokenizerError",
    "ConfigError",
    "CheckpointError",
    "OutOfMemoryError",
]
