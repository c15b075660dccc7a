"""The fine-tuner on the real broker: gated promotion, announcement, and the worker's hot swap."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from conftest import KSR, REPO, WorkerProcess, consume, decode, produce, scrape, stream_env
from test_worker import replay

from model import checkpoint

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def finetune_once(env: dict) -> dict:
    result = subprocess.run([*KSR, "finetune", "--once"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600, check=True)
    return json.loads(result.stdout)


def test_round_promotes_a_better_model_and_a_forced_margin_rejects(tmp_path, bootstrap, small_checkpoint) -> None:
    served = tmp_path / "current"
    shutil.copytree(small_checkpoint, served)
    env = stream_env(tmp_path, bootstrap, served, KSR_FINETUNE_EPOCHS="6")
    replay(env, 3000)

    first = finetune_once(env)
    assert first["result"] == "promoted", first
    assert first["window_events"] == 3000 and first["holdout_events"] == 300
    assert first["challenger"]["ndcg@10"] > first["champion"]["ndcg@10"]
    assert first["version"] == 2
    assert checkpoint.load(served).version == 2
    assert checkpoint.load(first["checkpoint"]).version == 2
    (announcement,) = decode(consume(bootstrap, env["KSR_TOPIC_MODEL_UPDATES"], 1, timeout=30))
    assert announcement["version"] == 2 and announcement["checkpoint"].endswith("current.v2")
    assert announcement["metrics"]["challenger"] == first["challenger"]

    second = finetune_once({**env, "KSR_FINETUNE_MARGIN": "1.0"})
    assert second["result"] == "rejected" and second["champion_version"] == 2
    assert checkpoint.load(served).version == 2


def test_worker_swaps_to_an_announced_model_between_batches(tmp_path, bootstrap, small_checkpoint) -> None:
    served = tmp_path / "current"
    shutil.copytree(small_checkpoint, served)
    # A negative margin promotes whatever the round produces: this test is about the swap.
    env = stream_env(tmp_path, bootstrap, served, KSR_FINETUNE_MARGIN="-1", KSR_FINETUNE_EPOCHS="1")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        replay(env, 1000)
        consume(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], 1000, timeout=180, worker=worker)

        # Announcements that cannot be read, or whose checkpoint cannot be loaded (missing; a
        # meta.json that is not text), leave the old model serving.
        damaged = tmp_path / "damaged"
        damaged.mkdir()
        (damaged / "meta.json").write_bytes(b"\xff\xfe not text")
        (damaged / "weights.pt").write_bytes(b"")
        produce(bootstrap, env["KSR_TOPIC_MODEL_UPDATES"], [
            (None, json.dumps({"version": 5, "checkpoint": str(tmp_path / "nope")}).encode()),
            (None, b'{"version": 1e400, "checkpoint": "x"}'),  # parses to inf
            (None, json.dumps({"version": 6, "checkpoint": str(damaged)}).encode()),
        ])
        deadline = time.monotonic() + 30
        while (scrape(worker.metrics_url).get('ksr_model_swaps_total{result="failed"}', 0) < 2
               or scrape(worker.metrics_url).get('ksr_model_swaps_total{result="bad_announcement"}', 0) < 1):
            assert time.monotonic() < deadline, worker.log()[-3000:]
            assert worker.alive(), worker.log()[-3000:]
            time.sleep(0.5)

        result = finetune_once(env)
        assert result["result"] == "promoted" and result["version"] == 2
        deadline = time.monotonic() + 60
        while "model v2 loaded" not in worker.log():
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.5)
        replay(env, 2000, skip=1000)
        messages = decode(consume(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], 2000, timeout=180, worker=worker))
    finally:
        worker.stop()

    positions = sorted(int(m["event_id"].split(":")[1]) for m in messages)
    assert positions == list(range(2000))  # nothing lost, nothing answered twice
    version_of = {int(m["event_id"].split(":")[1]): m["model_version"] for m in messages}
    assert all(version_of[p] == 1 for p in range(1000))
    assert all(version_of[p] == 2 for p in range(1000, 2000))
    assert "now serving model v2" in worker.log()
    assert "failed to load; still serving v1" in worker.log()
