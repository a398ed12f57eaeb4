"""Labelled progress bars with rate and ETA (tqdm on stderr), silenced by --quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """A progress bar over a known total of tokens or head-token ablations."""

    def __init__(self, label: str, total: int, unit: str, quiet: bool = False):
        self.bar = None if quiet else tqdm(
            total=total, desc=label, unit=unit, unit_scale=True, dynamic_ncols=True,
            file=sys.stderr, smoothing=0.1, mininterval=0.5,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
        )

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
