from __future__ import annotations

import ssl

import pytest

from proxy.kafka.config import KafkaSettings, from_sources


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({}, {}, None),
        (
            {"kafka_bootstrap": "127.0.0.1:9092"},
            {},
            KafkaSettings(bootstrap=("127.0.0.1:9092",)),
        ),
        (
            {},
            {"PAYSWITCH_KAFKA_BOOTSTRAP": "a:1, b:2", "PAYSWITCH_KAFKA_BUFFER": "50"},
            KafkaSettings(bootstrap=("a:1", "b:2"), buffer=50),
        ),
        (
            {"kafka_bootstrap": "flag:1", "kafka_control": "off"},
            {"PAYSWITCH_KAFKA_BOOTSTRAP": "env:1", "PAYSWITCH_KAFKA_CONTROL": "on"},
            KafkaSettings(bootstrap=("flag:1",), control=False),
        ),
        (
            {
                "kafka_bootstrap": "a:1",
                "kafka_spill_max_bytes": "1MiB",
                "kafka_min_severity": "ERROR",
            },
            {},
            KafkaSettings(bootstrap=("a:1",), spill_max_bytes=1024 * 1024, min_severity="error"),
        ),
        (
            {"kafka_bootstrap": "a:1", "kafka_security_protocol": "sasl_plaintext"},
            {"PAYSWITCH_KAFKA_SASL_USERNAME": "u", "PAYSWITCH_KAFKA_SASL_PASSWORD": "p"},
            KafkaSettings(
                bootstrap=("a:1",),
                security_protocol="SASL_PLAINTEXT",
                sasl_username="u",
                sasl_password="p",
            ),
        ),
    ],
    ids=["off", "flag", "env-list", "flag-wins", "units", "sasl"],
)
def test_settings_from_flags_and_env(
    flags: dict[str, object], env: dict[str, str], expected: KafkaSettings | None
) -> None:
    assert from_sources(flags, env) == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"kafka_bootstrap": "nohost"}, "HOST:PORT"),
        ({"kafka_bootstrap": "a:1", "kafka_buffer": "0"}, "positive number"),
        ({"kafka_bootstrap": "a:1", "kafka_buffer": "lots"}, "positive number"),
        ({"kafka_bootstrap": "a:1", "kafka_events_topic": "bad topic"}, "not a valid topic"),
        ({"kafka_bootstrap": "a:1", "kafka_min_severity": "loud"}, "expected one of"),
        ({"kafka_bootstrap": "a:1", "kafka_security_protocol": "TLS"}, "expected one of"),
        ({"kafka_bootstrap": "a:1", "kafka_spill_max_bytes": "big"}, "not a size"),
        ({"kafka_bootstrap": "a:1", "kafka_control": "maybe"}, "on/off"),
        ({"kafka_bootstrap": "a:1", "kafka_security_protocol": "SASL_SSL"}, "SASL username"),
        ({"kafka_client_id": "x"}, "without a bootstrap server"),
    ],
    ids=[
        "bootstrap",
        "buffer-zero",
        "buffer-word",
        "topic",
        "severity",
        "protocol",
        "size",
        "on-off",
        "sasl-user",
        "no-bootstrap",
    ],
)
def test_bad_settings_say_what_is_wrong(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_sources(flags, {})


def test_connection_passes_tls_and_sasl_through() -> None:
    s = KafkaSettings(
        bootstrap=("a:1",),
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password="p",
    )
    kw = s.connection()
    assert kw["bootstrap_servers"] == ["a:1"]
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("u", "p")
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    assert "ssl_context" not in KafkaSettings(bootstrap=("a:1",)).connection()
