"""Prometheus metrics of the gateway, served at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry()

REQUESTS = Counter(
    "ragbus_gateway_requests", "Chat completion requests", ["status", "stream"], registry=registry
)
LATENCY = Histogram(
    "ragbus_gateway_latency_seconds",
    "Time from HTTP request to final answer",
    ["stream"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120),
    registry=registry,
)
TOKENS = Counter("ragbus_gateway_tokens", "Tokens in answered requests", ["kind"], registry=registry)
CANCELS = Counter(
    "ragbus_gateway_cancels", "Cancels sent for unawaited requests", ["reason"], registry=registry
)
INFLIGHT = Gauge("ragbus_gateway_inflight", "Requests awaiting an answer", registry=registry)
EMBEDDINGS = Counter("ragbus_gateway_embeddings", "Texts embedded by /v1/embeddings", registry=registry)
