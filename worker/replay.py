"""`ksr replay`: produce a data set's events into `interactions`, in time order, with stable ids."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time

from worker.config import Settings


def _ahead(n: int, rate: float | None, started: float) -> float:
    """Seconds until the n-th item is due (n / rate after `started`); <= 0 when due or unpaced."""
    return n / rate - (time.perf_counter() - started) if rate else 0.0


def paced(items, rate: float | None):
    """Yield `items` no faster than `rate` per second, the n-th not before n / rate seconds after
    the first (falling behind is made up at once); a rate of None or 0 does not pace."""
    started = time.perf_counter()
    for n, item in enumerate(items):
        ahead = _ahead(n, rate, started)
        if ahead > 0:
            time.sleep(ahead)
        yield item


async def paced_async(items, rate: float | None):
    """`paced` on an event loop: the same schedule, awaiting instead of blocking the thread."""
    started = time.perf_counter()
    for n, item in enumerate(items):
        ahead = _ahead(n, rate, started)
        if ahead > 0:
            await asyncio.sleep(ahead)
        yield item


def event_messages(dataset, limit: int | None = None):
    """(key, value) pairs of the data set's events in time order; event_id = NAME:position."""
    count = dataset.n_events if limit is None else min(limit, dataset.n_events)
    users, items, stamps = dataset.users, dataset.items, dataset.timestamps
    for position in range(count):
        user = dataset.user_tokens[users[position]]
        event = {
            "user_id": user,
            "item_id": dataset.item_tokens[items[position]],
            "ts": float(stamps[position]),
            "event_id": f"{dataset.name}:{position}",
            "type": "rating",
        }
        yield user.encode(), json.dumps(event).encode()


def producer(settings: Settings):
    """A kafka-python producer for the project's topics (idempotent, all acks)."""
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5,
        enable_idempotence=True, **settings.kafka_security,
    )


def replay(data: str, rate: float | None = None, limit: int | None = None, skip: int = 0,
           progress: bool = True) -> int:
    """Produce events (after the first `skip`) at up to `rate` per second; returns how many."""
    from kafka.errors import KafkaError
    from tqdm import tqdm

    from model.data import load
    from worker.config import ConfigError
    from worker.topics import ensure_topics

    try:
        settings = Settings.from_env()
    except ConfigError as error:
        raise SystemExit(f"ksr replay: {error}") from None
    dataset = load(data)
    try:
        ensure_topics(settings)
        client = producer(settings)
    except ConfigError as error:
        raise SystemExit(f"ksr replay: {error}") from None
    except KafkaError as error:
        # kafka-python retries a failed SASL handshake like an unreachable broker, then times out.
        protocol = settings.kafka_security.get("security_protocol", "PLAINTEXT")
        raise SystemExit(
            f"ksr replay: cannot use Kafka at {settings.bootstrap_servers} over {protocol} ({error}); "
            "check KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL and the KAFKA_SASL_*/KAFKA_SSL_* "
            "settings (a wrong password looks like an unreachable broker)"
        ) from None
    total = (dataset.n_events if limit is None else min(limit, dataset.n_events)) - skip
    sent = 0
    bar = tqdm(total=max(total, 0), unit="ev", file=sys.stderr, disable=not progress, desc="replay")
    messages = itertools.islice(event_messages(dataset, limit), skip, None)
    for key, value in paced(messages, rate):
        client.send(settings.interactions_topic, key=key, value=value)
        sent += 1
        bar.update(1)
    client.flush()
    client.close()
    bar.close()
    return sent


def tail(topic: str | None, count: int, timeout: float) -> list[dict]:
    """The last `count` committed messages of a topic (all partitions), oldest first."""
    from kafka import KafkaConsumer, TopicPartition

    settings = Settings.from_env()
    topic = topic or settings.recommendations_topic
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
        isolation_level="read_committed", consumer_timeout_ms=int(timeout * 1000),
        **settings.kafka_security,
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, max(0, ends[tp] - count))
        messages = []
        remaining = {tp for tp in partitions if ends[tp] > 0}
        for record in consumer:
            messages.append(record)
            tp = TopicPartition(record.topic, record.partition)
            if record.offset >= ends[tp] - 1:
                remaining.discard(tp)
            if not remaining:
                break
    finally:
        consumer.close()
    messages.sort(key=lambda r: r.timestamp)
    out = []
    for record in messages[-count:]:
        try:
            out.append(json.loads(record.value))
        except ValueError:
            out.append({"raw": record.value.decode("utf-8", "replace")})
    return out
