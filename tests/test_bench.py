"""Benchmark commands print one JSON object with their figures (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import KSR, REPO


def test_bench_step_prints_its_figures() -> None:
    result = subprocess.run([*KSR, "bench", "step", "--json"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=True)
    figures = json.loads(result.stdout)
    assert set(figures["events_per_s"]) == {"1", "64", "512"}
    assert all(v > 0 for v in figures["events_per_s"].values())
    assert figures["catalog"] == 1682 and figures["history"] == 200
    assert figures["speedup_vs_recompute"] > 0


@pytest.mark.broker
@pytest.mark.slow
def test_bench_throughput_prints_its_figures(bootstrap, small_checkpoint) -> None:
    result = subprocess.run(
        [*KSR, "bench", "throughput", "--events", "2000", "--checkpoint", str(small_checkpoint), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap},
    )
    figures = json.loads(result.stdout)
    for key in ("raw_pipe_eps", "worker_eps", "p50_ms", "p99_ms", "events", "catalog"):
        assert key in figures, key
    assert figures["events"] == 2000 and figures["catalog"] == 1682
    assert figures["raw_pipe_eps"] > 0 and figures["worker_eps"] > 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
