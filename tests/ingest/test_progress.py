"""Progress without a terminal: a line at the start, at least every 30 s with rate and ETA, and at the end
(a fake clock, no sleeping); a bar on a terminal; `tqdm.auto` in a notebook; the GGUF bar replaced."""

from __future__ import annotations

import io

import pytest

from selfrepair.ingest import progress as P


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_without_a_tty_a_line_every_30_s_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    bar = P.Progress("ablation sweep", total=1000, unit="abl", stream=out, clock=clock, heartbeat=False)
    assert bar.bar is None and _lines(out) == ["ablation sweep: 1,000 abl to do"]
    clock.t += 10
    bar.update(100)  # 10 s after the start: too soon for a line
    assert len(_lines(out)) == 1
    clock.t += 20
    bar.update(200)  # 30 s: 300 done at 10 abl/s, 700 left
    assert _lines(out)[-1] == "ablation sweep: 300/1,000 abl (30%), 10.0 abl/s, elapsed 0:30, ETA 1:10"
    clock.t += 29
    bar.update(100)
    assert len(_lines(out)) == 2  # 29 s since the last line
    clock.t += 1
    bar.update(0)
    assert _lines(out)[-1] == "ablation sweep: 400/1,000 abl (40%), 6.7 abl/s, elapsed 1:00, ETA 1:30"
    clock.t += 40
    bar.update(600)
    bar.close()
    assert _lines(out)[-2:] == ["ablation sweep: 1,000/1,000 abl (100%), 10.0 abl/s, elapsed 1:40, ETA 0:00",
                                "ablation sweep: done, 1,000 abl in 1:40, 10.0 abl/s"]
    assert "\r" not in out.getvalue()


def test_a_step_longer_than_30_s_still_gets_a_line():
    # The heartbeat writes when no update comes: here its tick, driven by the fake clock.
    out, clock = io.StringIO(), Clock()
    bar = P.Progress("self-check", total=4, unit="steps", stream=out, clock=clock, heartbeat=False)
    clock.t += 45
    bar.lines.tick()
    assert _lines(out)[-1] == "self-check: 0/4 steps (0%), ? steps/s, elapsed 0:45, ETA ?"
    bar.lines.tick()  # no second line within 30 s
    assert len(_lines(out)) == 2
    clock.t += 45
    bar.update(1)  # below one a second the rate reads as the time per step
    assert _lines(out)[-1] == "self-check: 1/4 steps (25%), 1 per 90 s, elapsed 1:30, ETA 4:30"
    bar.close()


def test_the_heartbeat_thread_ends_with_the_bar():
    out = io.StringIO()
    bar = P.Progress("clean pass", total=10, unit="tok", stream=out)
    assert bar.lines.thread.is_alive()
    bar.update(10)
    bar.close()
    assert not bar.lines.thread.is_alive()
    assert _lines(out)[-1].startswith("clean pass: done, 10 tok in ")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_a_notebook_tqdm_auto_and_quiet_nothing(monkeypatch):
    from tqdm.auto import tqdm as auto_tqdm

    tty = _Tty()
    bar = P.Progress("clean pass", total=10, unit="tok", stream=tty)
    assert isinstance(bar.bar, auto_tqdm) and bar.lines is None
    bar.close()
    monkeypatch.setattr(P, "in_notebook", lambda: True)
    out = io.StringIO()  # a notebook's stderr is no terminal
    bar = P.Progress("clean pass", total=10, unit="tok", stream=out)
    assert isinstance(bar.bar, auto_tqdm)
    bar.close()
    quiet = P.Progress("clean pass", total=10, unit="tok", quiet=True, stream=out)
    quiet.update(3)
    quiet.close()
    assert quiet.bar is None and quiet.lines is None


def test_in_notebook_is_false_outside_a_kernel():
    assert P.in_notebook() is False


def test_the_gguf_loading_bar_becomes_progress_lines(monkeypatch, capsys):
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    original = gguf_utils.tqdm
    with P.library_bars("loading m: de-quantising GGUF tensors"):
        assert gguf_utils.tqdm is not original
        items = list(gguf_utils.tqdm(range(5), desc="Converting and de-quantizing GGUF tensors..."))
    assert gguf_utils.tqdm is original and items == list(range(5))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "loading m: de-quantising GGUF tensors: 5 tensors to do"
    assert err[-1].startswith("loading m: de-quantising GGUF tensors: done, 5 tensors in ")
    with P.library_bars("quiet", quiet=True):
        assert list(gguf_utils.tqdm([1, 2])) == [1, 2]
    assert capsys.readouterr().err == ""
