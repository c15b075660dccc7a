"""The Faust app: topics and the user-state table declared once, one thin agent.

Data path: `interactions` -> agent (batches via take_events, one model step per batch) ->
BatchProcessor (validate, load states, model step, top-k) -> `recommendations` / `interactions.dlq`,
and the new states into the `user-state` table (RocksDB via rocksdict, with its changelog topic).

Every message goes to the partition number of the event it answers, so with exactly-once processing
the recommendations, dead letters, changelog writes and input offsets of a partition all commit in
that partition's one Kafka transaction.
"""

from __future__ import annotations

import json
import logging
import sys
import weakref

import faust
from faust.streams import _current_event  # faust-streaming is pinned; see _agent

from model.serving import Recommender
from worker import metrics
from worker.config import Settings
from worker.processing import BatchProcessor, Source
from worker.state import StateDecodeError, StoredUser, decode, encode

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


class Worker:
    """The app with its topics, table and agent, bound to one Settings and one Recommender."""

    def __init__(self, settings: Settings, recommender: Recommender, partitions: int) -> None:
        self.settings = settings
        self.processor = BatchProcessor(
            recommender,
            top_k=settings.top_k,
            history_length=settings.history_length,
            recent_event_ids=settings.recent_event_ids,
            max_event_bytes=settings.max_event_bytes,
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
            topic_partitions=partitions,
            topic_replication_factor=1,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            producer_max_request_size=max(1024 * 1024, 4 * settings.max_event_bytes),
            consumer_max_fetch_size=max(1024 * 1024, 4 * settings.max_event_bytes),
        )
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
            options={"driver": "rocksdict"},
        )
        # Tables take their serializers from Record types only; states are our own bytes
        # (worker.state), so override before the store and changelog topic are created.
        self.user_state.key_serializer = "raw"
        self.user_state.value_serializer = "raw"
        self.app.agent(self.interactions, name="process-interactions")(
            self._agent
        )
        self.app.timer(10.0)(self._count_users)
        self.app.task(self._watch_model_updates)
        self.pending: Recommender | None = None
        metrics.MODEL_VERSION.set(recommender.version)

    async def _agent(self, stream) -> None:
        async for events in stream.take_events(self.settings.batch_size, within=self.settings.batch_within_s):
            await self.handle(events)

    def _load(self, user_id: str) -> StoredUser | None:
        blob = self.user_state.get(user_id.encode())
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
        import asyncio

        from aiokafka import AIOKafkaConsumer

        from model.checkpoint import CheckpointError

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
                except (ValueError, KeyError, TypeError) as error:
                    log.error("model-updates: unreadable announcement (%s): %r", error, record.value[:200])
                    metrics.MODEL_SWAPS.labels("bad_announcement").inc()
                    continue
                current = (self.pending or self.processor.recommender).version
                if version <= current:
                    continue
                try:
                    recommender = await asyncio.to_thread(Recommender.load, path)
                except CheckpointError as error:
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

    async def handle(self, events) -> None:
        """Process one batch of Faust events (from any of the assigned partitions)."""
        if self.pending is not None:
            # Between batches: this batch and all later ones use the new model; users whose state
            # came from an older version are recomputed from their stored history on their next event.
            self.processor.swap(self.pending)
            metrics.MODEL_VERSION.set(self.pending.version)
            metrics.MODEL_SWAPS.labels("swapped").inc()
            log.info("now serving model v%s", self.pending.version)
            self.pending = None
        sources = [
            Source(e.message.key, e.message.value, e.message.topic, e.message.partition,
                   e.message.offset, e.message.timestamp)
            for e in events
        ]
        # One model step for the whole batch, whichever partitions its events came from.
        result = self.processor.process(sources, self._load)
        event_of_partition = {e.message.partition: e for e in events}
        precision = self.settings.state_precision
        for partition, event in event_of_partition.items():
            # Table writes pick the RocksDB partition and the changelog partition from the current
            # event, which take_events does not set in this task: set it to one of the partition's own
            # events (only this task's context variable; the stream's attribute belongs to its
            # buffering task).
            token = _current_event.set(weakref.ref(event))
            try:
                for user_id, (user_partition, stored) in result.states.items():
                    if user_partition == partition:
                        self.user_state[user_id.encode()] = encode(stored, precision)
            finally:
                _current_event.reset(token)
        for partition, key, value in result.recommendations:
            await self.recommendations.send(key=key, value=value, partition=partition)
        for partition, key, value, reason in result.dead_letters:
            await self.dead_letters.send(key=key, value=value, partition=partition)
            metrics.DEAD_LETTERS.labels(reason).inc()
        metrics.BATCH_SIZE.observe(len(sources))
        metrics.STEP_SECONDS.observe(result.step_seconds)
        metrics.EVENTS.labels("ok").inc(len(result.recommendations))
        metrics.EVENTS.labels("dead_letter").inc(len(result.dead_letters))
        metrics.EVENTS.labels("duplicate").inc(result.duplicates)
        metrics.RECOMMENDATIONS.inc(len(result.recommendations))
        metrics.RECOMPUTED_USERS.inc(result.recomputed_users)
        for latency in result.latencies:
            metrics.LATENCY_SECONDS.observe(latency)

    async def _count_users(self) -> None:
        store = self.user_state.data
        total = 0
        for db in getattr(store, "_dbs", {}).values():
            try:
                total += int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
            except (RuntimeError, OSError) as error:  # a partition DB closing during a rebalance
                log.debug("users gauge: skipped a partition (%s)", error)
        metrics.USERS_IN_STATE.set(total)


def run(checkpoint: str | None = None, loglevel: str = "info") -> int:
    """`ksr worker`: load the model, make sure topics exist, serve metrics, run the Faust worker."""
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
    torch.set_num_threads(int(__import__("os").environ.get("KSR_TORCH_THREADS", "1")))
    try:
        recommender = Recommender.load(settings.checkpoint)
    except CheckpointError as error:
        print(f"ksr worker: cannot serve {settings.checkpoint}: {error}", file=sys.stderr)
        return 2
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    partitions = ensure_topics(settings)
    metrics.serve(settings.metrics_host, settings.metrics_port)
    print(
        f"ksr worker: model v{recommender.version} ({recommender.checkpoint.kind}, "
        f"{recommender.n_items - 1} items) from {settings.checkpoint}; {settings.interactions_topic} -> "
        f"{settings.recommendations_topic} on {settings.bootstrap_servers}; metrics on "
        f"http://{settings.metrics_host}:{settings.metrics_port}/metrics",
        file=sys.stderr,
    )
    worker = Worker(settings, recommender, partitions)
    runner = faust.Worker(worker.app, loglevel=loglevel, quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so that it turns on every record; every
    # debug call in aiokafka then builds a LogRecord on the hot path. No spinner, no such cost.
    runner.spinner = None
    runner.execute_from_commandline()
    return 0


def _replace(settings: Settings, **changes) -> Settings:
    from dataclasses import replace
    from pathlib import Path

    return replace(settings, **{k: Path(v) if k == "checkpoint" else v for k, v in changes.items()})
