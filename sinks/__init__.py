"""Sinks: components that copy what travels on the bus into durable stores (the audit trail)."""
