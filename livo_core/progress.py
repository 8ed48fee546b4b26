"""Progress of a long stage: a tqdm bar on a terminal, a plain line every few seconds otherwise.

    with Progress(total=800, desc="train", unit="step") as bar:
        for ...:
            bar.update(1)
            bar.set_postfix(loss=0.012)

On a TTY this is one tqdm bar per stage. When stderr is not a terminal (CI, a log file, a Prefect worker)
it prints `livo: train: 120/800 steps (15%), 4.1 steps/s, ETA 2m45s, loss=0.012` every
`LIVO_PROGRESS_SECONDS` seconds (default 10) and once at the end, with no cursor escapes, so a log of a
run reads top to bottom.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def silence_library_progress() -> None:
    """Turn off diffusers' and transformers' own progress bars (unless LIVO_VERBOSE is set)."""
    if os.environ.get("LIVO_VERBOSE"):
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress display for one stage (see the module docstring). disable=True shows nothing."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
                 every_s: float | None = None, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.disable = disable
        self.stream = stream or sys.stderr
        self.every_s = float(os.environ.get("LIVO_PROGRESS_SECONDS", 10)) if every_s is None else every_s
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._printed_n: int | None = None
        self._bar = None
        if not disable and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.disable and time.monotonic() - self._last >= self.every_s:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def line(self) -> str:
        """The plain progress line (what a non-terminal run prints)."""
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}s" if self.total else f"{self.n} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if done and rate > 0:
            parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return f"livo: {self.desc}: " + ", ".join(parts)

    def _print(self) -> None:
        self._last = time.monotonic()
        self._printed_n = self.n
        print(self.line(), file=self.stream, flush=True)

    def close(self, final_line: bool = True) -> None:
        """End the display; a non-terminal run prints its last line (not when the stage failed)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.disable and final_line and self._printed_n != self.n:
            self._print()
        self.disable = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(final_line=exc_type is None)
