"""`ksr replay`: produce a data set's events into `interactions`, in time order, with stable ids."""

from __future__ import annotations

import json
import sys
import time

from worker.config import Settings


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
    from tqdm import tqdm

    from model.data import load
    from worker.topics import ensure_topics

    settings = Settings.from_env()
    dataset = load(data)
    ensure_topics(settings)
    client = producer(settings)
    total = (dataset.n_events if limit is None else min(limit, dataset.n_events)) - skip
    sent = 0
    started = time.perf_counter()
    bar = tqdm(total=max(total, 0), unit="ev", file=sys.stderr, disable=not progress, desc="replay")
    for position, (key, value) in enumerate(event_messages(dataset, limit)):
        if position < skip:
            continue
        client.send(settings.interactions_topic, key=key, value=value)
        sent += 1
        bar.update(1)
        if rate:
            ahead = sent / rate - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)
    client.flush()
    client.close()
    bar.close()
    return sent
