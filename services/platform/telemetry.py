"""OpenTelemetry tracing, exported only when OTEL_EXPORTER_OTLP_ENDPOINT is set."""

from __future__ import annotations

import grpc


def server_interceptors(service: str, otlp_endpoint: str | None) -> list[grpc.aio.ServerInterceptor]:
    """Configure tracing for this process and return the server interceptors it needs (none when
    no exporter is configured, so an untraced mesh pays nothing for it)."""
    if not otlp_endpoint:
        return []
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"pythonon-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return [aio_server_interceptor()]


def shutdown() -> None:
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
