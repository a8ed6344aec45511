"""Progress of a long command on stderr, one line at a time: ``segment: 3/10 windows, 12 s elapsed, ~28 s left``."""

import math
import sys
import time


class Progress:
    """Counts finished items (``uxnet segment``'s windows, ``uxnet bench``'s cases) against a total and prints
    ``<prefix>: done/total <unit>, E s elapsed, ~R s left`` to ``stream`` (default stderr) at most every ``every_s``
    seconds and when the total is reached, followed by ``; last: <item>`` when :meth:`update` names the item."""

    def __init__(self, total: int, prefix: str, unit: str, stream=None, every_s: float = 2.0, enabled: bool = True):
        self.prefix, self.unit = prefix, unit
        self.stream, self.every_s, self.enabled = stream, every_s, enabled
        self.restart(total)

    def restart(self, total: int) -> None:
        """Count a new run of ``total`` items from zero."""
        self.total, self.done, self.start, self.last = total, 0, time.perf_counter(), -math.inf

    def update(self, n: int = 1, item: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            print(f"{self.prefix}: {self.done}/{self.total} {self.unit}, {elapsed:.0f} s elapsed, ~{eta:.0f} s left"
                  + (f"; last: {item}" if item else ""), file=self.stream or sys.stderr, flush=True)
