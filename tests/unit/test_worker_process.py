"""A worker's settings, its info metric, and the refusal of idempotency keys that each
worker would keep to itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.config.load import ConfigError, load_rules
from proxy.kafka.config import KafkaSettings
from proxy.settings import Settings
from proxy.worker_process import WorkerInfo, check_shared_keys, worker_settings

RULES = """\
gateways:
  g1: {{url: 'http://127.0.0.1:9', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [g1]
{extra}
"""
KEYED = "    idempotency: {header: Idempotency-Key}"

PORTS = {
    "worker 0 keeps the ports": (0, ("127.0.0.1", 9901), ("0.0.0.0", 9102)),
    "worker 2 shifts by 2": (2, ("127.0.0.1", 9903), ("0.0.0.0", 9104)),
}


@pytest.mark.parametrize(("index", "admin", "probes"), PORTS.values(), ids=PORTS)
def test_worker_ports(index: int, admin: tuple[str, int], probes: tuple[str, int]) -> None:
    base = Settings(workers=3, probes=("0.0.0.0", 9102))
    got = worker_settings(base, index)
    assert (got.admin, got.probes) == (admin, probes)
    assert got.listen == base.listen and got.workers == 3


def test_ephemeral_ports_stay_ephemeral() -> None:
    got = worker_settings(Settings(workers=2, admin=("127.0.0.1", 0)), 1)
    assert got.admin == ("127.0.0.1", 0) and got.probes is None


def _rules(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "r.yaml").write_text(RULES.format(extra=extra))
    return tmp_path


CASES = {
    "keyed, memory, 2 workers: refused": (2, "memory", KEYED, True),
    "keyed, redis, 2 workers": (2, "redis://127.0.0.1:6379/0", KEYED, False),
    "keyed, memory, 1 worker": (1, "memory", KEYED, False),
    "unkeyed, memory, 2 workers": (2, "memory", "", False),
}


@pytest.mark.parametrize(("workers", "store", "extra", "refused"), CASES.values(), ids=CASES)
def test_shared_keys(tmp_path: Path, workers: int, store: str, extra: str, refused: bool) -> None:
    rules = load_rules([str(_rules(tmp_path, extra))])
    settings = Settings(workers=workers, idempotency_store=store)
    if not refused:
        check_shared_keys(settings, rules)
        return
    with pytest.raises(ConfigError) as err:
        check_shared_keys(settings, rules)
    message = str(err.value.issues[0])
    assert "deposits" in message
    assert "--idempotency-store redis://" in message
    assert "r.yaml" in message


def test_worker_info_names_the_worker() -> None:
    registry = CollectorRegistry()
    registry.register(WorkerInfo(1, 2))
    text = generate_latest(registry).decode()
    assert 'payswitch_worker_info{pid="' in text
    assert 'worker="1",workers="2"} 1.0' in text


def test_settings_replace_keeps_every_other_field() -> None:
    base = Settings(workers=2, max_connections=10, shutdown_grace=0.5)
    got = worker_settings(base, 1)
    assert dataclasses.replace(got, admin=base.admin) == base


@pytest.mark.parametrize(
    ("index", "spill", "client_id"),
    [
        (0, "/var/spill/ps.jsonl", "ps"),
        (1, "/var/spill/ps.1.jsonl", "ps-1"),
        (3, "/var/spill/ps.3.jsonl", "ps-3"),
    ],
    ids=["first-keeps-its-name", "second", "fourth"],
)
def test_each_worker_spills_kafka_records_to_its_own_file(
    index: int, spill: str, client_id: str
) -> None:
    kafka = KafkaSettings(
        bootstrap=("127.0.0.1:9092",), spill_path="/var/spill/ps.jsonl", client_id="ps"
    )
    got = worker_settings(Settings(workers=4, kafka=kafka), index).kafka
    assert got is not None
    assert (got.spill_path, got.client_id) == (spill, client_id)
    assert got.bootstrap == kafka.bootstrap
