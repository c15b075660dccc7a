"""Benchmark commands print one JSON object with their figures (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import KSR, REPO

from worker.broker import local_broker_pid
from worker.metrics import ROCKSDB_MEMORY


def test_bench_step_prints_its_figures() -> None:
    result = subprocess.run([*KSR, "bench", "step", "--json"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=True)
    figures = json.loads(result.stdout)
    assert set(figures["events_per_s"]) == {"1", "64", "512"}
    assert all(v > 0 for v in figures["events_per_s"].values())
    assert figures["catalog"] == 1682 and figures["history"] == 200
    assert figures["speedup_vs_recompute"] > 0
    assert figures["score_ms_per_event"] > 0 and figures["score_gflops"] > 0
    assert set(figures["rank_ms_per_event_by_precision"]) == {"1", "16", "512"}
    assert all(set(pair) == {"float32", "int8"} for pair in figures["rank_ms_per_event_by_precision"].values())
    by_candidates = figures["rank_int8_by_candidates"]
    assert set(by_candidates) == {"64", "32", "48", "96"}
    for row in by_candidates.values():  # the int8 ranking's answers are the float one's, however many candidates
        assert row["same_items_share"] == 1.0 and 0 <= row["ranked_again_share"] <= 1 and row["ms_per_event"] > 0


def test_bench_batches_cuts_the_same_events_both_ways(small_checkpoint) -> None:
    result = subprocess.run(
        [*KSR, "bench", "batches", "--checkpoint", str(small_checkpoint), "--events", "3000", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    figures = json.loads(result.stdout)
    assert figures["events"] == 3000 and figures["partitions"] == 4 and figures["batch_size"] == 256
    fetch_order, shares = figures["fetch_order"], figures["partition_shares"]
    for cut in (fetch_order, shares):
        assert cut["ms_per_event"] > cut["model_ms_per_event"] > 0
        assert len(cut["ms_per_event_per_round"]) == 3
        assert cut["batches"] == 12  # ceil(3000 / 256): both cuts fill their batches
    # The same events in the same batch count, so the cut decides the recurrence's length: with
    # four partitions' shares a batch holds more users with fewer events each (ml-100k's sessions).
    assert shares["users_per_batch"] > fetch_order["users_per_batch"]
    assert shares["steps_per_event"] < fetch_order["steps_per_event"]
    assert figures["speedup"] > 0
    # Timed as the worker runs: the start-up heap frozen out of the garbage collector.
    assert figures["gc_frozen_objects"] > 10_000


def test_bench_batches_leaves_the_collector_alone_when_the_worker_would(small_checkpoint) -> None:
    result = subprocess.run(
        [*KSR, "bench", "batches", "--checkpoint", str(small_checkpoint), "--events", "600", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True, env={**os.environ, "KSR_GC_FREEZE": "0"},
    )
    assert json.loads(result.stdout)["gc_frozen_objects"] == 0


@pytest.mark.broker
@pytest.mark.slow
def _bench_topics(bootstrap: str) -> set[str]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {name for name in admin.list_topics() if name.startswith("bench")}
    finally:
        admin.close()


def test_bench_throughput_prints_its_figures(bootstrap, small_checkpoint) -> None:
    topics_before = _bench_topics(bootstrap)
    result = subprocess.run(
        [*KSR, "bench", "throughput", "--events", "2000", "--checkpoint", str(small_checkpoint), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap},
    )
    figures = json.loads(result.stdout)
    for key in ("raw_pipe_eps", "worker_eps", "p50_ms", "p99_ms", "events", "catalog"):
        assert key in figures, key
    assert figures["events"] == 2000 and figures["catalog"] == 1682
    assert figures["ranking_precision"] == "float32" and figures["ranked_again_share"] == 0
    assert figures["raw_pipe_eps"] > 0 and figures["worker_eps"] > 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    # Each answer is emitted before it arrives, so the emitted quantiles cannot exceed the arrived ones.
    assert 0 <= figures["emit_p50_ms"] <= figures["p50_ms"] and figures["emit_p99_ms"] <= figures["p99_ms"]
    # The raw pipe answered the same paced events through its echo.
    assert 0 < figures["raw_pipe_p50_ms"] <= figures["raw_pipe_p99_ms"]
    # How long the broker took to acknowledge the paced events, on both sides.
    for prefix in ("", "raw_pipe_"):
        acked = figures[f"{prefix}produce_ack_p50_ms"], figures[f"{prefix}produce_ack_p99_ms"]
        assert 0 <= acked[0] <= acked[1], (prefix, acked)
    # The latency phase's events' ages on their way through the worker (bucket bounds): each was
    # fetched before its batch started, so no quantile of the first can exceed the second's.
    ages = figures["event_age_p50_p99_ms_bounds"]
    assert set(ages) == {"fetched", "batched"}, ages
    for stage, (p50, p99) in ages.items():
        assert p50 is not None and 0 < p50 <= p99, (stage, ages)
    assert all(fetched <= batched for fetched, batched in zip(ages["fetched"], ages["batched"])), ages
    # Exactly-once (the default): the answers the latency phase saw were made visible by commits.
    assert figures["commits"] >= 1 and figures["commit_p50_ms_bound"] is not None
    assert figures["data"] == "ml-100k" and figures["users"] > 0
    assert figures["state_bytes_per_user"] > 100, "the worker's RocksDB folder holds every user's state"
    assert figures["rss_mb_at_20pct"] > 50 and figures["rss_growth_last_80pct"] is not None
    parts = figures["memory_parts_at_20pct_and_max"]  # sampled from the agent's start on
    assert set(parts) == {*ROCKSDB_MEMORY, "c_heap_in_use", "c_heap_free", "c_heap_mmapped",
                          "python_allocated_blocks"}
    assert all(part is not None and part >= 0 for pair in parts.values() for part in pair), parts
    assert min(parts["c_heap_in_use"]) > 10 and min(parts["python_allocated_blocks"]) > 100_000, parts
    assert "worker_loop_thread_busy" in figures
    # The workers' own count of answers over time (None when the backlog drained between two samples).
    assert figures["worker_emit_eps"] is None or figures["worker_emit_eps"] > 0
    agent = figures["worker_agent_ms_per_event"]  # None when the backlog drained between two samples
    assert agent is None or (agent["process"] > 0 and agent["send"] > 0), agent
    assert figures["worker_mean_batch"] is None or 1 <= figures["worker_mean_batch"] <= 256  # KSR_BATCH_SIZE
    # At least one step per batch, at most one per event.
    steps = figures["worker_model_steps_per_event"]
    assert steps is None or 1 / 256 <= steps <= 1, steps
    # The latency phase's own batches and agent time: every paced event answered in it.
    phase = figures["latency_phase"]
    assert phase["answers"] == figures["latency_events"] and 1 <= phase["batches"] <= phase["answers"], phase
    assert phase["mean_batch"] == pytest.approx(phase["answers"] / phase["batches"], rel=0.01), phase
    assert phase["seconds"] > 0 and phase["cpu_ms_per_event"] > 0 and phase["agent_ms_per_event"]["process"] > 0
    assert all(phase[name] is not None and phase[name] >= 0
               for name in ("machine_cores_busy", "machine_cores_iowait", "machine_cores_stolen")), phase
    # What each side's drain cost the broker (None when the backlog drained between two samples).
    broker_cpu = figures["broker_cpu_ms_per_event"]
    assert broker_cpu is None or broker_cpu > 0, broker_cpu
    assert figures["raw_pipe_broker_cpu_ms_per_event"] is None if local_broker_pid(bootstrap) is None \
        else figures["raw_pipe_broker_cpu_ms_per_event"] > 0
    # One worker: the drain's figures count from its first answer, so from nearly all of the backlog
    # when they were measured at all (a backlog this small can drain between two samples).
    share = figures["all_workers_answering_share"]
    assert 0 <= share <= 1 and (figures["worker_cpu_ms_per_event"] is None or share > 0.5), figures
    # Each process's cores over the phase; the broker's where it is this machine's.
    local = local_broker_pid(bootstrap) is not None
    assert set(phase["cores_by_process"]) == {"workers", "benchmark"} | ({"broker"} if local else set()), phase
    assert phase["cores_by_process"]["workers"] > 0 and phase["cores_by_process"]["benchmark"] > 0, phase
    raw = figures["raw_pipe_latency_phase"]
    assert set(raw["cores_by_process"]) == {"echo", "benchmark"} | ({"broker"} if local else set()), raw
    assert raw["cores_by_process"]["echo"] > 0 and raw["seconds"] > 0 and raw["machine_cores_busy"] > 0, raw
    if local:
        assert phase["cores_by_process"]["broker"] > 0 and raw["cores_by_process"]["broker"] > 0
    # The run deleted its topics (its inputs, outputs and the workers' changelogs) when it ended.
    assert _bench_topics(bootstrap) <= topics_before, _bench_topics(bootstrap) - topics_before


@pytest.mark.broker
@pytest.mark.slow
def test_bench_throughput_runs_several_workers_beside_as_many_raw_pipe_processes(bootstrap, small_checkpoint) -> None:
    """--workers 2: two `ksr worker` processes in one consumer group share the backlog (each its own
    state folder and metrics port; their figures summed), and the raw pipe runs as two processes;
    --partitions sets the benchmark's topics' partitions."""
    result = subprocess.run(
        [*KSR, "bench", "throughput", "--events", "3000", "--workers", "2", "--checkpoint", str(small_checkpoint),
         "--latency-rate", "200", "--latency-events", "400", "--partitions", "6", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap},
    )
    figures = json.loads(result.stdout)
    assert figures["workers"] == 2 and figures["partitions"] == 6
    # Every event answered once, by one worker or the other (which shares depends on when the
    # second joins the group); the counts come from each worker's own metrics page.
    assert len(figures["worker_answers_each"]) == 2 and sum(figures["worker_answers_each"]) == 3000
    # The drain's figures come from the stretch in which both answered (none if one drained it all).
    share = figures["all_workers_answering_share"]
    assert 0 <= share <= 1 and (share > 0 or 0 in figures["worker_answers_each"]), figures
    assert figures["raw_pipe_eps"] > 0 and figures["worker_eps"] > 0 and figures["raw_pipe_cpu_ms_per_event"] > 0
    assert figures["latency_events"] == 400 and 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert figures["state_bytes_per_user"] > 100


@pytest.mark.broker
@pytest.mark.slow
def test_bench_throughput_runs_on_a_synthetic_catalog(bootstrap, tmp_path) -> None:
    """The scale path end to end, small: synth data, an untrained serving checkpoint, the benchmark."""
    data, checkpoint = tmp_path / "synth-small", tmp_path / "synth-ckpt"
    subprocess.run([*KSR, "data", "synth", "--out", str(data), "--users", "600", "--items", "400"],
                   cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    subprocess.run([*KSR, "train", "--data", str(data), "--out", str(checkpoint), "--epochs", "0",
                    "--transe-epochs", "1", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300,
                   check=True)
    result = subprocess.run(
        [*KSR, "bench", "throughput", "--data", str(data), "--events", "1000", "--checkpoint", str(checkpoint),
         "--latency-rate", "50", "--latency-events", "200", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KSR_STATE_PRECISION": "int8",
             "KSR_RANKING_PRECISION": "int8"},
    )
    figures = json.loads(result.stdout)
    assert figures["catalog"] == 400 and figures["data"] == "synth-small"
    assert figures["state_precision"] == "int8" and figures["ranking_precision"] == "int8"
    assert 0 <= figures["ranked_again_share"] <= 1
    assert figures["worker_eps"] > 0 and figures["state_bytes_per_user"] > 0
    assert figures["latency_rate_eps"] == 50 and figures["latency_events"] == 200


def test_loop_thread_cpu_reads_the_supervisors_child_main_thread() -> None:
    """The supervisor (here a python that waits) runs the worker as its child; the figure is the
    child's main thread's CPU time, which a busy loop there drives up at about wall speed."""
    import sys
    import time

    from worker.bench import _loop_thread_cpu

    spin = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"
    supervisor = subprocess.Popen([sys.executable, "-c",
                                   f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"])
    try:
        deadline = time.monotonic() + 10
        first = None
        while first is None and time.monotonic() < deadline:
            first = _loop_thread_cpu(supervisor.pid)
            time.sleep(0.05)
        assert first is not None, "no child found under /proc"
        time.sleep(1.0)
        assert _loop_thread_cpu(supervisor.pid) - first > 0.3  # spinning for 1 s (2 cores shared)
    finally:
        children = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
        for child in children.read_text().split() if children.exists() else []:
            os.kill(int(child), 9)
        supervisor.kill()
        supervisor.wait()


def test_latency_figures_are_quantiles_of_the_trace() -> None:
    from worker.bench import _latency_figures

    # (sent, emitted, arrived, acknowledged): 100 answers, sent -> arrived of 1..100 ms, emitted
    # halfway, acknowledged at a tenth.
    trace = [(10.0, 10.0 + n / 2000, 10.0 + n / 1000, 10.0 + n / 10000) for n in range(1, 101)]
    figures = _latency_figures(trace)
    assert figures == {"p50_ms": 51.0, "p99_ms": 100.0, "emit_p50_ms": 25.5, "emit_p99_ms": 50.0,
                       "produce_ack_p50_ms": 5.1, "produce_ack_p99_ms": 10.0}
    assert _latency_figures(trace, prefix="raw_pipe_") == {
        "raw_pipe_p50_ms": 51.0, "raw_pipe_p99_ms": 100.0,
        "raw_pipe_produce_ack_p50_ms": 5.1, "raw_pipe_produce_ack_p99_ms": 10.0}


def test_profile_summary_groups_own_time_by_component(tmp_path) -> None:
    import cProfile

    import numpy as np
    import torch

    from worker.bench import profile_summary

    def work() -> None:
        for _ in range(200):
            torch.topk(torch.randn(64, 2000), 10)
            json.dumps({"items": list(range(50))})
            np.sort(np.random.default_rng(0).random(1000))

    profiler = cProfile.Profile()
    profiler.runcall(work)
    path = tmp_path / "work.prof"
    profiler.dump_stats(str(path))
    summary = profile_summary(path, top=5)
    shares = summary["share_by_component"]
    assert abs(sum(shares.values()) - 1) < 0.01
    assert shares["model step (torch)"] > 0.2, shares  # topk on random matrices dominates
    assert "json" in shares and len(summary["top_functions"]) == 5


def test_machine_and_loop_figures_are_rates_over_the_middle_of_the_backlog() -> None:
    from worker.bench import (
        _broker_cpu_per_event,
        _emit_eps,
        _loop_thread_busy,
        _machine_busy_seconds,
        _machine_cores_busy,
    )

    # (answered, rss, cpu, loop cpu, time, batch-size sum, batch count, phases, machine busy s):
    # between the middle samples 1 s passed, the machine's cores were busy 1.5 s and the loop
    # threads of two workers 1.6 s together.
    samples = [(50, 1, 0, 0.0, 0, 0, 0, {}, 10.0), (200, 1, 0, 0.2, 1, 0, 0, {}, 11.0),
               (800, 1, 0, 1.8, 2, 0, 0, {}, 12.5), (990, 1, 0, 3.0, 3, 0, 0, {}, 20.0)]
    assert _machine_cores_busy(samples, 1000) == 1.5
    assert _loop_thread_busy(samples, 1000, workers=2) == 0.8
    assert _emit_eps(samples, 1000) == 600.0  # (800 - 200) answers in 1 s
    assert _machine_cores_busy(samples[:2], 1000) is None
    # The broker's CPU per answer over the same stretch: 0.03 s for the 600 answers in the middle.
    brokered = [(*sample[:7], {"cpu:broker": cpu}, sample[8]) for sample, cpu in zip(samples, (5.0, 5.01, 5.04, 5.2))]
    assert _broker_cpu_per_event(brokered, 1000) == 0.05
    assert _broker_cpu_per_event(samples, 1000) is None  # no broker of this machine's
    first = _machine_busy_seconds()
    sum(i * i for i in range(2_000_000))  # keep a core busy for a moment
    assert first is not None and _machine_busy_seconds() > first


def test_the_drain_is_measured_from_the_first_sample_in_which_every_worker_answered() -> None:
    from worker.bench import _all_answering, _cpu_per_event, _saturated_rate

    def sample(each: list[float], cpu: float, wall: float) -> tuple:
        return (sum(each), 1, cpu, 0.0, wall, 0, 0, {"answered_each": each, "wall": wall}, 0.0)

    # The first worker drains alone (9,000 answers on 1 s of CPU) until the second answers; then both
    # answer 1,500 more at 0.2 ms of CPU per answer.
    samples = [sample([0, 0], 0.0, 100.0), sample([4000, 0], 0.5, 101.0), sample([9000, 0], 1.0, 102.0),
               sample([9300, 200], 1.1, 103.0), sample([9500, 400], 1.18, 103.1),
               sample([9700, 600], 1.26, 103.2), sample([9800, 1200], 1.4, 103.3)]
    measured, since, counted_from, together = _all_answering(samples)
    assert together and since == 103.0 and counted_from == 9500 and [s[0] for s in measured] == [0, 400, 800, 1500]
    assert _cpu_per_event(measured, 11000 - 9500) == pytest.approx(0.2)
    assert _cpu_per_event(samples, 11000) < 0.15  # over the whole drain: mostly the lone stretch's 0.11
    # Answer stamps: 9,000 before `since` at 9,000/s, then 2,000 at 10,000/s: the rate is the latter's.
    stamps = [101.0 + i / 9000 for i in range(9000)] + [103.0 + i / 10000 for i in range(2000)]
    assert _saturated_rate(stamps, 103.0) == pytest.approx(10000, rel=0.01)
    assert _saturated_rate(stamps, 0.0) < 9500  # from the start: mostly the lone worker's rate
    # A worker that never answered (the other drained everything): every sample, from the start.
    lone = [sample([0, 0], 0.0, 100.0), sample([3000, 0], 0.5, 101.0)]
    assert _all_answering(lone) == (lone, 0.0, 0.0, False)
    assert _saturated_rate(stamps, 200.0) == _saturated_rate(stamps, 0.0)  # none after `since`: all of them


def test_mean_batch_is_events_over_batches_in_the_middle_of_the_backlog() -> None:
    from worker.bench import _mean_batch

    # (seen, rss, cpu, loop cpu, time, batch-size sum, batch count): 100 events in 4 batches in the
    # middle; the first and last samples (outside 10%-90% of 1,000) are left out.
    samples = [(50, 1, 0, None, 0, 0.0, 0.0), (200, 1, 0, None, 1, 100.0, 10.0),
               (800, 1, 0, None, 2, 200.0, 14.0), (990, 1, 0, None, 3, 900.0, 15.0)]
    assert _mean_batch(samples, 1000) == 25.0
    assert _mean_batch(samples[:2], 1000) is None  # one sample in the middle: no figure


def test_agent_time_per_event_is_each_phases_seconds_over_the_events_in_the_middle() -> None:
    from worker.bench import AGENT_PHASES, _agent_ms_per_event

    def phases(process: float, send: float) -> dict:
        return {phase: 0.0 for phase in AGENT_PHASES} | {"process": process, "send": send}

    # 600 events between the two middle samples: 0.3 s of processing, 0.06 s of sending.
    samples = [(50, 1, 0, None, 0, 0.0, 0.0, phases(0.0, 0.0)), (200, 1, 0, None, 1, 0.0, 0.0, phases(0.1, 0.02)),
               (800, 1, 0, None, 2, 0.0, 0.0, phases(0.4, 0.08)), (990, 1, 0, None, 3, 0.0, 0.0, phases(0.9, 0.1))]
    figures = _agent_ms_per_event(samples, 1000)
    assert figures["process"] == pytest.approx(0.5) and figures["send"] == pytest.approx(0.1)
    assert figures["idle"] == 0.0 and set(figures) == set(AGENT_PHASES)
    assert _agent_ms_per_event(samples[:2], 1000) is None


def test_phase_figures_are_the_counters_differences_per_answer() -> None:
    from worker.bench import AGENT_PHASES, _phase_figures

    def counters(answers: float, cpu: float, events: float, batches: float, process: float, idle: float,
                 at: float, busy: float) -> dict:
        return {"ksr_recommendations_total": answers, "process_cpu_seconds_total": cpu,
                "ksr_batch_size_sum": events, "ksr_batch_size_count": batches, "monotonic": at,
                "machine_busy": busy, "machine_iowait": busy / 10, "machine_steal": busy / 50,
                "cpu:benchmark": busy / 4, "cpu:broker": busy / 5,
                **{name: 0.0 for name in AGENT_PHASES.values()},
                AGENT_PHASES["process"]: process, AGENT_PHASES["idle"]: idle}

    # 3,000 answers in 60 batches over 2 s: 0.9 s of CPU, 0.6 s processing, 1.2 s idle, 3 cores-seconds.
    figures = _phase_figures(counters(1000, 10.0, 1000, 10, 1.0, 5.0, 100.0, 50.0),
                             counters(4000, 10.9, 4000, 70, 1.6, 6.2, 102.0, 53.0))
    assert figures["answers"] == 3000 and figures["batches"] == 60 and figures["mean_batch"] == 50.0
    assert figures["seconds"] == 2.0 and figures["machine_cores_busy"] == 1.5
    assert figures["machine_cores_iowait"] == 0.15 and figures["machine_cores_stolen"] == 0.03
    assert figures["cpu_ms_per_event"] == pytest.approx(0.3)
    assert figures["agent_ms_per_event"]["process"] == pytest.approx(0.2)
    assert figures["agent_ms_per_event"]["idle"] == pytest.approx(0.4)
    # Each process's cores: the workers' CPU (0.9 s) and the others' over the 2 s.
    assert figures["cores_by_process"] == pytest.approx({"workers": 0.45, "benchmark": 0.375, "broker": 0.3}, abs=0.006)
    # Nothing answered (a worker whose page did not answer): no per-answer figures, no division by zero.
    quiet = _phase_figures(counters(1000, 10.0, 1000, 10, 1.0, 5.0, 100.0, 50.0),
                           counters(1000, 10.0, 1000, 10, 1.0, 5.0, 101.0, 50.5))
    assert quiet["answers"] == 0 and quiet["mean_batch"] is None and quiet["cpu_ms_per_event"] is None
    assert quiet["agent_ms_per_event"] is None


def test_rss_growth_is_from_the_20pct_sample_to_the_highest_after_with_the_parts_at_both() -> None:
    from worker.bench import MEMORY_PARTS, _rss_growth

    def parts(heap_mb: float) -> dict:
        return {f"memory:{part}": None for part in MEMORY_PARTS} | {"memory:c_heap_in_use": heap_mb * 2**20}

    mb = 2**20
    # 20% of 1,000 is first reached at 250 answers (1,000 MB); the highest after is 1,150 MB at 600,
    # not the last sample; the 1,300 MB before 20% does not count.
    samples = [(100, 1300 * mb, 0, None, 0, 0, 0, parts(500)), (250, 1000 * mb, 0, None, 1, 0, 0, parts(600)),
               (600, 1150 * mb, 0, None, 2, 0, 0, parts(700)), (1000, 1100 * mb, 0, None, 3, 0, 0, parts(650))]
    figures = _rss_growth(samples, 1000)
    assert figures["rss_mb_at_20pct"] == 1000 and figures["rss_mb_max_after"] == 1150
    assert figures["rss_growth_last_80pct"] == 0.15
    assert figures["memory_parts_at_20pct_and_max"]["c_heap_in_use"] == [600, 700]
    assert figures["memory_parts_at_20pct_and_max"]["rocksdb_block_cache"] == [None, None]  # not sampled yet
    assert _rss_growth([], 1000)["rss_growth_last_80pct"] is None


def test_bench_refuses_counts_below_one_and_rates_or_timeouts_not_above_zero() -> None:
    for bench, option, values in [
        ("throughput", "--workers", ("0", "two")),
        ("throughput", "--partitions", ("0", "two")),
        ("throughput", "--events", ("0", "-5")),
        ("throughput", "--latency-events", ("0",)),
        ("throughput", "--latency-rate", ("0", "-1", "nan", "inf", "fast")),
        ("throughput", "--timeout", ("0", "-1")),
        ("batches", "--batch-size", ("0", "-1", "1.5")),
        ("batches", "--events", ("0",)),
        ("step", "--threads", ("0",)),
        ("step", "--items", ("0",)),
    ]:
        for value in values:
            result = subprocess.run([*KSR, "bench", bench, option, value, "--json"], cwd=REPO,
                                    capture_output=True, text=True, timeout=120, check=False)
            assert result.returncode == 2 and option in result.stderr and result.stdout == "", result.stderr


def test_bench_functions_refuse_counts_below_one_from_library_callers() -> None:
    from worker.bench import bench_throughput
    from worker.bench_batches import bench_batches

    # Refused before anything is loaded or any topic is made: no checkpoint or broker is needed.
    for keyword in ("workers", "partitions", "events", "latency_events"):
        with pytest.raises(ValueError, match=keyword.replace("_", "-") + " must be at least 1, not 0"):
            bench_throughput(checkpoint="/nonexistent", **{keyword: 0})
    for keyword in ("events", "partitions", "batch_size", "repeats"):
        with pytest.raises(ValueError, match=keyword.replace("_", "-") + " must be at least 1, not 0"):
            bench_batches(checkpoint="/nonexistent", **{keyword: 0})
