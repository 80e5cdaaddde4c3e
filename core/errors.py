"""Typed errors of the infra package, in one place. The CLI maps each to an exit code."""

from __future__ import annotations


class SluiceInfraError(Exception):
    """Base of every infra error. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class SettingsError(SluiceInfraError):
    """A setting (env SLUICE_* or the YAML file) is invalid; the message names it."""

    exit_code = 2


class StackError(SluiceInfraError):
    """The local stack could not be started, checked or stopped."""

    exit_code = 3


class BrokerUnreachableError(SluiceInfraError):
    """The Kafka broker at settings.kafka_bootstrap did not answer a metadata request."""

    exit_code = 3


class KafkaDeliveryError(SluiceInfraError):
    """Records could not be delivered to the broker within the time allowed."""

    exit_code = 4


class IngestError(SluiceInfraError):
    """The ingest loop could not consume (no partitions assigned, broker errors)."""

    exit_code = 6
