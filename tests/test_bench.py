"""Benchmark commands print one JSON object with their figures (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess

from conftest import KSR, REPO


def test_bench_step_prints_its_figures() -> None:
    result = subprocess.run([*KSR, "bench", "step", "--json"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=True)
    figures = json.loads(result.stdout)
    assert set(figures["events_per_s"]) == {"1", "64", "512"}
    assert all(v > 0 for v in figures["events_per_s"].values())
    assert figures["catalog"] == 1682 and figures["history"] == 200
    assert figures["speedup_vs_recompute"] > 0
