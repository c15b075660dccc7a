"""Create the worker's topics when absent, with matching partition counts.

Co-partitioning matters: a user's events, state changelog, recommendations and dead letters all sit
in the same partition number, so one transactional producer per partition covers them all.
"""

from __future__ import annotations

import sys

from worker.config import ConfigError, Settings


def admin_client(settings: Settings):
    """A kafka-python admin client with the environment's security settings."""
    from kafka import KafkaAdminClient

    return KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, client_id=f"{settings.app_id}-admin",
        request_timeout_ms=30000, **settings.kafka_security,
    )


def ensure_topics(settings: Settings) -> int:
    """Create missing topics; returns the partition count of `interactions` (the one to match)."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        partitions = settings.partitions
        if settings.interactions_topic in existing:
            described = admin.describe_topics([settings.interactions_topic])
            partitions = len(described[0]["partitions"]) or partitions
            if partitions != settings.partitions:
                print(
                    f"ksr: {settings.interactions_topic} has {partitions} partitions (KSR_PARTITIONS="
                    f"{settings.partitions}); matching it", file=sys.stderr,
                )
        wanted = {
            settings.interactions_topic: partitions,
            settings.recommendations_topic: partitions,
            settings.dlq_topic: partitions,
            settings.model_updates_topic: 1,
        }
        # Every output goes to its event's partition number: an output topic with fewer partitions
        # than `interactions` would fail the first batch that has an event from a higher one, after
        # every restart. More partitions are harmless (the extra ones stay empty).
        outputs = [t for t in (settings.recommendations_topic, settings.dlq_topic) if t in existing]
        for described in admin.describe_topics(outputs) if outputs else []:
            count = len(described["partitions"])
            if count < partitions:
                raise ConfigError(
                    f"topic {described['name']} has {count} partitions, fewer than "
                    f"{settings.interactions_topic}'s {partitions}: each answer goes to its event's "
                    f"partition number. Add partitions to it (kafka-topics.sh --alter --topic "
                    f"{described['name']} --partitions {partitions}) or name another topic "
                    f"(KSR_TOPIC_RECOMMENDATIONS, KSR_TOPIC_DLQ)"
                )
        missing = [NewTopic(name, n, 1) for name, n in wanted.items() if name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process won the race
        return partitions
    finally:
        admin.close()


def delete_topics(settings: Settings, prefixes: tuple[str, ...]) -> list[str]:
    """Delete every topic whose name starts with one of `prefixes` (a benchmark's own topics, its
    Faust changelogs included); returns the names deleted."""
    admin = admin_client(settings)
    try:
        doomed = sorted(name for name in admin.list_topics() if name.startswith(prefixes))
        if doomed:
            admin.delete_topics(doomed, timeout_ms=30000)
        return doomed
    finally:
        admin.close()
