"""Progress output: a bar on a terminal, a line every few seconds elsewhere (logs, pipes, CI)."""

from __future__ import annotations

import io

from dalle._progress import LineProgress, progress_bar


def test_without_a_terminal_updates_do_not_each_print(capsys) -> None:
    bar = progress_bar(1000, "sampling", "tok")  # pytest's captured stderr is not a terminal
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(loss="0.1234")
    bar.close()
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("sampling: 1000/1000 tok (100%)")
        and "loss 0.1234" in lines[0]
    )


def test_a_line_every_interval() -> None:
    out = io.StringIO()
    bar = LineProgress(None, "train dvae", "step", initial=5, file=out, interval=0.0)
    bar.update(2)
    bar.write("step 7: loss 1")
    bar.close()
    assert out.getvalue().splitlines()[0].startswith("train dvae: 7 step, ")
    assert out.getvalue().splitlines()[1] == "step 7: loss 1"
    assert len(out.getvalue().splitlines()) == 3


def test_a_terminal_gets_a_bar(monkeypatch) -> None:
    import sys

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress_bar(3, "x", "it")
    assert not isinstance(bar, LineProgress)
    bar.close()
