"""Kafka plumbing: the local KRaft broker, topic declaration, client factories, codec and DLQ."""
