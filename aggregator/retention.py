"""Retention: what ended before `--retention` ago leaves every table.

Stage: beside the correlation worker (aggregator/worker.py), which runs it after its writes and
at start (`maybe_run`), at most every `every_s` of the clock's monotonic time; the cutoff is the
clock's wall time less the retention. In: the store's write interface. Out: rows deleted per
table (logged). `--retention` none: never.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from aggregator.store.base import WriteStore
from eastwest.clock import Clock

log = logging.getLogger("eastwest.aggregator")
EVERY_S = 600.0


class Retention:
    def __init__(self, store: WriteStore, keep: timedelta | None, clock: Clock, *,
                 every_s: float = EVERY_S) -> None:
        self.store, self.keep, self.clock, self.every_s = store, keep, clock, every_s
        self._last: float | None = None

    def maybe_run(self, now: datetime | None = None) -> dict[str, int]:
        """Delete what ended before the cutoff, if the last pass is `every_s` old (or `now` is
        given: at once, with that time). The caller holds the correlator's lock: the rows of a
        connection it may still change are not deleted under it."""
        if self.keep is None:
            return {}
        mono = self.clock.monotonic()
        if now is None and self._last is not None and mono - self._last < self.every_s:
            return {}
        self._last = mono
        deleted = self.store.apply_retention((now or self.clock.now()) - self.keep)
        if any(deleted.values()):
            log.info("retention %s: deleted %s", self.keep, deleted)
        return deleted
