"""What the model's answer is, and the generator's fixed messages about it: apart from the SDK, so
that a generator without an API key never imports the Anthropic SDK (about 30 MiB of its memory)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services.platform.errors import DomainError

NOT_CONFIGURED_MESSAGE = "generation is not configured: set ANTHROPIC_API_KEY"


class ModelTimeout(DomainError):
    """The model did not answer within the generator's time (HTTP 504)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ModelAnswer:
    code: str
    packages: list[str]
    explanation: str
    model: str  # as the API names the model that answered
    usage: Usage
