"""OpenTelemetry set-up from settings, and W3C trace context carried in Kafka headers.

Every component calls `setup_telemetry(settings, "<component>")` once at start. Producers inject
the current context into record headers (the codec does it); consumers start their span as a
child of the context extracted from the record they process.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

    from infra.settings import Settings

log = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_configured = False

HeaderList = list[tuple[str, bytes]]


class _HeaderGetter(Getter[Any]):
    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier or () if k == key and v is not None]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier or ()]


class _HeaderSetter(Setter[HeaderList]):
    def set(self, carrier: HeaderList, key: str, value: str) -> None:
        carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value.encode("latin-1")))


_getter = _HeaderGetter()
_setter = _HeaderSetter()


def inject_headers(headers: HeaderList, ctx: otel_context.Context | None = None) -> None:
    """Add `traceparent`/`tracestate` for `ctx` (default: the current context) to `headers`."""
    _propagator.inject(headers, context=ctx, setter=_setter)


def extract_context(headers: Sequence[tuple[str, bytes]] | None) -> otel_context.Context:
    return _propagator.extract(headers or [], getter=_getter)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def tracing_enabled() -> bool:
    """Whether a tracer provider is installed (`setup_telemetry`); without one, spans are no-ops
    and not worth creating per record."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def start_span_from_headers(
    name: str,
    headers: Sequence[tuple[str, bytes]] | None,
    *,
    component: str,
    start_time_s: float | None = None,
    **attributes: Any,
) -> trace.Span:
    """Like `span_from_headers`, for a span that outlives one block (the caller ends it);
    `start_time_s` (wall clock) backdates it to when the record arrived."""
    return tracer(component).start_span(
        name,
        context=extract_context(headers),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        start_time=None if start_time_s is None else int(start_time_s * 1e9),
    )


def reinject_headers(headers: Sequence[tuple[str, bytes]], span: trace.Span) -> HeaderList:
    """`headers` with their trace context replaced by `span`'s."""
    out = [(k, v) for k, v in headers if k not in ("traceparent", "tracestate")]
    inject_headers(out, trace.set_span_in_context(span))
    return out


@contextmanager
def span_from_headers(
    name: str, headers: Sequence[tuple[str, bytes]] | None, *, component: str, **attributes: Any
) -> Iterator[trace.Span]:
    """A CONSUMER span whose parent is the trace context carried by a record's headers."""
    parent = extract_context(headers)
    with tracer(component).start_as_current_span(
        name, context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


class _JsonLinesExporter:
    """Writes finished spans as one JSON object per line (used by tests and for debugging)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            for s in spans:
                ctx, parent = s.get_span_context(), s.parent
                self._file.write(
                    json.dumps(
                        {
                            "name": s.name,
                            "trace_id": f"{ctx.trace_id:032x}",
                            "span_id": f"{ctx.span_id:016x}",
                            "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                            "service": s.resource.attributes.get("service.name"),
                            "kind": s.kind.name,
                            "start_ns": s.start_time,
                            "end_ns": s.end_time,
                            "attributes": {
                                k: v
                                for k, v in (s.attributes or {}).items()
                                if isinstance(v, str | int | float | bool)
                            },
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def setup_telemetry(settings: Settings, component: str) -> None:
    """Install tracer and meter providers for this process (once; later calls are no-ops)."""
    global _configured
    with _lock:
        if _configured or settings.otel_exporter == "none":
            return
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        resource = Resource.create(
            {"service.name": f"{settings.otel_service_name}.{component}", "service.namespace": "ragbus"}
        )
        provider = TracerProvider(resource=resource)
        readers = []
        if settings.otel_exporter == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), 60_000))
        elif settings.otel_exporter == "file":
            if settings.otel_file is None:
                raise ValueError("otel_exporter=file needs RAGBUS_OTEL_FILE")
            provider.add_span_processor(SimpleSpanProcessor(_JsonLinesExporter(str(settings.otel_file))))  # type: ignore[arg-type]
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            base = (settings.otel_endpoint or "http://127.0.0.1:4318").rstrip("/")
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics")))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
        atexit.register(provider.shutdown)
        _configured = True
        log.info("telemetry: %s exporter for %s", settings.otel_exporter, component)
