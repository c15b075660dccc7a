"""Shared fixtures: the real local broker, a small real checkpoint, and worker processes.

Tests that touch Kafka use the broker that `.ci/run` (or `ksr broker start`) runs on 127.0.0.1,
each with its own topics, consumer group and state folder so they never see each other's messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from worker.faults import WorkerProcess, free_port, stream_env  # noqa: F401  (shared with the tests)

REPO = Path(__file__).resolve().parent.parent
KSR = [sys.executable, "-m", "worker.cli"]

# kafka-python 3.0 warns about its own resource loading on import; it is noise in test output.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="kafka")


@pytest.fixture(scope="session")
def bootstrap() -> str:
    """The broker's address; starts the local broker if nothing is configured or running."""
    from worker import broker

    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        broker.start(timeout=120)
    return broker.bootstrap_servers()


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A real KSR checkpoint trained briefly on ml-100k (the catalog and KB are the real ones)."""
    out = tmp_path_factory.mktemp("checkpoint") / "ksr"
    subprocess.run(
        [*KSR, "train", "--data", "ml-100k", "--out", str(out), "--epochs", "1", "--transe-epochs", "5",
         "--item-dim", "32", "--hidden-dim", "32", "--out-dim", "32", "--kb-dim", "32", "--json"],
        check=True, cwd=REPO, stdout=subprocess.DEVNULL,
    )
    return out


def consume(bootstrap: str, topic: str, count: int, timeout: float, worker: WorkerProcess | None = None):
    """Read `count` committed messages from `topic` (from the beginning), or fail after `timeout` s."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
        isolation_level="read_committed", consumer_timeout_ms=1000,
    )
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < count and time.monotonic() < deadline:
            messages.extend(consumer)
            if worker is not None and worker.process is not None and worker.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{worker.log()[-3000:]}")
    finally:
        consumer.close()
    if len(messages) < count:
        detail = worker.log()[-3000:] if worker else ""
        raise AssertionError(f"{topic}: {len(messages)} of {count} messages after {timeout}s\n{detail}")
    return messages


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    """Send (key, value) pairs and wait until all are acknowledged."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def scrape(url: str) -> dict[str, float]:
    """Fetch a Prometheus text page over HTTP; {"name{labels}": value} for every sample."""
    from urllib.request import urlopen

    samples = {}
    with urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
    return samples


def decode(messages) -> list[dict]:
    return [json.loads(m.value) for m in messages]
