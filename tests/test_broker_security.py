"""Kafka security settings (an external cluster with SASL and TLS, as the Helm chart sets
them from Secrets): validated once, and turned into the same kafka-python options for
every client."""
from __future__ import annotations

import pytest

from vidsearch.broker import client_security
from vidsearch.config import ConfigError, load_settings

SASL_ENV = {"KAFKA_BOOTSTRAP": "kafka-0:9093", "VIDSEARCH_BROKER__SECURITY_PROTOCOL": "SASL_SSL",
            "VIDSEARCH_BROKER__SASL_MECHANISM": "SCRAM-SHA-256", "VIDSEARCH_BROKER__SASL_USERNAME": "ingest",
            "VIDSEARCH_BROKER__SASL_PASSWORD": "12345", "VIDSEARCH_BROKER__SSL_CAFILE": "/var/run/ca/ca.crt"}


def test_plaintext_adds_no_options():
    assert client_security(load_settings(env={}).broker) == {}


def test_sasl_ssl_options_are_kafka_python_client_options():
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    broker = load_settings(env=SASL_ENV).broker
    options = client_security(broker)
    # A numeric-looking password stays a string (it is never parsed as JSON).
    assert options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                       "sasl_plain_username": "ingest", "sasl_plain_password": "12345",
                       "ssl_cafile": "/var/run/ca/ca.crt"}
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(options) <= set(client.DEFAULT_CONFIG), client
    # The password never shows in the settings dump that is logged.
    assert "12345" not in str(load_settings(env=SASL_ENV).dump())


def test_ssl_without_sasl_sends_no_credentials():
    env = {"VIDSEARCH_BROKER__SECURITY_PROTOCOL": "SSL"}
    assert client_security(load_settings(env=env).broker) == {"security_protocol": "SSL"}


@pytest.mark.parametrize("env, message", [
    ({"VIDSEARCH_BROKER__SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "needs broker.sasl_username and broker.sasl_password"),
    ({"VIDSEARCH_BROKER__SECURITY_PROTOCOL": "SASL_SSL", "VIDSEARCH_BROKER__SASL_USERNAME": "u"},
     "needs broker.sasl_username and broker.sasl_password"),
    ({"VIDSEARCH_BROKER__SECURITY_PROTOCOL": "TLS"}, "broker.security_protocol"),
    ({"VIDSEARCH_BROKER__SASL_MECHANISM": "GSSAPI"}, "broker.sasl_mechanism"),
])
def test_bad_security_settings_fail_naming_the_setting(env, message):
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env=env)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)
