"""Labelled progress with rate and ETA on stderr, silenced by --quiet.

Three ways to show it, chosen by where stderr goes:

- a terminal: a tqdm bar (`tqdm.auto`, which is plain tqdm there);
- a notebook: `tqdm.auto`'s widget (plain tqdm's carriage returns draw badly in a cell);
- anything else (a log file, a pipe, a batch job): one line at the start, then a line at least
  every `LINE_EVERY_S` seconds while the work runs, even when one step takes longer, and one at
  the end; a bar's carriage-return redraws would pile up in a file as one endless line.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

LINE_EVERY_S = 30.0  # the longest silence of a log without a terminal (issue 22)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where `tqdm.auto` draws a widget)."""
    shell = sys.modules.get("IPython")
    ip = getattr(shell, "get_ipython", lambda: None)() if shell is not None else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or a plain object
        return False


def _duration(seconds: float) -> str:
    """`1:02:03`, `4:05` (h:mm:ss, m:ss)."""
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _rate(per_s: float, unit: str) -> str:
    """`812.5 abl/s`, or `1 per 96 s` below one a second (a slow self-check step)."""
    return f"{per_s:,.1f} {unit}/s" if per_s >= 1 else f"1 per {1 / per_s:,.0f} s"


class _Lines:
    """Progress as whole lines: `label: n/total unit (p%), rate unit/s, elapsed m:ss, ETA m:ss`.

    `clock` is injectable (tests use a fake one); `heartbeat` starts a thread that writes a line
    when `every` seconds pass with no update, so a log is never silent longer than that.
    """

    def __init__(self, label: str, total: int, unit: str, stream, clock=time.monotonic, every: float = LINE_EVERY_S,
                 heartbeat: bool = True):
        self.label, self.total, self.unit, self.stream = label, total, unit, stream
        self.clock, self.every = clock, every
        self.n = 0
        self.start = self.last = clock()
        self.lock = threading.Lock()
        self.write(f"{label}: {_count(total)} {unit} to do")
        self.stop = threading.Event()
        self.thread = None
        if heartbeat and total:
            self.thread = threading.Thread(target=self._beat, name=f"progress: {label}", daemon=True)
            self.thread.start()

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = self.clock() - self.start
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        if self.n and elapsed > 0:
            rate = self.n / elapsed  # the whole run's mean: steady over uneven steps
            eta = _duration((self.total - self.n) / rate) if self.total >= self.n else "?"
            speed = _rate(rate, self.unit)
        else:
            eta, speed = "?", f"? {self.unit}/s"
        return (f"{self.label}: {_count(self.n)}/{_count(self.total)} {self.unit}{pct}, {speed}, "
                f"elapsed {_duration(elapsed)}, ETA {eta}")

    def tick(self) -> None:
        """Write a line if `every` seconds passed since the last one."""
        with self.lock:
            if self.clock() - self.last >= self.every:
                self.last = self.clock()
                self.write(self.line())

    def _beat(self) -> None:
        while not self.stop.wait(min(1.0, self.every)):
            self.tick()

    def update(self, n: int) -> None:
        with self.lock:
            self.n += n
        self.tick()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        elapsed = self.clock() - self.start
        rate = f", {_rate(self.n / elapsed, self.unit)}" if self.n and elapsed > 0 else ""
        self.write(f"{self.label}: done, {_count(self.n)} {self.unit} in {_duration(elapsed)}{rate}")


class Progress:
    """Progress over a known total of tokens, head-token ablations or checks (see the module doc).

    Args:
        label: what is counted, e.g. "ablation sweep".
        total: the count at the end.
        unit: the counted thing's short name, e.g. "abl".
        quiet: show nothing.
        stream: where to write (default: stderr at construction).
        clock, heartbeat: for the line form only (tests pass a fake clock and no heartbeat thread).
    """

    def __init__(self, label: str, total: int, unit: str, quiet: bool = False, stream=None, clock=None,
                 heartbeat: bool = True):
        self.bar = self.lines = None
        if quiet:
            return
        stream = stream if stream is not None else sys.stderr
        if in_notebook() or _is_tty(stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc=label, unit=unit, unit_scale=True, dynamic_ncols=True,
                file=stream, smoothing=0.1, mininterval=0.5,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
            )
        else:
            self.lines = _Lines(label, total, unit, stream, clock or time.monotonic, heartbeat=heartbeat)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines is not None:
            self.lines.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines is not None:
            self.lines.close()


@contextlib.contextmanager
def library_bars(label: str, quiet: bool = False):
    """Inside, transformers' GGUF de-quantisation bar (a plain `tqdm.auto` bar it draws itself) becomes a
    `Progress`: a line every `LINE_EVERY_S` seconds without a terminal, nothing with --quiet."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support draws no such bar
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def bar(iterable=None, desc=None, total=None, **kwargs):
        items = list(iterable) if iterable is not None else []
        progress = Progress(label, total=len(items) if total is None else total, unit="tensors", quiet=quiet)
        try:
            for item in items:
                yield item
                progress.update(1)
        finally:
            progress.close()

    gguf_utils.tqdm = bar
    try:
        yield
    finally:
        gguf_utils.tqdm = original
