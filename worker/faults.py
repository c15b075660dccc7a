"""Fault scenarios on the real broker: a crashed worker, a broker outage, a lost worker in a group,
a worker that stops taking events.

Each scenario streams real ml-100k events at a steady rate through `ksr worker` processes, breaks
something mid-stream, and reads every recommendation back with a read_committed consumer. It
returns what a user of the stream would count: events sent, answered, answered twice, lost, and the
seconds until recommendations flowed again; plus, where state matters, the largest difference
between the users' final states (read from the changelog) and an uninterrupted computation.
`ksr bench faults --json` prints them; tests/test_reliability.py asserts on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.config import REPO_ROOT
from worker.replay import paced


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerProcess:
    """A `ksr worker` subprocess with its own environment (topics, group, state folder, port)."""

    def __init__(self, env: dict, log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['KSR_METRICS_PORT']}/metrics"

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker", "--loglevel", "info"], cwd=REPO_ROOT,
                env=self.env, stdout=log, stderr=log, start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if not self.alive():
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stream_env(base: Path, bootstrap: str, checkpoint: Path | str, **extra: str) -> dict:
    """Environment for one isolated stream: unique topics and group, own state and metrics port."""
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KSR_APP_ID": f"ksr-test-{tag}",
        "KSR_TOPIC_INTERACTIONS": f"t{tag}.interactions",
        "KSR_TOPIC_RECOMMENDATIONS": f"t{tag}.recommendations",
        "KSR_TOPIC_DLQ": f"t{tag}.interactions.dlq",
        "KSR_TOPIC_MODEL_UPDATES": f"t{tag}.model-updates",
        "KSR_PARTITIONS": "2",
        "KSR_CHECKPOINT": str(checkpoint),
        "KSR_STATE_DIR": str(base / f"state-{tag}"),
        "KSR_VAR_DIR": str(base / "var"),
        "KSR_METRICS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


class PacedProducer(threading.Thread):
    """Sends (key, value) pairs at `rate` per second in a thread; kafka-python retries through
    broker outages (delivery timeout 5 minutes)."""

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], rate: float) -> None:
        super().__init__(daemon=True)
        from kafka import KafkaProducer

        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
            delivery_timeout_ms=300_000, request_timeout_ms=30_000, max_block_ms=300_000,
            reconnect_backoff_max_ms=1000,
        )
        self.topic, self.messages, self.rate = topic, messages, rate
        self.failures = 0

    def run(self) -> None:
        futures = []
        for key, value in paced(self.messages, self.rate):
            futures.append(self.producer.send(self.topic, key=key, value=value))
        self.producer.flush()
        for future in futures:
            if future.exception is not None:
                self.failures += 1
        self.producer.close()


def _poll(done, timeout: float, interval: float) -> bool:
    """Check `done()` every `interval` seconds until it holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


class Collector(threading.Thread):
    """Reads a topic from the beginning with read_committed; records (arrival time, value)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.received: list[tuple[float, dict]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False, isolation_level="read_committed", reconnect_backoff_max_ms=1000,
        )
        try:
            while not self._stop_event.is_set():
                for tp, records in consumer.poll(timeout_ms=200).items():
                    now = time.time()
                    self.received.extend((now, {**json.loads(r.value), "_partition": tp.partition})
                                         for r in records)
        finally:
            consumer.close()

    def wait_for(self, event_ids: set[str], timeout: float) -> bool:
        """Until every id has an answer (or the timeout passes); whether they all have."""
        return _poll(lambda: event_ids <= {m.get("event_id") for _, m in self.received}, timeout, 0.5)

    def wait_for_answers(self, count: int, timeout: float) -> bool:
        """Until `count` answers have arrived (or the timeout passes); whether they did."""
        return _poll(lambda: len(self.received) >= count, timeout, 0.1)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


def count_answers(received: list[tuple[float, dict]], event_ids: list[str]) -> dict:
    """Events sent, answered (at least once), duplicated (answered more than once), lost."""
    counts = Counter(m.get("event_id") for _, m in received)
    return {
        "events_sent": len(event_ids),
        "answered": sum(1 for e in event_ids if counts[e] >= 1),
        "duplicated": sum(1 for e in event_ids if counts[e] > 1),
        "lost": sum(1 for e in event_ids if counts[e] == 0),
    }


def changelog_states(bootstrap: str, app_id: str) -> dict[str, object]:
    """Every user's latest committed state in the table's changelog topic, decoded."""
    from kafka import KafkaConsumer

    from worker.state import decode

    consumer = KafkaConsumer(
        f"{app_id}-user-state-changelog", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
        enable_auto_commit=False, isolation_level="read_committed", consumer_timeout_ms=3000,
    )
    try:
        return {record.key.decode(): decode(record.value) for record in consumer if record.value}
    finally:
        consumer.close()


def state_difference(states: dict, checkpoint: str, dataset, count: int) -> float:
    """Largest absolute difference between stored states and replaying each user's events."""
    from model.serving import Recommender

    recommender = Recommender.load(checkpoint)
    histories: dict[str, list[int]] = {}
    for position in range(count):
        user = dataset.user_tokens[dataset.users[position]]
        histories.setdefault(user, []).append(int(dataset.items[position]))
    users = sorted(histories)
    missing = [u for u in users if u not in states]
    if missing:
        return float("inf")
    expected = recommender.replay([histories[u] for u in users])
    worst = 0.0
    for row, user in enumerate(users):
        stored = states[user]
        worst = max(
            worst,
            float(np.abs(stored.hidden - expected.hidden[row].numpy()).max()),
            float(np.abs(stored.memory_values - expected.memory_values[row].numpy()).max(initial=0.0)),
        )
    return worst


def _messages(dataset, count: int) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    from worker.replay import event_messages

    messages = list(event_messages(dataset, count))
    return messages, [json.loads(v)["event_id"] for _, v in messages]


def _first_answer_after(received: list[tuple[float, dict]], moment: float) -> float | None:
    later = [t for t, _ in received if t > moment]
    return round(min(later) - moment, 2) if later else None


@dataclass
class Stream:
    """One scenario's isolated stream: its folder, environment, events, first worker and reader."""

    dataset: object
    base: Path
    env: dict
    messages: list[tuple[bytes, bytes]]
    event_ids: list[str]
    worker: WorkerProcess
    collector: Collector

    def start_load(self, bootstrap: str, rate: float) -> PacedProducer:
        """Once the worker is up, start sending the events at `rate` per second."""
        _wait_for_metrics(self.worker)
        producer = PacedProducer(bootstrap, self.env["KSR_TOPIC_INTERACTIONS"], self.messages, rate)
        producer.start()
        return producer


def open_stream(name: str, bootstrap: str, checkpoint: str, events: int, **env_extra: str) -> Stream:
    """Fresh topics and folder, `events` real ml-100k events, a started worker and reader."""
    from model.data import load

    dataset = load("ml-100k")
    base = Path(tempfile.mkdtemp(prefix=f"ksr-{name}-"))
    env = stream_env(base, bootstrap, checkpoint, **env_extra)
    messages, event_ids = _messages(dataset, events)
    worker = WorkerProcess(env, base / "worker.log").start()
    collector = Collector(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"])
    collector.start()
    return Stream(dataset, base, env, messages, event_ids, worker, collector)


def crash(bootstrap: str, checkpoint: str, events: int = 5000, rate: float = 500.0, kill_after: float = 4.0,
          timeout: float = 240.0, guarantee: str = "exactly_once") -> dict:
    """kill -9 the worker mid-stream (`kill_after` seconds after its first answer, or once 60% of
    the events are answered if sooner) and start it again with the same state folder."""
    stream = open_stream("crash", bootstrap, checkpoint, events, KSR_PROCESSING_GUARANTEE=guarantee)
    worker, collector = stream.worker, stream.collector
    try:
        producer = stream.start_load(bootstrap, rate)
        # The metrics endpoint is up before the worker has joined its group and recovered its
        # tables: wait for it to answer, so that the kill lands mid-stream, not in its start (nor
        # after its end, on a machine where the start takes longer: at most 60% answered).
        collector.wait_for_answers(1, timeout)
        collector.wait_for_answers(int(0.6 * events), kill_after)
        worker.stop(signal.SIGKILL)
        killed_at = time.time()
        worker.start()
        producer.join()
        collector.wait_for(set(stream.event_ids), timeout)
    finally:
        worker.stop()
        collector.stop()
    result = {"scenario": "crash", "processing_guarantee": guarantee,
              **count_answers(collector.received, stream.event_ids),
              "recovery_s": _first_answer_after(collector.received, killed_at),
              "answered_before_kill": len({m.get("event_id") for t, m in collector.received if t <= killed_at}),
              "producer_failures": producer.failures}
    result["max_state_diff"] = state_difference(changelog_states(bootstrap, stream.env["KSR_APP_ID"]),
                                                checkpoint, stream.dataset, events)
    result["discarded_local_state"] = "did not stop cleanly" in worker.log()
    _clean_up(stream.base, result)
    return result


def broker_outage(bootstrap: str, checkpoint: str, events: int = 3000, rate: float = 150.0,
                  stop_after: float = 4.0, outage_s: float = 30.0, timeout: float = 300.0,
                  freeze: bool = False, stop_when_logged: str | None = None, **env_extra: str) -> dict:
    """Stop the local broker for `outage_s` seconds mid-stream, then start it again.

    `stop_when_logged`: count `stop_after` from the moment this text appears in the worker's log
    (a step of its start, say), not from the start of the load.
    `freeze`: instead of stopping it, suspend the broker's process (SIGSTOP, then SIGCONT) at the
    first answer the worker sends once `stop_after` seconds have passed since its first one, while
    that answer's transaction is open: a hung broker, whose connections stay open and whose answers never come,
    so that the requests under way (the commit) wait rather than fail.
    `env_extra`: worker settings for this run (KSR_COMMIT_TIMEOUT_S, say).
    """
    from worker import broker

    stream = open_stream("outage", bootstrap, checkpoint, events, **env_extra)
    worker, collector = stream.worker, stream.collector
    try:
        producer = stream.start_load(bootstrap, rate)
        if freeze:
            # Mid-stream, not in the worker's start: a hung broker then stops commits under way.
            collector.wait_for_answers(1, timeout)
        if stop_when_logged is not None:
            _wait_for_log(worker, stop_when_logged, timeout)
        time.sleep(stop_after)
        if freeze:
            # Hang the broker while one of the worker's transactions is open, so that its commit
            # waits. (Between events, with everything committed, a worker has nothing under way to
            # wait for, and rightly sits idle until the broker is back: one in many runs froze it
            # there when the hang came at a set time.)
            with _open_transaction_seen(bootstrap, stream.env["KSR_TOPIC_RECOMMENDATIONS"], timeout), \
                    broker.suspended():
                time.sleep(outage_s)
        else:
            broker.stop()
            time.sleep(outage_s)
            broker.start(timeout=120)
        restarted_at = time.time()
        producer.join()
        collector.wait_for(set(stream.event_ids), timeout)
        worker_survived = worker.alive()
    finally:
        worker.stop()
        collector.stop()
    log = worker.log()
    result = {"scenario": "broker_outage", "outage_s": outage_s, "freeze": freeze,
              **count_answers(collector.received, stream.event_ids),
              "recovery_s": _first_answer_after(collector.received, restarted_at),
              "worker_restarts": log.count("restarting the Faust worker"),
              "start_watchdog_restarts": log.count("has not started in"),
              "worker_log_lines": log.count("\n"),
              "worker_alive_at_end": worker_survived, "producer_failures": producer.failures}
    if freeze and not result["worker_restarts"]:
        # A hung broker should have left a commit waiting past the watchdog; what the worker did
        # instead is in the end of its log.
        result["worker_log_tail"] = log[-4000:]
    _clean_up(stream.base, result)
    return result


@contextlib.contextmanager
def _open_transaction_seen(bootstrap: str, topic: str, timeout: float):
    """Enter as soon as a record reaches `topic` from now on, as a read_uncommitted reader sees it:
    the worker has sent an answer, and its transaction's commit (a few round trips to the broker)
    has at best just begun. Raises TimeoutError when none comes within `timeout` seconds."""
    from kafka import KafkaConsumer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted", fetch_max_wait_ms=5,
                           enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        reader.assign(partitions)
        reader.seek_to_end(*partitions)
        for partition in partitions:
            reader.position(partition)  # the end now, before anything new arrives
        deadline = time.monotonic() + timeout
        while not reader.poll(timeout_ms=100):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no record reached {topic} within {timeout}s")
        yield
    finally:
        reader.close()


def _wait_for_log(worker: WorkerProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not log {text!r} in {timeout:g} s:\n{worker.log()[-3000:]}")
        time.sleep(0.01)


def scale_out(bootstrap: str, checkpoint: str, events: int = 4000, rate: float = 400.0, kill_after: float = 5.0,
              timeout: float = 240.0) -> dict:
    """Two workers in one group on a 4-partition topic; kill -9 one; the other takes over."""
    stream = open_stream("scale", bootstrap, checkpoint, events, KSR_PARTITIONS="4")
    survivor, collector = stream.worker, stream.collector
    env_b = {**stream.env, "KSR_STATE_DIR": stream.env["KSR_STATE_DIR"] + "-b", "KSR_METRICS_PORT": str(free_port())}
    victim = WorkerProcess(env_b, stream.base / "worker-b.log")
    try:
        _wait_for_metrics(survivor)
        victim.start()
        _wait_for_metrics(victim)
        _wait_for_partitions(victim, 60)
        producer = stream.start_load(bootstrap, rate)
        time.sleep(kill_after)
        victim_served = _counter(victim, "ksr_recommendations_total")
        victim.stop(signal.SIGKILL)
        killed_at = time.time()
        producer.join()
        collector.wait_for(set(stream.event_ids), timeout)
    finally:
        survivor.stop()
        victim.stop()
        collector.stop()
    # Takeover: until every partition answers again after the kill (the victim's resume last).
    resumed = {}
    for t, m in collector.received:
        if t > killed_at:
            resumed.setdefault(m["_partition"], t)
    result = {"scenario": "scale_out", **count_answers(collector.received, stream.event_ids),
              "victim_answers_before_kill": victim_served,
              "takeover_s": round(max(resumed.values()) - killed_at, 2) if len(resumed) == 4 else None}
    result["max_state_diff"] = state_difference(changelog_states(bootstrap, stream.env["KSR_APP_ID"]),
                                                checkpoint, stream.dataset, events)
    _clean_up(stream.base, result)
    return result


STALL_FAULT = REPO_ROOT / "tests" / "stall_fault"  # a sitecustomize module: see its docstring


def stalled_delivery(bootstrap: str, checkpoint: str, events: int = 1200, rate: float = 300.0,
                     stall_after: int = 300, stall_timeout_s: float = 10.0, timeout: float = 240.0) -> dict:
    """The first worker process hands its agent `stall_after` events and then none, while it keeps
    its group membership, its partitions and its fetches (tests/stall_fault); the progress watchdog
    (KSR_STALL_TIMEOUT_S = `stall_timeout_s`) should restart it, and the restarted process, which
    runs without the fault, answer the rest."""
    marker = Path(tempfile.mkdtemp(prefix="ksr-stall-marker-"))
    pythonpath = os.pathsep.join(p for p in (str(STALL_FAULT), os.environ.get("PYTHONPATH")) if p)
    stream = open_stream("stall", bootstrap, checkpoint, events, PYTHONPATH=pythonpath,
                         KSR_TEST_STALL_MARKER=str(marker / "stalled"), KSR_TEST_STALL_AFTER=str(stall_after),
                         KSR_STALL_TIMEOUT_S=f"{stall_timeout_s:g}")
    worker, collector = stream.worker, stream.collector
    try:
        producer = stream.start_load(bootstrap, rate)
        producer.join()
        collector.wait_for(set(stream.event_ids), timeout)
    finally:
        worker.stop()
        collector.stop()
        shutil.rmtree(marker, ignore_errors=True)
    log = worker.log()
    stalled = [line for line in log.splitlines() if "the worker has taken no event in" in line]
    result = {"scenario": "stalled_delivery", "stall_after": stall_after, "stall_timeout_s": stall_timeout_s,
              **count_answers(collector.received, stream.event_ids),
              "stall_restarts": len(stalled), "worker_restarts": log.count("restarting the Faust worker"),
              "stall_report": stalled[0][stalled[0].index("the worker has taken"):][:1000] if stalled else None,
              "producer_failures": producer.failures}
    _clean_up(stream.base, result)
    return result


def _clean_up(base: Path, result: dict) -> None:
    """Remove the scenario's folder, unless something was lost or doubled: then keep the logs."""
    if result.get("lost") or result.get("duplicated"):
        result["logs"] = str(base)
    else:
        shutil.rmtree(base, ignore_errors=True)


def _counter(worker: WorkerProcess, name: str) -> float:
    from worker.bench import scrape_sample

    return scrape_sample(worker.metrics_url, name, timeout=5) or 0.0


def _wait_for_metrics(worker: WorkerProcess, timeout: float = 120) -> None:
    from urllib.request import urlopen

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"worker exited at start-up:\n{worker.log()[-2000:]}")
        try:
            with urlopen(worker.metrics_url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("worker metrics endpoint did not come up")


def _wait_for_partitions(worker: WorkerProcess, timeout: float) -> None:
    """Until the worker has been given partitions (its log says the rebalance finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.log().count("Worker ready") >= 1 and "Setting newly assigned partitions" in worker.log():
            return
        time.sleep(0.5)


def hostile_payloads(catalog: list[str], count: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """`count` payloads, one in ten a valid event, the rest bytes, JSON of wrong shapes and types,
    huge ids, NaN/inf timestamps, unknown items and values over the size cap; three are 10 MB."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        user = rng.choice(["h-1", "h-2", "用户-ü-😀", str(rng.randrange(60))])
        item = rng.choice(catalog)
        kind = n % 10
        if kind == 0:
            value = json.dumps({"user_id": user, "item_id": item, "ts": n, "event_id": f"hostile-{n}"}).encode()
        elif kind == 1:
            value = rng.randbytes(rng.randrange(1, 300))
        elif kind == 2:
            value = rng.choice([b"[1, 2]", b"42", b'"text"', b"null", b"true", b"{}"])
        elif kind == 3:
            event = {"user_id": user, "item_id": item, "ts": n}
            del event[rng.choice(list(event))]
            value = json.dumps(event).encode()
        elif kind == 4:
            field, bad = rng.choice([("user_id", {"a": 1}), ("item_id", [1]), ("ts", "yesterday"), ("user_id", True)])
            value = json.dumps({"user_id": user, "item_id": item, "ts": n, field: bad}).encode()
        elif kind == 5:
            value = rng.choice([
                json.dumps({"user_id": "u" * 5000, "item_id": item, "ts": n}).encode(),
                b'{"user_id": "1", "item_id": "' + item.encode() + b'", "ts": 1' + b"0" * 5000 + b"}",
            ])
        elif kind == 6:
            value = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"])
            value = b'{"user_id": "1", "item_id": "' + item.encode() + b'", "ts": ' + value + b"}"
        elif kind == 7:
            value = json.dumps({"user_id": user, "item_id": f"no-such-{n}", "ts": n}).encode()
        elif kind == 8 and n % 100 == 8:
            value = json.dumps({"user_id": user, "item_id": item, "ts": n, "pad": "x" * 66_000}).encode()
        elif kind == 8:
            value = json.dumps({"user_id": user, "item_id": item, "ts": n, "event_id": "e" * 300}).encode()
        else:
            value = ("\ud800 " + rng.choice(["ünïcödé", "😀", "\u0000"])).encode("utf-8", "surrogatepass")
        out.append((user.encode(), value))
    for position in (count // 4, count // 2, 3 * count // 4):
        out[position] = (b"huge", b"x" * (10 * 1024 * 1024))
    return out


def hostile_input(bootstrap: str, checkpoint: str, payloads: int = 10000, timeout: float = 240.0) -> dict:
    """Send hostile payloads through a worker: every one is answered or dead-lettered, and the
    worker stays up."""
    from kafka import KafkaProducer

    from model.checkpoint import load
    from worker.processing import Interaction, validate

    catalog = [t for t in load(checkpoint).item_tokens if t != "[PAD]"]
    messages = hostile_payloads(catalog, payloads)
    valid = {
        event.event_id for event in (validate(v, 64 * 1024) for _, v in messages)
        if isinstance(event, Interaction) and event.item_id in set(catalog)
    }
    stream = open_stream("hostile", bootstrap, checkpoint, 0)
    dead_letters = Collector(bootstrap, stream.env["KSR_TOPIC_DLQ"])
    dead_letters.start()
    try:
        _wait_for_metrics(stream.worker)
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                 max_request_size=16 * 1024 * 1024)
        for key, value in messages:
            producer.send(stream.env["KSR_TOPIC_INTERACTIONS"], key=key, value=value)
        producer.flush()
        producer.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(stream.collector.received) + len(dead_letters.received) < payloads:
            time.sleep(0.5)
        time.sleep(2)  # anything beyond the expected counts would have arrived by now
        alive = stream.worker.alive()
    finally:
        stream.worker.stop()
        stream.collector.stop()
        dead_letters.stop()
    answers = count_answers(stream.collector.received, sorted(valid))
    reasons = Counter(m["reason"] for _, m in dead_letters.received)
    result = {
        "scenario": "hostile_input", "events_sent": payloads, "valid": len(valid),
        "answered": answers["answered"], "duplicated": answers["duplicated"],
        "dead_lettered": len(dead_letters.received),
        "lost": payloads - answers["answered"] - len(dead_letters.received),
        "worker_alive_at_end": alive, "dead_letter_reasons": dict(sorted(reasons.items())),
    }
    _clean_up(stream.base, result)
    return result


def run_all(checkpoint: str, bootstrap: str) -> dict:
    """`ksr bench faults`: every scenario, one line each."""
    return {
        "crash": crash(bootstrap, checkpoint),
        "crash_at_least_once": crash(bootstrap, checkpoint, guarantee="at_least_once"),
        "scale_out": scale_out(bootstrap, checkpoint),
        "broker_outage": broker_outage(bootstrap, checkpoint),
        "hostile_input": hostile_input(bootstrap, checkpoint),
        "stalled_delivery": stalled_delivery(bootstrap, checkpoint),
    }
