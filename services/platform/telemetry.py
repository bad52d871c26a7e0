"""OpenTelemetry tracing, exported only when OTEL_EXPORTER_OTLP_ENDPOINT is set.

One tracer provider per process traces both its server (bootstrap) and its clients (connect), so
a trace runs on through every internal call. An untraced process installs no interceptor at all
and pays nothing for tracing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# The process's tracer provider, like OpenTelemetry's own global one, but replaceable, so that a
# test can trace in-process servers into memory.
_provider: TracerProvider | None = None


def configure(service: str, otlp_endpoint: str | None) -> None:
    """Export this process's spans to `otlp_endpoint`, once; nothing without an endpoint. Called
    before a service builds its clients, so that they are traced too."""
    if not otlp_endpoint or _provider is not None:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"pythonon-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    use(provider)


def use(provider: TracerProvider | None) -> None:
    """Trace the servers and clients built from now on with `provider` (None: trace none)."""
    global _provider
    _provider = provider


def server_interceptors(service: str, otlp_endpoint: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors tracing needs (configuring it first); none when it is off."""
    configure(service, otlp_endpoint)
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The client interceptors tracing needs: a span per call, its context sent along; none when off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_provider))


def shutdown() -> None:
    """Flush and stop the exporter (at the end of a graceful stop)."""
    if _provider is not None:
        _provider.shutdown()
