"""Security settings: KAFKA_* SASL/SSL variables reach every Kafka client the project builds, the
metrics endpoint binds where KSR_METRICS_HOST says, and the payload cap is read and enforced.

Most tests capture client arguments (no SASL broker needed); one runs a private broker with a
SASL_PLAINTEXT listener and drives `ksr replay` and a `ksr worker` through it.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import ClassVar
from urllib.error import URLError
from urllib.request import urlopen

import pytest
from conftest import KSR, REPO, WorkerProcess, decode, free_port, stream_env

from worker import finetune, replay, topics
from worker.config import ConfigError, Settings
from worker.processing import BatchProcessor, Interaction, Rejection, Source, validate

SECURITY_VARS = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
                 "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE")
PASSWORD = "alice-Secr3t"
SASL = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_plain_username": "alice",
        "sasl_plain_password": PASSWORD}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in SECURITY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example.com:9096")
    return monkeypatch


@pytest.fixture
def sasl_env(clean_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    clean_env.setenv("KAFKA_SASL_USERNAME", "alice")
    clean_env.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    return clean_env


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A self-signed CA certificate, and a client certificate and key (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("tls")
    files = {"ca": out / "ca.pem", "cert": out / "client.pem", "key": out / "client.key"}
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ksr-test",
         "-keyout", str(files["key"]), "-out", str(files["cert"])],
        check=True, capture_output=True,
    )
    shutil.copy(files["cert"], files["ca"])  # self-signed: the certificate is its own CA
    return files


class Captured:
    """Stands in for a kafka-python class: records its keyword arguments, talks to nobody."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, *args, **kwargs) -> None:
        Captured.calls.append((type(self).__name__, kwargs))

    def partitions_for_topic(self, topic):
        return None

    def list_topics(self):
        return []

    def send(self, *args, **kwargs):
        return self

    def get(self, timeout=None):
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    import kafka

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(Captured, "calls", calls)
    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka, name, type(name, (Captured,), {}))
    return calls


def build_every_kafka_python_client(settings: Settings) -> None:
    replay.producer(settings)  # `ksr replay`
    replay.tail(None, 5, 1.0)  # `ksr tail`
    topics.admin_client(settings)  # topic creation: worker, replay
    finetune.end_offsets(settings)  # the fine-tuner's consumer...
    finetune.read_window(settings, 0.0)
    finetune.announce(settings, {"version": 2, "checkpoint": "/x"})  # ...and its announce producer


# --------------------------------------------------------------------------- (1) kafka-python


def test_sasl_settings_reach_every_kafka_python_client(sasl_env, captured) -> None:
    settings = Settings.from_env()
    build_every_kafka_python_client(settings)
    kinds = [kind for kind, _ in captured]
    assert kinds.count("KafkaProducer") == 2 and kinds.count("KafkaAdminClient") == 1
    assert kinds.count("KafkaConsumer") == 3
    for kind, kwargs in captured:
        assert kwargs["bootstrap_servers"] == "kafka.example.com:9096", kind
        assert {k: kwargs.get(k) for k in SASL} == SASL, kind


def test_ssl_files_reach_every_kafka_python_client(clean_env, captured, tls_files) -> None:
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    clean_env.setenv("KAFKA_SSL_CAFILE", str(tls_files["ca"]))
    clean_env.setenv("KAFKA_SSL_CERTFILE", str(tls_files["cert"]))
    clean_env.setenv("KAFKA_SSL_KEYFILE", str(tls_files["key"]))
    build_every_kafka_python_client(Settings.from_env())
    assert len(captured) == 6
    for kind, kwargs in captured:
        assert kwargs["security_protocol"] == "SSL", kind
        assert (kwargs["ssl_cafile"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
            str(tls_files["ca"]), str(tls_files["cert"]), str(tls_files["key"])), kind
        assert not any(k.startswith("sasl_") for k in kwargs), kind


def test_plaintext_by_default_adds_nothing(clean_env, captured) -> None:
    settings = Settings.from_env()
    assert settings.kafka_security == {}
    build_every_kafka_python_client(settings)
    for kind, kwargs in captured:
        assert not any(k.startswith(("sasl_", "ssl_", "security_")) for k in kwargs), kind


KAFKA_CLASSES = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "AIOKafkaConsumer", "AIOKafkaProducer"}


@pytest.mark.parametrize("module", ["app", "bench", "finetune", "replay", "topics"])
def test_every_client_in_the_source_takes_the_security_settings(module: str) -> None:
    """A client added later without `**settings.kafka_security` (or `**aiokafka_security(..)`)
    would connect in plaintext to a SASL cluster: every constructor call must splat them."""
    tree = ast.parse((REPO / "worker" / f"{module}.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id in KAFKA_CLASSES]
    for call in calls:
        splats = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
        assert any("security" in s for s in splats), f"worker/{module}.py:{call.lineno} {ast.unparse(call)[:80]}"
    assert calls


# --------------------------------------------------------------------------- (2) Faust / aiokafka


def test_faust_and_aiokafka_get_sasl(sasl_env) -> None:
    import faust

    from worker.app import aiokafka_security, faust_credentials

    settings = Settings.from_env()
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("alice", PASSWORD)
    assert credentials.mechanism.value == "PLAIN" and credentials.protocol.value == "SASL_PLAINTEXT"
    assert credentials.ssl_context is None
    security = aiokafka_security(settings)
    assert security == SASL

    async def build():
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer("t", bootstrap_servers=settings.bootstrap_servers, **security)
        return consumer._client  # constructed, never started

    client = asyncio.run(build())
    assert (client._security_protocol, client._sasl_mechanism) == ("SASL_PLAINTEXT", "PLAIN")
    assert (client._sasl_plain_username, client._sasl_plain_password) == ("alice", PASSWORD)


def test_worker_app_is_built_with_the_credentials_and_the_cap(sasl_env) -> None:
    import faust

    from model.bench import _synthetic_recommender
    from worker.app import Worker

    sasl_env.setenv("KSR_MAX_EVENT_BYTES", "300")
    settings = Settings.from_env()
    worker = Worker(settings, _synthetic_recommender(20, 3), 2)
    credentials = worker.app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials) and credentials.username == "alice"
    assert worker.processor.max_event_bytes == 300


# --------------------------------------------------------------------------- (3) SSL files


def test_ssl_files_become_ssl_contexts(clean_env, tls_files) -> None:
    import faust

    from worker.app import aiokafka_security, faust_credentials

    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    clean_env.setenv("KAFKA_SASL_USERNAME", "alice")
    clean_env.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    clean_env.setenv("KAFKA_SSL_CAFILE", str(tls_files["ca"]))
    clean_env.setenv("KAFKA_SSL_CERTFILE", str(tls_files["cert"]))
    clean_env.setenv("KAFKA_SSL_KEYFILE", str(tls_files["key"]))
    settings = Settings.from_env()

    security = aiokafka_security(settings)
    assert not any(k.startswith("ssl_") and k != "ssl_context" for k in security)
    context = security["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ksr-test"),),)]
    assert security["security_protocol"] == "SASL_SSL" and security["sasl_mechanism"] == "SCRAM-SHA-512"

    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.ssl_context.get_ca_certs() == context.get_ca_certs()

    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    for var in ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
        clean_env.delenv(var)
    credentials = faust_credentials(Settings.from_env())
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.context.get_ca_certs() == context.get_ca_certs()


# --------------------------------------------------------------------------- (4) bad values


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "sasl"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "alice"}, "KAFKA_SASL_PASSWORD"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_PASSWORD": "x"}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "a", "KAFKA_SASL_PASSWORD": "b",
          "KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM"),
        # Credentials that the protocol would silently drop: a plaintext connection the user thinks is
        # authenticated.
        ({"KAFKA_SASL_USERNAME": "alice", "KAFKA_SASL_PASSWORD": "b"}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "a", "KAFKA_SASL_PASSWORD": "b",
          "KAFKA_SSL_CAFILE": "/etc/hostname"}, "KAFKA_SSL_CAFILE"),
        ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/no/such/ca.pem"}, "KAFKA_SSL_CAFILE"),
    ],
)
def test_bad_security_settings_are_config_errors_naming_the_variable(clean_env, env, names) -> None:
    for var, value in env.items():
        clean_env.setenv(var, value)
    with pytest.raises(ConfigError, match=names):
        Settings.from_env()


def test_sasl_mechanism_defaults_to_plain(sasl_env) -> None:
    """kafka-python has no default mechanism (aiokafka and Faust default to PLAIN): fill it in."""
    sasl_env.delenv("KAFKA_SASL_MECHANISM")
    assert Settings.from_env().kafka_security["sasl_mechanism"] == "PLAIN"


def test_replay_command_reports_a_bad_protocol_without_a_traceback(tmp_path) -> None:
    env = {**os.environ, "KAFKA_SECURITY_PROTOCOL": "SASL", "KSR_VAR_DIR": str(tmp_path)}
    result = subprocess.run([*KSR, "replay", "--data", "ml-100k", "--limit", "1"], cwd=REPO, env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "KAFKA_SECURITY_PROTOCOL must be one of" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- (5) masking


def test_password_is_masked_in_describe_and_repr(sasl_env) -> None:
    settings = Settings.from_env()
    described = settings.describe()
    assert described["kafka_security"]["sasl_plain_password"] == "***"
    assert described["kafka_security"]["sasl_plain_username"] == "alice"
    assert PASSWORD not in json.dumps(described)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)


# --------------------------------------------------------------------------- (6) metrics bind address


def _loopback_alias_works(host: str) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind((host, 0))
        return True
    except OSError:
        return False


def test_metrics_endpoint_binds_to_ksr_metrics_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import prometheus_client

    from worker import metrics

    host = "127.0.0.2" if _loopback_alias_works("127.0.0.2") else "127.0.0.1"
    port = free_port()
    monkeypatch.setenv("KSR_METRICS_HOST", host)
    monkeypatch.setenv("KSR_METRICS_PORT", str(port))
    settings = Settings.from_env()
    assert (settings.metrics_host, settings.metrics_port) == (host, port)

    servers = []

    def recording(*args, **kwargs):
        servers.append(prometheus_client.start_http_server(*args, **kwargs))
        return servers[-1]

    monkeypatch.setattr(metrics, "start_http_server", recording)
    metrics.serve(settings.metrics_host, settings.metrics_port)
    try:
        with urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            assert b"ksr_events_total" in response.read()
        # Bound to that address only: not to every interface, not to another loopback address.
        assert servers[0][0].server_address[0] == host
        if host != "127.0.0.1":
            with pytest.raises(URLError):
                urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(5)


# --------------------------------------------------------------------------- (7) payload cap


def test_payload_cap_is_read_and_enforced(clean_env) -> None:
    clean_env.setenv("KSR_MAX_EVENT_BYTES", "120")
    settings = Settings.from_env()
    assert settings.max_event_bytes == 120
    event = json.dumps({"user_id": "1", "item_id": "50", "ts": 1, "pad": ""}).encode()
    fits = event.replace(b'"pad": ""', b'"pad": "' + b"x" * (120 - len(event)) + b'"')
    assert len(fits) == 120 and isinstance(validate(fits, settings.max_event_bytes), Interaction)
    over = fits.replace(b'"x', b'"xx')
    rejected = validate(over, settings.max_event_bytes)
    assert isinstance(rejected, Rejection) and rejected.reason == "oversized"
    assert "121 bytes" in rejected.detail and "120-byte" in rejected.detail

    class Catalog:
        def __init__(self) -> None:
            self.item_index = {"[PAD]": 0, "50": 1}

    processor = BatchProcessor(Catalog(), max_event_bytes=settings.max_event_bytes)  # type: ignore[arg-type]
    result = processor.process([Source(b"1", over, "t", 0, 0, 0.0)], lambda user, _partition: None)
    assert [reason for *_, reason in result.dead_letters] == ["oversized"]

    for bad in ("0", "-5", "64k"):
        clean_env.setenv("KSR_MAX_EVENT_BYTES", bad)
        with pytest.raises(ConfigError, match="KSR_MAX_EVENT_BYTES"):
            Settings.from_env()


@pytest.mark.parametrize(("variable", "value", "message"), [
    # Each of these was accepted and failed later: a state too long to encode (16-bit counts), a
    # port the metrics server cannot bind, a timer that never fires, threads parsed outside Settings.
    ("KSR_HISTORY_LENGTH", "70000", "KSR_HISTORY_LENGTH must be a positive integer of at most 65535, got '70000'"),
    ("KSR_RECENT_EVENT_IDS", "65536", "KSR_RECENT_EVENT_IDS must be a positive integer of at most 65535"),
    ("KSR_METRICS_PORT", "99999", "KSR_METRICS_PORT must be a positive integer of at most 65535"),
    ("KSR_COMMIT_INTERVAL_MS", "inf", "KSR_COMMIT_INTERVAL_MS must be a positive, finite number, got 'inf'"),
    ("KSR_COMMIT_TIMEOUT_S", "nan", "KSR_COMMIT_TIMEOUT_S must be a positive, finite number"),
    ("KSR_TORCH_THREADS", "abc", "KSR_TORCH_THREADS must be a positive integer, got 'abc'"),
])
def test_settings_that_would_fail_later_are_refused_at_start(clean_env, variable, value, message) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env()
    clean_env.setenv(variable, "65535" if variable != "KSR_COMMIT_INTERVAL_MS" else "250.5")
    if variable not in ("KSR_COMMIT_TIMEOUT_S", "KSR_TORCH_THREADS"):
        Settings.from_env()  # the largest accepted value is accepted


# --------------------------------------------------------------------------- a real SASL broker


def test_broker_extra_properties_are_appended_and_win(tmp_path, monkeypatch) -> None:
    from worker import broker

    monkeypatch.delenv("KSR_BROKER_EXTRA_PROPERTIES", raising=False)
    assert broker.extra_properties() == ""
    extra = tmp_path / "extra.properties"
    extra.write_text("sasl.enabled.mechanisms=PLAIN\nnum.partitions=7\n")
    monkeypatch.setenv("KSR_BROKER_EXTRA_PROPERTIES", str(extra))
    text = broker._format_properties(
        broker.server_properties(port=1, controller_port=2, log_dir=tmp_path), broker.extra_properties())
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[-2:] == ["sasl.enabled.mechanisms=PLAIN", "num.partitions=7"]
    assert "num.partitions=4" in lines  # the generated value, overridden: java.util.Properties keeps the last
    monkeypatch.setenv("KSR_BROKER_EXTRA_PROPERTIES", str(tmp_path / "missing"))
    with pytest.raises(broker.BrokerError, match="KSR_BROKER_EXTRA_PROPERTIES"):
        broker.extra_properties()


SASL_PROPERTIES = """\
listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=\
org.apache.kafka.common.security.plain.PlainLoginModule required user_alice="{password}";
"""


@pytest.mark.broker
@pytest.mark.slow
def test_replay_and_worker_through_a_sasl_listener(tmp_path, monkeypatch, bootstrap, small_checkpoint) -> None:
    """A private broker (own var dir and ports) with a SASL_PLAINTEXT listener beside the PLAINTEXT one
    its readiness probe uses: `ksr replay` and a `ksr worker` with the KAFKA_* settings get through;
    `ksr replay` with a wrong password fails and says what to check."""
    from worker import broker

    if broker.external_cluster() is not None:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS points at another cluster; no local broker")
    port, controller, sasl_port = free_port(), free_port(), free_port()
    extra = tmp_path / "sasl.properties"
    extra.write_text(SASL_PROPERTIES.format(port=port, sasl_port=sasl_port, controller=controller,
                                            password=PASSWORD))
    for var, value in {"KSR_VAR_DIR": tmp_path / "broker", "KSR_BROKER_PORT": port,
                       "KSR_CONTROLLER_PORT": controller, "KSR_BROKER_EXTRA_PROPERTIES": extra}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    for var in SECURITY_VARS:
        monkeypatch.delenv(var, raising=False)
    address = f"127.0.0.1:{sasl_port}"
    env = stream_env(tmp_path, address, small_checkpoint, KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                     KAFKA_SASL_MECHANISM="PLAIN", KAFKA_SASL_USERNAME="alice", KAFKA_SASL_PASSWORD=PASSWORD,
                     KSR_METRICS_HOST="127.0.0.2" if _loopback_alias_works("127.0.0.2") else "127.0.0.1")
    command = [*KSR, "replay", "--data", "ml-100k", "--limit", "50"]
    started = time.monotonic()
    broker.start(timeout=90)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    wrong = None
    try:
        # kafka-python retries a failed handshake until its 30 s bootstrap timeout: run that one
        # beside everything else.
        wrong = subprocess.Popen(command, cwd=REPO, env={**env, "KAFKA_SASL_PASSWORD": "wrong"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        subprocess.run(command, cwd=REPO, env=env, check=True, stderr=subprocess.DEVNULL, timeout=120)
        worker.start()
        tail = subprocess.run([*KSR, "tail", "--topic", env["KSR_TOPIC_INTERACTIONS"], "-n", "50", "--json"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True)
        assert sorted(json.loads(line)["event_id"] for line in tail.stdout.splitlines()) == sorted(
            f"ml-100k:{i}" for i in range(50))
        recommendations = consume_sasl(env, env["KSR_TOPIC_RECOMMENDATIONS"], 50, 90, worker)
        assert sorted(m["event_id"] for m in recommendations) == sorted(f"ml-100k:{i}" for i in range(50))
        with urlopen(f"http://{env['KSR_METRICS_HOST']}:{env['KSR_METRICS_PORT']}/metrics", timeout=5) as page:
            assert b'ksr_events_total{outcome="ok"} 50.0' in page.read()
        _, stderr = wrong.communicate(timeout=90)
        assert wrong.returncode != 0
        assert "cannot use Kafka at" in stderr and "KAFKA_SASL_" in stderr and "Traceback" not in stderr
    finally:
        worker.stop()
        if wrong is not None and wrong.poll() is None:
            wrong.kill()
            wrong.wait(10)
        broker.stop()
    assert "Traceback" not in worker.log()
    print(f"SASL test {time.monotonic() - started:.1f} s")


def consume_sasl(env: dict, topic: str, count: int, timeout: float, worker: WorkerProcess) -> list[dict]:
    """`count` committed messages of `topic`, read through the SASL listener with the env's settings."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], auto_offset_reset="earliest",
        enable_auto_commit=False, isolation_level="read_committed", consumer_timeout_ms=1000,
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_plain_username="alice",
        sasl_plain_password=env["KAFKA_SASL_PASSWORD"],
    )
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < count and time.monotonic() < deadline:
            messages.extend(consumer)
            assert worker.process.poll() is None, worker.log()[-3000:]
    finally:
        consumer.close()
    assert len(messages) >= count, f"{len(messages)} of {count}\n{worker.log()[-3000:]}"
    return decode(messages)
