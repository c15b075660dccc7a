"""`ksr finetune`: keep the served model learning from the stream it serves.

A round: replay the recent window of `interactions` from Kafka (kafka-python, `offsets_for_times`),
fine-tune a copy of the champion on all but the newest slice, compare challenger and champion on
that held-out slice, and promote only a challenger that wins by the configured margin. Promotion
writes the new checkpoint atomically, with the next version number, and announces it on
`model-updates`; workers swap it in between batches.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from worker import metrics
from worker.config import ConfigError, Settings, _positive_float, _positive_int
from worker.processing import Interaction, validate

log = logging.getLogger("ksr.finetune")


@dataclass(frozen=True)
class FinetuneSchedule:
    """When rounds run and what they read; from the environment."""

    window_s: float  # how far back the replay reaches (by Kafka timestamp)
    interval_s: float  # a round at least this often...
    min_new_events: int  # ...or as soon as this many new events arrived
    metrics_port: int

    @classmethod
    def from_env(cls) -> FinetuneSchedule:
        return cls(
            window_s=_positive_float("KSR_FINETUNE_WINDOW_S", 7 * 24 * 3600.0),
            interval_s=_positive_float("KSR_FINETUNE_INTERVAL_S", 600.0),
            min_new_events=_positive_int("KSR_FINETUNE_MIN_EVENTS", 5000),
            metrics_port=_positive_int("KSR_FINETUNE_METRICS_PORT", 9465),
        )


def finetune_config_from_env():
    """The round's FinetuneConfig from KSR_FINETUNE_* variables."""
    from model.finetune import FinetuneConfig

    margin_raw = os.environ.get("KSR_FINETUNE_MARGIN", "0")
    try:
        margin = float(margin_raw)
    except ValueError:
        raise ConfigError(f"KSR_FINETUNE_MARGIN must be a number, got {margin_raw!r}") from None
    fraction = _positive_float("KSR_FINETUNE_HOLDOUT", 0.1)
    if not 0 < fraction < 1:
        raise ConfigError(f"KSR_FINETUNE_HOLDOUT must be between 0 and 1, got {fraction}")
    return FinetuneConfig(
        epochs=_positive_int("KSR_FINETUNE_EPOCHS", 2),
        max_seconds=_positive_float("KSR_FINETUNE_MAX_SECONDS", 300.0),
        holdout_fraction=fraction,
        margin=margin,
    )


def _consumer(settings: Settings):
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, group_id=None,
        isolation_level="read_committed", consumer_timeout_ms=2000,
        max_partition_fetch_bytes=max(1024 * 1024, 4 * settings.max_event_bytes),
        **settings.kafka_security,
    )


def end_offsets(settings: Settings) -> int:
    """Sum of the interactions topic's end offsets: a cheap counter of events ever produced."""
    from kafka import TopicPartition

    consumer = _consumer(settings)
    try:
        partitions = consumer.partitions_for_topic(settings.interactions_topic) or set()
        tps = [TopicPartition(settings.interactions_topic, p) for p in partitions]
        return sum(consumer.end_offsets(tps).values()) if tps else 0
    finally:
        consumer.close()


def read_window(settings: Settings, since_s: float) -> list[Interaction]:
    """Valid events of `interactions` with a Kafka timestamp >= since_s, up to the current end."""
    from kafka import TopicPartition

    consumer = _consumer(settings)
    try:
        partitions = sorted(consumer.partitions_for_topic(settings.interactions_topic) or [])
        tps = [TopicPartition(settings.interactions_topic, p) for p in partitions]
        if not tps:
            return []
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        starts = consumer.offsets_for_times({tp: int(since_s * 1000) for tp in tps})
        remaining = set()
        for tp in tps:
            start = starts.get(tp)
            offset = start.offset if start is not None else ends[tp]
            consumer.seek(tp, offset)
            if offset < ends[tp]:
                remaining.add(tp)
        events: list[tuple[int, int, Interaction]] = []
        idle_since = time.monotonic()
        while remaining and time.monotonic() - idle_since < 30:
            batch = consumer.poll(timeout_ms=1000, max_records=5000)
            if batch:
                idle_since = time.monotonic()
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        remaining.discard(tp)
                        continue
                    event = validate(record.value, settings.max_event_bytes)
                    if isinstance(event, Interaction):
                        events.append((record.timestamp, record.offset, event))
                    if record.offset >= ends[tp] - 1:
                        remaining.discard(tp)
            for tp in list(remaining):
                # Transaction markers occupy offsets that are never delivered.
                if consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        events.sort(key=lambda e: (e[0], e[1]))
        return [event for _, _, event in events]
    finally:
        consumer.close()


def announce(settings: Settings, message: dict) -> None:
    """Publish a promotion on the model-updates topic."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", **settings.kafka_security
    )
    try:
        producer.send(settings.model_updates_topic, value=json.dumps(message).encode()).get(timeout=30)
    finally:
        producer.close()


def version_path(checkpoint: Path, version: int) -> Path:
    """Where an immutable copy of a promoted version lives, beside the champion's folder."""
    return checkpoint.with_name(f"{checkpoint.name}.v{version}")


def run_round(settings: Settings, schedule: FinetuneSchedule, config=None) -> dict:
    """One fine-tune round; returns what happened (also counted in metrics)."""
    from model import checkpoint as checkpoints
    from model.finetune import decide, fine_tune, holdout_metrics, split_window
    from model.train import TrainConfig

    config = config or finetune_config_from_env()
    started = time.perf_counter()
    champion = checkpoints.load(settings.checkpoint)
    metrics.MODEL_VERSION.set(champion.version)
    if champion.model is None:
        raise checkpoints.CheckpointError(f"{settings.checkpoint}: a pop checkpoint cannot be fine-tuned")
    window = read_window(settings, time.time() - schedule.window_s)
    catalog = {token: i for i, token in enumerate(champion.item_tokens)}
    events = [(e.user_id, catalog[e.item_id], e.ts) for e in window if catalog.get(e.item_id)]  # not [PAD]
    result: dict = {"window_events": len(events), "champion_version": champion.version}
    if len(events) < 100:
        result.update(result="skipped", reason=f"only {len(events)} usable events in the window")
        metrics.FINETUNE_RUNS.labels("skipped").inc()
        return result
    split = split_window(events, config.holdout_fraction)
    train_config = TrainConfig(**{k: v for k, v in champion.meta.get("train", {}).items()
                                  if k in TrainConfig.__dataclass_fields__})
    champion_metrics = holdout_metrics(champion.model, split)
    challenger, training = fine_tune(champion.model, split, train_config, config)
    challenger_metrics = holdout_metrics(challenger, split)
    promoted = decide(champion_metrics, challenger_metrics, config)
    result.update(
        train_events=split.train_events, holdout_events=split.holdout_events, training=training,
        champion=champion_metrics, challenger=challenger_metrics, metric=config.metric,
        margin=config.margin, result="promoted" if promoted else "rejected",
    )
    if promoted:
        version = champion.version + 1
        meta = {k: v for k, v in champion.meta.items() if k not in ("created", "config", "format")}
        meta.update(version=version, parent_version=champion.version,
                    finetune={**config.to_dict(), **{k: result[k] for k in ("window_events", "training")}},
                    online_metrics={"champion": champion_metrics, "challenger": challenger_metrics})
        immutable = version_path(settings.checkpoint, version)
        checkpoints.save(immutable, meta, model=challenger)
        checkpoints.save(settings.checkpoint, meta, model=challenger)
        announce(settings, {"version": version, "checkpoint": str(immutable.resolve()),
                            "metrics": {"champion": champion_metrics, "challenger": challenger_metrics}})
        metrics.MODEL_VERSION.set(version)
        result.update(version=version, checkpoint=str(immutable))
    metrics.FINETUNE_RUNS.labels(result["result"]).inc()
    metrics.FINETUNE_SECONDS.observe(time.perf_counter() - started)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def run(once: bool = False) -> int:
    """`ksr finetune [--once]`: rounds on a schedule (time or new events), or a single one."""
    import torch

    from model.checkpoint import CheckpointError

    try:
        settings = Settings.from_env()
        schedule = FinetuneSchedule.from_env()
        config = finetune_config_from_env()
    except ConfigError as error:
        print(f"ksr finetune: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(settings.torch_threads)
    if not once:
        metrics.serve(settings.metrics_host, schedule.metrics_port)
    while True:
        try:
            result = run_round(settings, schedule, config)
        except CheckpointError as error:
            print(f"ksr finetune: {error}", file=sys.stderr)
            metrics.FINETUNE_RUNS.labels("failed").inc()
            if once:
                return 2
            result = {"result": "failed", "reason": str(error)}
        print(json.dumps(result, sort_keys=True), flush=True)
        if once:
            return 0
        last_round, last_offsets = time.monotonic(), end_offsets(settings)
        while True:
            time.sleep(10)
            if time.monotonic() - last_round >= schedule.interval_s:
                break
            if end_offsets(settings) - last_offsets >= schedule.min_new_events:
                break
