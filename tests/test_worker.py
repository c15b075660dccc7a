"""The worker end to end on the real broker: a `ksr worker` process, real topics, real RocksDB."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import KSR, REPO, WorkerProcess, consume, decode, produce, scrape, stream_env

from model.data import load
from model.serving import Recommender

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPLAYED = 2000


def replay(env: dict, limit: int, skip: int = 0) -> None:
    subprocess.run(
        [*KSR, "replay", "--data", "ml-100k", "--limit", str(limit), "--skip", str(skip)],
        check=True, cwd=REPO, env=env, stderr=subprocess.DEVNULL,
    )


def expected_recommendation(recommender: Recommender, history: list[str], k: int = 10):
    """What `ksr recommend` computes for a history: replay from scratch, rank minus seen items."""
    indices = recommender.lookup(history)
    state = recommender.replay([indices])
    return recommender.rank(state, [indices], k)[0]


def histories_of(dataset, count: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for position in range(count):
        out[dataset.user_tokens[dataset.users[position]]].append(dataset.item_tokens[dataset.items[position]])
    return out


def persisted_offsets(state_dir: str) -> dict[int, int | None]:
    """Per table partition, the changelog offset a stopped worker's RocksDB says it holds up to."""
    from rocksdict import AccessType, Rdict

    offsets = {}
    for path in Path(state_dir).glob("*/tables/user-state-*.db"):
        db = Rdict(str(path), access_type=AccessType.read_only())
        try:
            value = db.get(b"__faust\0offset__")  # faust.stores.rocksdb.Store.offset_key
        finally:
            db.close()
        offsets[int(path.stem.rsplit("-", 1)[1])] = None if value is None else int(value)
    return offsets


def last_committed_offsets(bootstrap: str, topic: str, timeout: float = 60) -> dict[int, int]:
    """Per partition of `topic`, the offset of its last committed record (read_committed)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                             enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        last = {}
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"{topic}: not read to its end in {timeout} s"
            for tp, records in consumer.poll(timeout_ms=1000).items():
                last[tp.partition] = records[-1].offset
        return last
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def stream(tmp_path_factory, bootstrap, small_checkpoint):
    tmp = tmp_path_factory.mktemp("stream")
    env = stream_env(tmp, bootstrap, small_checkpoint, KSR_MAX_EVENT_BYTES="2048")
    worker = WorkerProcess(env, tmp / "worker.log").start()
    yield env, worker
    worker.stop()


@pytest.fixture(scope="module")
def replayed(stream, bootstrap):
    env, worker = stream
    replay(env, REPLAYED)
    messages = consume(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], REPLAYED, timeout=180, worker=worker)
    return decode(messages)


def test_every_replayed_event_gets_exactly_one_recommendation(replayed) -> None:
    event_ids = [m["event_id"] for m in replayed]
    assert len(event_ids) == REPLAYED
    assert sorted(event_ids) == sorted(f"ml-100k:{i}" for i in range(REPLAYED))
    first = replayed[0]
    assert set(first) == {"user_id", "items", "scores", "model_version", "explanation", "event_id",
                          "event_ts", "emitted_ts"}
    assert len(first["items"]) == 10 and first["scores"] == sorted(first["scores"], reverse=True)
    assert first["model_version"] == 1
    weights = [e["weight"] for e in first["explanation"]]
    assert {"relation", "weight"} == set(first["explanation"][0])
    assert sum(weights) == pytest.approx(1.0, abs=1e-3)


def test_recommendations_never_repeat_seen_items(replayed) -> None:
    dataset = load("ml-100k")
    seen: dict[str, set[str]] = defaultdict(set)
    by_event = {m["event_id"]: m for m in replayed}
    for position in range(REPLAYED):
        user = dataset.user_tokens[dataset.users[position]]
        seen[user].add(dataset.item_tokens[dataset.items[position]])
        assert not seen[user] & set(by_event[f"ml-100k:{position}"]["items"])


def test_last_recommendation_matches_ksr_recommend(replayed, small_checkpoint) -> None:
    dataset = load("ml-100k")
    histories = histories_of(dataset, REPLAYED)
    last = {}
    for message in sorted(replayed, key=lambda m: int(m["event_id"].split(":")[1])):
        last[message["user_id"]] = message
    recommender = Recommender.load(small_checkpoint)
    assert len(last) > 5
    for user, message in last.items():
        expected = expected_recommendation(recommender, histories[user])
        assert message["items"] == expected.items, user
        assert message["scores"] == pytest.approx(expected.scores, abs=1e-4)
    # And through the command itself, for a few users.
    for user in sorted(last, key=lambda u: -len(histories[u]))[:3]:
        output = subprocess.run(
            [*KSR, "recommend", "--checkpoint", str(small_checkpoint), "--items", ",".join(histories[user]),
             "--json"], check=True, cwd=REPO, capture_output=True, text=True,
        ).stdout
        command = json.loads(output)
        assert command["items"] == last[user]["items"]
        assert command["scores"] == pytest.approx(last[user]["scores"], abs=1e-4)


BAD_EVENTS = [
    (b"not json {", "not_json"),
    (b"\xff\xfe\x00", "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (json.dumps({"item_id": "50", "ts": 1}).encode(), "missing_user_id"),
    (json.dumps({"user_id": "1", "ts": 1}).encode(), "missing_item_id"),
    (json.dumps({"user_id": "1", "item_id": "50"}).encode(), "missing_ts"),
    (json.dumps({"user_id": {"a": 1}, "item_id": "50", "ts": 1}).encode(), "bad_user_id"),
    (json.dumps({"user_id": "1", "item_id": "50", "ts": "yesterday"}).encode(), "bad_ts"),
    (json.dumps({"user_id": "1", "item_id": "no-such-item", "ts": 1}).encode(), "unknown_item"),
    (json.dumps({"user_id": "1", "item_id": "50", "ts": 1}).encode(), "key_mismatch"),  # sent under "bad"
    (json.dumps({"user_id": "1", "item_id": "50", "ts": 1, "pad": "x" * 4096}).encode(), "oversized"),
]


def test_bad_events_go_to_the_dead_letter_topic_and_the_counts_add_up(stream, replayed, bootstrap) -> None:
    env, worker = stream
    before = scrape(worker.metrics_url)
    good = [json.dumps({"user_id": "dlq-user", "item_id": item, "ts": 1.0 + i, "event_id": f"good-{i}"}).encode()
            for i, item in enumerate(["50", "172", "181"])]
    messages = [(b"bad", value) for value, _ in BAD_EVENTS[:5]] + [(b"dlq-user", good[0])]
    messages += [(b"bad", value) for value, _ in BAD_EVENTS[5:]] + [(b"dlq-user", v) for v in good[1:]]
    produce(bootstrap, env["KSR_TOPIC_INTERACTIONS"], messages)

    dead = decode(consume(bootstrap, env["KSR_TOPIC_DLQ"], len(BAD_EVENTS), timeout=60, worker=worker))
    assert sorted(d["reason"] for d in dead) == sorted(reason for _, reason in BAD_EVENTS)
    for letter in dead:
        assert letter["source"]["topic"] == env["KSR_TOPIC_INTERACTIONS"]
        assert letter["source"]["offset"] >= 0 and letter["detail"]
    originals = {d["original"] for d in dead if d["original_encoding"] == "utf-8"}
    assert "not json {" in originals
    recommendations = consume(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], REPLAYED + 3, 60, worker)
    assert sum(1 for m in decode(recommendations) if m["user_id"] == "dlq-user") == 3

    after = scrape(worker.metrics_url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('ksr_events_total{outcome="ok"}') == 3
    assert delta('ksr_events_total{outcome="dead_letter"}') == len(BAD_EVENTS)
    for reason in {r for _, r in BAD_EVENTS}:
        expected = sum(1 for _, r in BAD_EVENTS if r == reason)
        assert delta(f'ksr_dead_letters_total{{reason="{reason}"}}') == expected, reason
    assert after["ksr_model_version"] == 1
    assert after["ksr_batch_size_count"] >= 1


def test_the_worker_has_no_leader_election_topic(stream, replayed, bootstrap) -> None:
    """Faust's leader election topic is off: nothing runs on the leader only, and its one
    partition, which nobody writes, held the worker's fetches back (configure_worker_consumer)."""
    from kafka import KafkaAdminClient

    env, _ = stream
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        topics = set(admin.list_topics())
    finally:
        admin.close()
    mine = {topic for topic in topics if topic.startswith(env["KSR_APP_ID"])}
    assert f"{env['KSR_APP_ID']}-user-state-changelog" in mine  # the worker's own topics are there
    assert f"{env['KSR_APP_ID']}-__assignor-__leader" not in mine


def test_metrics_endpoint_serves_the_documented_metrics(stream, replayed) -> None:
    _, worker = stream
    samples = scrape(worker.metrics_url)
    for name in ("ksr_recommendations_total", "ksr_model_version", "ksr_users_in_state",
                 "ksr_model_step_seconds_count", "ksr_event_to_recommendation_seconds_count",
                 "ksr_batch_size_count", "ksr_commit_seconds_count"):
        assert name in samples, name
    assert samples["ksr_recommendations_total"] >= REPLAYED
    # The users of the partitions it serves (sampled every 10 s), none of them a standby's.
    deadline = time.monotonic() + 30
    while scrape(worker.metrics_url)["ksr_users_in_state"] == 0:
        assert time.monotonic() < deadline, "ksr_users_in_state stayed 0"
        time.sleep(1)
    # The stream runs exactly-once (the default): its answers became visible through commits.
    assert samples["ksr_commit_seconds_count"] >= 1
    # ... some of them as soon as the agent caught up (KSR_COMMIT_WHEN_IDLE), counted among them.
    assert 1 <= samples["ksr_idle_commits_total"] <= samples["ksr_commit_seconds_count"]
    assert samples["ksr_event_to_recommendation_seconds_count"] >= REPLAYED
    # Every answered event's age was taken on its way: when fetched (direct delivery, the default)
    # and when its batch started.
    for stage in ("fetched", "batched"):
        assert samples[f'ksr_event_age_seconds_count{{stage="{stage}"}}'] >= REPLAYED, stage
    # KSR_GC_FREEZE (on by default) collected once and froze the start-up heap, timed like any collection.
    assert samples['ksr_gc_pause_seconds_count{generation="2"}'] >= 1
    assert samples["ksr_gc_frozen_objects"] > 10_000
    # The agent's time by phase: it processed, sent, and waited for events.
    for phase in ("process", "send", "idle", "admit", "other"):
        assert samples[f'ksr_agent_seconds_total{{phase="{phase}"}}'] > 0, phase
    # Direct delivery (the default): everything fetched was handed to the agent and answered.
    assert samples["ksr_queued_events"] == 0
    # The recurrence ran, at most one step per event (a batch of only bad events runs none).
    assert 1 <= samples["ksr_model_steps_total"] <= samples["ksr_batch_size_sum"]
    # Every 10 s the worker samples its memory by part: the replayed users' states sit in RocksDB's
    # memtables, and the C heap holds them, the model and the rest. (The sample taken when the agent
    # starts comes before the stores open, so wait for a timer's.)
    deadline = time.monotonic() + 30
    while not samples.get('ksr_memory_bytes{part="rocksdb_memtables"}') and time.monotonic() < deadline:
        time.sleep(1)
        samples = scrape(worker.metrics_url)
    memory = {line.split('"')[1]: value for line, value in samples.items() if line.startswith("ksr_memory_bytes{")}
    assert set(memory) == {"rocksdb_block_cache", "rocksdb_memtables", "rocksdb_table_readers",
                           "c_heap_in_use", "c_heap_free", "c_heap_mmapped"}, memory
    assert memory["rocksdb_memtables"] > 0 and memory["c_heap_in_use"] > 10 * 2**20, memory
    assert min(memory.values()) >= 0 and samples["ksr_python_allocated_blocks"] > 100_000


def answers_of_a_fresh_worker(env: dict, log: Path, bootstrap: str, count: int, timeout: float) -> list[dict]:
    """Start a worker, replay the first `count` ml-100k events, and return the `count` answers a
    read_committed consumer gets within `timeout` s (one per event, checked); the worker is stopped
    and must not have logged a traceback."""
    worker = WorkerProcess(env, log).start()
    try:
        replay(env, count)
        answers = decode(consume(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], count, timeout=timeout, worker=worker))
    finally:
        worker.stop()
    assert "Traceback" not in worker.log()
    # A first start has no crashed run's state to discard (the crash scenario checks that one does).
    assert "did not stop cleanly" not in worker.log()
    assert sorted(m["event_id"] for m in answers) == sorted(f"ml-100k:{i}" for i in range(count))
    return answers


@pytest.mark.parametrize(("variable", "value"), [
    ("KSR_FAST_DELIVERY", "0"), ("KSR_SERVING_KERNEL", "torch"), ("KSR_RANKING_PRECISION", "int8"),
])
def test_the_other_delivery_and_serving_paths_give_the_same_answers(
    tmp_path, bootstrap, small_checkpoint, replayed, variable, value
) -> None:
    """The defaults the other tests run have an alternative each; the same events get the same
    recommendations (scores within rounding) through it.

    KSR_FAST_DELIVERY=0: Faust's stream delivers the events one at a time, instead of whole fetches
    handed to the agent (worker.delivery). KSR_SERVING_KERNEL=torch: each batch's recurrence runs
    through PyTorch's own forward instead of the compiled loop of model/kernels.py.
    KSR_RANKING_PRECISION=int8: the catalog is ranked on int8 products, certified or ranked again.
    """
    count = 400
    env = stream_env(tmp_path, bootstrap, small_checkpoint, KSR_MAX_EVENT_BYTES="2048", **{variable: value})
    answers = answers_of_a_fresh_worker(env, tmp_path / "worker.log", bootstrap, count, timeout=180)
    direct = {m["event_id"]: m for m in replayed}
    for message in answers:
        assert message["items"] == direct[message["event_id"]]["items"], message["event_id"]
        assert message["scores"] == pytest.approx(direct[message["event_id"]]["scores"], abs=1e-4)


@pytest.mark.parametrize(("environment", "message"), [
    ({"KSR_RANKING_PRECISION": "int4"}, "KSR_RANKING_PRECISION must be one of auto, float32, int8"),
    ({"KSR_RANKING_PRECISION": "int8", "KSR_SERVING_KERNEL": "torch"}, "runs through the compiled kernels"),
])
def test_a_ranking_precision_the_worker_cannot_serve_is_refused(monkeypatch, environment, message) -> None:
    from worker.config import ConfigError, Settings

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env()


def test_a_serving_kernel_that_does_not_exist_is_refused(monkeypatch) -> None:
    from worker.config import ConfigError, Settings

    monkeypatch.setenv("KSR_SERVING_KERNEL", "numpy")
    with pytest.raises(ConfigError, match="KSR_SERVING_KERNEL must be one of compiled, torch"):
        Settings.from_env()


@contextlib.asynccontextmanager
async def started_worker_consumer(worker):
    """The consumer Faust builds for `worker` (as its consumer thread does), started, so its
    fetcher exists; stopped on the way out."""
    consumer = worker.app.consumer._thread._create_worker_consumer(worker.app.transport)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def test_the_workers_consumer_fetches_with_the_configured_wait(monkeypatch, bootstrap) -> None:
    """KSR_FETCH_MAX_WAIT_MS reaches the fetcher of the consumer Faust builds for the worker, where
    faust-streaming fixes 1,500 ms; a bad value is refused."""
    import asyncio

    from model.bench import _synthetic_recommender
    from worker.app import Worker
    from worker.config import ConfigError, Settings

    async def fetch_wait(worker: Worker) -> int:
        async with started_worker_consumer(worker) as consumer:
            return consumer._fetcher._fetch_max_wait_ms

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.delenv("KSR_FETCH_MAX_WAIT_MS", raising=False)
    assert asyncio.run(fetch_wait(Worker(Settings.from_env(), _synthetic_recommender(20, 3), 2))) == 50
    monkeypatch.setenv("KSR_FETCH_MAX_WAIT_MS", "1500")
    assert asyncio.run(fetch_wait(Worker(Settings.from_env(), _synthetic_recommender(20, 3), 2))) == 1500
    for bad in ("0", "-1", "30001", "soon"):
        monkeypatch.setenv("KSR_FETCH_MAX_WAIT_MS", bad)
        with pytest.raises(ConfigError, match="KSR_FETCH_MAX_WAIT_MS must be a positive integer of at most 30000"):
            Settings.from_env()


def test_the_standby_replicas_reach_faust_s_partition_assignor(monkeypatch, bootstrap) -> None:
    """KSR_STANDBY_REPLICAS sets how many standby copies of each partition's table the assignor
    hands out (Faust's default, 1, when unset); a value outside 0-3 is refused."""
    from model.bench import _synthetic_recommender
    from worker.app import Worker
    from worker.config import ConfigError, Settings

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.delenv("KSR_STANDBY_REPLICAS", raising=False)
    assert Worker(Settings.from_env(), _synthetic_recommender(20, 3), 2).app.assignor.replicas == 1
    monkeypatch.setenv("KSR_STANDBY_REPLICAS", "0")
    assert Worker(Settings.from_env(), _synthetic_recommender(20, 3), 2).app.assignor.replicas == 0
    for bad in ("-1", "4", "none"):
        monkeypatch.setenv("KSR_STANDBY_REPLICAS", bad)
        with pytest.raises(ConfigError, match="KSR_STANDBY_REPLICAS must be one of 0, 1, 2, 3"):
            Settings.from_env()


def test_the_workers_fetches_are_traced_when_asked(monkeypatch, bootstrap, tmp_path) -> None:
    """KSR_TRACE_FETCHES=PATH: the worker's consumer writes a line per fetch to PATH.PID, with the
    partitions and offsets it asked for and whether records came back."""
    import asyncio
    import os

    from aiokafka import TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    from model.bench import _synthetic_recommender
    from worker.app import Worker
    from worker.config import Settings

    topic = f"trace-{time.time_ns()}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        admin.close()
    produce(bootstrap, topic, [(b"u1", b"first"), (b"u1", b"second")])

    async def fetch_the_second(worker: Worker) -> list:
        async with started_worker_consumer(worker) as consumer:
            consumer.assign([TopicPartition(topic, 0)])
            consumer.seek(TopicPartition(topic, 0), 1)
            return [(await consumer.getone()).value]

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("KSR_TRACE_FETCHES", str(tmp_path / "fetches"))
    assert asyncio.run(fetch_the_second(Worker(Settings.from_env(), _synthetic_recommender(20, 3), 2))) == [b"second"]
    lines = [json.loads(line) for line in (tmp_path / f"fetches.{os.getpid()}").read_text().splitlines()]
    brought = [line for line in lines if line["records"]]
    assert brought and brought[0]["fetched"] == [f"{topic}:0@1"]
    assert all(line["ms"] >= 0 and line["t"] > 0 for line in lines)


def committed_count(bootstrap: str, topic: str, seconds: float) -> int:
    """How many messages of `topic` a read_committed consumer reads in `seconds`."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, isolation_level="read_committed")
    count = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            count += sum(len(records) for records in consumer.poll(timeout_ms=500).values())
    finally:
        consumer.close()
    return count


def test_exactly_once_answers_commit_when_the_worker_catches_up(tmp_path, bootstrap, small_checkpoint) -> None:
    """Under exactly-once an answer reaches read_committed consumers when its transaction commits.
    With the commit timer at 10 minutes, the answers still arrive, because the worker commits as
    soon as it has nothing left to process (KSR_COMMIT_WHEN_IDLE, the default). With that off,
    the same processed answers stay invisible until the timer (or the stop's commit)."""
    count = 200
    slow_timer = {"KSR_COMMIT_INTERVAL_MS": "600000", "KSR_PROCESSING_GUARANTEE": "exactly_once"}

    for fast_delivery in ("1", "0"):  # direct delivery (the default), and Faust's stream
        env = stream_env(tmp_path, bootstrap, small_checkpoint, KSR_FAST_DELIVERY=fast_delivery, **slow_timer)
        answers_of_a_fresh_worker(env, tmp_path / f"idle-{fast_delivery}.log", bootstrap, count, timeout=120)

    env = stream_env(tmp_path, bootstrap, small_checkpoint, KSR_COMMIT_WHEN_IDLE="0", **slow_timer)
    worker = WorkerProcess(env, tmp_path / "timer.log").start()
    try:
        replay(env, count)
        deadline = time.monotonic() + 120
        processed = 0.0
        while processed < count:
            assert time.monotonic() < deadline and worker.alive(), worker.log()[-3000:]
            time.sleep(0.5)
            try:
                processed = scrape(worker.metrics_url).get('ksr_events_total{outcome="ok"}', 0.0)
            except OSError:
                continue  # the metrics endpoint is not up yet
        assert committed_count(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], seconds=5) == 0
    finally:
        worker.stop()
    # The stop commits what was processed.
    assert len(consume(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], count, timeout=60)) == count


def test_restarted_worker_continues_each_user_from_their_state(tmp_path, bootstrap, small_checkpoint) -> None:
    """Stop and restart (same RocksDB folder), then restart with the folder wiped (restored from
    the changelog): each user's next recommendation equals what an uninterrupted run gives."""
    env = stream_env(tmp_path, bootstrap, small_checkpoint)
    topic = env["KSR_TOPIC_RECOMMENDATIONS"]
    worker = WorkerProcess(env, tmp_path / "worker.log")
    phases = [(0, 400, False), (400, 800, False), (800, 1200, True)]
    received = []
    for skip, limit, wipe in phases:
        if wipe:
            shutil.rmtree(env["KSR_STATE_DIR"])
        worker.start()
        try:
            replay(env, limit, skip)
            received = consume(bootstrap, topic, limit, timeout=180, worker=worker)
        finally:
            worker.stop()
        assert "Traceback" not in worker.log()
        # The clean stop left each partition's RocksDB knowing how far the changelog it holds
        # goes, so the next start reads nothing of it again.
        changelog = f"{env['KSR_APP_ID']}-user-state-changelog"
        assert persisted_offsets(env["KSR_STATE_DIR"]) == last_committed_offsets(bootstrap, changelog)

    messages = decode(received)
    assert sorted(m["event_id"] for m in messages) == sorted(f"ml-100k:{i}" for i in range(1200))
    dataset = load("ml-100k")
    recommender = Recommender.load(small_checkpoint)
    by_event = {m["event_id"]: m for m in messages}
    checked = 0
    for boundary in (400, 800):
        histories = histories_of(dataset, boundary)
        # Users active both before and after the restart: their first event after it.
        after = {}
        for position in range(boundary, boundary + 400):
            user = dataset.user_tokens[dataset.users[position]]
            if user in histories and user not in after:
                after[user] = position
        for user, position in after.items():
            history = histories[user] + [dataset.item_tokens[dataset.items[position]]]
            expected = expected_recommendation(recommender, history)
            got = by_event[f"ml-100k:{position}"]
            assert got["items"] == expected.items, (boundary, user)
            assert got["scores"] == pytest.approx(expected.scores, abs=1e-4)
            checked += 1
    assert checked >= 5


def test_a_commits_hold_on_the_batch_gate_is_released_once() -> None:
    """The commit lets go of the gate early (to commit the transactions off the agent's path) and
    again when it ends: the second release must not free a gate another holder has taken since."""
    import asyncio

    from worker.app import _GateHold

    async def scenario() -> bool:
        gate = asyncio.Lock()
        await gate.acquire()
        first = _GateHold(gate)
        first.release()  # early, before the transactions commit
        await gate.acquire()  # the next holder (a batch, or a commit of a rebalance)
        first.release()  # the first commit ends
        return gate.locked()

    assert asyncio.run(scenario())


def test_a_batch_of_latencies_is_counted_as_observing_each_one() -> None:
    """metrics.observe_many (one update per bucket for a batch's latencies) exposes the same
    buckets, count and sum as Histogram.observe called for every amount, amounts on a bucket's
    bound (counted in that bucket: `le`) and beyond the last finite bound included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from worker import metrics

    amounts = [0.0, 0.001, 0.0011, 0.004, 0.05, 0.05, 0.3, 2.5, 7.0, 12.0, 0.02]
    exposition = {}
    for way in ("each", "batch"):
        registry = CollectorRegistry()
        histogram = Histogram("latency", "test", buckets=(0.001, 0.01, 0.05, 1, 2.5, 10), registry=registry)
        if way == "each":
            for amount in amounts:
                histogram.observe(amount)
        else:
            metrics.observe_many(histogram, amounts[:4])
            metrics.observe_many(histogram, [])
            metrics.observe_many(histogram, amounts[4:])
        exposition[way] = {
            line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in generate_latest(registry).decode().splitlines()
            if line.startswith("latency_") and "_created" not in line
        }
    assert exposition["batch"].keys() == exposition["each"].keys()
    for key, value in exposition["each"].items():
        assert exposition["batch"][key] == pytest.approx(value), key
    assert exposition["batch"]['latency_bucket{le="0.001"}'] == 2  # 0.0 and 0.001 (on the bound)
    assert exposition["batch"]['latency_bucket{le="+Inf"}'] == len(amounts)


def test_event_ages_count_from_the_kafka_timestamp_and_never_below_zero() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from worker import metrics

    histogram = Histogram("age", "test", buckets=(0.1, 1, 10), registry=CollectorRegistry())
    now = time.time()
    metrics.observe_ages(histogram, [now - 5.0, now - 0.5, now + 60.0])  # the last one stamped ahead of us
    counts = [bucket.get() for bucket in histogram._buckets]
    assert counts == [1, 1, 1, 0]  # 0 (clamped), 0.5, 5
    assert 5.5 <= histogram._sum.get() < 5.6


def test_an_output_topic_with_fewer_partitions_stops_the_worker_with_what_to_do(tmp_path, bootstrap,
                                                                               small_checkpoint) -> None:
    """Each answer goes to its event's partition number; an existing recommendations topic with
    fewer partitions than interactions would fail the first batch from a higher partition, after
    every restart. The worker refuses to start and says how to fix it."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    env = stream_env(tmp_path, bootstrap, small_checkpoint, KSR_PARTITIONS="4")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(env["KSR_TOPIC_INTERACTIONS"], 4, 1),
                             NewTopic(env["KSR_TOPIC_RECOMMENDATIONS"], 2, 1)])
    finally:
        admin.close()
    result = subprocess.run([*KSR, "worker"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"topic {env['KSR_TOPIC_RECOMMENDATIONS']} has 2 partitions, fewer than "
            f"{env['KSR_TOPIC_INTERACTIONS']}'s 4") in result.stderr
    assert "--partitions 4" in result.stderr

