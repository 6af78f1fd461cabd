"""Topic creation against the real broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from proxy.kafka.topics import ensure_topics
from tests.kafka_support import kafka_settings, start_broker

pytestmark = pytest.mark.kafka


async def test_missing_topics_are_created_compacted_where_they_keep_state(tmp_path: Path) -> None:
    start_broker()
    s = kafka_settings(tmp_path)
    created = await ensure_topics(s)
    assert sorted(created) == sorted([s.transactions_topic, s.events_topic, s.control_topic])
    assert await ensure_topics(s) == []  # a second replica finds them there
    admin = AIOKafkaAdminClient(bootstrap_servers=list(s.bootstrap))
    await admin.start()
    try:
        resources = [
            ConfigResource(ConfigResourceType.TOPIC, t)
            for t in (s.transactions_topic, s.events_topic, s.control_topic)
        ]
        policies = {}
        for resp in await admin.describe_configs(resources):
            for resource in resp.resources:
                name, entries = resource[3], resource[4]
                policies[name] = {e[0]: e[1] for e in entries}["cleanup.policy"]
    finally:
        await admin.close()
    assert policies == {
        s.transactions_topic: "compact,delete",
        s.events_topic: "delete",
        s.control_topic: "compact",
    }
