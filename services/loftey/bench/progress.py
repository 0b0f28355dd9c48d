"""A live progress line for a benchmark run: requests done, output tokens/s so far, errors."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loftey.bench.metrics import RequestRecord


class LiveProgress:
    """Context manager whose `update` is a runner on_finish callback. Draws on stderr.

    Disabled (nothing drawn) when `enabled` is false; rich also draws nothing live when
    stderr is not a terminal.
    """

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = total
        self.tokens = 0
        self.errors = 0
        self.started = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=Console(file=sys.stderr),
            transient=False,
            disable=not enabled,
        )
        self._task = self._progress.add_task(label, total=total, rate="")

    def __enter__(self) -> LiveProgress:
        self.started = time.perf_counter()
        self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.stop()

    def update(self, record: RequestRecord) -> None:
        if record.ok:
            self.tokens += record.output_tokens
        else:
            self.errors += 1
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = f"{self.tokens / elapsed:.1f} tok/s"
        if self.errors:
            rate += f", {self.errors} errors"
        self._progress.update(self._task, advance=1, rate=rate)
