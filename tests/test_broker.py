"""Tests of worker/broker.py: the local single-node Kafka broker.

Tests marked ``broker`` use the shared broker on 127.0.0.1:KSR_BROKER_PORT, starting it if
needed and leaving it running for the rest of the suite. The lifecycle test runs a second,
private broker on free ports under tmp_path, so stopping it never disturbs the shared one.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from worker import broker

# kafka-python 3.0 loads its protocol schemas with importlib.resources' legacy API.
KAFKA_PYTHON_WARNINGS = pytest.mark.filterwarnings(
    r"ignore:(read|open)_text is deprecated:DeprecationWarning"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the broker module at a fresh var dir and free ports; returns the var dir."""
    monkeypatch.setenv("KSR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("KSR_BROKER_PORT", str(_free_port()))
    monkeypatch.setenv("KSR_CONTROLLER_PORT", str(_free_port()))
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    return tmp_path / "var" / "kafka"


@pytest.fixture(scope="session")
def shared_broker() -> str:
    """Bootstrap servers of the shared broker, started once and never stopped here."""
    broker.start()
    return broker.bootstrap_servers()


@pytest.fixture
def local_only(shared_broker: str) -> str:
    if broker.external_cluster() is not None:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS points at another cluster; no local broker")
    return shared_broker


# --------------------------------------------------------------------------- no broker needed


def test_bootstrap_servers_defaults_to_local_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("KSR_BROKER_PORT", "19092")
    assert broker.bootstrap_servers() == "127.0.0.1:19092"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    assert broker.bootstrap_servers() == "kafka-1:9092,kafka-2:9092"


@pytest.mark.parametrize(
    ("servers", "external"),
    [
        ("127.0.0.1:9092", False),
        ("localhost:9092", False),
        ("PLAINTEXT://localhost:9092", False),
        ("localhost", False),
        ("kafka.example.com:9092", True),
        ("127.0.0.1:9999", True),
        ("kafka.example.com:9092,127.0.0.1:9092", False),
    ],
)
def test_external_cluster_detection(
    servers: str, external: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KSR_BROKER_PORT", "9092")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", servers)
    assert (broker.external_cluster() is not None) is external


def test_start_does_nothing_for_an_external_cluster(
    private_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example.com:9092")
    assert broker.main("start") == 0
    out = capsys.readouterr().out
    assert "not needed" in out and "kafka.example.com:9092" in out
    assert not private_env.exists()


def test_status_and_stop_when_not_running(
    private_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not broker.is_running()
    assert broker.main("status") == 3
    assert "not running" in capsys.readouterr().out
    assert broker.main("stop") == 0
    assert "not running" in capsys.readouterr().out
    broker.stop()  # idempotent as a function too


def test_stale_pid_file_is_ignored_and_removed(private_env: Path) -> None:
    private_env.mkdir(parents=True)
    pid_file = private_env / "broker.pid"
    # Our own pid is alive but is not a kafka.Kafka process: a recycled pid must not count.
    pid_file.write_text(f"{os.getpid()}\n")
    assert not broker.is_running()
    assert broker.main("status") == 3
    assert not pid_file.exists()


def test_missing_java_says_what_to_install(
    private_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert broker.main("start") == 1
    err = capsys.readouterr().err
    assert "Java 17+" in err and "openjdk-17-jre-headless" in err
    with pytest.raises(broker.BrokerError, match="KAFKA_BOOTSTRAP_SERVERS"):
        broker.start()


def test_missing_maven_says_what_to_install(
    private_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    java = shutil.which("java")
    if java is None:
        pytest.skip("java not installed")
    bin_dir = tmp_path / "java-only-bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(os.path.realpath(java))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("KSR_CACHE_DIR", str(tmp_path / "cache"))  # no jars there yet
    with pytest.raises(broker.BrokerError, match="Maven is needed"):
        broker.start()
    # Nothing half-resolved may be left where the next run would take it for the jars.
    assert not broker.libs_dir().exists()


def test_server_properties_single_node_with_transactions(tmp_path: Path) -> None:
    props = broker.server_properties(port=1234, controller_port=1235, log_dir=tmp_path)
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:1235"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1234,CONTROLLER://127.0.0.1:1235"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1234"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ):
        assert props[key] == "1"
    assert props["log.dirs"] == str(tmp_path)
    # Only loopback addresses: nothing may listen on or advertise another interface.
    assert "0.0.0.0" not in "".join(props.values())


def test_wait_until_ready_times_out_on_a_closed_port() -> None:
    t0 = time.monotonic()
    with pytest.raises(broker.BrokerError, match="not ready"):
        broker.wait_until_ready(f"127.0.0.1:{_free_port()}", timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_wait_until_ready_is_not_fooled_by_a_plain_tcp_listener() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    port = server.getsockname()[1]
    done = threading.Event()

    def accept_and_hang_up() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=accept_and_hang_up, daemon=True)
    thread.start()
    try:
        with pytest.raises(broker.BrokerError, match="not ready"):
            broker.wait_until_ready(f"127.0.0.1:{port}", timeout=1.0)
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()


# --------------------------------------------------------------------------- shared broker


@pytest.mark.broker
@KAFKA_PYTHON_WARNINGS
def test_round_trip(shared_broker: str) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    topic = f"ksr-test-{uuid.uuid4().hex[:12]}"
    payloads = [f"event-{i}".encode() for i in range(10)]
    producer = KafkaProducer(bootstrap_servers=shared_broker, acks="all")
    try:
        for payload in payloads:
            producer.send(topic, payload).get(timeout=30)
    finally:
        producer.close(timeout=10)

    # A group id makes this exercise the group coordinator and __consumer_offsets as well.
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=shared_broker,
        group_id=f"ksr-test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        consumer_timeout_ms=15_000,
    )
    try:
        received = []
        for message in consumer:
            received.append(message.value)
            if len(received) == len(payloads):
                break
        consumer.commit()
    finally:
        consumer.close()
    assert sorted(received) == sorted(payloads)


@pytest.mark.broker
@KAFKA_PYTHON_WARNINGS
def test_transactional_producer(shared_broker: str) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    topic = f"ksr-test-tx-{uuid.uuid4().hex[:12]}"
    producer = KafkaProducer(
        bootstrap_servers=shared_broker, transactional_id=f"ksr-test-{uuid.uuid4().hex[:8]}"
    )
    try:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, b"committed")
        producer.commit_transaction()
    finally:
        producer.close(timeout=10)

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=shared_broker,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        consumer_timeout_ms=15_000,
    )
    try:
        received = next(iter(consumer)).value
    finally:
        consumer.close()
    assert received == b"committed"


@pytest.mark.broker
def test_start_is_idempotent_and_fast(local_only: str, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    broker.start()
    assert time.monotonic() - t0 < 3
    assert broker.is_running()
    assert broker.main("start") == 0
    assert f"broker already running on {broker.local_address()}" in capsys.readouterr().out


@pytest.mark.broker
def test_status_when_running(local_only: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert broker.main("status") == 0
    out = capsys.readouterr().out
    assert "broker running: pid" in out and broker.local_address() in out


@pytest.mark.broker
def test_local_broker_pid_is_the_running_brokers_and_none_for_another_cluster(local_only: str) -> None:
    pid = broker.local_broker_pid(broker.local_address())
    assert pid is not None and "kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert broker.local_broker_pid(f"localhost:{broker.broker_port()}") == pid
    # Another cluster's processes are not this machine's to count.
    assert broker.local_broker_pid("kafka.example.com:9092") is None
    assert broker.local_broker_pid(f"127.0.0.1:{broker.broker_port() + 1}") is None


@pytest.mark.broker
def test_start_leaves_a_foreign_broker_on_the_port_alone(
    local_only: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Same port, other var dir: the running broker is not ours to manage, but it serves.
    monkeypatch.setenv("KSR_VAR_DIR", str(tmp_path / "other"))
    assert broker.main("start") == 0
    assert "not started from" in capsys.readouterr().out
    assert not (tmp_path / "other" / "kafka" / "broker.pid").exists()


# --------------------------------------------------------------------------- private broker


@pytest.mark.broker
@pytest.mark.slow
def test_private_broker_lifecycle(
    shared_broker: str, private_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # shared_broker first: the jars are resolved once, by whichever broker starts first.
    try:
        broker.start(timeout=60)
        assert broker.is_running()
        assert broker.probe_metadata("127.0.0.1", broker.broker_port())
        assert broker.main("status") == 0
        cluster_id = (private_env / "cluster.id").read_text()
        assert (private_env / "data" / "meta.properties").exists()
        assert (private_env / "broker.log").stat().st_size > 0

        assert broker.main("stop") == 0
        assert "broker stopped" in capsys.readouterr().out
        assert not broker.is_running()
        assert broker.main("status") == 3
        assert broker.main("stop") == 0
        assert "broker not running" in capsys.readouterr().out

        # A restart reuses the formatted storage instead of formatting it again.
        broker.start(timeout=60)
        assert broker.is_running()
        assert (private_env / "cluster.id").read_text() == cluster_id
    finally:
        broker.stop()
    assert not broker.is_running()
