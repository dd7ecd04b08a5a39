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
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, dst)
