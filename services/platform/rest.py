"""What a servicer tells the edge about the REST response (the edge's Lua filter applies it)."""

from __future__ import annotations

import grpc

from services.platform.service_graph import HTTP_STATUS_HEADER


async def set_http_status(context: grpc.aio.ServicerContext, status: int) -> None:
    """Ask the edge to answer a REST caller with `status` (e.g. 201) instead of 200."""
    await context.send_initial_metadata(((HTTP_STATUS_HEADER, str(status)),))
