"""The one pacing loop (worker.replay.paced) used by replay, the benchmark and the fault scenarios."""

from __future__ import annotations

from worker import replay


class FakeClock:
    """perf_counter and sleep on a clock that only moves when slept on or told to."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_paced_holds_each_item_until_its_slot(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(replay.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(replay.time, "sleep", clock.sleep)
    released = []
    for item in replay.paced("abcd", rate=4.0):
        released.append((item, clock.now))
        if item == "b":
            clock.now += 0.6  # the consumer of the items fell behind: c and d go out at once
    assert released == [("a", 100.0), ("b", 100.25), ("c", 100.85), ("d", 100.85)]
    assert clock.sleeps == [0.25]


def test_paced_without_a_rate_never_sleeps(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(replay.time, "sleep", clock.sleep)
    assert list(replay.paced(range(5), None)) == [0, 1, 2, 3, 4]
    assert list(replay.paced(range(3), 0)) == [0, 1, 2]
    assert clock.sleeps == []


def test_paced_async_keeps_the_same_schedule(monkeypatch) -> None:
    import asyncio

    clock = FakeClock()

    async def fake_sleep(seconds: float) -> None:
        clock.sleep(seconds)

    monkeypatch.setattr(replay.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(replay.asyncio, "sleep", fake_sleep)

    async def run() -> list:
        released = []
        async for item in replay.paced_async("abcd", rate=4.0):
            released.append((item, clock.now))
            if item == "b":
                clock.now += 0.6
        return released

    assert asyncio.run(run()) == [("a", 100.0), ("b", 100.25), ("c", 100.85), ("d", 100.85)]
    assert clock.sleeps == [0.25]
