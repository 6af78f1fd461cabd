"""The three topics payswitch uses, created when missing with the settings they need.

Owns: `ensure_topics`: `payswitch.transactions` and `payswitch.control` compacted (the
latest state of each payment, the current command per target), `payswitch.events` kept by
time. Partition count and replication are the broker's defaults.
Must not: change a topic that exists; a platform team's settings win over ours.
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from proxy.kafka.config import KafkaSettings

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def topic_configs(settings: KafkaSettings) -> dict[str, dict[str, str]]:
    return {
        settings.transactions_topic: {"cleanup.policy": "compact,delete"},
        settings.events_topic: {"cleanup.policy": "delete"},
        settings.control_topic: {"cleanup.policy": "compact"},
    }


async def ensure_topics(settings: KafkaSettings, *, request_timeout: float = 10.0) -> list[str]:
    """Create whichever of our topics are missing; returns the ones created. Raises on a
    connection failure; a topic refused for another reason is logged, not raised."""
    admin = AIOKafkaAdminClient(
        **settings.connection(), request_timeout_ms=int(request_timeout * 1000)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, -1, -1, replica_assignments={}, topic_configs=cfg)
            for name, cfg in topic_configs(settings).items()
            if name not in existing
        ]
        if not wanted:
            return []
        resp = await admin.create_topics(wanted)
        created = []
        for name, code, *rest in resp.topic_errors:
            if code == 0:
                created.append(name)
            elif code != _TOPIC_ALREADY_EXISTS:
                logger.warning("kafka: creating topic %s failed: error %s %s", name, code, rest)
        if created:
            logger.info("kafka: created topics %s", ", ".join(created))
        return created
    finally:
        await admin.close()
