"""Which input offsets this worker has really processed, so that no commit can skip an event.

Faust's consumer decides what to commit from its own acknowledgements, and faust-streaming 0.15
acknowledges some events that never reached the agent: events fetched across a rebalance are
"skipped" (and acknowledged) by the stream, a fetch that was in flight during the seek after
recovery can deliver records from beyond the committed offset, and a jump in offsets is taken for
a gap (transaction markers) and committed over. Each of these lost an event in the scale-out test.

The ledger keeps, per input partition, the next offset this worker has not processed yet. It is
the only authority on commits: a commit offset is clamped to it. Every delivered offset is
classified against it:

* ``NEXT``: the expected offset; processed, the ledger moves on.
* ``REDELIVERED``: below the ledger: already processed by this worker; dropped (acknowledged
  to Faust, never processed twice).
* ``JUMP``: above the ledger: the offsets in between are either not consumable (transaction
  markers, aborted or compacted records) or an event Faust dropped. The caller checks with the
  broker; a real hole stops the worker before it processes anything past it, so that the restart
  reads the hole again from the last commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from enum import Enum

from faust.types import TP

__all__ = ["BrokerOffsets", "Delivery", "OffsetLedger", "last_records"]


class Delivery(Enum):
    NEXT = "next"
    REDELIVERED = "redelivered"
    JUMP = "jump"


class OffsetLedger:
    """Per partition, the next unprocessed offset, valid for one consumer generation."""

    def __init__(self) -> None:
        self._next: dict[TP, int] = {}
        self._generation: dict[TP, int] = {}

    def knows(self, tp: TP, generation: int) -> bool:
        """Whether `tp` has a starting point for this generation (after a rebalance it has not)."""
        return self._generation.get(tp) == generation and tp in self._next

    def start(self, tp: TP, offset: int, generation: int) -> None:
        """Begin `tp` at `offset` (the committed offset, where Faust's seek put the consumer)."""
        self._next[tp] = offset
        self._generation[tp] = generation

    def classify(self, tp: TP, offset: int) -> Delivery:
        expected = self._next[tp]
        if offset == expected:
            return Delivery.NEXT
        if offset < expected:
            return Delivery.REDELIVERED
        return Delivery.JUMP

    def expected(self, tp: TP) -> int:
        return self._next[tp]

    def processed(self, tp: TP, offset: int) -> None:
        """`offset` of `tp` and everything before it are processed (jumps already verified)."""
        self._next[tp] = max(self._next[tp], offset + 1)

    def clamp(self, offsets: Mapping[TP, int], topic: str, generation: int) -> dict[TP, int]:
        """The commit offsets Faust proposes, none beyond what was processed.

        Partitions of `topic` with nothing processed in this generation are left out (an entry
        from before a rebalance may be older than another worker's commit since); other topics
        pass through unchanged.
        """
        out = {}
        for tp, offset in offsets.items():
            if tp.topic != topic:
                out[tp] = offset
            elif self.knows(tp, generation):
                out[tp] = min(offset, self._next[tp])
        return out


class BrokerOffsets:
    """What the broker says about the input: committed offsets, ends, and whether a range holds
    records.

    Two aiokafka consumers, each created on first use. One has the app's group id, to read the
    group's committed offsets; it never subscribes nor is assigned partitions (so it never joins
    the group) and never commits. The other has no group and reads: it is assigned one partition
    at a time and seeks. With a group id, assigning partitions again while aiokafka's coordinator
    task was between two steps failed that task's assertion ("Unexpected error in coordinator
    routine"), and every later question to that consumer failed (asking about two partitions in
    a row was enough: tests/test_ledger.py). Both read with read_committed, as the worker does.
    """

    def __init__(self, bootstrap_servers: str, group_id: str, security: dict) -> None:
        self.bootstrap_servers, self.group_id, self.security = bootstrap_servers, group_id, security
        self._group = None
        self._reader = None

    async def _consumer(self, group_id: str | None):
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=group_id, enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest", **self.security,
        )
        await consumer.start()
        return consumer

    async def _get_group(self):
        if self._group is None:
            self._group = await self._consumer(self.group_id)
        return self._group

    async def _get_reader(self):
        if self._reader is None:
            self._reader = await self._consumer(None)
        return self._reader

    async def committed(self, tp: TP) -> int:
        """Where a rebalance's seek puts `tp`: its committed offset, else the start of its log."""
        from aiokafka import TopicPartition

        partition = TopicPartition(tp.topic, tp.partition)
        offset = await (await self._get_group()).committed(partition)
        if offset is None:
            offset = (await (await self._get_reader()).beginning_offsets([partition]))[partition]
        return int(offset)

    async def end_offsets(self, tps) -> dict[TP, int]:
        """Each partition's end as a read_committed reader sees it (its last stable offset)."""
        from aiokafka import TopicPartition

        keys = {TopicPartition(tp.topic, tp.partition): tp for tp in tps}
        ends = await (await self._get_reader()).end_offsets(list(keys))
        return {keys[ktp]: int(end) for ktp, end in ends.items()}

    async def consumable_between(self, tp: TP, start: int, end: int, timeout: float = 15.0,
                                 unknown: bool = True) -> bool:
        """Whether `tp` holds a committed record at an offset in [start, end).

        Offsets without one (transaction markers, aborted or compacted records) make a legitimate
        jump. If the broker cannot tell within `timeout`, the answer is `unknown` (by default yes:
        a restart is safe).
        """
        from aiokafka import TopicPartition

        consumer = await self._get_reader()
        partition = TopicPartition(tp.topic, tp.partition)
        consumer.assign([partition])
        consumer.seek(partition, start)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            records = await consumer.getmany(partition, timeout_ms=200, max_records=1)
            for record in records.get(partition, []):
                return record.offset < end
            if await consumer.position(partition) >= end:
                return False
        return unknown

    async def stop(self) -> None:
        for name in ("_group", "_reader"):
            consumer = getattr(self, name)
            if consumer is not None:
                setattr(self, name, None)
                await consumer.stop()


async def last_records(bootstrap_servers: str, security: dict, ends: Mapping, window: int = 64,
                       timeout: float = 10.0) -> dict:
    """Per partition, the offset of the last committed record before `ends[tp]`, or None.

    Reads the last `window` offsets of each partition with read_committed (so commit markers and
    aborted records are skipped); None where there is none in that window (for example a long
    aborted transaction at the end) or the broker does not answer in time.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    out: dict = dict.fromkeys(ends)
    key_of = {TopicPartition(tp.topic, tp.partition): tp for tp, end in ends.items() if end}
    end_of = {ktp: ends[tp] for ktp, tp in key_of.items()}
    if not key_of:
        return out
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed", **security)
    await consumer.start()
    try:
        consumer.assign(list(key_of))
        starts = await consumer.beginning_offsets(list(key_of))
        for ktp, end in end_of.items():
            consumer.seek(ktp, max(starts[ktp], end - window))
        pending = set(key_of)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pending and loop.time() < deadline:
            batches = await consumer.getmany(*pending, timeout_ms=200)
            for ktp, records in batches.items():
                below = [r.offset for r in records if r.offset < end_of[ktp]]
                if below:
                    out[key_of[ktp]] = max(below)
            for ktp in list(pending):
                if await consumer.position(ktp) >= end_of[ktp]:
                    pending.discard(ktp)
        for ktp in pending:  # not sure: let Faust wait as it would have
            out[key_of[ktp]] = None
    finally:
        await consumer.stop()
    return out
