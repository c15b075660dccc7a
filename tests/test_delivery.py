"""worker.delivery's queue and fetch loop against a stand-in for Faust's consumer.

The worker's tests (test_worker, test_reliability, test_hostile_input) run the same path on the real
broker; these pin down the loop's bookkeeping one case at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from types import SimpleNamespace
from weakref import WeakSet

import pytest
from mode.utils.queues import FlowControlEvent

from worker.delivery import DirectDelivery

TOPIC = "interactions"


class Message:
    def __init__(self, topic: str, partition: int, offset: int, timestamp: float | None = None) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self.timestamp = time.time() if timestamp is None else timestamp  # Kafka's, in seconds (as Faust's)
        self.tp = (topic, partition)
        self.acked = False

    def __repr__(self) -> str:
        return f"{self.topic}-{self.partition}@{self.offset}"


class Consumer:
    """What DirectDelivery uses of Faust's Consumer; fetches come from a list, then it stops."""

    consumer_stopped_errors = ()

    def __init__(self, fetches: list[list[Message]]) -> None:
        self.fetches = list(fetches)
        self._stopped = asyncio.Event()
        self._read_offset = defaultdict(lambda: None)
        self._commit_every = None
        self._n_acked = 0
        self._unacked_messages = WeakSet()
        self.should_stop = False
        self.suspend_flow = asyncio.Event()
        self.delivered: list[Message] = []  # through Faust's callback
        self.gaps: list[tuple] = []
        self.acked: list[Message] = []

    async def callback(self, message: Message) -> None:
        self.delivered.append(message)

    async def wait_first(self, *coros):
        first, *rest = coros
        for coro in rest:
            coro.close()
        return await first

    async def getmany(self, timeout: float):
        if not self.fetches:
            self._stopped.set()
            return
        for message in self.fetches.pop(0):
            yield message.tp, message

    async def _add_gap(self, tp, offset_from: int, offset_to: int) -> None:
        self.gaps.append((tp, offset_from, offset_to))

    def ack(self, message: Message) -> None:
        message.acked = True
        self._unacked_messages.discard(message)
        self.acked.append(message)


def make(fetches, max_queued: int = 100):
    consumer = Consumer(fetches)
    app = SimpleNamespace(
        consumer=consumer,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
        flow_control=FlowControlEvent(initially_suspended=False),
        monitor=SimpleNamespace(stream_inbound_time={}),
        should_stop=False,
        _fetcher=SimpleNamespace(_drainer=None),
    )
    delivery = DirectDelivery(app, TOPIC, max_queued=max_queued)
    delivery.install()
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    return delivery, consumer, fetcher


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def take(delivery: DirectDelivery, size: int, count: int) -> list[list[Message]]:
    batches = []
    async for batch in delivery.batches(size):
        batches.append(batch)
        if sum(map(len, batches)) >= count:
            return batches
    return batches


def test_the_topic_goes_to_the_queue_in_order_and_every_other_topic_to_fausts_callback() -> None:
    fetches = [
        [Message(TOPIC, 0, 0), Message("changelog", 0, 7), Message(TOPIC, 1, 0), Message(TOPIC, 0, 1)],
        [Message(TOPIC, 1, 1), Message("changelog", 0, 8)],
    ]

    async def main():
        delivery, consumer, fetcher = make(fetches)
        await consumer._drain_messages(fetcher)  # replaced by install()
        return await take(delivery, 3, 4), consumer

    batches, consumer = run(main())
    assert [[repr(m) for m in batch] for batch in batches] == [
        ["interactions-0@0", "interactions-1@0", "interactions-0@1"],
        ["interactions-1@1"],
    ]
    assert [repr(m) for m in consumer.delivered] == ["changelog-0@7", "changelog-0@8"]
    assert consumer._read_offset[(TOPIC, 0)] == 1 and consumer._read_offset[("changelog", 0)] == 8


def test_the_fetch_loop_records_the_age_of_each_event_it_queues() -> None:
    from worker import metrics

    fetched = metrics.EVENT_AGE["fetched"]
    before = fetched._sum.get(), sum(bucket.get() for bucket in fetched._buckets)
    old = time.time() - 0.3  # produced 0.3 s before the fetch loop has it
    fetches = [[Message(TOPIC, 0, 0, old), Message("changelog", 0, 7, old), Message(TOPIC, 1, 0, old)]]

    async def main():
        delivery, consumer, fetcher = make(fetches)
        await consumer._drain_messages(fetcher)
        return await take(delivery, 10, 2)

    run(main())
    total, count = fetched._sum.get() - before[0], sum(bucket.get() for bucket in fetched._buckets) - before[1]
    assert count == 2, "the interactions only, each once"
    assert 0.6 <= total < 0.7, total


def test_a_batch_takes_a_share_of_every_partition_queued_each_in_its_order() -> None:
    # One fetch returns partition by partition: 8 messages of partition 0, then 2 of 1, 1 of 2.
    fetch = [Message(TOPIC, 0, i) for i in range(8)] + [Message(TOPIC, 1, i) for i in range(2)]
    fetch.append(Message(TOPIC, 2, 0))

    async def main():
        delivery, consumer, fetcher = make([fetch])
        await consumer._drain_messages(fetcher)
        return await take(delivery, 6, 11)

    batches = run(main())
    # A third of the batch for each: 2, 2 and the 1 there is, then the rest from partition 0.
    assert [repr(m) for m in batches[0]] == [
        "interactions-0@0", "interactions-0@1", "interactions-1@0", "interactions-1@1",
        "interactions-2@0", "interactions-0@2",
    ]
    assert [repr(m) for m in batches[1]] == [f"interactions-0@{i}" for i in range(3, 8)]
    delivered = [m for batch in batches for m in batch]
    for partition in range(3):  # every message once, each partition's in order
        offsets = [m.offset for m in delivered if m.partition == partition]
        assert offsets == list(range(len(offsets)))
    assert len(delivered) == 11


def test_the_partition_that_goes_first_takes_turns() -> None:
    async def main():
        delivery, _, _ = make([])
        delivery.put([Message(TOPIC, p, i) for p in range(3) for i in range(4)])
        batches = delivery.batches(2)  # fewer than the partitions: one message from each of two
        firsts = [(await batches.__anext__())[0].partition for _ in range(3)]
        await batches.aclose()
        return firsts, delivery.queued

    firsts, queued = run(main())
    assert sorted(firsts) == [0, 1, 2]
    assert queued == 12 - 6


def test_offsets_below_the_read_offset_are_dropped_and_holes_are_recorded_as_gaps() -> None:
    fetches = [
        [Message(TOPIC, 0, 5)],
        [Message(TOPIC, 0, 4), Message(TOPIC, 0, 5), Message(TOPIC, 0, 9)],
    ]

    async def main():
        delivery, consumer, fetcher = make(fetches)
        await consumer._drain_messages(fetcher)
        return [m.offset for batch in await take(delivery, 10, 3) for m in batch], consumer

    offsets, consumer = run(main())
    assert offsets == [5, 5, 9]  # 4 dropped; 5 again, as Faust delivers it (the ledger skips it)
    assert consumer.gaps == [((TOPIC, 0), 6, 9)]


def test_nothing_is_queued_while_flow_is_suspended() -> None:
    async def main():
        delivery, consumer, fetcher = make([[Message(TOPIC, 0, 0)]])
        delivery.app.flow_control.suspend()
        drain = asyncio.ensure_future(consumer._drain_messages(fetcher))
        await asyncio.sleep(0.05)
        held = delivery.queued
        delivery.app.flow_control.resume()  # also clears the queues it manages: nothing lost here
        await drain
        return held, [m.offset for batch in await take(delivery, 10, 1) for m in batch]

    held, offsets = run(main())
    assert held == 0
    assert offsets == [0]


def test_a_full_queue_stops_the_fetch_loop_until_the_agent_takes_a_batch() -> None:
    fetches = [[Message(TOPIC, 0, i)] for i in range(6)]

    async def main():
        delivery, consumer, fetcher = make(fetches, max_queued=2)
        drain = asyncio.ensure_future(consumer._drain_messages(fetcher))
        await asyncio.sleep(0.05)
        stalled = (delivery.queued, len(consumer.fetches), drain.done())
        batches = await take(delivery, 1, 6)
        await drain
        return stalled, [m.offset for batch in batches for m in batch]

    stalled, offsets = run(main())
    assert stalled == (2, 4, False)
    assert offsets == list(range(6))


def test_clearing_drops_the_queue_and_frees_the_fetch_loop() -> None:
    async def main():
        delivery, _, _ = make([], max_queued=2)
        delivery.put([Message(TOPIC, 0, 0), Message(TOPIC, 0, 1)])
        full = not delivery._room.is_set()
        delivery.app.flow_control.clear()  # what Faust does to its channel queues at a revocation
        return full, delivery.queued, delivery._room.is_set()

    assert run(main()) == (True, 0, True)


def test_the_queued_events_gauge_follows_the_queue() -> None:
    from worker import metrics

    async def main():
        delivery, _, _ = make([])
        delivery.put([Message(TOPIC, 0, i) for i in range(5)])
        queued = [metrics.QUEUED_EVENTS._value.get()]
        batches = delivery.batches(3)
        await batches.__anext__()
        queued.append(metrics.QUEUED_EVENTS._value.get())
        delivery.clear()
        queued.append(metrics.QUEUED_EVENTS._value.get())
        await batches.aclose()
        return queued

    assert run(main()) == [5, 2, 0]


def test_taken_messages_are_unacknowledged_until_done() -> None:
    async def main():
        delivery, consumer, _ = make([])
        messages = [Message(TOPIC, 0, 0), Message(TOPIC, 2, 0)]
        delivery.take(messages)
        pending = set(consumer._unacked_messages)
        inbound = set(delivery.app.monitor.stream_inbound_time)
        delivery.done(messages)
        return pending, inbound, set(consumer._unacked_messages), consumer.acked, messages

    pending, inbound, after, acked, messages = run(main())
    assert pending == set(messages)  # a revocation (Consumer.wait_empty) waits for these
    assert inbound == {(TOPIC, 0), (TOPIC, 2)}
    assert after == set() and acked == messages


def test_max_queued_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_queued"):
        DirectDelivery(SimpleNamespace(), TOPIC, max_queued=0)
