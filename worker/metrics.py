"""Prometheus metrics of the worker and the fine-tuner (prefix `ksr_`), served by prometheus-client."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence

import numpy as np
from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS = Counter("ksr_events", "Interaction events by outcome", ["outcome"])  # ok|dead_letter|duplicate
RECOMMENDATIONS = Counter("ksr_recommendations", "Recommendation messages emitted")
DEAD_LETTERS = Counter("ksr_dead_letters", "Events sent to the dead-letter topic, by reason", ["reason"])
FINETUNE_RUNS = Counter("ksr_finetune_runs", "Fine-tune rounds by result", ["result"])
FINETUNE_SECONDS = Histogram(
    "ksr_finetune_round_seconds", "Duration of a fine-tune round",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
MODEL_STEPS = Counter(
    "ksr_model_steps",
    "Sequential model steps: per batch, the most events any one user had in it (the recurrence's length)",
)
BATCH_SIZE = Histogram(
    "ksr_batch_size", "Events per processed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
STEP_SECONDS = Histogram(
    "ksr_model_step_seconds", "Model step + top-k time per batch",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
LATENCY_SECONDS = Histogram(
    "ksr_event_to_recommendation_seconds",
    "From the event's Kafka timestamp to its recommendation being emitted",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENT_AGE_SECONDS = Histogram(
    "ksr_event_age_seconds",
    "An event's age (from its Kafka timestamp) on its way through the worker: when the fetch loop "
    "hands it to the agent's queue (fetched; direct delivery only) and when its batch starts (batched); "
    "ksr_event_to_recommendation_seconds is its age when answered",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# One child per stage, made here so that both are on the page from the start.
EVENT_AGE = {stage: EVENT_AGE_SECONDS.labels(stage) for stage in ("fetched", "batched")}
COMMIT_SECONDS = Histogram(
    "ksr_commit_seconds",
    "Offset commit time (under exactly-once: the transactions' commit, partitions side by side)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
AGENT_SECONDS = Counter(
    "ksr_agent_seconds",
    "The agent's wall time by phase: waiting for events (idle), for the commit gate (gate), admitting "
    "them (admit), processing them: validation, states, model, ranking, encoding (process), sending "
    "the batch's records (send), waiting to send into a committing transaction (send_commit_wait), "
    "the rest: table writes, transactions, acknowledgements (other)",
    ["phase"],
)
# One child per phase, made here so that every phase is on the page (at 0) from the start.
AGENT_PHASE = {phase: AGENT_SECONDS.labels(phase)
               for phase in ("process", "send", "send_commit_wait", "admit", "gate", "other", "idle")}
IDLE_COMMITS = Counter(
    "ksr_idle_commits",
    "Commits made because the agent caught up, ahead of the commit timer (exactly-once, KSR_COMMIT_WHEN_IDLE)",
)
QUEUED_EVENTS = Gauge(
    "ksr_queued_events", "Interaction events fetched and waiting for the agent (direct delivery)"
)
MODEL_VERSION = Gauge("ksr_model_version", "Version of the model being served")
USERS_IN_STATE = Gauge("ksr_users_in_state", "Users with state in this worker's partitions (estimate)")
RECOMPUTED_USERS = Counter("ksr_recomputed_users", "Users whose state was recomputed after a model swap")
RANKED_AGAIN = Counter(
    "ksr_ranked_again", "Answers whose int8 candidates the bound could not certify, ranked again "
    "(with more int8 candidates, then in float32 if need be; KSR_RANKING_PRECISION int8 or auto)"
)
SKIPPED_EVENTS = Counter(
    "ksr_skipped_deliveries", "Deliveries not processed: redelivered (already processed) or from before a rebalance",
    ["reason"],
)
OFFSET_JUMPS = Counter(
    "ksr_offset_jumps", "Jumps in input offsets, by what the broker holds in between (no_records: transaction "
    "markers and the like; hole: undelivered events, the worker restarts)", ["result"],
)
MODEL_SWAPS = Counter("ksr_model_swaps", "Model swap attempts by result", ["result"])
GC_PAUSE_SECONDS = Histogram(
    "ksr_gc_pause_seconds", "Python garbage collections: how long each stopped the process, by generation",
    ["generation"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

MEMORY_BYTES = Gauge(
    "ksr_memory_bytes",
    "The worker's memory by part, sampled every 10 s: RocksDB's block cache (one, shared by the "
    "partitions' stores), memtables and table readers (index and filter blocks held outside the "
    "cache, summed over the stores); "
    "the C heap (glibc's mallinfo2): bytes in use in its heaps, free in them (kept, not yet returned "
    "to the system) and in chunks mapped on their own",
    ["part"],
)
PYTHON_BLOCKS = Gauge(
    "ksr_python_allocated_blocks", "Memory blocks the Python interpreter has allocated (sys.getallocatedblocks)"
)

GC_FROZEN_OBJECTS = Gauge(
    "ksr_gc_frozen_objects", "Start-up objects moved out of the garbage collector's reach (KSR_GC_FREEZE)"
)


def observe_gc_pauses() -> None:
    """Time every collection of the cyclic garbage collector into `ksr_gc_pause_seconds` (once per
    process). A full (generation 2) collection walks every tracked object and stops the event loop
    while it does."""
    if getattr(observe_gc_pauses, "installed", False):
        return
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            GC_PAUSE_SECONDS.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)
    observe_gc_pauses.installed = True


def freeze_heap() -> int:
    """Move every object alive now out of the garbage collector's reach (a collection first, then
    `gc.freeze()`), unless something is frozen already; sets `ksr_gc_frozen_objects` and returns
    how many objects are frozen. The worker does it at its start (KSR_GC_FREEZE), and `ksr bench
    batches` to time batches as the worker runs them."""
    if not gc.get_freeze_count():
        gc.collect()
        gc.freeze()
    GC_FROZEN_OBJECTS.set(gc.get_freeze_count())
    return gc.get_freeze_count()


# RocksDB's memory properties, as the parts of `ksr_memory_bytes` they are reported under.
ROCKSDB_MEMORY = {
    "rocksdb_block_cache": "rocksdb.block-cache-usage",
    "rocksdb_memtables": "rocksdb.cur-size-all-mem-tables",
    "rocksdb_table_readers": "rocksdb.estimate-table-readers-mem",
}


# The C heap's parts of `ksr_memory_bytes`, as glibc's mallinfo2 fields they are read from.
C_HEAP = {"c_heap_in_use": "uordblks", "c_heap_free": "fordblks", "c_heap_mmapped": "hblkhd"}


def c_heap() -> dict[str, int] | None:
    """The C heap's bytes by part (C_HEAP: in use, free, mapped on their own), or None where the C
    library is not glibc 2.33 or later."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {part: getattr(info, field) for part, field in C_HEAP.items()}


def store_property(dbs, prop: str) -> int:
    """RocksDB's integer property `prop` summed over the stores `dbs` (rocksdict `Rdict`s); a store
    that fails to answer (closed during a rebalance) is left out."""
    from rocksdict import DbClosedError

    total = 0
    for db in dbs:
        try:
            total += int(db.property_int_value(prop) or 0)
        except (RuntimeError, OSError, DbClosedError) as error:
            logging.getLogger("ksr.worker").debug("%s: skipped a partition's store (%s)", prop, error)
    return total


def sample_memory(dbs, cache=None) -> dict[str, int]:
    """Set `ksr_memory_bytes` and `ksr_python_allocated_blocks` from the RocksDB stores `dbs`
    (rocksdict `Rdict`s), the C heap and the interpreter; returns the parts set. With `cache` (a
    rocksdict `Cache` all the stores share) the block cache is its usage, counted once; without, the
    stores' own caches summed. A store that fails to answer (closing during a rebalance) is left out
    of the sums."""
    import sys

    parts = {part: store_property(dbs, prop) for part, prop in ROCKSDB_MEMORY.items()
             if not (part == "rocksdb_block_cache" and cache is not None)}
    if cache is not None:
        parts["rocksdb_block_cache"] = int(cache.get_usage())
    parts.update(c_heap() or {})
    for part, value in parts.items():
        MEMORY_BYTES.labels(part).set(value)
    PYTHON_BLOCKS.set(sys.getallocatedblocks())
    return parts


def serve(host: str, port: int) -> None:
    """Start the /metrics HTTP endpoint in a background thread."""
    start_http_server(port, addr=host)


def observe_ages(histogram: Histogram, timestamps: Sequence[float]) -> None:
    """`observe_many` of each event's age now: seconds since its Kafka timestamp, 0 for one stamped
    ahead of this clock."""
    now = time.time()
    observe_many(histogram, np.maximum(0.0, now - np.asarray(timestamps, dtype=np.float64)))


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """`histogram.observe(a)` for every a of `amounts` (a batch's latencies), at one update per
    bucket instead of one bucket search and two locked increments per amount.

    Uses prometheus-client's own fields (pinned in pyproject.toml: `_upper_bounds`, `_buckets`,
    `_sum`), as its `observe` does; tests/test_worker.py holds the exposition to `observe`'s.
    """
    if not len(amounts):
        return
    histogram._raise_if_not_observable()
    values = np.asarray(amounts, dtype=np.float64)
    bounds = histogram._upper_bounds
    # observe() counts an amount in the first bucket whose bound is >= it (the last bound is +Inf).
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket, count in zip(histogram._buckets, counts[: len(bounds)].tolist()):
        if count:
            bucket.inc(count)
