"""The Faust app: topics and the user-state table declared once, one thin agent.

Data path: `interactions` -> agent (batches of the events fetched, handed over whole by
worker.delivery; one model forward per batch) ->
BatchProcessor (validate, load states, model step, top-k) -> `recommendations` / `interactions.dlq`,
and the new states into the `user-state` table (RocksDB via rocksdict, with its changelog topic).

Every message goes to the partition number of the event it answers, so with exactly-once processing
the recommendations, dead letters, changelog writes and input offsets of a partition all commit in
that partition's one Kafka transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import json
import logging
import os
import sys
import time

import aiokafka.producer.sender
import faust
import rocksdict
from faust.types import TP

from model.serving import Recommender
from worker import metrics
from worker.config import Settings
from worker.delivery import DirectDelivery
from worker.ledger import BrokerOffsets, Delivery, OffsetLedger
from worker.logfilter import quiet_repeated_kafka_errors
from worker.processing import BatchProcessor, Source
from worker.state import StateDecodeError, StoredUser, decode, encode_many
from worker.store import SharedCacheOptions

log = logging.getLogger("ksr.worker")


def broker_urls(bootstrap_servers: str) -> list[str]:
    """Faust wants kafka://host:port URLs."""
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()]


def aiokafka_security(settings: Settings) -> dict:
    """aiokafka client arguments from the shared KAFKA_* security settings."""
    security = dict(settings.kafka_security)
    protocol = security.get("security_protocol", "PLAINTEXT")
    if "SSL" in protocol:
        from aiokafka.helpers import create_ssl_context

        security["ssl_context"] = create_ssl_context(
            cafile=security.pop("ssl_cafile", None), certfile=security.pop("ssl_certfile", None),
            keyfile=security.pop("ssl_keyfile", None),
        )
    return security


def faust_credentials(settings: Settings):
    """Faust credentials from the shared KAFKA_* security settings (None for PLAINTEXT)."""
    security = settings.kafka_security
    protocol = security.get("security_protocol", "PLAINTEXT")
    if protocol == "PLAINTEXT":
        return None
    import ssl

    context = None
    if "SSL" in protocol:
        context = ssl.create_default_context(cafile=security.get("ssl_cafile"))
        if security.get("ssl_certfile"):
            context.load_cert_chain(security["ssl_certfile"], security.get("ssl_keyfile"))
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=security.get("sasl_plain_username"),
            password=security.get("sasl_plain_password"),
            mechanism=security.get("sasl_mechanism", "PLAIN"),
            ssl_context=context,
        )
    return faust.SSLCredentials(context)


def ask_broker_for_highwaters(settings: Settings) -> None:
    """Make Faust's table recovery ask the broker where each changelog partition ends.

    With exactly-once processing faust-streaming 0.15 reads the changelog's end from the consumer's
    cached last stable offset, which aiokafka only knows after it has fetched from that partition.
    Right after a rebalance hands this worker a partition it has not fetched yet, that is unknown,
    recovery takes the end to be -1 and either skips restoring the partition (its users would go on
    from stale or empty state) or stops on a ConsistencyError. A ListOffsets request to the broker
    (with the consumer's isolation level, so read_committed gets the last stable offset) is right.

    The end Faust wants is the offset of the last record it will read. With transactions that is
    not the log end minus one, which is the commit marker: Faust would wait for a record that never
    comes and only give up after two 5-second timeouts, in every recovery. So the last committed
    record is looked up (worker.ledger.last_records). Faust-streaming is pinned;
    tests/test_reliability.py covers the takeover.
    """
    from faust.transport.drivers import aiokafka as driver

    from worker.ledger import last_records

    thread_cls = driver.AIOKafkaConsumerThread
    security = aiokafka_security(settings)

    async def _highwaters(self, partitions):
        try:
            ends = await self._ensure_consumer().end_offsets(list(partitions))
            if not self.consumer.in_transaction:
                return ends
            last = await last_records(settings.bootstrap_servers, security, ends)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            # Faust's recovery swallows this and never resumes the streams: the worker would stay
            # up, assigned and silent after the broker came back (tests/test_reliability.py).
            exit_for_restart("could not read the changelog ends from the broker (recovery cannot go on)")
        # Faust subtracts one from what this returns.
        return {tp: (last[tp] + 1 if last.get(tp) is not None else end) for tp, end in ends.items()}

    thread_cls._highwaters = _highwaters


def configure_worker_consumer() -> None:
    """Make the consumer Faust builds for a worker wait at most the app's KSR_FETCH_MAX_WAIT_MS
    for a fetch, where faust-streaming 0.15 fixes aiokafka's `fetch_max_wait_ms` at 1,500 ms.

    aiokafka keeps one fetch in flight per broker. A partition whose fetched records have waited
    in its buffer longer than its prefetch backoff (100 ms) is left out of the next fetch, and once
    the worker takes those records it is fetched again only when the fetch in flight returns. If
    every busy partition is left out, that fetch holds only partitions with nothing to read, and
    the broker keeps it for the whole wait: the events of the busy partitions wait with it. A trace
    of the worker's fetches in a benchmark run at a million users (docs/speed.md, At scale) showed
    exactly that: a fetch of Faust's leader election partition (`__assignor-__leader`, which nobody
    writes) alone, held 1.50 s while the events of all four input partitions waited, and the
    latency phase's p99 at 1,804 ms. The worker no longer has that topic (`topic_disable_leader`),
    but a quiet input partition, or a standby's changelog, can take its place: the wait bounds the
    hold-up; an idle worker sends a fetch per wait. With KSR_TRACE_FETCHES set, the consumer also
    traces its fetches (trace_fetches). Faust-streaming and aiokafka are pinned;
    tests/test_worker.py checks that both reach the consumer's fetcher.
    """
    from faust.transport.drivers import aiokafka as driver

    thread_cls = driver.AIOKafkaConsumerThread
    if getattr(thread_cls, "_ksr_worker_consumer_configured", False):
        return
    create = thread_cls._create_worker_consumer

    def _create_worker_consumer(self, transport):
        consumer = create(self, transport)
        wait = getattr(self.app, "_ksr_fetch_max_wait_ms", None)
        if wait is not None:
            # Read by the consumer's start, which builds its fetcher with it.
            consumer._fetch_max_wait_ms = wait
        trace = getattr(self.app, "_ksr_trace_fetches", None)
        if trace:
            trace_fetches(consumer, trace)
        return consumer

    thread_cls._create_worker_consumer = _create_worker_consumer
    thread_cls._ksr_worker_consumer_configured = True


def trace_fetches(consumer, path: str) -> None:
    """Write one JSON line per fetch of `consumer` (an aiokafka consumer, not yet started) to
    `path`.PID: when it was sent (`t`, epoch seconds), how long the broker took to answer (`ms`),
    whether it brought records (`records`) and the partitions it asked for, each `topic:partition@offset`
    (`fetched`). KSR_TRACE_FETCHES=PATH turns it on in the worker; a fetch held for the whole
    KSR_FETCH_MAX_WAIT_MS with none of the busy partitions in it is the hold-up that setting
    bounds (configure_worker_consumer). A diagnostic: it costs a write per fetch."""
    start = consumer.start

    async def start_traced():
        await start()
        fetcher = consumer._fetcher
        proc = fetcher._proc_fetch_request
        # A diagnostic: opened once, before the first fetch; closed by stop.
        out = open(f"{path}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115, ASYNC230

        async def traced(assignment, node_id, request):
            sent = time.time()
            brought = await proc(assignment, node_id, request)
            asked = [f"{topic}:{partition}@{offset}" for topic, partitions in request.topics
                     for partition, offset, _ in partitions]
            out.write(json.dumps({"t": round(sent, 4), "ms": round((time.time() - sent) * 1000, 2),
                                  "records": bool(brought), "fetched": asked}) + "\n")
            return brought

        fetcher._proc_fetch_request = traced
        stop = consumer.stop

        async def stop_traced():
            try:
                await stop()
            finally:
                out.close()

        consumer.stop = stop_traced

    consumer.start = start_traced


class _GateHold:
    """One commit's hold on the batch gate, released at most once (early, by
    Worker._commit_transactions, or when the commit ends)."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock: asyncio.Lock | None = lock

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()


_commit_gate_hold: contextvars.ContextVar[_GateHold | None] = contextvars.ContextVar("ksr_commit_gate_hold")


class Worker:
    """The app with its topics, table and agent, bound to one Settings and one Recommender."""

    def __init__(self, settings: Settings, recommender: Recommender, partitions: int) -> None:
        self.settings = settings
        ask_broker_for_highwaters(settings)
        configure_worker_consumer()
        self.ledger = OffsetLedger()
        self.offsets = BrokerOffsets(settings.bootstrap_servers, settings.app_id, aiokafka_security(settings))
        self.processor = BatchProcessor(
            recommender,
            top_k=settings.top_k,
            history_length=settings.history_length,
            recent_event_ids=settings.recent_event_ids,
            max_event_bytes=settings.max_event_bytes,
            answer_duplicates=settings.processing_guarantee == "at_least_once",
        )
        self.app = faust.App(
            settings.app_id,
            broker=broker_urls(settings.bootstrap_servers),
            broker_credentials=faust_credentials(settings),
            store="rocksdb://",
            datadir=str(settings.state_dir),
            processing_guarantee=settings.processing_guarantee,
            # With exactly-once, recommendations become visible to read_committed consumers when the
            # transaction commits, so the commit interval bounds the latency they see.
            broker_commit_interval=settings.commit_interval_s,
            # How long a dead worker's partitions wait before another takes them over.
            broker_session_timeout=settings.session_timeout_s,
            broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
            # Faust waits this long after a rebalance before resuming the streams (default 3 s).
            stream_recovery_delay=0.5,
            topic_partitions=partitions,
            topic_replication_factor=1,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            producer_max_request_size=max(1024 * 1024, 4 * settings.max_event_bytes),
            # One producer batch per topic partition per processed batch (Worker._send_batches):
            # 256 KiB holds a 256-event batch's answers in one request.
            producer_max_batch_size=256 * 1024,
            consumer_max_fetch_size=max(1024 * 1024, 4 * settings.max_event_bytes),
            # No leader election topic: nothing here runs on the leader only, and its one partition,
            # which nobody writes, was fetched alone and held for the whole fetch wait while the
            # input's records waited (configure_worker_consumer).
            topic_disable_leader=True,
            # Standby copies of other workers' partitions (Faust's default, 1): a takeover has little
            # to restore, but every state another worker writes is read and written here as well.
            table_standby_replicas=settings.standby_replicas,
        )
        # Read by configure_worker_consumer's wrapper when Faust builds this app's consumer.
        self.app._ksr_fetch_max_wait_ms = settings.fetch_max_wait_ms
        self.app._ksr_trace_fetches = os.environ.get("KSR_TRACE_FETCHES") or None
        if settings.processing_guarantee == "exactly_once":
            # Wrapped before Faust creates its producer (at start), so before any transaction.
            new_producer = self.app._new_producer
            self.app._new_producer = lambda: shorten_transaction_retries(
                new_producer(), settings.txn_retry_backoff_ms)
        raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
        self.interactions = self.app.topic(settings.interactions_topic, partitions=partitions, **raw)
        self.recommendations = self.app.topic(settings.recommendations_topic, partitions=partitions, **raw)
        self.dead_letters = self.app.topic(settings.dlq_topic, partitions=partitions, **raw)
        self.user_state = self.app.Table(
            "user-state",
            default=None,
            partitions=partitions,
            key_type=bytes,
            value_type=bytes,
            # Per partition: Faust's defaults (64 MiB x 3 write buffers, a 2 GiB block cache, bloom
            # filters of 3 bits per key, false positives for about a quarter of absent keys) let the
            # worker's memory grow by gigabytes as the table fills. The block cache is shared (below).
            options={
                "driver": "rocksdict",
                "write_buffer_size": settings.rocksdb_write_buffer_mb << 20,
                "max_write_buffer_number": 2,
                "bloom_filter_size": 10,
            },
        )
        # One block cache for every partition's store (worker.store): the bound is the worker's.
        self.block_cache = rocksdict.Cache(settings.rocksdb_block_cache_mb << 20)
        store = self.user_state.data
        store.rocksdb_options = SharedCacheOptions(self.block_cache, **store.options)
        # Tables take their serializers from Record types only; states are our own bytes
        # (worker.state), so override before the store and changelog topic are created.
        self.user_state.key_serializer = "raw"
        self.user_state.value_serializer = "raw"
        self.app.agent(self.interactions, name="process-interactions")(
            self._agent
        )
        self.app.timer(10.0)(self._sample_gauges)
        self.app.timer(30.0)(self._release_free_memory)
        self.app.task(self._watch_model_updates)
        self.app.task(self._watch_progress)
        self.batches_taken = 0  # by the agent; what the progress watchdog counts
        self.pending: Recommender | None = None
        # Interactions handed from the fetch loop to the agent in whole fetches (worker.delivery);
        # None with KSR_FAST_DELIVERY=0 (Faust's stream delivers them one at a time).
        self.delivery = (
            DirectDelivery(self.app, settings.interactions_topic, max_queued=max(4096, 4 * settings.batch_size))
            if settings.fast_delivery else None
        )
        self.commit_gate = asyncio.Lock()
        self.start_watch: asyncio.Task | None = None
        # Under exactly-once: per input partition's transactional id, the changelog batches sent in
        # its open transaction (future, record count), for the table's persisted offset at its commit.
        self.changelog_sends: dict[str, list[tuple[asyncio.Future, int]]] = {}
        # At-least-once: every send since the last offset commit, checked before the next one.
        self.unconfirmed_sends: list[asyncio.Future] = []
        metrics.MODEL_VERSION.set(recommender.version)

    async def _agent(self, stream) -> None:
        # From the agent's start, which comes before Faust's table recovery: Faust starts the app's
        # tasks (app.task, app.timer) only once that recovery has completed.
        if self.start_watch is None:
            self.start_watch = asyncio.create_task(self._watch_start(), name="ksr-watch-start")
        self._gate_commits()
        if self.delivery is not None:
            self.delivery.install()
        self._freeze_startup_heap()
        # The memory gauges from the start (the timer samples them every 10 s once the tables are up).
        metrics.sample_memory(self._stores(), self.block_cache)
        caught_up = asyncio.Event()
        idle_commits = None
        if self.app.in_transaction and self.settings.commit_when_idle:
            idle_commits = asyncio.create_task(self._commit_when_idle(caught_up), name="ksr-commit-when-idle")
        if self.delivery is not None:
            # Direct delivery (worker.delivery): the agent's Faust stream stays empty.
            batches, remaining = self._direct_batches(), lambda: self.delivery.queued
        else:
            batches, remaining = self._batches(stream), stream.channel.queue.qsize
        try:
            idle = metrics.AGENT_PHASE["idle"]
            waiting = time.perf_counter()
            async for messages, acknowledge in batches:
                idle.inc(time.perf_counter() - waiting)
                self.batches_taken += 1
                await self._batch(messages, acknowledge)
                waiting = time.perf_counter()
                if not remaining() or 2 * len(messages) <= self.settings.batch_size:  # see _commit_when_idle
                    caught_up.set()
        finally:
            if idle_commits is not None:
                idle_commits.cancel()
            await self.offsets.stop()

    async def _commit_when_idle(self, caught_up: asyncio.Event) -> None:
        """Under exactly-once: commit as soon as the agent keeps up, not only on the timer.

        A read_committed consumer sees an answer only when its transaction commits, and Faust
        commits every KSR_COMMIT_INTERVAL_MS: an answer waited on average half the interval, then
        the commit. The agent keeps up when nothing is queued after its batch, or when the batch
        (everything queued, up to KSR_BATCH_SIZE) was at most half full: at 1,500 events/s a few
        events arrive during every batch, so the queue is seldom empty, but the batches stay
        small. The worker then commits at once, and again as soon as that commit ends if the
        agent still keeps up. Under saturation batches are full and the queue is not empty, the
        timer alone commits, and the rate pays nothing. Commits never overlap (Faust's `commit`
        waits for one under way); a commit under way may have chosen its offsets before the last
        batch, so the next one starts when it ends. KSR_COMMIT_WHEN_IDLE=0 leaves the timer alone.
        """
        consumer = self.app.consumer
        while True:
            await caught_up.wait()
            caught_up.clear()
            try:
                await consumer.maybe_wait_for_commit_to_finish()
                # Shielded: stopping the agent cancels this loop, never a commit half done (Faust's
                # own commit at shutdown waits for it).
                if await asyncio.shield(consumer.commit()):
                    metrics.IDLE_COMMITS.inc()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  (as in _agent: a commit that failed restarts the worker)
                exit_for_restart("commit failed")

    async def _watch_start(self) -> None:
        """Restart the worker when its start stalls (KSR_START_TIMEOUT_S): see watch_start."""
        await watch_start(self.app.tables.recovery, self.settings.start_timeout_s)

    async def _watch_progress(self) -> None:
        """Restart the worker when its input holds events it is not processing
        (KSR_STALL_TIMEOUT_S): see watch_progress. Started by Faust after the first recovery."""
        # Its own client: the agent's (self.offsets) seeks its consumer in _admit.
        probe = BrokerOffsets(self.settings.bootstrap_servers, self.settings.app_id,
                              aiokafka_security(self.settings))
        try:
            await watch_progress(lambda: self.batches_taken, self._cannot_progress,
                                 lambda: self._unprocessed_input(probe), self._progress_report,
                                 self.settings.stall_timeout_s)
        finally:
            await probe.stop()

    def _cannot_progress(self) -> bool:
        """A rebalance or a table recovery is under way: the agent is not meant to take events."""
        app = self.app
        return bool(app.rebalancing or getattr(app, "in_recovery", False) or not app.flow_control.is_active())

    async def _unprocessed_input(self, probe: BrokerOffsets) -> dict:
        """Per assigned input partition with committed records this worker has not processed:
        (the next offset to process, the partition's end). Asks the broker."""
        topic = self.settings.interactions_topic
        tps = sorted(tp for tp in self.app.consumer.assignment() if tp.topic == topic)
        if not tps:
            return {}
        ends = await probe.end_offsets(tps)
        generation = self.app.consumer_generation_id
        behind = {}
        for tp in tps:
            start = self.ledger.expected(tp) if self.ledger.knows(tp, generation) else await probe.committed(tp)
            end = ends.get(tp)
            if end is not None and end > start and await probe.consumable_between(tp, start, end, unknown=False):
                behind[tp] = (start, end)
        return behind

    def _progress_report(self) -> str:
        """What a stalled worker's fetch path looks like, for its log."""
        consumer, topic = self.app.consumer, self.settings.interactions_topic

        def partitions(tps) -> list[int]:
            return sorted(tp.partition for tp in (tps or ()) if tp.topic == topic)

        read = getattr(consumer, "_read_offset", {}) or {}
        queued = self.delivery.queued if self.delivery is not None else "n/a (KSR_FAST_DELIVERY=0)"
        return (f"queued for the agent: {queued}; Faust's paused partitions: "
                f"{partitions(getattr(consumer, '_paused_partitions', None))}, active: "
                f"{partitions(getattr(consumer, '_active_partitions', None))}; last read offsets: "
                f"{ {tp.partition: read[tp] for tp in sorted(read) if tp.topic == topic} }; "
                f"flow {'active' if self.app.flow_control.is_active() else 'suspended'}; {self._client_report()}")

    def _client_report(self) -> str:
        """aiokafka's view, in Faust's consumer thread, of each input partition: its fetch position
        (none while it awaits a reset), whether aiokafka has it paused, the last highwater a fetch
        saw. Read from this thread without a lock: a diagnostic, not a decision."""
        topic = self.settings.interactions_topic
        try:
            client = self.app.consumer._thread._consumer
            assignment = client._subscription.subscription.assignment
            parts = []
            for tp in sorted(client.assignment()):
                if tp.topic == topic:
                    state = assignment.state_value(tp)
                    position = state.position if state.has_valid_position else "none"
                    parts.append(f"{tp.partition}: position {position}{', paused' if state.paused else ''}, "
                                 f"highwater {client.highwater(tp)}")
            return "aiokafka: " + ("; ".join(parts) or "no input partition assigned")
        except Exception as error:  # noqa: BLE001  (private attributes of two libraries: report, never fail)
            return f"aiokafka: unknown ({type(error).__name__}: {error})"

    async def _direct_batches(self):
        """Direct delivery's batches (worker.delivery), as (messages, acknowledge) pairs."""
        delivery = self.delivery

        async def acknowledge(messages) -> None:
            delivery.done(messages)

        async for messages in delivery.batches(self.settings.batch_size):
            delivery.take(messages)
            yield messages, acknowledge

    async def _batches(self, stream):
        """With KSR_FAST_DELIVERY=0: the Faust stream's events in batches, each every event already
        delivered, up to KSR_BATCH_SIZE; it waits for nothing more. Yields (messages, acknowledge)
        pairs, as _direct_batches does.

        Faust's take_events waits a fixed window for each batch and stops buffering while the agent
        processes one, so the worker sat out the window with thousands of events queued and
        batches of ~100 (README, Speed). Here, under load, a full batch is queued whenever the agent
        is ready; at a low rate an event is processed as soon as it arrives. The agent acknowledges
        the events after their batch.
        """
        queue = stream.channel.queue
        size = self.settings.batch_size
        events = []
        async for event in stream.noack().events():
            events.append(event)
            if len(events) >= size or queue.empty():

                async def acknowledge(_messages, events=events) -> None:
                    for event in events:
                        await stream.ack(event)

                yield [event.message for event in events], acknowledge
                events = []

    async def _batch(self, messages, acknowledge) -> None:
        # A batch is one unit for the commit: its answers, its state changelog records and its
        # input offsets all land in the same transaction, or none of them do. So the messages are
        # acknowledged (what Faust's commit counts) under the gate too: a commit between the sends
        # and the acknowledgement would commit the answers without their offsets.
        phase = metrics.AGENT_PHASE
        try:
            started = time.perf_counter()
            async with self.commit_gate:
                admitting = time.perf_counter()
                phase["gate"].inc(admitting - started)
                fresh = await self._admit(messages)
                handling = time.perf_counter()
                phase["admit"].inc(handling - admitting)
                booked = await self.handle(fresh) if fresh else 0.0
                await acknowledge(messages)
                phase["other"].inc(time.perf_counter() - handling - booked)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001  (crash-only: any failure restarts; logged there)
            # A batch that failed (e.g. a transaction left unusable by a rebalance) must not
            # leave a half-working agent behind: nothing of it was committed.
            exit_for_restart("batch failed")

    def _freeze_startup_heap(self) -> None:
        """Move everything alive at start-up (PyTorch, Faust, the model, the app) out of the
        collector's reach with `gc.freeze()`.

        Every full collection walks every tracked object. With the start-up heap in it, the
        worker's full collections took 110-175 ms each, one every few seconds under load
        (`ksr_gc_pause_seconds` times them; README, Speed): the event loop stops that long, and the events
        that arrive meanwhile wait. Frozen objects are never collected (they live as long as the
        process anyway); collections then walk only what was allocated since.
        ``KSR_GC_FREEZE=0`` leaves the collector as Python sets it.
        """
        if not self.settings.gc_freeze or gc.get_freeze_count():
            return  # off, or frozen already (an agent restarted in the same process)
        log.info("froze %d start-up objects out of the garbage collector", metrics.freeze_heap())

    def _gate_commits(self) -> None:
        """Make Faust's commits wait for the batch in progress, and commit the partitions'
        transactions side by side, off the agent's path.

        Faust commits on a timer, concurrently with the agent. A commit that ran while a batch was
        half sent would commit some of its answers with none of its offsets, and a crash right after
        would answer those events twice. Commits therefore take the same lock as a batch (the gate)
        to choose their offsets.

        Under exactly-once, Faust then commits one transaction per input partition, one after
        another, each a few round trips to the broker, all while holding the gate. Here the commit
        takes every committed partition's transaction lock under the gate, lets go of the gate,
        and commits the transactions concurrently: the agent goes on with the next batch (state
        loads, model) and waits only where it sends to a partition whose commit has not finished
        (sends take the same per-partition lock), so nothing of the next batch enters a committing
        transaction.
        """
        consumer = self.app.consumer
        if getattr(consumer, "_ksr_gated", False):
            return
        force_commit = consumer.force_commit
        gate = self.commit_gate
        timeout = self.settings.commit_timeout_s

        async def gated_force_commit(*args, **kwargs):
            # A commit that never ends stops every later one (Faust's commits wait for it), so the
            # answers of exactly-once never become visible while the worker looks alive.
            stuck = asyncio.get_running_loop().call_later(timeout, commit_stuck, timeout)
            try:
                return await force_commit_under_the_gate(*args, **kwargs)
            finally:
                stuck.cancel()

        async def force_commit_under_the_gate(*args, **kwargs):
            await gate.acquire()
            hold = _GateHold(gate)
            token = _commit_gate_hold.set(hold)  # seen by _commit_transactions, called in this task
            started = time.perf_counter()
            try:
                committed = await force_commit(*args, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  (as in _agent)
                # A failed commit leaves the transactions in an unknown state.
                exit_for_restart("commit failed")
            finally:
                _commit_gate_hold.reset(token)
                hold.release()
            if committed:
                metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            return committed

        consumer.force_commit = gated_force_commit
        commit_offsets = consumer._commit_offsets

        async def ledger_commit_offsets(offsets, start_new_transaction: bool = True):
            # Never commit past an event this worker has not processed (see worker.ledger).
            offsets = self.ledger.clamp(offsets, self.settings.interactions_topic, self.app.consumer_generation_id)
            if not offsets:
                return False
            await self._confirm_sends()
            return await commit_offsets(offsets, start_new_transaction=start_new_transaction)

        consumer._commit_offsets = ledger_commit_offsets
        if self.app.in_transaction:
            self.app.producer.commit_transactions = self._commit_transactions
        consumer._ksr_gated = True

    async def _confirm_sends(self) -> None:
        """At-least-once: before input offsets commit, every answer, dead letter and changelog record
        sent so far must have reached the broker. A send that failed (a topic the worker may not
        write, a record the broker refuses) would otherwise be lost in silence behind the committed
        offsets; the worker restarts instead, and the events are delivered again. (Under
        exactly-once a failed send fails its transaction's commit, which restarts the worker.)"""
        sends, self.unconfirmed_sends = self.unconfirmed_sends, []
        if not sends:
            return
        failed = [r for r in await asyncio.gather(*sends, return_exceptions=True) if isinstance(r, BaseException)]
        if failed:
            log.error("%d sends failed (first: %r); not committing the offsets of their events",
                      len(failed), failed[0])
            exit_for_restart("a send failed", with_traceback=False)

    async def _commit_transactions(self, offsets_by_transaction, group_id: str,
                                   start_new_transaction: bool = True) -> None:
        """Faust's producer.commit_transactions, with the transactions committed concurrently.

        Called under the gate (Worker._gate_commits). Takes each transaction's lock first, so no
        send can enter a transaction being committed, then releases the gate.
        """
        producer = self.app.producer
        held = []
        try:
            for transactional_id in offsets_by_transaction:
                lock = self._transaction_lock(transactional_id)
                await lock.acquire()
                held.append(lock)
        except BaseException:
            for lock in held:
                lock.release()
            raise
        # Still under the gate: no batch is between its sends and its bookkeeping.
        changelog_sends = {
            transactional_id: self.changelog_sends.pop(transactional_id)
            for transactional_id in offsets_by_transaction if transactional_id in self.changelog_sends
        }
        hold = _commit_gate_hold.get(None)
        if hold is not None:
            hold.release()

        async def commit(transactional_id: str, offsets, lock: asyncio.Lock) -> None:
            try:
                client = producer._transaction_producers.get(transactional_id)
                if client is None:
                    log.warning("commit invoked for unknown transaction %s", transactional_id)
                    return
                await client.send_offsets_to_transaction(offsets, group_id)
                await client.commit_transaction()
                self._persist_changelog_offset(changelog_sends.get(transactional_id))
                if start_new_transaction:
                    await client.begin_transaction()
            finally:
                lock.release()

        await asyncio.gather(*(
            commit(transactional_id, offsets, lock)
            for (transactional_id, offsets), lock in zip(offsets_by_transaction.items(), held)
        ))

    async def _admit(self, messages) -> list:
        """The batch's messages this worker has not processed yet, in order; stops on a hole.

        Checked against the ledger (worker.ledger): redeliveries are dropped, events from before a
        rebalance are left for their redelivery, and a jump in offsets is checked with the broker.
        Runs under the commit gate, and marks the events processed: a failure in the batch exits
        the process before any commit.
        """
        generation = self.app.consumer_generation_id
        fresh = []
        for message in messages:
            if message.generation_id != generation:
                metrics.SKIPPED_EVENTS.labels("old_generation").inc()
                continue
            tp = message.tp
            if not self.ledger.knows(tp, generation):
                self.ledger.start(tp, await self.offsets.committed(tp), generation)
            kind = self.ledger.classify(tp, message.offset)
            if kind is Delivery.REDELIVERED:
                metrics.SKIPPED_EVENTS.labels("redelivered").inc()
                continue
            if kind is Delivery.JUMP:
                expected = self.ledger.expected(tp)
                if await self.offsets.consumable_between(tp, expected, message.offset):
                    metrics.OFFSET_JUMPS.labels("hole").inc()
                    log.error("%s: offset %d arrived but %d..%d were never delivered; restarting to read "
                              "them again from the last commit", tp, message.offset, expected, message.offset - 1)
                    exit_for_restart("undelivered events", with_traceback=False)
                metrics.OFFSET_JUMPS.labels("no_records").inc()
            self.ledger.processed(tp, message.offset)
            fresh.append(message)
        return fresh

    def _load(self, user_id: str, partition: int) -> StoredUser | None:
        """The user's state from the store of its event's partition, the one its state is written
        to (`handle`): a user's events share a partition, as its key is its id. One RocksDB read;
        through the table, with no current event (a batch holds several partitions), Faust looked
        every key up in each partition's store first, and a state it found it read twice."""
        blob = self.user_state.data._db_for_partition(partition).get(user_id.encode())
        if blob is None:
            return None
        try:
            return decode(blob)
        except StateDecodeError as error:
            log.warning("user %r: unreadable state (%s); starting fresh", user_id, error)
            return None

    async def _watch_model_updates(self) -> None:
        """Follow `model-updates` (every worker reads every announcement: no consumer group) and
        load each newer version off the event loop; `handle` swaps it in between batches."""
        from aiokafka import AIOKafkaConsumer

        from model.checkpoint import VERSION_MAX, CheckpointError

        consumer = AIOKafkaConsumer(
            self.settings.model_updates_topic, bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None, auto_offset_reset="latest", **aiokafka_security(self.settings),
        )
        await consumer.start()
        try:
            async for record in consumer:
                try:
                    update = json.loads(record.value)
                    version, path = int(update["version"]), str(update["checkpoint"])
                    if not 1 <= version <= VERSION_MAX:
                        raise ValueError(f"version {version} is not in 1..{VERSION_MAX}")
                except (ValueError, KeyError, TypeError, OverflowError) as error:  # 1e400 is inf
                    log.error("model-updates: unreadable announcement (%s): %r", error, record.value[:200])
                    metrics.MODEL_SWAPS.labels("bad_announcement").inc()
                    continue
                current = (self.pending or self.processor.recommender).version
                if version <= current:
                    continue
                try:
                    # Served as the current model is (KSR_SERVING_KERNEL, KSR_RANKING_PRECISION).
                    serving = self.processor.recommender
                    recommender = await asyncio.to_thread(
                        Recommender.load, path, serving.compiled, serving.ranking_setting)
                except Exception as error:  # noqa: BLE001 - whatever fails, the current model keeps serving
                    if not isinstance(error, CheckpointError):
                        error = f"{type(error).__name__}: {error}"
                    log.error("model v%s at %s failed to load; still serving v%s: %s", version, path,
                              current, error)
                    metrics.MODEL_SWAPS.labels("failed").inc()
                    continue
                if recommender.item_tokens != self.processor.recommender.item_tokens:
                    log.error("model v%s has another catalog; still serving v%s", version, current)
                    metrics.MODEL_SWAPS.labels("failed").inc()
                    continue
                self.pending = recommender
                log.info("model v%s loaded from %s; swapping in at the next batch", version, path)
        finally:
            await consumer.stop()

    async def handle(self, messages) -> float:
        """Process one batch of input messages (Faust ConsumerMessages, from any of the assigned
        partitions). Returns the seconds it booked to the agent's process and send phases."""
        if self.pending is not None:
            # Between batches: this batch and all later ones use the new model; users whose state
            # came from an older version are recomputed from their stored history on their next event.
            self.processor.swap(self.pending)
            metrics.MODEL_VERSION.set(self.pending.version)
            metrics.MODEL_SWAPS.labels("swapped").inc()
            log.info("now serving model v%s", self.pending.version)
            self.pending = None
        sources = [
            Source(m.key, m.value, m.topic, m.partition, m.offset, m.timestamp)
            for m in messages
        ]
        metrics.observe_ages(metrics.EVENT_AGE["batched"], [source.timestamp for source in sources])
        # One model forward for the whole batch, whichever partitions its events came from. Each
        # user's state is read from its own event's partition (`_load`).
        started = time.perf_counter()
        result = self.processor.process(sources, self._load)
        processed = time.perf_counter() - started
        metrics.AGENT_PHASE["process"].inc(processed)
        message_of_partition = {m.partition: m for m in messages}
        await self._ensure_transactions(message_of_partition)
        precision = self.settings.state_precision
        changelog = self.user_state.changelog_topic_name
        outgoing: list[tuple[str, int, bytes | None, bytes]] = []
        # Each partition's states in one RocksDB write (one write-ahead-log append per partition and
        # batch), to the store of that partition: where `_load` reads them and Faust's recovery
        # rebuilds them from the changelog records sent beside them.
        writes: dict[int, rocksdict.WriteBatch] = {}
        values = encode_many([stored for _, stored in result.states.values()], precision)
        for (user_id, (partition, _)), value in zip(result.states.items(), values):
            key = user_id.encode()
            write = writes.get(partition)
            if write is None:
                write = writes[partition] = rocksdict.WriteBatch(raw_mode=True)
            write.put(key, value)
            outgoing.append((changelog, partition, key, value))
        store = self.user_state.data
        for partition, write in writes.items():
            store._db_for_partition(partition).write(write)
        topic = self.settings.recommendations_topic
        outgoing.extend((topic, partition, key, value) for partition, key, value in result.recommendations)
        topic = self.settings.dlq_topic
        outgoing.extend((topic, partition, key, value) for partition, key, value, _ in result.dead_letters)
        started = time.perf_counter()
        sent, commit_wait = await self._send_batches(outgoing)
        sending = time.perf_counter() - started
        metrics.AGENT_PHASE["send_commit_wait"].inc(commit_wait)
        metrics.AGENT_PHASE["send"].inc(sending - commit_wait)
        if not self.app.in_transaction:
            self.unconfirmed_sends.extend(future for _, _, future, _ in sent)
        for sent_topic, partition, future, count in sent:
            if sent_topic != changelog:
                continue
            if self.app.in_transaction:
                self.changelog_sends.setdefault(self._transactional_id(partition), []).append((future, count))
            else:
                future.add_done_callback(self._changelog_persisted(TP(changelog, partition), count))
        for *_, reason in result.dead_letters:
            metrics.DEAD_LETTERS.labels(reason).inc()
        metrics.BATCH_SIZE.observe(len(sources))
        metrics.STEP_SECONDS.observe(result.step_seconds)
        metrics.MODEL_STEPS.inc(result.rounds)
        metrics.EVENTS.labels("ok").inc(len(result.recommendations) - result.answered_duplicates)
        metrics.EVENTS.labels("dead_letter").inc(len(result.dead_letters))
        metrics.EVENTS.labels("duplicate").inc(result.duplicates)
        metrics.RECOMMENDATIONS.inc(len(result.recommendations))
        metrics.RECOMPUTED_USERS.inc(result.recomputed_users)
        if result.ranked_again:
            metrics.RANKED_AGAIN.inc(result.ranked_again)
        metrics.observe_many(metrics.LATENCY_SECONDS, result.latencies)
        return processed + sending  # _batch books the rest of the batch's time as "other"

    def _changelog_persisted(self, tp: TP, count: int):
        """At-least-once: a done-callback for a batch of `count` changelog records that records the
        last one's offset as the table's persisted offset once the broker has them, as Faust's own
        table writes do. Recovery reads the changelog from after that offset."""
        table = self.user_state

        def persisted(done) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            table.data.set_persisted_offset(tp, done.result().offset + count - 1)

        return persisted

    def _persist_changelog_offset(self, sends: list[tuple[asyncio.Future, int]] | None) -> None:
        """Exactly-once: after a partition's transaction committed, record its last changelog
        record's offset as the table's persisted offset, so that a restart after a clean stop reads
        nothing of the changelog the local RocksDB already holds.

        Faust's own bookkeeping for this (TableManager.persist_offset_on_commit, flushed by
        on_commit) keys the pending offsets by changelog partition but looks them up by input
        partition, so under exactly-once it never writes them (faust-streaming 0.15.3): every
        restart would replay the whole changelog. The transaction committed, so every batch sent in
        it was delivered (aiokafka flushes before the commit).
        """
        if not sends:
            return
        last = None
        for future, count in sends:
            if future.done() and not future.cancelled() and future.exception() is None:
                metadata = future.result()
                offset = metadata.offset + count - 1  # the batch's base offset + its last record
                if last is None or offset > last[1]:
                    last = (TP(metadata.topic, metadata.partition), offset)
        if last is not None:
            self.user_state.data.set_persisted_offset(*last)

    def _transactional_id(self, partition: int) -> str:
        """Faust's transactional id for a partition of the input topic (its TransactionManager's
        "{group_id}-{group}-{partition}" format)."""
        group = self.app.assignor.group_for_topic(self.settings.interactions_topic)
        return f"{self.app.conf.id}-{group}-{partition}"

    def _transaction_lock(self, transactional_id: str) -> asyncio.Lock:
        """The lock Faust's producer holds around a transaction's sends and commit; every send and
        commit of the worker takes it too (created with the transaction's producer)."""
        locks = self.app.producer._trn_locks
        return locks.get(transactional_id) or locks.setdefault(transactional_id, asyncio.Lock())

    async def _ensure_transactions(self, partitions) -> None:
        """Make sure each source partition's transactional producer is in a transaction.

        Around a rebalance Faust may begin a partition's transaction while its commit of the
        previous one is still running, and that commit then leaves the producer with no open
        transaction (logged by Faust as "Exception in begin_transaction"). Sending then fails.
        Beginning one here is what Faust meant to do: the batch's sends and its offsets still go
        in the same transaction, committed by Faust's next commit of that partition.
        """
        if not self.app.in_transaction:
            return
        producer = self.app.producer
        for partition in partitions:
            transactional_id = self._transactional_id(partition)
            client = producer._transaction_producers.get(transactional_id)
            if client is None or client._txn_manager.is_in_transaction():
                continue
            # Under the transaction's lock: a commit in flight (Worker._commit_transactions) begins
            # the next transaction itself.
            async with self._transaction_lock(transactional_id):
                if not client._txn_manager.is_in_transaction():
                    log.info("%s: no open transaction after a rebalance; beginning one", transactional_id)
                    await client.begin_transaction()

    async def _send_batches(self, messages):
        """Send a batch's outgoing records, one producer batch per topic partition.

        messages: (topic, partition, key, value) in order; `partition` is both the destination
        partition and the input partition whose transaction the record belongs to.
        Returns (topic, partition, future, count) per producer batch, each future resolving to the
        batch's base offset once the broker has it; and the seconds spent waiting for transaction
        locks (a partition's commit under way).

        Every record of the worker's output (its answer, the user's changelog record, a dead letter)
        goes here, not through Faust's topic.send, for two reasons:
        - Faust's topic.send picks the transaction from the destination topic's consumer metadata,
          which a worker that never consumes `recommendations` does not have; the record would go
          out outside any transaction and survive a crash whose input offsets were never committed.
          Naming the source partition's transaction keeps answer, state and offset together.
        - Faust's table assignment hands the changelog record to a background buffer, which can
          reach the producer after the batch's transaction committed; a crash then would keep the
          batch's answers and offsets but lose its state change.
        One aiokafka batch per topic partition (create_batch / send_batch) also costs a fraction of
        one producer.send per record (README, Speed).
        """
        groups: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = {}
        for topic, partition, key, value in messages:
            groups.setdefault((topic, partition), []).append((key, value))
        producer = self.app.producer
        transactional = self.app.in_transaction
        sent = []
        lock_wait = 0.0
        for (topic, partition), records in groups.items():
            if transactional:
                transactional_id = self._transactional_id(partition)
                client = producer._transaction_producers.get(transactional_id)
                if client is None:
                    raise RuntimeError(f"no transactional producer {transactional_id!r} for partition {partition}")
                lock = self._transaction_lock(transactional_id)
            else:
                client, lock = producer._ensure_producer(), contextlib.nullcontext()
            waiting = time.perf_counter()
            async with lock:
                lock_wait += time.perf_counter() - waiting
                batch, count = client.create_batch(), 0
                for key, value in records:
                    if batch.append(key=key, value=value, timestamp=None) is None:  # full
                        batch.close()
                        sent.append((topic, partition, await client.send_batch(batch, topic, partition=partition), count))
                        batch, count = client.create_batch(), 0
                        batch.append(key=key, value=value, timestamp=None)  # a first record always fits
                    count += 1
                batch.close()
                sent.append((topic, partition, await client.send_batch(batch, topic, partition=partition), count))
        return sent, lock_wait

    async def _release_free_memory(self) -> None:
        """Give memory freed inside the C heap back to the system (glibc's malloc_trim).

        Every event allocates and frees state blobs, tensors and RocksDB buffers of many sizes;
        glibc keeps freed pages in its heap, so the resident size creeps up with the number of
        users seen. Trimming every 30 s (off the event loop) returns them. A no-op without glibc.
        """
        await asyncio.to_thread(release_free_memory)

    def _stores(self) -> list:
        """The RocksDB stores (rocksdict `Rdict`s) of the partitions this worker holds now."""
        return list(getattr(self.user_state.data, "_dbs", {}).values())

    def _active_stores(self) -> list:
        """The stores of the partitions this worker serves, without the standby copies it keeps of
        other workers' partitions (whose users those workers count)."""
        dbs = getattr(self.user_state.data, "_dbs", {})
        try:
            actives = {tp.partition for tp in self.app.assignor.assigned_actives()
                       if tp.topic == self.settings.interactions_topic}
        except Exception:  # noqa: BLE001 - no assignment yet: count what is there
            return list(dbs.values())
        return [db for partition, db in dbs.items() if partition in actives]

    async def _sample_gauges(self) -> None:
        """Every 10 s: the users in this worker's stores and its memory by part (worker.metrics)."""
        stores = self._stores()
        metrics.USERS_IN_STATE.set(metrics.store_property(self._active_stores(), "rocksdb.estimate-num-keys"))
        # Off the event loop, as the trim is: glibc's mallinfo2 walks the heap's free chunks, which
        # takes longer the more of them there are.
        await asyncio.to_thread(metrics.sample_memory, stores, self.block_cache)


def release_free_memory() -> bool:
    """malloc_trim(0) where the C library is glibc; whether it ran."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def run(checkpoint: str | None = None, loglevel: str = "info") -> int:
    """`ksr worker`: a supervisor that runs the Faust worker in a child process and restarts it.

    Faust stops for good on some failures a restart cures (a broker that went away for longer
    than its retries, a consistency check after a rebalance with a killed peer). A restarted child
    finds its local state marked unclean, rebuilds it from the changelog, and resumes from the
    committed offsets, so nothing is lost or answered twice. Start-up errors (exit code 2: bad
    settings, bad checkpoint) are not retried.
    """
    if os.environ.get("KSR_WORKER_CHILD") == "1":
        return run_worker(checkpoint, loglevel)
    return supervise(checkpoint, loglevel)


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the supervisor dies, however it dies (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def supervise(checkpoint: str | None, loglevel: str) -> int:
    """Run and restart the Faust worker child until it exits cleanly or we are told to stop."""
    import signal
    import subprocess
    import time

    command = [sys.executable, "-m", "worker.cli", "worker", "--loglevel", loglevel]
    if checkpoint:
        command += ["--checkpoint", str(checkpoint)]
    env = {**os.environ, "KSR_WORKER_CHILD": "1"}
    state = {"stopping": False, "child": None}

    def forward(signum, _frame) -> None:
        state["stopping"] = True
        if state["child"] is not None and state["child"].poll() is None:
            state["child"].send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = 1.0
    while True:
        started = time.monotonic()
        # The supervisor runs no threads, so preexec_fn is safe here.
        state["child"] = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        code = state["child"].wait()
        if state["stopping"]:
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
        if code in (0, 2):
            return code
        if time.monotonic() - started > 60:
            backoff = 1.0
        print(f"ksr worker: the Faust worker exited with code {code}; restarting the Faust worker "
              f"in {backoff:.0f} s", file=sys.stderr, flush=True)
        time.sleep(backoff)
        backoff = min(30.0, backoff * 2)


def run_worker(checkpoint: str | None = None, loglevel: str = "info") -> int:
    """The Faust worker itself: load the model, make sure topics exist, serve metrics, run."""
    import torch

    from model.checkpoint import CheckpointError
    from worker.config import ConfigError
    from worker.topics import ensure_topics

    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"ksr worker: {error}", file=sys.stderr)
        return 2
    if checkpoint:
        settings = _replace(settings, checkpoint=checkpoint)
    torch.set_num_threads(settings.torch_threads)
    try:
        recommender = Recommender.load(
            settings.checkpoint, settings.serving_kernel == "compiled", settings.ranking_precision)
    except CheckpointError as error:
        print(f"ksr worker: cannot serve {settings.checkpoint}: {error}", file=sys.stderr)
        return 2
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        partitions = ensure_topics(settings)
    except ConfigError as error:
        print(f"ksr worker: {error}", file=sys.stderr)
        return 2
    metrics.serve(settings.metrics_host, settings.metrics_port)
    metrics.observe_gc_pauses()
    print(
        f"ksr worker: model v{recommender.version} ({recommender.checkpoint.kind}, "
        f"{recommender.n_items - 1} items) from {settings.checkpoint}; {settings.interactions_topic} -> "
        f"{settings.recommendations_topic} on {settings.bootstrap_servers}; metrics on "
        f"http://{settings.metrics_host}:{settings.metrics_port}/metrics",
        file=sys.stderr,
    )
    # Before the app is made: making it creates the tables' folders, which would then read as a
    # crashed run's on every first start.
    discard_state_after_crash(settings)
    worker = Worker(settings, recommender, partitions)
    quiet_repeated_kafka_errors()
    runner = faust.Worker(worker.app, loglevel=loglevel, quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so that it turns on every record; every
    # debug call in aiokafka then builds a LogRecord on the hot path. No spinner, no such cost.
    runner.spinner = None
    profiler = None
    if os.environ.get("KSR_PROFILE"):
        # cProfile of the event-loop thread (agent, Faust, producer; not aiokafka's consumer
        # thread), written when the worker stops; `ksr bench throughput --profile` summarises it.
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        runner.execute_from_commandline()
    except SystemExit as stop:
        if stop.code in (0, None):
            # Faust stopped its services (final commit, RocksDB closed): the local state is clean.
            (settings.state_dir / CLEAN_SHUTDOWN).touch()
        raise
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.environ["KSR_PROFILE"])
    return 0


CLEAN_SHUTDOWN = "clean-shutdown"
EXIT_RESTART = 70  # the Faust child asks its supervisor for a restart


def shorten_transaction_retries(producer, backoff_ms: int):
    """Make Faust's producer, and the transactional producers it creates (one per input
    partition), retry after `backoff_ms` (KSR_TXN_RETRY_BACKOFF_MS) instead of aiokafka's 100 ms
    and 20 ms. Returns the producer.

    Right after a commit the broker is still writing the transaction's markers for a few
    milliseconds, and meanwhile it answers the next transaction's AddPartitionsToTxn with
    ConcurrentTransactions, on which aiokafka waits a fixed 20 ms (`BACKOFF_OVERRIDE`); other
    retriable answers (seen on TxnOffsetCommit) wait its `retry_backoff_ms`, 100 ms. Under
    exactly-once the worker commits every few tens of milliseconds, so those waits held answers
    back, and the agent too when it sent into a partition whose commit was waiting (README,
    Speed). `retry_backoff_ms` is aiokafka's own producer setting, passed through Faust's
    per-producer settings hook; the 20 ms is a module constant of aiokafka (pinned), lowered for
    the process and never raised.
    """
    extra = producer._settings_extra
    producer._settings_extra = lambda: {**extra(), "retry_backoff_ms": backoff_ms}
    sender = aiokafka.producer.sender
    sender.BACKOFF_OVERRIDE = min(sender.BACKOFF_OVERRIDE, backoff_ms / 1000)
    return producer


async def watch_start(recovery, timeout: float, interval: float = 1.0) -> None:
    """Exit for a restart when the worker has not finished its start (Faust's first table
    recovery, up to "Worker ready") and has restored nothing for `timeout` seconds.

    A broker outage that begins in the middle of that recovery can leave Faust waiting for good:
    a run stopped the broker just after the recovery had read the changelog ends, and the worker
    stayed up, assigned and silent for four minutes after the broker came back (no error logged).
    Restoring a large changelog is progress and resets the clock; waiting for the group or the
    broker is not. Faust's `completed` is set once, at the first recovery's end, so this guards
    the start only; later rebalances are Faust's as before.
    """
    loop = asyncio.get_running_loop()
    progress, since = None, loop.time()
    while not recovery.completed.is_set():
        await asyncio.sleep(interval)
        restored = getattr(recovery, "_last_active_event_processed_at", None)
        if restored != progress:
            progress, since = restored, loop.time()
        elif loop.time() - since > timeout:
            start_stuck(timeout)
            return


def start_stuck(timeout: float) -> None:
    """The start has made no progress in KSR_START_TIMEOUT_S: log where every task of the worker
    waits, then restart."""
    restart_with_every_tasks_stack(
        f"the worker has not started in {timeout:g} s, with nothing restored meanwhile (KSR_START_TIMEOUT_S)",
        "start stuck")


async def watch_progress(progress, cannot_progress, behind, report, timeout: float,
                         interval: float = 5.0, probe_timeout: float = 30.0) -> None:
    """Exit for a restart when the input holds events this worker has not processed and it has
    taken none of them for `timeout` seconds.

    `progress()` counts the agent's batches; `cannot_progress()` is true during a rebalance or a
    recovery; `behind()` asks the broker which assigned partitions hold committed records past
    what this worker has processed ({tp: (next offset, end)}); `report()` describes the fetch path
    for the log. One CI run saw a restarted worker answer one batch after a broker outage and then
    nothing for five minutes, with its partitions assigned, nothing logged and no commit waiting
    (so the commit watchdog had nothing to see); a consumer group keeps such a member and its
    partitions for good. The clock starts when the broker first shows unprocessed events with no
    batch taken since the last check; a broker that cannot tell (down, hung) stops it, since an
    outage is waited out, not restarted from.
    """
    loop = asyncio.get_running_loop()
    seen, stalled_since = progress(), None
    while True:
        await asyncio.sleep(interval)
        if progress() != seen or cannot_progress():
            seen, stalled_since = progress(), None
            continue
        try:
            lagging = await asyncio.wait_for(behind(), probe_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001  (the broker could not tell: not a stall)
            log.debug("progress watchdog: the broker did not say where the input ends (%r)", error)
            lagging = None
        if progress() != seen or cannot_progress() or not lagging:
            seen, stalled_since = progress(), None
            continue
        if stalled_since is None:
            stalled_since = loop.time()
        elif loop.time() - stalled_since >= timeout:
            progress_stuck(timeout, lagging, report())
            return


def progress_stuck(timeout: float, lagging: dict, report: str) -> None:
    """The agent has taken no event in KSR_STALL_TIMEOUT_S while its input holds some: log where
    the input stands, the fetch path and where every task waits, then restart."""
    where = ", ".join(f"{tp.topic}[{tp.partition}] at offset {start} of {end}"
                      for tp, (start, end) in sorted(lagging.items()))
    restart_with_every_tasks_stack(
        f"the worker has taken no event in {timeout:g} s while its input holds events it has not "
        f"processed ({where}; {report}) (KSR_STALL_TIMEOUT_S)", "processing stalled")


def commit_stuck(timeout: float) -> None:
    """A commit has not ended in KSR_COMMIT_TIMEOUT_S: log where every task of the worker waits,
    then restart (the open transactions are aborted and their events processed again)."""
    restart_with_every_tasks_stack(f"a commit has not ended in {timeout:g} s (KSR_COMMIT_TIMEOUT_S)",
                                   "commit stuck")


def restart_with_every_tasks_stack(problem: str, what: str) -> None:
    """A watchdog's verdict: log the problem and where each of the worker's tasks waits, then exit
    for the supervisor."""
    log.error("%s; where the worker's tasks wait:\n%s",
              problem, "\n".join(_await_chain(task) for task in asyncio.all_tasks()))
    exit_for_restart(what, with_traceback=False)


def _await_chain(task: asyncio.Task) -> str:
    """A task and the chain of coroutines it awaits, innermost last (a task's own stack shows only
    its outermost coroutine)."""
    lines = [repr(task)]
    awaited = task.get_coro()
    for _ in range(64):
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            if awaited is not None:
                lines.append(f"  awaiting {awaited!r}"[:300])
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "\n".join(lines)


def exit_for_restart(what: str, with_traceback: bool = True) -> None:
    """Crash-only recovery: log the exception being handled and leave at once.

    Everything a batch does is committed in Kafka transactions, so whatever was not committed is
    redone after the supervisor restarts the worker, from the last commit and with local state
    rebuilt from the changelog; carrying on after a failure could commit a half-done batch.
    """
    (log.exception if with_traceback else log.error)("%s; exiting so that the supervisor restarts the worker", what)
    logging.shutdown()
    os._exit(EXIT_RESTART)


def discard_state_after_crash(settings: Settings) -> None:
    """After a crash, drop the local RocksDB state so that it is rebuilt from the changelog.

    With exactly-once processing the table writes of an open transaction reach RocksDB at once, but
    their changelog records are aborted if the worker dies before the commit. Recovery replays only
    committed changelog records after the last committed offset, so the aborted writes would stay in
    the local files and the re-processed events would be applied twice (or skipped as duplicates
    without an answer). A marker written at each clean stop tells the two cases apart.
    """
    import shutil

    marker = settings.state_dir / CLEAN_SHUTDOWN
    local_tables = [p for p in settings.state_dir.glob("*/tables") if p.is_dir()]
    if local_tables and not marker.exists() and settings.processing_guarantee == "exactly_once":
        print(
            f"ksr worker: the last run did not stop cleanly; discarding local state in "
            f"{settings.state_dir} to restore it from the changelog",
            file=sys.stderr,
        )
        for tables in local_tables:
            shutil.rmtree(tables)
    marker.unlink(missing_ok=True)


def _replace(settings: Settings, **changes) -> Settings:
    from dataclasses import replace
    from pathlib import Path

    return replace(settings, **{k: Path(v) if k == "checkpoint" else v for k, v in changes.items()})
