"""One progress bar for the benchmark (bench/run.py) and the training CLI (gemini_seg.train).

tqdm when it is importable (an optional dependency: ``pip install tqdm``), else plain lines with the
rate and the ETA: redrawn in place on a terminal, one every 10 % otherwise (logs, CI).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """``update(note)`` after each of ``total`` steps, ``close()`` at the end (or use it as a context
    manager). ``enabled=False`` prints nothing."""

    def __init__(self, total: int, label: str = "", file: Optional[TextIO] = None, enabled: bool = True,
                 unit: str = "it"):
        self.total, self.label, self.enabled, self.unit = max(int(total), 1), label, enabled, unit
        self.file = file if file is not None else sys.stderr
        self.done, self.start, self.next_report = 0, time.time(), 0
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                # Off a terminal (a log file), a line at most every 30 s instead of 10 a second.
                self.bar = tqdm(total=self.total, desc=label or None, file=self.file, unit=unit,
                                dynamic_ncols=True, mininterval=0.1 if self.tty else 30.0)

    def update(self, note: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note[:60], refresh=False)
            self.bar.update(1)
            return
        fraction = min(self.done / self.total, 1.0)
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(30 * fraction)
        line = (f"{self.label + ' ' if self.label else ''}[{'#' * filled}{'.' * (30 - filled)}] "
                f"{self.done}/{self.total} {rate:.2f} {self.unit}/s elapsed {_clock(elapsed)} eta {_clock(eta)}"
                f"{' ' + note if note else ''}")
        if self.tty:
            self.file.write("\r" + line[:150].ljust(150))
            if self.done >= self.total:
                self.file.write("\n")
        elif fraction * 10 >= self.next_report or self.done >= self.total:
            self.file.write(line + "\n")
            self.next_report = math.floor(fraction * 10) + 1
        self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.tty and self.done < self.total:
            self.file.write("\n")
            self.file.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
