"""Everything dropped is counted, with the stage that dropped it and why.

One `Drops` per process, passed down. Exported as `eastwest_dropped_total{stage,reason}` by the
metrics endpoints, and summarised by the collector at exit. Cheap enough for the data path: a dict
increment under the GIL.
"""

from __future__ import annotations

import logging
import time
from collections import Counter


class Drops:
    def __init__(self, log: logging.Logger | None = None, log_every_s: float = 10.0) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._log = log or logging.getLogger("eastwest.drops")
        self._log_every = log_every_s
        self._last_log: dict[tuple[str, str], float] = {}

    def count(self, stage: str, reason: str, n: int = 1, detail: str | None = None) -> None:
        key = (stage, reason)
        self.counts[key] += n
        if detail is not None:  # rate-limited: the data path never floods the log
            now = time.monotonic()
            if now - self._last_log.get(key, -1e9) >= self._log_every:
                self._last_log[key] = now
                self._log.warning("dropped at %s (%s): %s [total %d]", stage, reason, detail,
                                  self.counts[key])

    def total(self, stage: str | None = None) -> int:
        return sum(v for (s, _), v in self.counts.items() if stage is None or s == stage)

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self.counts)
