"""`ksr bench throughput`: the worker beside the raw Kafka pipe it sits on, in one run.

(a) raw pipe: an aiokafka consumer feeding an aiokafka producer, no model: the ceiling.
(b) the worker end to end (`ksr worker` as a subprocess), same broker, partitions, input messages
    and output message size.
Both drain the same pre-produced backlog (saturation), with `workers` processes each (one
consumer group per side), and nothing reads either side's answers while it drains (the workers are
followed through their metrics pages); then each is fed the same further events at
one rate (by default half the worker's saturated rate) to measure latency from an event's produce
time to its answer arriving at a read_committed consumer: the worker, and the raw pipe as an echo in
its own process (the floor of that figure on this machine and broker). Bounded in events and
seconds; loopback broker only (KAFKA_BOOTSTRAP_SERVERS is honoured).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from worker.broker import local_broker_pid
from worker.config import REPO_ROOT, Settings
from worker.metrics import AGENT_PHASE, C_HEAP, EVENT_AGE, ROCKSDB_MEMORY
from worker.replay import paced_async
from worker.topics import delete_topics


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _events(dataset, count: int, offset: int = 0) -> list[tuple[bytes, dict]]:
    """`count` real events cycling through the data set, with unique event ids."""
    out = []
    for n in range(count):
        position = (offset + n) % dataset.n_events
        user = dataset.user_tokens[dataset.users[position]]
        out.append((user.encode(), {
            "user_id": user, "item_id": dataset.item_tokens[dataset.items[position]],
            "ts": float(dataset.timestamps[position]), "event_id": f"bench-{offset + n}", "type": "rating",
        }))
    return out


def _produce(bootstrap: str, topic: str, events: list[tuple[bytes, dict]], security: dict) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10, batch_size=256 * 1024,
                             **security)
    for key, event in events:
        producer.send(topic, key=key, value=json.dumps(event).encode())
    producer.flush()
    producer.close()


def _create_topics(settings: Settings, names: list[str], partitions: int) -> None:
    from kafka.admin import NewTopic

    from worker.topics import admin_client

    admin = admin_client(settings)
    try:
        admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    finally:
        admin.close()


async def _raw_pipe(
    settings: Settings, source: str, sink: str, reply: bytes, timeout: float, group: str, done,
) -> tuple[float | None, float | None, float, int]:
    """Consume messages and produce one `reply`-sized message each, as one member of consumer group
    `group`, until `done(messages piped)` is true or `timeout` s passed.

    Returns the wall time of its first fetch and of the end of its last batch's sends (None if it
    fetched nothing), its process's CPU seconds from the first fetch, and the messages it piped.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from worker.app import aiokafka_security

    security = aiokafka_security(settings)
    consumer = AIOKafkaConsumer(source, bootstrap_servers=settings.bootstrap_servers, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=True, **security)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5, **security)
    await consumer.start()
    await producer.start()
    seen, started, ended, cpu_started = 0, None, None, 0.0
    deadline = time.monotonic() + timeout
    try:
        while not done(seen) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100, max_records=1000)
            for tp, records in batches.items():
                if started is None:
                    started, cpu_started = time.time(), time.process_time()
                for record in records:
                    await producer.send(sink, key=record.key, value=reply, partition=tp.partition)
                seen += len(records)
            if batches:
                ended = time.time()
        await producer.flush()
        cpu = time.process_time() - cpu_started if started is not None else 0.0
    finally:
        await producer.stop()
        await consumer.stop()
    return started, ended, cpu, seen


def require_at_least_one(**counts: int) -> None:
    """Refuse a benchmark count below 1, named as its command-line option (for library callers;
    the CLI's parser refuses them first)."""
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def _raw_pipes(settings: Settings, source: str, sink: str, count: int, reply: bytes, timeout: float,
               processes: int) -> tuple[float, float]:
    """The raw pipe over a backlog of `count` events: in this process, or as `processes` processes
    in one consumer group (as `processes` workers are), stopped once the sink holds `count` replies.

    Returns events per second (from the first fetch of any process to the end of the last sends)
    and the pipe's CPU milliseconds per event (all its processes).
    """
    group = f"raw-{uuid.uuid4().hex[:6]}"
    if processes == 1:
        figures = [asyncio.run(_raw_pipe(settings, source, sink, reply, timeout, group, lambda seen: seen >= count))]
    else:
        stop_file = Path(tempfile.mkdtemp(prefix="ksr-raw-")) / "stop"
        members = [subprocess.Popen([sys.executable, "-m", "worker.bench", "raw-pipe", source, sink, str(len(reply)),
                                     group, str(stop_file), str(timeout)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                    start_new_session=True) for _ in range(processes)]
        try:
            _wait_for_records(settings, sink, count, timeout, members)
            stop_file.touch()
            figures = [json.loads(member.communicate(timeout=60)[0].decode().strip().splitlines()[-1])
                       for member in members]
        finally:
            for member in members:
                _stop(member, 10)
            shutil.rmtree(stop_file.parent, ignore_errors=True)
    seen = sum(piped for *_, piped in figures)
    starts = [started for started, *_ in figures if started is not None]
    if seen < count or not starts:
        raise RuntimeError(f"raw pipe saw {seen} of {count} events within {timeout}s")
    elapsed = max(ended for _, ended, *_ in figures if ended is not None) - min(starts)
    return count / elapsed, sum(cpu for _, _, cpu, _ in figures) / count * 1000


def _wait_for_records(settings: Settings, topic: str, count: int, timeout: float, members: list) -> None:
    """Wait until `topic` (written without transactions) holds `count` records."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **settings.kafka_security)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        deadline = time.monotonic() + timeout
        while sum(consumer.end_offsets(partitions).values()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the raw pipe did not answer {count} events within {timeout}s")
            if any(member.poll() is not None for member in members):
                raise RuntimeError("a raw pipe process exited early")
            time.sleep(0.05)
    finally:
        consumer.close()


# The agent's time by phase (worker.metrics.AGENT_SECONDS), as named on the metrics page; and
# process_model, the part of `process` in the model's forward and the ranking (ksr_model_step_seconds).
AGENT_PHASES = {
    **{phase: f'ksr_agent_seconds_total{{phase="{phase}"}}' for phase in AGENT_PHASE},
    "process_model": "ksr_model_step_seconds_sum",
}


def _drain(settings: Settings, topic: str, count: int, timeout: float) -> tuple[list[float], bytes]:
    """Read `count` committed messages of `topic` from the start: their produce timestamps
    (seconds) and the longest message value among the first 100."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest",
                             enable_auto_commit=False, isolation_level="read_committed",
                             consumer_timeout_ms=500, fetch_max_wait_ms=5, **settings.kafka_security)
    stamps: list[float] = []
    longest = b""
    deadline = time.monotonic() + timeout
    try:
        while len(stamps) < count and time.monotonic() < deadline:
            for record in consumer:
                stamps.append(record.timestamp / 1000)
                if len(stamps) <= 100 and len(record.value) > len(longest):
                    longest = record.value
                if len(stamps) >= count:
                    break
    finally:
        consumer.close()
    if len(stamps) < count:
        raise RuntimeError(f"{topic}: {len(stamps)} of {count} messages within {timeout}s")
    return stamps, longest


# What `_watch` reads from each worker's metrics page, summed over the workers.
_WATCHED = ("ksr_recommendations_total", "process_resident_memory_bytes", "process_cpu_seconds_total",
            "ksr_batch_size_sum", "ksr_batch_size_count", "ksr_model_steps_total", "ksr_ranked_again_total")
# The worker's memory by part (worker.metrics.sample_memory, every 10 s), as named on the metrics page.
MEMORY_PARTS = {
    **{part: f'ksr_memory_bytes{{part="{part}"}}' for part in (*ROCKSDB_MEMORY, *C_HEAP)},
    "python_allocated_blocks": "ksr_python_allocated_blocks",
}


# /proc/stat's columns of a busy core: user, nice, system, irq, softirq.
_BUSY_COLUMNS = (0, 1, 2, 5, 6)


def _counters(urls: list[str], pids: dict[str, int | None] | None = None) -> dict[str, float]:
    """The workers' cumulative counters that `_phase_figures` turns into a phase's figures, summed,
    with the CPU seconds of this benchmark's own process and of each process in `pids` (name: pid;
    "broker", "echo"), as "cpu:NAME"."""
    names = ("ksr_recommendations_total", "process_cpu_seconds_total", "ksr_batch_size_sum",
             "ksr_batch_size_count", *AGENT_PHASES.values())
    totals: dict[str, float] = {"monotonic": time.monotonic(), "cpu:benchmark": time.process_time()}
    for name, columns in (("machine_busy", _BUSY_COLUMNS), ("machine_iowait", (4,)), ("machine_steal", (7,))):
        seconds = _proc_stat_seconds(columns)
        if seconds is not None:
            totals[name] = seconds
    for name, pid in (pids or {}).items():
        seconds = _process_cpu_seconds(pid)
        if seconds is not None:
            totals[f"cpu:{name}"] = seconds
    for url in urls:
        for name, value in scrape_samples(url, names).items():
            totals[name] = totals.get(name, 0.0) + value
    return totals


def _phase_figures(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the workers did between two `_counters` reads: answers, batches and their mean size, CPU
    and the agent's wall time by phase per answer (ms). The latency phase's own figures: a worker
    that falls behind there shows whether it took small batches, waited, or spent more per event."""
    def delta(name: str) -> float | None:
        return after[name] - before[name] if name in after and name in before else None

    answers = delta("ksr_recommendations_total") or 0.0
    batches = delta("ksr_batch_size_count")
    cpu = delta("process_cpu_seconds_total")
    wall = delta("monotonic")

    def cores(name: str) -> float | None:
        seconds = delta(name)
        return round(seconds / wall, 2) if seconds is not None and wall else None

    figures = {"answers": int(answers), "batches": None if batches is None else int(batches),
               "seconds": round(wall, 2),
               # How many of the machine's cores were busy (the workers, the broker, this benchmark),
               # idle with a disk write or read outstanding, and taken by the hypervisor.
               "machine_cores_busy": cores("machine_busy"), "machine_cores_iowait": cores("machine_iowait"),
               "machine_cores_stolen": cores("machine_steal"),
               "mean_batch": round(delta("ksr_batch_size_sum") / batches, 1) if batches else None,
               "cpu_ms_per_event": round(cpu * 1000 / answers, 4) if cpu is not None and answers else None}
    # Cores each process used over the phase: the workers (their metrics pages), this benchmark (its
    # producer and read_committed reader), the broker when it is this machine's, the raw pipe's echo.
    processes = {"workers": cores("process_cpu_seconds_total"),
                 **{name.split(":", 1)[1]: cores(name) for name in after if name.startswith("cpu:")}}
    figures["cores_by_process"] = {name: value for name, value in processes.items() if value is not None}
    phases = {phase: delta(name) for phase, name in AGENT_PHASES.items()}
    figures["agent_ms_per_event"] = {
        phase: round(seconds * 1000 / answers, 4) for phase, seconds in phases.items()
        if seconds is not None and answers
    } or None
    return figures


def _machine_busy_seconds() -> float | None:
    """CPU seconds this machine's cores have spent busy since boot, or None where /proc does not tell."""
    return _proc_stat_seconds(_BUSY_COLUMNS)


def _process_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds (user and system, all threads) process `pid` has used, or None where /proc does
    not tell."""
    return None if pid is None else _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def _stat_cpu_seconds(stat: Path) -> float | None:
    """utime + stime of a /proc `stat` file (a process's or a thread's), in seconds, or None where
    it cannot be read."""
    try:
        fields = stat.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _proc_stat_seconds(columns: tuple[int, ...]) -> float | None:
    """The sum of /proc/stat's `columns` (0: user ... 4: iowait, 7: steal) over all cores, in
    seconds since boot, or None where /proc does not tell."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        return sum(int(fields[i]) for i in columns) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _watch(workers: list[subprocess.Popen], urls: list[str], count: int, timeout: float,
           interval: float = 0.25, broker_pid: int | None = None) -> list[tuple]:
    """Follow the workers through their metrics pages until they have answered `count` events.

    Nothing reads their output meanwhile: the raw pipe's output is not read during its run either,
    and a read_committed reader of the answers takes most of a core on a small machine (README,
    Speed). Returns samples taken every `interval` s, each (answers emitted, resident memory, CPU
    seconds (all threads), event-loop threads' CPU seconds, monotonic time, events in batches,
    batches, {agent phase: seconds, "model_steps": sequential model steps, "ranked_again": answers the
    int8 ranking ranked again}, machine busy CPU
    seconds), every worker figure summed over the workers; the dict also holds the memory parts
    (MEMORY_PARTS) as "memory:PART", the CPU seconds of the broker `broker_pid` as "cpu:broker"
    (None without one), each worker's answers as "answered_each" and the wall clock as "wall".
    """
    names = (*_WATCHED, *AGENT_PHASES.values(), *MEMORY_PARTS.values())
    samples: list[tuple] = []
    deadline = time.monotonic() + timeout
    answered = 0.0
    while answered < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers answered {answered:.0f} of {count} events within {timeout}s")
        if any(worker.poll() is not None for worker in workers):
            raise RuntimeError("a worker exited during the benchmark")
        pages = [scrape_samples(url, names) for url in urls]
        if all(len(page) >= 3 for page in pages):

            def total(name: str, pages: list[dict] = pages) -> float | None:
                values = [page.get(name) for page in pages]
                return None if None in values else sum(values)

            loops = [_loop_thread_cpu(worker.pid) for worker in workers]
            answered = total("ksr_recommendations_total") or 0.0
            samples.append((answered, total("process_resident_memory_bytes"), total("process_cpu_seconds_total"),
                            None if None in loops else sum(loops), time.monotonic(),
                            total("ksr_batch_size_sum"), total("ksr_batch_size_count"),
                            {**{phase: total(name) for phase, name in AGENT_PHASES.items()},
                             "model_steps": total("ksr_model_steps_total"),
                             "ranked_again": total("ksr_ranked_again_total"),
                             "cpu:broker": _process_cpu_seconds(broker_pid),
                             "answered_each": [page.get("ksr_recommendations_total") or 0.0 for page in pages],
                             "wall": time.time(),
                             **{f"memory:{part}": total(name) for part, name in MEMORY_PARTS.items()}},
                            _machine_busy_seconds()))
            if answered >= count:
                break
        time.sleep(interval)
    return samples


def _metrics_page(url: str, timeout: float = 2) -> list[str]:
    """The lines of a Prometheus text page; none when the endpoint does not answer."""
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=timeout) as response:
            return response.read().decode().splitlines()
    except OSError:
        return []


def scrape_sample(url: str, name: str, timeout: float = 2) -> float | None:
    """The value of the unlabelled sample `name` on a metrics page, or None."""
    return scrape_samples(url, (name,), timeout).get(name)


def scrape_samples(url: str, names, timeout: float = 2) -> dict[str, float]:
    """The values of the unlabelled samples `names` found on one read of a metrics page."""
    wanted = set(names)
    found = {}
    for line in _metrics_page(url, timeout):
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value.split()[0])
    return found


def _histogram(url: str, name: str, label: str = "") -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of a Prometheus histogram on `url` (of its
    series with `label`, e.g. 'generation="2"', when given)."""
    buckets: dict[float, float] = {}
    for line in _metrics_page(url):
        if line.startswith(name + "_bucket{") and label in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def _histograms(urls: list[str], name: str, label: str = "") -> dict[float, float]:
    """`_histogram` summed over several workers' pages."""
    total: dict[float, float] = {}
    for url in urls:
        for bound, count in _histogram(url, name, label).items():
            total[bound] = total.get(bound, 0.0) + count
    return total


def _bucket_count(before: dict, after: dict) -> int:
    """How many observations a histogram gained between two scrapes (its +Inf bucket)."""
    return int(after.get(float("inf"), 0) - before.get(float("inf"), 0))


def _bucket_quantile(before: dict, after: dict, q: float) -> float | None:
    """The upper bucket bound below which a fraction `q` of the observations between two scrapes
    fell (Prometheus buckets: the figure is a bound, not an exact percentile)."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0
    if not total:
        return None
    for bound, cumulative in counts:
        if cumulative >= q * total:
            return bound
    return None


def _loop_thread_cpu(supervisor_pid: int) -> float | None:
    """CPU seconds of the Faust worker's main thread (its event loop: agent, Faust, producer), the
    first child of `ksr worker`'s supervisor; None where /proc does not tell."""
    try:
        child = int(Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return _stat_cpu_seconds(Path(f"/proc/{child}/task/{child}/stat"))


def _all_answering(samples: list[tuple]) -> tuple[list[tuple], float, float, bool]:
    """The samples from the first one in which every worker had answered, their answers counted
    from there; that sample's wall clock; the answers before it; and whether there was such a
    sample (if not, all the samples, counted from 0 and from any time, and False).

    Several workers do not start together: the first to join the consumer group is given every
    partition at once (on a broker whose `group.initial.rebalance.delay.ms` is 0, as this project's
    is) and drains alone until the next one has joined, the group has rebalanced and the newcomer
    has restored its partitions' states. That takes seconds, in which a 60,000-event backlog is
    mostly gone, and rates over it would be one worker's. With one worker this is its first answer."""
    start = next((i for i, sample in enumerate(samples)
                  if sample[7].get("answered_each") and all(n > 0 for n in sample[7]["answered_each"])), None)
    if start is None:
        return samples, 0.0, 0.0, False
    base = samples[start][0]
    return ([(sample[0] - base, *sample[1:]) for sample in samples[start:]], samples[start][7]["wall"], base,
            True)


def _saturated_rate(stamps: list[float], since: float) -> float:
    """Answers per second over the middle 80% of the answers whose records were stamped from
    `since` on (seconds), so the start-up, the stretch before every worker answered and the tail do
    not count; over all of them when fewer than two were stamped after `since`."""
    stamps = sorted(stamps)
    after = [stamp for stamp in stamps if stamp >= since]
    if len(after) >= 2:
        stamps = after
    low, high = int(0.1 * len(stamps)), int(0.9 * len(stamps)) - 1
    return (high - low) / max(stamps[high] - stamps[low], 1e-9)


def _middle(samples: list[tuple], count: int) -> list[tuple]:
    """The samples taken over the middle 80% of the backlog (start-up and tail left out)."""
    return [sample for sample in samples if 0.1 * count <= sample[0] <= 0.9 * count]


def _middle_rate(samples: list[tuple], count: int, numerator: int, denominator: int) -> float | None:
    """Over the middle 80% of the backlog, how much sample field `numerator` changed per change of
    field `denominator` (samples missing either are left out); None without two such samples or
    without a change in the denominator."""
    middle = [sample for sample in _middle(samples, count)
              if sample[numerator] is not None and sample[denominator] is not None]
    if len(middle) < 2 or middle[-1][denominator] == middle[0][denominator]:
        return None
    first, last = middle[0], middle[-1]
    return (last[numerator] - first[numerator]) / (last[denominator] - first[denominator])


def _emit_eps(samples: list[tuple], count: int) -> float | None:
    """Answers the workers emitted per second of wall time over the middle 80% of the backlog, by
    their own count (when each answer was made, not when its record was stamped)."""
    rate = _middle_rate(samples, count, 0, 4)
    return None if rate is None else round(rate, 1)


def _cpu_per_event(samples: list[tuple], count: int) -> float | None:
    """The worker's CPU seconds (all its threads) per output over the middle 80% of the backlog,
    in milliseconds: what the worker spends per event, a figure a busy machine disturbs far less
    than a rate."""
    seconds = _middle_rate(samples, count, 2, 0)
    return None if seconds is None else round(seconds * 1000, 4)


def _loop_thread_busy(samples: list[tuple], count: int, workers: int = 1) -> float | None:
    """The share of wall time the worker's event-loop thread spent on a CPU over the middle 80% of
    the backlog (the mean over `workers` workers): near 1, the loop is the bottleneck (a profile's
    "idle" share then includes waiting for the interpreter lock, not spare capacity)."""
    share = _middle_rate(samples, count, 3, 4)
    return None if share is None else round(share / workers, 3)


def _machine_cores_busy(samples: list[tuple], count: int) -> float | None:
    """How many of the machine's cores were busy, on average, over the middle 80% of the backlog."""
    cores = _middle_rate([(sample[0], sample[8], sample[4]) for sample in samples], count, 1, 2)
    return None if cores is None else round(cores, 2)


def _broker_cpu_per_event(samples: list[tuple], count: int) -> float | None:
    """The broker's CPU milliseconds per answer over the middle 80% of the backlog (None when the
    broker is not this machine's)."""
    seconds = _middle_rate([(sample[0], sample[7].get("cpu:broker")) for sample in samples], count, 1, 0)
    return None if seconds is None else round(seconds * 1000, 4)


def _mean_batch(samples: list[tuple], count: int) -> float | None:
    """Events per processed batch over the middle 80% of the backlog (from `ksr_batch_size`): the
    fewer, the more each event pays of a batch's fixed cost."""
    events = _middle_rate(samples, count, 5, 6)
    return None if events is None else round(events, 1)


def _agent_ms_per_event(samples: list[tuple], count: int) -> dict[str, float] | None:
    """The agent's wall time per event by phase (`ksr_agent_seconds`) over the middle 80% of the
    backlog, in milliseconds: where the event-loop thread's time goes, read from the worker's own
    counters (no profiler, no slowdown)."""
    figures = {}
    for phase in AGENT_PHASES:
        seconds = _middle_rate([(sample[0], sample[7][phase]) for sample in samples], count, 1, 0)
        if seconds is not None:
            figures[phase] = round(seconds * 1000, 4)
    return figures or None


def _ranked_again_share(samples: list[tuple]) -> float | None:
    """Answers the int8 ranking ranked again (`ksr_ranked_again`) per answer over the whole drain."""
    answered, again = samples[-1][0], samples[-1][7].get("ranked_again")
    return None if again is None or not answered else round(again / answered, 6)


def _model_steps_per_event(samples: list[tuple], count: int) -> float | None:
    """Sequential model steps per event over the middle 80% of the backlog (`ksr_model_steps`):
    how long the recurrence ran for each batch's events, which depends on how batches are cut."""
    steps = _middle_rate([(sample[0], sample[7].get("model_steps")) for sample in samples], count, 1, 0)
    return None if steps is None else round(steps, 4)


def _rss_growth(samples: list[tuple], count: int) -> dict:
    """Resident memory when 20% of the outputs were seen, its highest after, and the growth in
    between; and the worker's memory by part (MEMORY_PARTS, in MB; Python's in blocks) at those two
    samples, so that a growth can be traced to what grew."""
    if not samples:
        return {"rss_mb_at_20pct": None, "rss_mb_max_after": None, "rss_growth_last_80pct": None,
                "memory_parts_at_20pct_and_max": None}
    later = [sample for sample in samples if sample[0] >= 0.2 * count] or samples[-1:]
    first, peak = later[0], max(later, key=lambda sample: sample[1])

    def part(sample: tuple, name: str) -> float | None:
        value = sample[7].get(f"memory:{name}")
        if value is None or name == "python_allocated_blocks":  # a count, not bytes
            return value
        return round(value / 2**20, 1)

    return {"rss_mb_at_20pct": round(first[1] / 2**20, 1), "rss_mb_max_after": round(peak[1] / 2**20, 1),
            "rss_growth_last_80pct": round(peak[1] / first[1] - 1, 4),
            "memory_parts_at_20pct_and_max": {name: [part(first, name), part(peak, name)] for name in MEMORY_PARTS}}


# Where a profiled function's own time is counted, by the first matching part of its file path.
_COMPONENTS = (
    ("/torch/", "model step (torch)"), ("/model/", "model step (torch)"),
    ("worker/processing.py", "batch processing (validate, state, messages)"),
    ("worker/state.py", "state encode/decode"), ("/json/", "json"), ("rocksdict", "rocksdb"),
    ("/faust/tables/", "faust tables"), ("/faust/", "faust streams/consumer/producer"),
    ("/aiokafka/", "aiokafka"), ("/mode/", "mode (faust services)"),
    ("/asyncio/", "asyncio event loop"), ("worker/", "worker app"),
)
_BUILTINS = (
    ("select.epoll", "idle (waiting for I/O)"), ("torch", "model step (torch)"), ("socket", "socket I/O"),
    ("_json", "json"), ("rocksdict", "rocksdb"), ("numpy", "batch processing (validate, state, messages)"),
    ("_contextvars", "asyncio event loop"), ("_asyncio", "asyncio event loop"),
)


def profile_summary(path: str | Path, top: int = 12) -> dict:
    """Own time of a cProfile dump grouped by component, and the top functions, as shares."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values()) or 1.0
    groups: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in stats.items():
        if filename == "~":  # a C function: place it by its name
            component = next((label for part, label in _BUILTINS if part in name), "other C calls")
        else:
            component = next((label for part, label in _COMPONENTS if part in filename), "other python")
        groups[component] = groups.get(component, 0.0) + tottime
    functions = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {
        "profiled_seconds": round(total, 1),
        "share_by_component": {k: round(v / total, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_functions": [
            {"function": f"{Path(f).name}:{line}({name})", "share": round(v[2] / total, 3), "calls": v[1]}
            for (f, line, name), v in functions
        ],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def bench_throughput(
    checkpoint: str | None = None,
    events: int = 20000,
    latency_events: int = 3000,
    partitions: int = 4,
    timeout: float = 600.0,
    worker_env: dict | None = None,
    data: str = "ml-100k",
    profile: str | None = None,
    latency_rate: float | None = None,
    workers: int = 1,
) -> dict:
    """Run (a) and (b) and the latency phase; returns the figures.

    The latency phase runs at `latency_rate` events/s, by default half the worker's saturated rate.
    `workers`: worker processes in one consumer group (each its own state folder and metrics
    port), and as many raw pipe processes in one group, so that both sides get the same processes.

    Also reports the worker's resident memory growth over the last 80% of the backlog and, after
    the worker stopped (RocksDB flushed and closed), its state folder's bytes per user.
    """
    from model.data import load

    require_at_least_one(workers=workers, partitions=partitions, events=events, latency_events=latency_events)
    base = Settings.from_env()
    checkpoint = checkpoint or str(base.checkpoint)
    dataset = load(data)
    tag = uuid.uuid4().hex[:8]
    names = {k: f"bench{tag}.{k}" for k in ("raw-in", "raw-out", "echo-in", "echo-out", "in", "out", "dlq", "updates")}
    app_id = f"bench-{tag}"  # the workers' group, and the prefix of their Faust changelog topics
    _create_topics(base, list(names.values()), partitions)
    try:
        return _bench_throughput(base, dataset, names, app_id, checkpoint, events, latency_events, partitions,
                                 timeout, worker_env, profile, latency_rate, workers)
    finally:
        # A run leaves a few GB on the broker at a million events (every topic holds the backlog
        # or its answers): gone when the run ends, however it ends.
        try:
            deleted = delete_topics(base, (f"bench{tag}.", f"{app_id}-"))
            _log(f"deleted this run's {len(deleted)} topics")
        except Exception as error:  # noqa: BLE001  (the run's own error, if any, is the one to see)
            _log(f"could not delete this run's topics (bench{tag}.*, {app_id}-*): {error!r}")


def _bench_throughput(base: Settings, dataset, names: dict, app_id: str, checkpoint: str, events: int,
                      latency_events: int, partitions: int, timeout: float, worker_env: dict | None,
                      profile: str | None, latency_rate: float | None, workers: int) -> dict:
    from model.serving import resolve_ranking_precision

    backlog = _events(dataset, events)
    _log(f"producing {events} events to two input topics ({partitions} partitions)")
    _produce(base.bootstrap_servers, names["raw-in"], backlog, base.kafka_security)
    _produce(base.bootstrap_servers, names["in"], backlog, base.kafka_security)

    state_dirs = [Path(tempfile.mkdtemp(prefix="ksr-bench-")) for _ in range(workers)]
    metrics_port = int(os.environ.get("KSR_BENCH_METRICS_PORT", "9474"))
    urls = [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(workers)]
    env = {
        **os.environ, "KSR_APP_ID": app_id, "KSR_TOPIC_INTERACTIONS": names["in"],
        "KSR_TOPIC_RECOMMENDATIONS": names["out"], "KSR_TOPIC_DLQ": names["dlq"],
        "KSR_TOPIC_MODEL_UPDATES": names["updates"], "KSR_CHECKPOINT": checkpoint,
        **(worker_env or {}),
    }
    _log(f"(b) worker: draining the backlog ({workers} worker process{'es' if workers > 1 else ''})")
    log_paths = [state_dir / "worker.log" for state_dir in state_dirs]
    processes: list[subprocess.Popen] = []
    try:
        for i, (state_dir, log_path) in enumerate(zip(state_dirs, log_paths)):
            own = {"KSR_STATE_DIR": str(state_dir), "KSR_METRICS_PORT": str(metrics_port + i)}
            if profile and i == 0:  # one profile file: the first worker's
                own["KSR_PROFILE"] = str(Path(profile).resolve())
            with open(log_path, "wb") as log:
                processes.append(subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], cwd=REPO_ROOT,
                                                  env={**env, **own}, stdout=log, stderr=log,
                                                  start_new_session=True))
        broker_pid = local_broker_pid(base.bootstrap_servers)
        samples = _watch(processes, urls, events, timeout, broker_pid=broker_pid)
        answers_each = [int(scrape_sample(url, "ksr_recommendations_total") or 0) for url in urls]
        stamps, reply = _drain(base, names["out"], events, timeout)
        # The drain's figures count from the moment every worker answers (`_all_answering`).
        measured, since, counted_from, together = _all_answering(samples)
        measured_events = events - counted_from  # what `measured` counts its middle 80% of
        worker_eps = _saturated_rate(stamps, since)

        rate = latency_rate or worker_eps / 2
        _log(f"(b) worker: {worker_eps:.0f} events/s; latency phase at {rate:.0f} events/s")
        latency_events = min(latency_events, int(rate * 30) or 1)  # at most ~30 s of load
        paced = _events(dataset, latency_events, offset=events)
        commits_before = _histograms(urls, "ksr_commit_seconds")
        full_gc_before = _histograms(urls, "ksr_gc_pause_seconds", 'generation="2"')
        ages_before = {stage: _histograms(urls, "ksr_event_age_seconds", f'stage="{stage}"') for stage in EVENT_AGE}
        counted = {"broker": broker_pid}
        counters_before = _counters(urls, counted)
        trace = asyncio.run(_paced_trace(base, names["in"], names["out"], paced, rate, timeout, processes))
        commits_after = _histograms(urls, "ksr_commit_seconds")
        full_gc_after = _histograms(urls, "ksr_gc_pause_seconds", 'generation="2"')
        ages_after = {stage: _histograms(urls, "ksr_event_age_seconds", f'stage="{stage}"') for stage in EVENT_AGE}
        latency_phase = _phase_figures(counters_before, _counters(urls, counted))
    finally:
        for process in processes:
            _stop(process, 60)
    users = len({key for key, _ in backlog} | {key for key, _ in paced})
    state_bytes = sum(_disk_bytes(state_dir) - log_path.stat().st_size
                      for state_dir, log_path in zip(state_dirs, log_paths))
    for state_dir in state_dirs:
        shutil.rmtree(state_dir, ignore_errors=True)  # the workers' RocksDB files and logs

    _log("(a) raw aiokafka pipe: draining the same backlog")
    broker_before = _process_cpu_seconds(broker_pid)
    raw_eps, raw_cpu_ms = _raw_pipes(base, names["raw-in"], names["raw-out"], events, reply, timeout, workers)
    broker_after = _process_cpu_seconds(broker_pid)
    _log(f"(a) raw pipe: latency at {rate:.0f} events/s")
    raw_trace, raw_latency_phase = _raw_latency(base, names, paced, rate, len(reply), timeout)

    return {
        "workers": workers,
        "raw_pipe_eps": round(raw_eps, 1),
        "worker_eps": round(worker_eps, 1),
        "ratio": round(worker_eps / raw_eps, 3),
        # CPU per event, all threads of each process: less disturbed by a busy machine than rates.
        "raw_pipe_cpu_ms_per_event": round(raw_cpu_ms, 4),
        "worker_cpu_ms_per_event": _cpu_per_event(measured, measured_events),
        # The broker's CPU per event (when it is this machine's) while the workers drained (the
        # same middle stretch) and while the raw pipe did (its whole drain, start-up included): what
        # each side's traffic costs the broker, which shares the machine's cores with them.
        "broker_cpu_ms_per_event": _broker_cpu_per_event(measured, measured_events),
        "raw_pipe_broker_cpu_ms_per_event": (round((broker_after - broker_before) * 1000 / events, 4)
                                             if broker_before is not None and broker_after is not None
                                             else None),
        # The same middle of the backlog by the workers' own count of answers emitted (metrics
        # page, wall clock): a check on worker_eps, which dates the answers by their records.
        "worker_emit_eps": _emit_eps(measured, measured_events),
        "worker_loop_thread_busy": _loop_thread_busy(measured, measured_events, workers),
        # Over the same stretch, how many of the machine's cores were busy (all processes: the
        # workers, the broker, this benchmark): near the core count, the machine is the bound.
        "machine_cores_busy": _machine_cores_busy(measured, measured_events),
        # How many of the backlog's events each worker answered (a consumer group shares them out).
        "worker_answers_each": answers_each,
        # The share of the backlog answered while every worker was answering: the stretch the
        # drain's figures above come from (`_all_answering`). When it is small they say little: a
        # larger --events gives the workers a longer stretch together.
        "all_workers_answering_share": round(measured_events / events, 3) if together else 0.0,
        "worker_mean_batch": _mean_batch(measured, measured_events),
        "worker_model_steps_per_event": _model_steps_per_event(measured, measured_events),
        # The agent's wall time per event by phase over the same stretch (ksr_agent_seconds).
        "worker_agent_ms_per_event": _agent_ms_per_event(measured, measured_events),
        # Event sent -> recommendation fetched by a read_committed consumer, and of that, sent ->
        # emitted by the worker (its `emitted_ts`, before any commit): the rest is the commit and
        # the delivery to the reader. raw_pipe_*: the same events at the same rate through an
        # aiokafka echo with no model (the floor this machine and broker give).
        **_latency_figures(trace),
        **_latency_figures(raw_trace, prefix="raw_pipe_"),
        # Where the events of that phase waited before being answered: their age when the worker's
        # fetch loop had them and when their batch started (p50 and p99, bucket bounds; the worker's
        # ksr_event_age_seconds), beside emit_p50_ms / emit_p99_ms (answered) and p50_ms / p99_ms (seen).
        "event_age_p50_p99_ms_bounds": {
            stage: [_ms(_bucket_quantile(ages_before[stage], ages_after[stage], q)) for q in (0.50, 0.99)]
            for stage in EVENT_AGE
        },
        "latency_rate_eps": round(rate, 1),
        "latency_events": len(trace),
        # How long the worker's commits took in that phase (bucket bounds), and how many there were.
        "commit_p50_ms_bound": _ms(_bucket_quantile(commits_before, commits_after, 0.50)),
        "commit_p99_ms_bound": _ms(_bucket_quantile(commits_before, commits_after, 0.99)),
        "commits": _bucket_count(commits_before, commits_after),
        # The workers' batches, CPU and agent phases over that phase (per answer), as the drain's above.
        "latency_phase": latency_phase,
        # The raw pipe's latency phase at the same rate: the machine's busy cores and each process's.
        "raw_pipe_latency_phase": raw_latency_phase,
        # The worker's full garbage collections during the latency phase: each stops its event loop.
        "full_gc_collections": _bucket_count(full_gc_before, full_gc_after),
        "full_gc_pause_max_ms_bound": _ms(_bucket_quantile(full_gc_before, full_gc_after, 1.0)),
        "events": events,
        "partitions": partitions,
        "catalog": dataset.n_items - 1,
        "data": dataset.name,
        "output_bytes": len(reply),
        "processing_guarantee": env.get("KSR_PROCESSING_GUARANTEE", base.processing_guarantee),
        "state_precision": env.get("KSR_STATE_PRECISION", base.state_precision),
        # What the worker ranked in: KSR_RANKING_PRECISION, "auto" resolved for this catalog.
        "ranking_precision": resolve_ranking_precision(
            env.get("KSR_RANKING_PRECISION", base.ranking_precision), dataset.n_items,
            env.get("KSR_SERVING_KERNEL", base.serving_kernel) == "compiled"),
        # Of the drained events' answers, the share the int8 ranking did not certify (0 in float32).
        "ranked_again_share": _ranked_again_share(samples),
        "users": users,
        "state_bytes_per_user": round(state_bytes / max(users, 1), 1),
        **_rss_growth(samples, events),
        **({"profile": profile_summary(profile)} if profile else {}),
    }


async def _paced_trace(settings: Settings, source: str, sink: str, paced: list, rate: float, timeout: float,
                       processes: list) -> list[tuple[float, float, float, float]]:
    """Produce `paced` into `source` at `rate` while a read_committed consumer, already at the end of
    `sink`, waits for each answer. Returns (sent, emitted, arrived, acknowledged) wall-clock seconds
    per event: sent when handed to the producer, emitted from the answer's `emitted_ts`, arrived
    when fetched, acknowledged when the broker had the event (its send's future done).

    aiokafka on one event loop, as light as the pipe it measures: the kafka-python producer thread
    and consumer this phase used before added waits of their own to every figure (README, Speed).
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from worker.app import aiokafka_security

    security = aiokafka_security(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                isolation_level="read_committed", fetch_max_wait_ms=5, **security)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks=1, linger_ms=0, **security)
    await consumer.start()
    await producer.start()
    sent_at: dict[str, float] = {}
    acked_at: dict[str, float] = {}
    answered: list[tuple[str, float, float]] = []  # (event id, emitted, arrived)
    sender = None
    try:
        tps = [TopicPartition(sink, p) for p in sorted(await producer.partitions_for(sink))]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # resolve the end offsets now, before anything new arrives

        async def send_all() -> None:
            async for key, event in paced_async(paced, rate):
                event_id = event["event_id"]
                sent_at[event_id] = time.time()
                delivered = await producer.send(source, key=key, value=json.dumps(event).encode())
                delivered.add_done_callback(lambda _, event_id=event_id: acked_at.setdefault(event_id, time.time()))
            await producer.flush()
            flushed = time.time()  # every send acknowledged by now (a callback not yet run: this bound)
            for event_id in sent_at:
                acked_at.setdefault(event_id, flushed)

        sender = asyncio.create_task(send_all())
        deadline = time.monotonic() + timeout
        while len(answered) < len(paced) and time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=100)
            arrived = time.time()
            for records in fetched.values():
                for record in records:
                    answer = json.loads(record.value)
                    if answer.get("event_id") in sent_at:
                        answered.append((answer["event_id"], answer["emitted_ts"], arrived))
            if any(process.poll() is not None for process in processes):
                raise RuntimeError("a process answering exited during the latency phase")
            if sender.done() and sender.exception() is not None:
                raise sender.exception()
        await sender
    finally:
        if sender is not None and not sender.done():
            sender.cancel()
        await producer.stop()
        await consumer.stop()
    if len(answered) < len(paced):
        raise RuntimeError(f"latency phase: {len(answered)} of {len(paced)} answers within {timeout}s")
    return [(sent_at[event_id], emitted, arrived, acked_at[event_id]) for event_id, emitted, arrived in answered]


def _raw_latency(settings: Settings, names: dict, paced: list, rate: float, size: int,
                 timeout: float) -> tuple[list, dict]:
    """The latency phase through `_echo` in its own process (as the worker is): its trace, and the
    machine's and each process's cores over it (`_phase_figures`: the echo, the broker, this benchmark)."""
    echo = subprocess.Popen([sys.executable, "-m", "worker.bench", "echo", names["echo-in"], names["echo-out"],
                             str(size)], cwd=REPO_ROOT, stdout=subprocess.PIPE, start_new_session=True)
    try:
        if echo.stdout.readline().strip() != b"ready":
            raise RuntimeError("the raw pipe's echo did not start")
        counted = {"broker": local_broker_pid(settings.bootstrap_servers), "echo": echo.pid}
        before = _counters([], counted)
        trace = asyncio.run(_paced_trace(settings, names["echo-in"], names["echo-out"], paced, rate, timeout, [echo]))
        figures = _phase_figures(before, _counters([], counted))
        return trace, {name: figures[name] for name in ("seconds", "machine_cores_busy", "machine_cores_iowait",
                                                         "machine_cores_stolen", "cores_by_process")}
    finally:
        _stop(echo, 30)


def _stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()


async def _echo(settings: Settings, source: str, sink: str, size: int) -> None:
    """The raw pipe for the latency phase: answer each event at once with a `size`-byte message
    carrying its event id and the time it was sent (no model, no state, no transactions). Reads
    every partition of `source` from the start; prints "ready" once positioned."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from worker.app import aiokafka_security

    security = aiokafka_security(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                **security)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=0, **security)
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(source, p) for p in sorted(await producer.partitions_for(source))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            await consumer.position(tp)
        print("ready", flush=True)
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=500, max_records=1000)).items():
                for record in records:
                    answer = {"event_id": json.loads(record.value)["event_id"], "emitted_ts": time.time()}
                    padding = max(0, size - len(json.dumps(answer)) - 10)
                    answer["pad"] = "x" * padding
                    await producer.send(sink, key=record.key, value=json.dumps(answer).encode(),
                                        partition=tp.partition)
    finally:
        await producer.stop()
        await consumer.stop()


def _latency_figures(trace: list[tuple[float, float, float, float]], prefix: str = "") -> dict:
    """p50/p99 of sent -> arrived, of sent -> acknowledged by the broker (the benchmark's producer
    and the broker's share of the wait) and, with no prefix, of sent -> emitted, in milliseconds."""

    def percentile(values: list[float], q: float) -> float:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

    total = [arrived - sent for sent, _, arrived, _ in trace]
    acked = [acked - sent for sent, _, _, acked in trace]
    figures = {f"{prefix}p50_ms": percentile(total, 0.50), f"{prefix}p99_ms": percentile(total, 0.99),
               f"{prefix}produce_ack_p50_ms": percentile(acked, 0.50),
               f"{prefix}produce_ack_p99_ms": percentile(acked, 0.99)}
    if not prefix:
        emitted = [max(0.0, emitted - sent) for sent, emitted, _, _ in trace]
        figures.update(emit_p50_ms=percentile(emitted, 0.50), emit_p99_ms=percentile(emitted, 0.99))
    return figures


if __name__ == "__main__":
    # python -m worker.bench echo SOURCE SINK SIZE (the latency phase's raw pipe), or
    # python -m worker.bench raw-pipe SOURCE SINK SIZE GROUP STOP_FILE TIMEOUT (one of several raw
    # pipe processes: pipes until STOP_FILE exists, then prints its figures as JSON)
    if sys.argv[1:2] == ["echo"] and len(sys.argv) == 5:
        try:
            asyncio.run(_echo(Settings.from_env(), sys.argv[2], sys.argv[3], int(sys.argv[4])))
        except KeyboardInterrupt:
            pass
    elif sys.argv[1:2] == ["raw-pipe"] and len(sys.argv) == 8:
        stop = Path(sys.argv[6])
        print(json.dumps(asyncio.run(_raw_pipe(Settings.from_env(), sys.argv[2], sys.argv[3], b"x" * int(sys.argv[4]),
                                               float(sys.argv[7]), sys.argv[5], lambda seen: stop.exists()))))
    else:
        sys.exit("usage: python -m worker.bench echo SOURCE SINK SIZE | "
                 "raw-pipe SOURCE SINK SIZE GROUP STOP_FILE TIMEOUT")
