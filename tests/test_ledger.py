"""The offset ledger: no commit past an unprocessed event, and jumps checked with the real broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from faust.types import TP

from worker.ledger import BrokerOffsets, Delivery, OffsetLedger, last_records

IN = "interactions"


def test_deliveries_are_classified_against_the_next_unprocessed_offset() -> None:
    ledger = OffsetLedger()
    tp = TP(IN, 0)
    assert not ledger.knows(tp, 1)
    ledger.start(tp, 10, generation=1)
    assert ledger.knows(tp, 1) and not ledger.knows(tp, 2)
    assert ledger.classify(tp, 10) is Delivery.NEXT
    ledger.processed(tp, 10)
    assert ledger.classify(tp, 10) is Delivery.REDELIVERED
    assert ledger.classify(tp, 5) is Delivery.REDELIVERED
    assert ledger.classify(tp, 11) is Delivery.NEXT
    assert ledger.classify(tp, 13) is Delivery.JUMP
    ledger.processed(tp, 13)  # the caller verified 11..12 hold no records
    assert ledger.expected(tp) == 14
    ledger.processed(tp, 12)  # never moves backwards
    assert ledger.expected(tp) == 14


def test_commits_are_clamped_to_what_was_processed_in_this_generation() -> None:
    ledger = OffsetLedger()
    ledger.start(TP(IN, 0), 100, generation=3)
    ledger.processed(TP(IN, 0), 104)
    ledger.start(TP(IN, 1), 50, generation=2)  # from before the last rebalance
    proposed = {
        TP(IN, 0): 120,  # Faust acknowledged events the agent never got
        TP(IN, 1): 70,  # stale entry: another worker may have committed since
        TP(IN, 2): 10,  # nothing processed here in this generation
        TP("other-topic", 0): 7,  # not the input: untouched
    }
    assert ledger.clamp(proposed, IN, generation=3) == {TP(IN, 0): 105, TP("other-topic", 0): 7}
    assert ledger.clamp({TP(IN, 0): 103}, IN, generation=3) == {TP(IN, 0): 103}


@pytest.mark.broker
def test_broker_tells_records_from_transaction_markers_and_aborted_records(bootstrap) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"ledger-{uuid.uuid4().hex[:8]}"
    group = f"ledger-group-{uuid.uuid4().hex[:6]}"

    async def scenario() -> dict:
        plain = AIOKafkaProducer(bootstrap_servers=bootstrap)
        txn = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{topic}-txn")
        await plain.start()
        await txn.start()
        try:
            for n in range(5):  # offsets 0..4
                await plain.send_and_wait(topic, b"x%d" % n, partition=0)
            await txn.begin_transaction()  # offsets 5..7 aborted, 8 the abort marker
            for _ in range(3):
                await (await txn.send(topic, b"aborted", partition=0))
            await txn.abort_transaction()
            last = await plain.send_and_wait(topic, b"after", partition=0)
        finally:
            await txn.stop()
            await plain.stop()
        offsets = BrokerOffsets(bootstrap, group, {})
        tp = TP(topic, 0)
        try:
            out = {
                "after": last.offset,
                "start_uncommitted": await offsets.committed(tp),
                "hole": await offsets.consumable_between(tp, 2, 4),
                "aborted_only": await offsets.consumable_between(tp, 5, last.offset),
                "up_to_after": await offsets.consumable_between(tp, 5, last.offset + 1),
            }
            committer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
            await committer.start()
            committer.assign([TopicPartition(topic, 0)])
            try:
                await committer.commit({TopicPartition(topic, 0): 3})
            finally:
                await committer.stop()
            out["start_committed"] = await offsets.committed(tp)
        finally:
            await offsets.stop()
        return out

    result = asyncio.run(scenario())
    assert result["after"] > 5, result  # the aborted transaction took offsets from 5 on (records, marker)
    assert result["start_uncommitted"] == 0
    assert result["hole"] is True
    assert result["aborted_only"] is False, "aborted records and markers are no events"
    assert result["up_to_after"] is True
    assert result["start_committed"] == 3


@pytest.mark.broker
def test_recovery_end_is_the_last_committed_record_not_the_commit_marker(bootstrap) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"ledger-end-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[dict, dict]:
        txn = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{topic}-txn")
        await txn.start()
        try:
            async with txn.transaction():  # partition 0: records 0..2, marker 3
                for _ in range(3):
                    await txn.send(topic, b"kept", partition=0)
            async with txn.transaction():  # partition 1: record 0, marker 1 ...
                await txn.send(topic, b"kept", partition=1)
            await txn.begin_transaction()  # ... then records 2..4 aborted, marker 5
            for _ in range(3):
                await (await txn.send(topic, b"aborted", partition=1))
            await txn.abort_transaction()
        finally:
            await txn.stop()
        probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
        await probe.start()
        try:
            tps = [TopicPartition(topic, p) for p in (0, 1, 2)]
            ends = await probe.end_offsets(tps)
        finally:
            await probe.stop()
        ends = {TP(tp.topic, tp.partition): end for tp, end in ends.items()}
        return ends, await last_records(bootstrap, {}, ends)

    ends, last = asyncio.run(scenario())
    assert ends[TP(topic, 0)] == 4 and ends[TP(topic, 1)] == 6, ends
    assert last == {TP(topic, 0): 2, TP(topic, 1): 0, TP(topic, 2): None}


@pytest.mark.broker
def test_asking_about_partitions_in_turn_leaves_the_committed_offsets_readable(bootstrap) -> None:
    """The progress watchdog asks about every assigned partition in turn. When the range reads
    and the committed offsets shared one consumer with the group id, reassigning it between two
    steps of aiokafka's coordinator task killed that task ("Unexpected error in coordinator
    routine"), and every later question to that consumer failed: the watchdog took that for a
    broker that cannot tell, and let a stalled worker be (one run of its reliability test)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"ledger-turns-{uuid.uuid4().hex[:8]}"
    group = f"{topic}-group"

    async def scenario() -> dict:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for n in range(6):
                await producer.send_and_wait(topic, b"x%d" % n, partition=n % 2)
        finally:
            await producer.stop()
        committer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await committer.start()
        try:
            committer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
            await committer.commit({TopicPartition(topic, 0): 1, TopicPartition(topic, 1): 2})
        finally:
            await committer.stop()
        offsets = BrokerOffsets(bootstrap, group, {})
        tps = [TP(topic, 0), TP(topic, 1)]
        try:
            answers = []
            for _ in range(5):  # as the watchdog asks when it knows where the worker stands
                ends = await asyncio.wait_for(offsets.end_offsets(tps), 10)
                for tp in tps:
                    answers.append((tp.partition, ends[tp],
                                    await offsets.consumable_between(tp, 0, ends[tp], timeout=10, unknown=None)))
            committed = [await asyncio.wait_for(offsets.committed(tp), 10) for tp in tps]
            return {"answers": answers, "committed": committed}
        finally:
            await offsets.stop()

    result = asyncio.run(scenario())
    assert result["answers"] == [(0, 3, True), (1, 3, True)] * 5, result
    assert result["committed"] == [1, 2]
