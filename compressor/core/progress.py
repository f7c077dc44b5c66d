"""One stderr line per step of a long computation, with the time spent and the time left.

A decoder's calibrated analysis, GPTQ's block-by-block rounding and a perplexity measurement each take
minutes on a CPU; none of them may be silent for that long. Lines are printed when asked (``progress=True``)
or, when not said (None), only on a terminal, so logs and tests stay quiet.
"""

from __future__ import annotations

import math
import sys
import time


class Progress:
    """``step(what)`` after each of ``steps`` equal steps prints ``"{prefix}: {what}, {spent} spent, about
    {left} left"``; ``lead(what)`` says a step unlike them (timed, left out of the rate)."""

    def __init__(self, prefix: str, steps: int, progress: bool | None) -> None:
        self.prefix, self.steps, self.done = prefix, steps, 0
        self.begin = self.start = time.perf_counter()
        self.on = progress if progress is not None else sys.stderr.isatty()

    def lead(self, what: str) -> None:
        """A step unlike the ``steps`` (a decoder's Fisher pass): said with its time and left out of the rate the
        time left is estimated from (counted as one block step, it made the first estimate 8x too long)."""
        self.start = time.perf_counter()
        self.say(f"{what}, {clock(self.start - self.begin)} spent")

    def step(self, what: str) -> None:
        self.done += 1
        now = time.perf_counter()
        left = (now - self.start) / self.done * (self.steps - self.done)
        self.say(f"{what}, {clock(now - self.begin)} spent, about {clock(left)} left")

    def say(self, line: str) -> None:
        if self.on:
            print(f"{self.prefix}: {line}", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """``seconds`` as ``1m05s`` (or ``42s``), rounded up."""
    m, s = divmod(math.ceil(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
