"""Operations: settings, the local stack (broker, Redis), Kafka plumbing and the `sluice` CLI."""
