"""`ksr bench batches`: how the agent's batches are cut, and what that costs the model; no broker.

The worker's agent takes batches from direct delivery's queue (worker.delivery). A fetch returns
partition by partition, so a batch taken in fetch order holds one partition's events: in ml-100k's
time order, sessions of a hundred ratings or more by one user, so five or six users with dozens of
events each, and the model's recurrence (the GRU and the memory write) runs as many sequential
steps as the longest of them. Direct delivery now takes an equal share of every partition queued.

This runs the same events (the throughput benchmark's, split over the topic's partitions by the
Kafka producer's key hash) through `BatchProcessor.process` (validation, state decode and encode, the
model, the ranking, the answers' encoding) with batches cut both ways, repeats interleaved, and
prints per event: wall time, the model and ranking's time, and the sequential model steps.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from types import SimpleNamespace

from worker.bench import require_at_least_one
from worker.delivery import DirectDelivery


def _partition(key: bytes, partitions: int) -> int:
    """The partition the Kafka producers' default partitioner gives a keyed record."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _messages(dataset, events: int, partitions: int) -> list:
    """The throughput benchmark's events as queued messages, each partition's in offset order, and
    the partitions one after another, as fetches arrive."""
    import json

    from worker.bench import _events

    by_partition: dict[int, list] = {p: [] for p in range(partitions)}
    for key, event in _events(dataset, events):
        by_partition[_partition(key, partitions)].append((key, json.dumps(event).encode()))
    messages = []
    for partition, records in by_partition.items():
        tp = ("interactions", partition)  # hashable, as Faust's TP
        for offset, (key, value) in enumerate(records):
            messages.append(SimpleNamespace(tp=tp, key=key, value=value, topic=tp[0], partition=partition,
                                            offset=offset, timestamp=time.time()))
    return messages


def _cut_in_fetch_order(messages: list, size: int) -> list[list]:
    """Batches as direct delivery took them before partition shares: in queue order."""
    return [messages[start : start + size] for start in range(0, len(messages), size)]


def _cut_in_partition_shares(messages: list, size: int) -> list[list]:
    """Batches as direct delivery takes them now."""

    async def cut() -> list[list]:
        delivery = DirectDelivery(SimpleNamespace(), "interactions", max_queued=len(messages) + 1)
        delivery.put(messages)
        batches = []
        async for batch in delivery.batches(size):
            batches.append(batch)
            if not delivery.queued:
                return batches
        return batches

    return asyncio.run(cut())


def _run(recommender, batches: list[list]) -> dict:
    """Process the batches from empty state, as the agent does; figures per event."""
    from worker import state as states
    from worker.processing import BatchProcessor, Source

    processor = BatchProcessor(recommender)
    store: dict[str, bytes] = {}

    def load(user_id: str, _partition: int):
        blob = store.get(user_id)
        return None if blob is None else states.decode(blob)

    sources = [[Source(m.key, m.value, m.topic, m.partition, m.offset, m.timestamp) for m in batch]
               for batch in batches]
    events = sum(map(len, sources))
    model = steps = answers = users = 0.0
    started = time.perf_counter()
    for batch in sources:
        result = processor.process(batch, load)
        model += result.step_seconds
        steps += result.rounds
        answers += len(result.recommendations)
        users += len(result.states)
        for user_id, (_, user) in result.states.items():
            store[user_id] = states.encode(user)
    wall = time.perf_counter() - started
    if answers != events:
        raise RuntimeError(f"{events} events gave {answers} answers")
    return {"ms_per_event": 1e3 * wall / events, "model_ms_per_event": 1e3 * model / events,
            "steps_per_event": steps / events, "users_per_batch": users / len(sources), "batches": len(sources)}


def _freeze_like_the_worker() -> int:
    """Move everything alive now (PyTorch, the model, the events) out of the garbage collector's
    reach, as the worker does at its start (KSR_GC_FREEZE, default on; `Worker._freeze_startup_heap`).

    Without it every full collection here walks the whole start-up heap, which the worker's never
    do, and the dicts, lists and messages a batch allocates trigger them: the explanations' part of
    the ranking cost 9.3 us per event against 2.6 with the heap frozen (a microbenchmark of a
    256-event batch, not in the repo). Returns the objects frozen (0 with KSR_GC_FREEZE=0).
    """
    from worker import metrics
    from worker.config import Settings

    return metrics.freeze_heap() if Settings.from_env().gc_freeze else 0


def bench_batches(checkpoint: str, data: str = "ml-100k", events: int = 20000, partitions: int = 4,
                  batch_size: int = 256, repeats: int = 3) -> dict:
    """Fetch-order batches against partition-share batches, `repeats` interleaved rounds; medians."""
    require_at_least_one(events=events, partitions=partitions, batch_size=batch_size, repeats=repeats)
    import torch

    from model import data as datasets
    from model.serving import Recommender

    torch.set_num_threads(1)  # as the worker (KSR_TORCH_THREADS)
    recommender = Recommender.load(checkpoint)
    messages = _messages(datasets.load(data), events, partitions)
    cuts = {"fetch_order": _cut_in_fetch_order(messages, batch_size),
            "partition_shares": _cut_in_partition_shares(messages, batch_size)}
    frozen = _freeze_like_the_worker()
    rounds: dict[str, list[dict]] = {name: [] for name in cuts}
    for _ in range(repeats):
        for name, batches in cuts.items():
            rounds[name].append(_run(recommender, batches))
    result: dict = {"events": events, "partitions": partitions, "batch_size": batch_size, "repeats": repeats,
                    "gc_frozen_objects": frozen}
    for name, runs in rounds.items():
        result[name] = {key: round(statistics.median(run[key] for run in runs), 4) for key in runs[0]}
        result[name]["ms_per_event_per_round"] = [round(run["ms_per_event"], 4) for run in runs]
    result["speedup"] = round(result["fetch_order"]["ms_per_event"] / result["partition_shares"]["ms_per_event"], 3)
    return result
