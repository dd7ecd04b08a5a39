"""Small file helpers shared by the writers (no torch import)."""

from __future__ import annotations

import os
import threading

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # reading the umask means setting it; keep other threads of this module out meanwhile
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename the finished temporary file ``tmp`` onto ``dst`` with ordinary permissions.

    Temporary files from ``tempfile.mkstemp`` (and safetensors' writer) are private (0600); a model directory
    copied into a package or shared on a server must be readable like any file the user creates, so the
    mode becomes ``0666 & ~umask`` before the atomic rename.
    """
    ordinary_permissions(tmp)
    os.replace(tmp, dst)


def ordinary_permissions(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a file the user creates would have (``0666 & ~umask``), e.g. after safetensors
    wrote it private (0600)."""
    os.chmod(path, 0o666 & ~_umask())
