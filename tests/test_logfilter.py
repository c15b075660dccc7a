"""The filter that keeps a broker outage from flooding the worker's log (worker.logfilter). The
broker test is in test_reliability.py (the worker's log during a 30 s outage)."""

from __future__ import annotations

import logging

from worker.logfilter import RepeatedRecords, quiet_repeated_kafka_errors


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(message: str, *args, level: int = logging.ERROR, name: str = "aiokafka") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_repeats_are_held_back_and_counted_in_the_next_one_let_through() -> None:
    clock = Clock()
    repeated = RepeatedRecords(interval=10.0, clock=clock)
    passed = []
    for step in range(2001):  # 20 s of a loop that fails every 10 ms
        clock.now = step * 0.01
        r = record("Unable connect to node with id %s: %s", 1, "refused")
        if repeated.filter(r):
            passed.append((clock.now, r.getMessage()))
    assert [t for t, _ in passed] == [0.0, 10.0, 20.0]
    assert passed[0][1] == "Unable connect to node with id 1: refused"
    assert passed[1][1] == ("Unable connect to node with id 1: refused "
                            "(999 more like this in the last 10 s, not logged)")
    assert passed[2][1].endswith("(999 more like this in the last 10 s, not logged)")


def test_other_messages_loggers_and_levels_pass() -> None:
    clock = Clock()
    repeated = RepeatedRecords(interval=10.0, clock=clock)
    assert repeated.filter(record("Unable to update metadata from %s", [1]))
    assert not repeated.filter(record("Unable to update metadata from %s", [1]))
    assert repeated.filter(record("Failed fetch messages from %s: %s", 1, "x"))  # another template
    assert repeated.filter(record("Unable to update metadata from %s", [1], name="aiokafka.conn"))  # another logger
    for _ in range(3):
        assert repeated.filter(record("Unable to update metadata from %s", [1], level=logging.INFO))
    clock.now = 10.0  # a quiet spell: the next one passes as it is
    r = record("Failed fetch messages from %s: %s", 1, "x")
    assert repeated.filter(r) and r.getMessage() == "Failed fetch messages from 1: x"


def test_every_aiokafka_logger_gets_the_filter() -> None:
    # aiokafka's client logs as "aiokafka".
    names = ("aiokafka", "aiokafka.consumer.fetcher", "aiokafka.consumer.group_coordinator",
             "aiokafka.producer.sender", "aiokafka.conn")
    repeated = quiet_repeated_kafka_errors()
    try:
        for name in names:
            assert repeated in logging.getLogger(name).filters, name
        assert repeated not in logging.getLogger("ksr.worker").filters
    finally:
        for name in list(logging.root.manager.loggerDict):
            logger = logging.getLogger(name)
            if repeated in logger.filters:
                logger.removeFilter(repeated)
