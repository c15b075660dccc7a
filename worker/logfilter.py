"""Keep a broker outage from flooding the worker's log.

While the broker is away, aiokafka's fetch and send loops ask for fresh metadata again as soon as
the last attempt failed, and a refused connection fails at once: in a 25 s outage a worker wrote
207,000 lines of "Unable connect to node" and "Unable to update metadata" (README, Reliability).
The filter lets the first record of each kind through, holds the repeats back for `interval`
seconds, and then lets one through with the count of those held back. Records below WARNING pass
untouched, and a message never seen before always passes at once.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time


class RepeatedRecords(logging.Filter):
    """Per (logger, message template): the first record, then at most one per `interval` seconds,
    which carries how many were held back since the last one let through."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._seen: dict[tuple[str, str], list] = {}  # key -> [last passed at, held back since]
        self._lock = threading.Lock()  # aiokafka's consumer logs from Faust's consumer thread

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                self._seen[key] = [now, 0]
                return True
            if now - entry[0] < self.interval:
                entry[1] += 1
                return False
            held, entry[0], entry[1] = entry[1], now, 0
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this in the last {self.interval:g} s, not logged)"
            record.args = ()
        return True


def quiet_repeated_kafka_errors(interval: float = 10.0) -> RepeatedRecords:
    """Install one RepeatedRecords on every aiokafka logger (a logger's filters see the records
    logged on it, not those of its children, so each module's logger gets it)."""
    for module in ("aiokafka.client", "aiokafka.conn", "aiokafka.consumer.fetcher",
                   "aiokafka.consumer.group_coordinator", "aiokafka.producer.sender"):
        importlib.import_module(module)  # for its logger, which exists once the module is loaded

    repeated = RepeatedRecords(interval)
    names = [name for name in logging.root.manager.loggerDict if name == "aiokafka" or name.startswith("aiokafka.")]
    for name in names:
        logging.getLogger(name).addFilter(repeated)
    return repeated
