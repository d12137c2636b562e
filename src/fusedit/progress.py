"""Progress output that stays readable when piped.

On a terminal a tqdm bar redraws itself in place. When stderr is not a terminal (``make demo > log``, CI, a job
scheduler's log file) a redrawn bar becomes megabytes of carriage returns, so :func:`progress_bar` returns a
:class:`LineProgress` instead: one plain line every few percent (and at the end) with the count, rate, ETA and the
latest postfix values.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: A plain progress line is printed each time this fraction of the total more is done.
LINE_EVERY = 0.05


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class LineProgress:
    """A progress bar for non-terminals: the tqdm methods the project uses (``update``, ``set_postfix``, ``write``,
    ``close``), printing one line per :data:`LINE_EVERY` of ``total``.

    Args:
        total: number of units; ``initial``: units already done (a resumed run).
        desc: what is counted (the line's prefix); ``unit``: the unit's name.
        stream: where the lines go (default stderr, like tqdm).
    """

    def __init__(
        self, total: int, initial: int = 0, desc: str = "", unit: str = "it", stream: TextIO | None = None
    ) -> None:
        self.total, self.n, self.initial = max(int(total), 1), int(initial), int(initial)
        self.desc, self.unit = desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self._started = time.perf_counter()
        self._next_line = self._next_mark(self.n)
        self._printed_at = -1

    def _next_mark(self, n: int) -> int:
        step = max(int(self.total * LINE_EVERY), 1)
        return (n // step + 1) * step

    def line(self) -> str:
        """The current progress line."""
        done = self.n - self.initial
        elapsed = time.perf_counter() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - self.n) / rate) if rate > 0 else "?"
        text = f"{self.desc + ': ' if self.desc else ''}{self.n}/{self.total} {self.unit}s ({self.n / self.total:.0%})"
        text += f", {rate:.3g} {self.unit}/s, elapsed {_duration(elapsed)}, ETA {eta}"
        if self.postfix:
            text += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _emit(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._printed_at = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next_line or self.n >= self.total:
            self._next_line = self._next_mark(self.n)
            self._emit()

    def set_postfix(self, values: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**dict(values or {}), **kwargs}

    def write(self, message: str) -> None:
        """A message line (to stdout, as ``tqdm.write`` does)."""
        print(message, flush=True)

    def close(self) -> None:
        if self.n != self._printed_at and self.n > self.initial:
            self._emit()


def progress_bar(
    total: int, *, initial: int = 0, desc: str = "", unit: str = "it", leave: bool = True, stream: TextIO | None = None
) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress`."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return tqdm(
            total=total, initial=initial, desc=desc or None, unit=unit, leave=leave, dynamic_ncols=True, file=stream
        )
    return LineProgress(total, initial=initial, desc=desc, unit=unit, stream=stream)


def track(iterable: Iterable[T], total: int, *, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate ``iterable`` while showing progress (see :func:`progress_bar`); the bar closes at the end."""
    bar = progress_bar(total, desc=desc, unit=unit, leave=False)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
