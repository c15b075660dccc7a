"""The progress watchdog (KSR_STALL_TIMEOUT_S) on stand-ins: when a worker whose input holds events
it has not processed takes none of them for the timeout, it restarts; otherwise it is left alone.
The broker test is in test_reliability.py
(test_a_worker_that_stops_taking_events_restarts_by_itself_and_loses_nothing)."""

from __future__ import annotations

import asyncio

import pytest
from faust.types import TP

from worker import app
from worker.config import ConfigError, Settings

LAGGING = {TP("interactions", 1): (120, 300)}


class StandInWorker:
    """What watch_progress reads: the agent's batch count, whether a rebalance is under way, and
    what the broker says is left to process (or that it cannot say)."""

    def __init__(self) -> None:
        self.batches = 0
        self.rebalancing = False
        self.lagging: dict = dict(LAGGING)
        self.broker = "answers"  # or "fails", "hangs"
        self.probes = 0

    async def behind(self) -> dict:
        self.probes += 1
        if self.broker == "fails":
            raise ConnectionError("the broker is away")
        if self.broker == "hangs":
            await asyncio.sleep(3600)
        return self.lagging

    def watch(self, timeout: float = 0.3) -> asyncio.Task:
        return asyncio.create_task(app.watch_progress(
            lambda: self.batches, lambda: self.rebalancing, self.behind, lambda: "the fetch path's report",
            timeout, interval=0.02, probe_timeout=0.05))


@pytest.fixture
def restarts(monkeypatch) -> list:
    out: list = []
    monkeypatch.setattr(app, "exit_for_restart", lambda what, with_traceback=True: out.append(what))
    return out


def test_a_worker_that_takes_no_event_while_its_input_has_some_restarts_with_every_tasks_stack(
        restarts, caplog) -> None:
    async def run() -> float:
        worker = StandInWorker()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(worker.watch(timeout=0.3), 5)
        return loop.time() - started

    with caplog.at_level("ERROR"):
        took = asyncio.run(run())
    assert restarts == ["processing stalled"]
    assert took >= 0.3
    assert ("the worker has taken no event in 0.3 s while its input holds events it has not processed "
            "(interactions[1] at offset 120 of 300; the fetch path's report) (KSR_STALL_TIMEOUT_S)") in caplog.text
    assert " in watch_progress" in caplog.text  # where each task waits


def test_a_worker_that_keeps_taking_batches_or_has_nothing_to_take_is_left_alone(restarts) -> None:
    async def run(busy: bool) -> int:
        worker = StandInWorker()
        if not busy:
            worker.lagging = {}  # idle: everything in the input is processed
        watcher = worker.watch(timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < 1.0:  # five timeouts long
            if busy:
                worker.batches += 1
            await asyncio.sleep(0.01)
        assert not watcher.done()
        watcher.cancel()
        return worker.probes

    assert asyncio.run(run(busy=True)) == 0  # progress: the broker is not even asked
    assert asyncio.run(run(busy=False)) > 10  # asked at every check, and never behind
    assert restarts == []


def test_no_restart_during_a_rebalance_or_while_the_broker_cannot_tell(restarts) -> None:
    async def run(setting: str) -> None:
        worker = StandInWorker()
        if setting == "rebalancing":
            worker.rebalancing = True
        else:
            worker.broker = setting
        watcher = worker.watch(timeout=0.2)
        await asyncio.sleep(1.0)
        assert not watcher.done(), setting
        watcher.cancel()

    for setting in ("rebalancing", "fails", "hangs"):
        asyncio.run(run(setting))
    assert restarts == []


def test_the_clock_starts_when_the_broker_answers_again_not_at_the_last_batch(restarts) -> None:
    """An outage is waited out: once the broker is back the worker gets the whole timeout to take
    the events again before the watchdog restarts it."""

    async def run() -> float:
        worker = StandInWorker()
        worker.broker = "fails"
        loop = asyncio.get_running_loop()
        watcher = worker.watch(timeout=0.4)
        await asyncio.sleep(0.6)  # longer than the timeout without a batch, the broker away
        worker.broker = "answers"
        back = loop.time()
        await asyncio.wait_for(watcher, 5)
        return loop.time() - back

    assert asyncio.run(run()) >= 0.4
    assert restarts == ["processing stalled"]


def test_a_batch_taken_resets_the_clock(restarts) -> None:
    async def run() -> None:
        worker = StandInWorker()
        watcher = worker.watch(timeout=0.3)
        for _ in range(8):  # one batch every 0.2 s: never 0.3 s without one
            await asyncio.sleep(0.2)
            worker.batches += 1
        assert not watcher.done()
        await asyncio.wait_for(watcher, 5)  # then none: it fires

    asyncio.run(run())
    assert restarts == ["processing stalled"]


def test_the_stall_timeout_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSR_STALL_TIMEOUT_S", raising=False)
    assert Settings.from_env().stall_timeout_s == 60.0
    monkeypatch.setenv("KSR_STALL_TIMEOUT_S", "15")
    assert Settings.from_env().stall_timeout_s == 15.0
    monkeypatch.setenv("KSR_STALL_TIMEOUT_S", "0")
    with pytest.raises(ConfigError, match="KSR_STALL_TIMEOUT_S must be a positive, finite number"):
        Settings.from_env()
