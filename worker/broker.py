"""Local single-node Apache Kafka broker (KRaft combined mode) on 127.0.0.1.

`ksr broker start|stop|status` lands here. The broker is plain Apache Kafka run from its
Maven artifacts, so no Docker and no system-wide install are needed, only Java 17+ and Maven:

* jars: ``${KSR_CACHE_DIR:-~/.cache/ksr-stream}/kafka-<pom hash>/libs``, resolved once with
  ``mvn dependency:copy-dependencies`` from ``deploy/kafka/pom.xml`` and shared by every clone;
* state: ``${KSR_VAR_DIR:-<repo>/var}/kafka/`` holds ``data/``, ``broker.log`` (log4j),
  ``broker.out`` (JVM stdout/stderr), ``broker.pid``, ``cluster.id``, ``server.properties``
  and ``log4j.properties``, all regenerated from this module on every start.

Environment: ``KSR_BROKER_PORT`` (9092), ``KSR_CONTROLLER_PORT`` (9093),
``KSR_BROKER_START_TIMEOUT`` (60 s), ``KAFKA_HEAP_OPTS`` (``-Xms256m -Xmx512m``),
``JAVA_HOME``, ``KSR_BROKER_EXTRA_PROPERTIES`` (a file appended to ``server.properties``, whose
keys win), and ``KAFKA_BOOTSTRAP_SERVERS``: when that names another cluster the local broker is
not needed and ``start`` does nothing.

Only the standard library is used, so the broker can be managed before PyTorch or Faust load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "BrokerError",
    "bootstrap_servers",
    "is_running",
    "main",
    "start",
    "status",
    "stop",
    "wait_until_ready",
]

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
DEFAULT_START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
DEFAULT_HEAP_OPTS = "-Xms256m -Xmx512m"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MIN_JAVA = 17
START_MARKER = "=== ksr broker start"

JAVA_HINT = (
    f"Java {MIN_JAVA}+ is needed to run the local Kafka broker: "
    "apt-get install openjdk-17-jre-headless (or set JAVA_HOME), "
    "or point KAFKA_BOOTSTRAP_SERVERS at an existing cluster"
)
MAVEN_HINT = (
    "Maven is needed once to download the Kafka jars for the local broker: "
    "apt-get install maven, or point KAFKA_BOOTSTRAP_SERVERS at an existing cluster"
)

# Exit code of `status` when the broker is down, as in LSB init scripts ("program is not running").
EXIT_NOT_RUNNING = 3


class BrokerError(RuntimeError):
    """The local broker could not be resolved, started or stopped; the message says why."""


# Popen objects of brokers started by this process: keeping them referenced lets stop() reap
# its own child (a zombie would otherwise look alive to kill(pid, 0)) and avoids the
# "subprocess is still running" ResourceWarning when the object would be collected.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- configuration


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise BrokerError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise BrokerError(f"{name}={raw!r} is not a port number")
    return port


def broker_port() -> int:
    """The PLAINTEXT port of the local broker (``KSR_BROKER_PORT``, default 9092)."""
    return _env_port("KSR_BROKER_PORT", DEFAULT_PORT)


def controller_port() -> int:
    """The KRaft controller port of the local broker (``KSR_CONTROLLER_PORT``, default 9093)."""
    return _env_port("KSR_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT)


def local_address() -> str:
    """``127.0.0.1:PORT`` of the local broker, whatever KAFKA_BOOTSTRAP_SERVERS says."""
    return f"{HOST}:{broker_port()}"


def bootstrap_servers() -> str:
    """Kafka bootstrap servers for clients: ``KAFKA_BOOTSTRAP_SERVERS``, else the local broker."""
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip() or local_address()


def cache_dir() -> Path:
    """Root of the per-user cache shared by all clones (``KSR_CACHE_DIR``)."""
    raw = os.environ.get("KSR_CACHE_DIR", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "ksr-stream"


def var_dir() -> Path:
    """The broker's state folder: ``${KSR_VAR_DIR:-<repo>/var}/kafka``."""
    raw = os.environ.get("KSR_VAR_DIR", "").strip()
    base = Path(raw).expanduser() if raw else REPO_ROOT / "var"
    return base.absolute() / "kafka"


def data_dir() -> Path:
    """Where the broker keeps its partitions and KRaft metadata log."""
    return var_dir() / "data"


def libs_dir() -> Path:
    """Folder of the broker's jars, keyed by the pom so a version bump resolves afresh."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"kafka-{digest}" / "libs"


def _split_servers(servers: str) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for item in servers.split(","):
        item = item.strip()
        if not item:
            continue
        # Clients accept "PLAINTEXT://host:port"; only the address matters here.
        item = item.split("://", 1)[-1]
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_s = rest.lstrip(":")
        else:
            host, sep, port_s = item.rpartition(":")
            if not sep:
                host, port_s = item, ""
        try:
            port = int(port_s) if port_s else None
        except ValueError:
            port = None
        out.append((host.lower(), port))
    return out


def external_cluster() -> str | None:
    """KAFKA_BOOTSTRAP_SERVERS when it names a cluster other than the local broker, else None."""
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if not servers:
        return None
    port = broker_port()
    local_hosts = {"127.0.0.1", "localhost", "::1"}
    for host, p in _split_servers(servers):
        if host in local_hosts and p in (port, None):
            return None
    return servers


def server_properties(*, port: int, controller_port: int, log_dir: Path) -> dict[str, str]:
    """Broker settings for a single-node KRaft dev broker that also supports transactions."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "4",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        # Internal topics default to replication 3, which a single node can never satisfy:
        # consumer groups and transactions would then fail with COORDINATOR_NOT_AVAILABLE.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        # Fewer internal partitions than the defaults (50) make the first consumer group and
        # the first transactional producer come up in well under a second on a laptop.
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.num.partitions": "8",
        # Tests and `honcho start` create groups all the time; waiting 3 s for more members
        # to join is pointless with one worker per group.
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        # The cleaner's dedupe buffer (default 128 MiB) comes out of the heap; Faust's compacted
        # changelog topics need the cleaner, but not at that size in a 512 MiB heap.
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        "num.recovery.threads.per.data.dir": "1",
        "log.retention.hours": "168",
        "log.segment.bytes": str(256 * 1024 * 1024),
        # Producers may send values of up to MAX_MESSAGE_BYTES (default 1 MiB): an oversized event
        # must reach the worker to be dead-lettered as `oversized`, not be refused at the broker.
        "message.max.bytes": str(MAX_MESSAGE_BYTES),
        "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
    }


# Per-request, state-change and log-cleaner chatter would drown the lines that explain a failure.
LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=${kafka.logs.dir}/broker.log
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.network.RequestChannel$=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log.LogCleaner=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.clients=WARN
"""


def log4j_properties() -> str:
    """log4j 1.x configuration: INFO to a size-capped ``broker.log`` under ``kafka.logs.dir``."""
    return LOG4J_PROPERTIES


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _format_properties(props: dict[str, str], extra: str = "") -> str:
    lines = ["# Generated by worker/broker.py on every start; edits here are overwritten."]
    for key, value in props.items():
        # Backslashes are escapes in .properties files (matters for Windows-ish paths only).
        lines.append(f"{key}={value.replace(chr(92), chr(92) * 2)}")
    text = "\n".join(lines) + "\n"
    if extra.strip():
        # Java's Properties keeps the last value of a repeated key, so these override the above.
        text += "# From KSR_BROKER_EXTRA_PROPERTIES:\n" + extra.rstrip("\n") + "\n"
    return text


def extra_properties() -> str:
    """Text of the file named by ``KSR_BROKER_EXTRA_PROPERTIES`` (empty when unset).

    Appended verbatim to the generated ``server.properties``, so its keys win: e.g. a SASL
    listener beside the PLAINTEXT one (which the readiness probe keeps using).
    """
    raw = os.environ.get("KSR_BROKER_EXTRA_PROPERTIES", "").strip()
    if not raw:
        return ""
    try:
        return Path(raw).expanduser().read_text()
    except OSError as exc:
        raise BrokerError(f"KSR_BROKER_EXTRA_PROPERTIES={raw!r} cannot be read: {exc}") from None


# --------------------------------------------------------------------------- tools and jars


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME", "").strip()
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if not found:
        raise BrokerError(f"`java` not found. {JAVA_HINT}")
    return found


def _check_java(java: str) -> None:
    try:
        proc = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"could not run {java} -version ({exc}). {JAVA_HINT}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if proc.returncode != 0 or not match:
        raise BrokerError(f"{java} -version failed: {proc.stderr.strip()}. {JAVA_HINT}")
    major = int(match.group(1))
    if major == 1:  # "1.8.0_392" style
        major = int(match.group(2) or 0)
    if major < MIN_JAVA:
        raise BrokerError(f"{java} is Java {major}. {JAVA_HINT}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _has_kafka_jar(libs: Path) -> bool:
    return libs.is_dir() and any(libs.glob("kafka_2.13-*.jar"))


def resolve_libs() -> Path:
    """Return the jar folder, downloading the jars with Maven the first time.

    Maven writes into a temporary folder that is renamed into place only once it is complete,
    so an interrupted download is never mistaken for a usable classpath.
    """
    libs = libs_dir()
    if _has_kafka_jar(libs):
        return libs
    home = libs.parent
    # Two clones starting their first broker at once must not both download into one place.
    with _locked(home.with_name(home.name + ".lock")):
        if _has_kafka_jar(libs):
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise BrokerError(f"`mvn` not found. {MAVEN_HINT}")
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="libs.tmp-", dir=home))
        try:
            print(f"broker: resolving Kafka jars into {libs} (first run only)", file=sys.stderr)
            cmd = [
                mvn, "-q", "-B", "-f", str(POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp}",
            ]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as exc:
                raise BrokerError(f"could not run mvn: {exc}. {MAVEN_HINT}") from exc
            if proc.returncode != 0 or not _has_kafka_jar(tmp):
                output = (proc.stdout + proc.stderr).strip()[-4000:]
                raise BrokerError(
                    f"resolving the Kafka jars with Maven failed (exit {proc.returncode}):\n"
                    f"{output}\n(command: {' '.join(cmd)})"
                )
            if libs.exists():  # a leftover without the kafka jar: not ours to trust
                shutil.rmtree(libs)
            os.rename(tmp, libs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return libs


# --------------------------------------------------------------------------- process state


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int, props: Path | None = None) -> bool:
    """Whether ``pid`` is a live process and, where /proc tells, our broker on ``props``."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _CHILDREN[pid]
            return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists but belongs to someone else: the cmdline check below decides
    proc = Path("/proc") / str(pid)
    if not proc.exists():
        return True  # no procfs (macOS): trust the signal check
    try:
        stat = (proc / "stat").read_text()
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return False
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # A recycled pid belongs to some other program: only a kafka.Kafka on our properties counts.
    args = [a.decode(errors="replace") for a in cmdline]
    if "kafka.Kafka" not in args:
        return False
    return props is None or str(props) in args


def _broker_pid() -> int | None:
    """Pid of the live broker recorded in the var dir; clears a stale pid file."""
    pid_file = var_dir() / "broker.pid"
    pid = _read_pid(pid_file)
    if pid is None:
        return None
    if _pid_alive(pid, var_dir() / "server.properties"):
        return pid
    with contextlib.suppress(OSError):
        pid_file.unlink()
    return None


def local_broker_pid(bootstrap: str) -> int | None:
    """Pid of the local broker when `bootstrap` is its address and it is alive, else None (another
    cluster: its processes are not this machine's to count)."""
    if bootstrap.strip() not in (local_address(), f"localhost:{broker_port()}"):
        return None
    return _broker_pid()


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_running() -> bool:
    """True when the broker recorded in the var dir is alive and its port accepts connections."""
    return _broker_pid() is not None and _port_open(HOST, broker_port())


# --------------------------------------------------------------------------- readiness probe


def _kafka_string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    raw = value.encode()
    return struct.pack(">h", len(raw)) + raw


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        buf.extend(chunk)
    return bytes(buf)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        value = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return value


def probe_metadata(host: str, port: int, timeout: float = 5.0) -> list[tuple[int, str, int]]:
    """Send one Kafka Metadata request (v4, no topics) and return the brokers it lists.

    A TCP connect succeeds long before a KRaft broker serves requests (the socket is bound
    early, and the broker is fenced until the controller has registered it), so readiness
    means: the broker answers Metadata and lists at least one live broker. v4 is old enough
    for any 2.x broker and still supported by Kafka 4.x, which dropped v0-v3.
    """
    correlation_id = 0x4B53
    header = struct.pack(">hhi", 3, 4, correlation_id) + _kafka_string("ksr-broker-probe")
    body = struct.pack(">ib", 0, 0)  # topics: empty array (no topics); allow_auto_topic_creation
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        if not 0 < size < 16 * 1024 * 1024:
            raise ConnectionError(f"implausible response size {size}: not a Kafka broker?")
        reader = _Reader(_recv_exact(sock, size))
    if reader.take(">i") != correlation_id:
        raise ConnectionError("response does not match the request: not a Kafka broker?")
    reader.take(">i")  # throttle_time_ms
    brokers = []
    for _ in range(reader.take(">i")):
        node_id = reader.take(">i")
        broker_host = reader.string() or ""
        broker_port_ = reader.take(">i")
        reader.string()  # rack
        brokers.append((node_id, broker_host, broker_port_))
    return brokers


def _first_address(bootstrap: str) -> tuple[str, int]:
    for host, port in _split_servers(bootstrap):
        return host, port or DEFAULT_PORT
    raise BrokerError(f"no address in bootstrap servers {bootstrap!r}")


def wait_until_ready(
    bootstrap: str, timeout: float, *, pid: int | None = None, props: Path | None = None
) -> None:
    """Block until the broker at ``bootstrap`` (first address) answers a Metadata request.

    Raises BrokerError after ``timeout`` seconds, or at once if ``pid`` is given and that
    process exits (a broker that crashed at startup will never become ready).
    """
    host, port = _first_address(bootstrap)
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while True:
        if pid is not None and not _pid_alive(pid, props):
            raise BrokerError(f"the broker process (pid {pid}) exited during startup")
        remaining = deadline - time.monotonic()
        try:
            brokers = probe_metadata(host, port, timeout=max(0.5, min(5.0, remaining)))
            if brokers:
                return
            last_error = "metadata lists no live broker yet"
        except (OSError, struct.error, UnicodeDecodeError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"Kafka at {host}:{port} not ready after {timeout:.0f} s ({last_error})"
            )
        time.sleep(0.25)


# --------------------------------------------------------------------------- start / stop


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _log_tails() -> str:
    parts = []
    for name in ("broker.log", "broker.out"):
        path = var_dir() / name
        # Only this start's lines: earlier runs would suggest a failure that is not the current one.
        tail = _tail(path).rpartition(START_MARKER)[2].partition("\n")[2]
        if tail.strip():
            parts.append(f"--- last lines of {path} ---\n{tail}")
    return "\n".join(parts) or f"(no log output in {var_dir()})"


def _java_cmd(java: str, libs: Path, *args: str) -> list[str]:
    return [java, "-cp", str(libs / "*"), *args]


def _ensure_formatted(java: str, libs: Path, props: Path) -> None:
    """Format the KRaft storage on first start; the cluster id is kept in the var dir."""
    if (data_dir() / "meta.properties").exists():
        return
    vdir = var_dir()
    id_file = vdir / "cluster.id"
    cluster_id = id_file.read_text().strip() if id_file.exists() else ""
    # Storage tools log through log4j as well; without a config they print warnings to stderr.
    log_opts = [f"-Dlog4j.configuration=file:{vdir / 'tools-log4j.properties'}"]
    _write_text_atomic(
        vdir / "tools-log4j.properties",
        "log4j.rootLogger=WARN, stderr\n"
        "log4j.appender.stderr=org.apache.log4j.ConsoleAppender\n"
        "log4j.appender.stderr.Target=System.err\n"
        "log4j.appender.stderr.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.stderr.layout.ConversionPattern=%p %m%n\n",
    )
    if not cluster_id:
        proc = subprocess.run(
            [java, *log_opts, "-cp", str(libs / "*"), "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        cluster_id = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not cluster_id:
            raise BrokerError(f"kafka-storage random-uuid failed: {proc.stderr.strip()}")
        _write_text_atomic(id_file, cluster_id + "\n")
    proc = subprocess.run(
        [java, *log_opts, "-cp", str(libs / "*"), "kafka.tools.StorageTool",
         "format", "-t", cluster_id, "-c", str(props), "--ignore-formatted"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BrokerError(
            f"formatting the broker storage in {data_dir()} failed:\n"
            f"{(proc.stdout + proc.stderr).strip()}"
        )


def _jvm_opts(vdir: Path) -> list[str]:
    heap = os.environ.get("KAFKA_HEAP_OPTS", "").strip() or DEFAULT_HEAP_OPTS
    return [
        *heap.split(),
        # The GC settings of kafka-server-start.sh, minus the GC log nobody reads in dev.
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={vdir}",
        f"-Dlog4j.configuration=file:{vdir / 'log4j.properties'}",
    ]


def _launch(java: str, libs: Path, props: Path) -> int:
    vdir = var_dir()
    cmd = [java, *_jvm_opts(vdir), "-cp", str(libs / "*"), "kafka.Kafka", str(props)]
    marker = f"{START_MARKER} {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    # log4j appends to broker.log, so the marker separates this run's lines from the last one's.
    with open(vdir / "broker.log", "a") as log:
        log.write(marker)
    with open(vdir / "broker.out", "ab") as out:
        out.write(marker.encode())
        out.flush()
        # A new session keeps the broker alive after the shell or test run that started it
        # exits, and out of reach of the Ctrl-C meant for the foreground process.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=vdir,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    _write_text_atomic(vdir / "broker.pid", f"{proc.pid}\n")
    return proc.pid


def _start_timeout() -> float:
    raw = os.environ.get("KSR_BROKER_START_TIMEOUT", "").strip()
    try:
        return float(raw) if raw else DEFAULT_START_TIMEOUT
    except ValueError:
        raise BrokerError(f"KSR_BROKER_START_TIMEOUT={raw!r} is not a number") from None


def _start_locked(timeout: float) -> str:
    vdir = var_dir()
    port, cport = broker_port(), controller_port()
    address = f"{HOST}:{port}"
    props = vdir / "server.properties"

    pid = _broker_pid()
    if pid is not None:
        if _port_open(HOST, port):
            return f"broker already running on {address} (pid {pid})"
        # Alive but not (yet) listening: starting from another shell, or stuck.
        try:
            wait_until_ready(address, timeout, pid=pid, props=props)
        except BrokerError as exc:
            raise BrokerError(
                f"{exc}; the broker process {pid} does not answer on {address}. "
                f"Run `ksr broker stop` and try again.\n{_log_tails()}"
            ) from None
        return f"broker already running on {address} (pid {pid})"

    if port == cport:
        raise BrokerError(f"KSR_BROKER_PORT and KSR_CONTROLLER_PORT are both {port}")
    if _port_open(HOST, port):
        try:
            brokers = probe_metadata(HOST, port, timeout=3.0)
        except (OSError, struct.error, UnicodeDecodeError):
            brokers = []
        if brokers:
            return (
                f"a Kafka broker not started from {vdir} already answers on {address}; "
                "using it as it is"
            )
        raise BrokerError(f"port {address} is already in use by another program")
    if _port_open(HOST, cport):
        raise BrokerError(f"controller port {HOST}:{cport} is already in use (KSR_CONTROLLER_PORT)")

    java = _java()
    _check_java(java)
    libs = resolve_libs()

    data_dir().mkdir(parents=True, exist_ok=True)
    _write_text_atomic(
        props, _format_properties(server_properties(port=port, controller_port=cport,
                                                    log_dir=data_dir()), extra_properties())
    )  # fmt: skip
    _write_text_atomic(vdir / "log4j.properties", log4j_properties())
    _ensure_formatted(java, libs, props)

    t0 = time.monotonic()
    pid = _launch(java, libs, props)
    try:
        wait_until_ready(address, timeout, pid=pid, props=props)
    except BrokerError as exc:
        tails = _log_tails()
        if _pid_alive(pid, props):
            # Leave nothing half-started behind: the next `start` begins from a clean slate.
            _terminate(pid, props)
        raise BrokerError(f"{exc}\n{tails}") from None
    return f"broker started on {address} (pid {pid}, {time.monotonic() - t0:.1f} s, data {vdir})"


def start(timeout: float = DEFAULT_START_TIMEOUT) -> None:
    """Start the local broker unless it already runs, and wait until it serves requests.

    Idempotent and safe to call from several processes at once. Does nothing when
    KAFKA_BOOTSTRAP_SERVERS names another cluster. ``timeout`` bounds the wait for a freshly
    launched broker, not the one-time jar download. Raises BrokerError with the reason (and
    the tail of the broker log when the broker itself failed).
    """
    _start(timeout)


def _start(timeout: float) -> str:
    external = external_cluster()
    if external is not None:
        return (
            f"KAFKA_BOOTSTRAP_SERVERS={external} points at another cluster: "
            "the local broker is not needed, nothing started"
        )
    with _locked(var_dir() / "broker.lock"):
        return _start_locked(timeout)


def _terminate(pid: int, props: Path) -> bool:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL. Returns False if it had to kill."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not _pid_alive(pid, props):
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _pid_alive(pid, props):
        time.sleep(0.1)
    return False


def _stop() -> str:
    vdir = var_dir()
    with _locked(vdir / "broker.lock"):
        pid = _broker_pid()
        if pid is None:
            return "broker not running"
        clean = _terminate(pid, vdir / "server.properties")
        with contextlib.suppress(OSError):
            (vdir / "broker.pid").unlink()
    if clean:
        return f"broker stopped (pid {pid})"
    return f"broker (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:.0f} s and was killed"


def stop() -> None:
    """Stop the local broker: SIGTERM, then SIGKILL after 30 s. Does nothing if it is not running."""
    _stop()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Suspend the local broker's process for the block (SIGSTOP, then SIGCONT however the block
    ends): a hung broker, whose connections stay open and whose answers never come. For fault tests."""
    pid = _broker_pid()
    if pid is None:
        raise BrokerError("no local broker process to suspend")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def status() -> tuple[bool, str]:
    """``(running, one-line description)`` of the local broker; running means it accepts connections."""
    vdir = var_dir()
    address = local_address()
    pid = _broker_pid()
    if pid is not None and _port_open(HOST, broker_port()):
        text = f"broker running: pid {pid}, {address}, data {data_dir()}"
        running = True
    elif pid is not None:
        text = (
            f"broker not running: pid {pid} is alive but {address} does not accept connections "
            f"(starting or stuck; see {vdir / 'broker.log'})"
        )
        running = False
    else:
        text = f"broker not running ({address}, data {data_dir()})"
        running = False
    external = external_cluster()
    if external is not None:
        text += f"; clients use KAFKA_BOOTSTRAP_SERVERS={external}"
    return running, text


def main(action: str) -> int:
    """Entry point of ``ksr broker {start,stop,status}``; returns the process exit code.

    start: 0 when the broker runs (or is not needed), 1 on failure. stop: 0, 1 on failure.
    status: 0 when running, 3 when not.
    """
    try:
        if action == "start":
            print(_start(_start_timeout()))
            return 0
        if action == "stop":
            print(_stop())
            return 0
        if action == "status":
            running, text = status()
            print(text)
            return 0 if running else EXIT_NOT_RUNNING
    except BrokerError as exc:
        print(f"ksr broker {action}: {exc}", file=sys.stderr)
        return 1
    print(
        f"ksr broker: unknown action {action!r} (expected start, stop or status)", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "status"))
