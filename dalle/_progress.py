"""Progress reporting that suits where the output goes.

On a terminal or in a notebook: a tqdm bar. Anywhere else (a log file, a pipe, CI): one plain line every
``interval`` seconds and one at the end, instead of a bar redrawn with carriage returns on every update,
which fills logs with thousands of overwritten lines.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

#: seconds between two lines when the output is not a terminal
LINE_INTERVAL = 10.0


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:  # pragma: no cover - an unusual IPython
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class LineProgress:
    """The tqdm calls dalle uses (``update``, ``set_postfix``, ``write``, ``total``, ``close``), printed as a
    line every ``interval`` seconds (and at the end) rather than redrawn in place."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        initial: int = 0,
        file: TextIO | None = None,
        interval: float = LINE_INTERVAL,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.postfix = ""
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit}{share}, {elapsed:.0f} s, {rate:.3g} {self.unit}/s{extra}"

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; print a line when ``interval`` seconds have passed since the last one."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self._line(), file=self.file, flush=True)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Values shown at the end of the next line (tqdm's signature)."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, message: str) -> None:
        """Print a message line."""
        print(message, file=self.file, flush=True)

    def close(self) -> None:
        """Print the final line (once)."""
        if not self._closed:
            self._closed = True
            print(self._line(), file=self.file, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", initial: int = 0) -> Any:
    """A tqdm bar on stderr when it is a terminal (or in a notebook), else a :class:`LineProgress`."""
    stream = sys.stderr
    if _in_notebook() or (hasattr(stream, "isatty") and stream.isatty()):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial=initial, file=stream)
