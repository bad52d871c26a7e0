"""The generator's client of Claude: the official Anthropic SDK (async), asked for a structured
output (the API's `output_config.format`, a JSON schema the answer must follow: code, packages,
explanation), validated before anyone sees it. Structured output rather than a forced tool call:
current models think before they answer, and the API refuses forced tool use with thinking (Claude
Sonnet 5.5 and later refuse it outright).

Every failure of the model API becomes a domain error here, in one place, with a message of our own:
the SDK's exceptions carry the request and its headers, so neither they nor their text reach a log
or an answer (nothing here ever logs the API key, the prompt or the code)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from typing import Any

import anthropic
from anthropic import APIRequest, AsyncAnthropic, AsyncAPIResponse, AsyncCallNext, Middleware
from anthropic.types import MessageParam, OutputConfigParam

from services.generator.answers import (  # noqa: F401 - NOT_CONFIGURED_MESSAGE is re-exported
    NOT_CONFIGURED_MESSAGE,
    ModelAnswer,
    ModelTimeout,
    Usage,
)
from services.platform.errors import DomainError, ResourceExhausted, Unavailable

log = logging.getLogger("pythonon.generator.model")

MAX_PACKAGES = 50
# A package as the model must name it: a PEP 508 name with an optional version specifier, no URL,
# path or pip option (the packages service accepts nothing else).
_PACKAGE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?(?:\[[A-Za-z0-9._,-]+\])?"
                      r"(?:\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+(?:\s*,\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?")  # fmt: skip

# The shape of the answer: the API makes the model's text a JSON object of this schema.
ANSWER_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "The complete program, ready to run as it is."},
        "packages": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Third-party packages the program imports, as PEP 508 requirements "
            "(e.g. requests or numpy>=2); empty when it needs only the standard library.",
        },
        "explanation": {
            "type": "string",
            "description": "A short explanation of what the program does and how to use it.",
        },
    },
    "required": ["code", "packages", "explanation"],
    "additionalProperties": False,
}

OUTPUT_CONFIG: OutputConfigParam = {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}

MALFORMED_MESSAGE = "the model's answer was malformed ({why}); retry"
DECLINED_MESSAGE = "the model declined to write this program; change the prompt"
OVERLOADED_MESSAGE = "the model is overloaded or unavailable right now; retry later"


class _RateLimited(Exception):
    """Raised from inside the SDK's retry loop on a 429, so that it is passed on at once with the
    API's Retry-After instead of being waited out while the caller's request hangs."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("rate limited")
        self.retry_after = retry_after


class _PassOnRateLimits(Middleware):
    async def handle_async(self, request: APIRequest, call_next: AsyncCallNext) -> AsyncAPIResponse[Any]:
        response = await call_next(request)
        if response.status_code == 429:
            raise _RateLimited(retry_after_seconds(response.headers.get("retry-after")))
        return response


def retry_after_seconds(value: str | None) -> int:
    """Whole seconds from a Retry-After header in seconds (at least 1; 1 when absent or a date)."""
    try:
        seconds = float(value or "")
    except ValueError:
        return 1
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else 1


class ClaudeCodeWriter:
    """Writes code for a prompt through the Messages API; one client for the process."""

    def __init__(
        self,
        api_key: str,
        model: str,
        *,
        base_url: str | None,
        max_tokens: int,
        timeout_seconds: float,
        max_retries: int,
    ) -> None:
        self._client = AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=timeout_seconds,
            middleware=[_PassOnRateLimits()],
        )
        self.model = model
        self._max_tokens = max_tokens
        self._timeout = timeout_seconds

    async def write(self, system_prompt: str, prompt: str) -> ModelAnswer:
        """The model's answer to `prompt`; ResourceExhausted (429), Unavailable (503) or ModelTimeout
        (504) when the API cannot give one."""
        user_message: MessageParam = {"role": "user", "content": prompt}
        try:
            async with asyncio.timeout(self._timeout):
                message = await self._client.messages.create(
                    model=self.model,
                    max_tokens=self._max_tokens,
                    system=system_prompt,
                    messages=[user_message],
                    output_config=OUTPUT_CONFIG,
                )
        except TimeoutError:
            raise ModelTimeout(f"the model did not answer within {self._timeout:g} seconds; retry") from None
        except _RateLimited as limited:
            log.warning("model rate limited", extra={"retry_after": limited.retry_after})
            raise ResourceExhausted(
                "the model's rate limit is reached; retry after the time Retry-After gives",
                limited.retry_after,
            ) from None
        except anthropic.APITimeoutError:
            raise ModelTimeout("the model did not answer in time; retry") from None
        except anthropic.APIStatusError as error:
            raise _status_error(error) from None
        except anthropic.APIConnectionError:
            log.warning("model unreachable")
            raise Unavailable(OVERLOADED_MESSAGE) from None
        return parse_answer(message)

    async def close(self) -> None:
        await self._client.close()


def _status_error(error: anthropic.APIStatusError) -> DomainError:
    """What the API's refusal means to our caller. Logged with its status, type and request id
    only: the exception also holds the request, whose headers carry the key."""
    log.warning(
        "model call failed",
        extra={"status": error.status_code, "type": error.type or "", "request_id": error.request_id or ""},
    )
    if error.status_code in (401, 403):
        return Unavailable(
            "generation is unavailable: the model API refused this server's credentials; "
            "the operator must check ANTHROPIC_API_KEY"
        )
    if error.status_code >= 500:  # 500, 529 overloaded, ...: after the SDK's retries
        return Unavailable(OVERLOADED_MESSAGE)
    return Unavailable(
        f"generation failed: the model API refused the request ({error.type or error.status_code}); retry later"
    )


def parse_answer(message: Any) -> ModelAnswer:
    """The structured answer (the message's text, thinking blocks aside), checked field by field;
    Unavailable naming what is wrong otherwise."""
    if message.stop_reason == "refusal":
        raise Unavailable(DECLINED_MESSAGE)
    if message.stop_reason == "max_tokens":
        raise Unavailable(MALFORMED_MESSAGE.format(why="it ran out of tokens"))
    text = "".join(
        str(getattr(block, "text", "")) for block in message.content if getattr(block, "type", None) == "text"
    )
    if not text.strip():
        raise Unavailable(MALFORMED_MESSAGE.format(why="it holds no text"))
    try:
        answer = json.loads(text)
    except ValueError:
        raise Unavailable(MALFORMED_MESSAGE.format(why="its text is not JSON")) from None
    if not isinstance(answer, dict):
        raise Unavailable(MALFORMED_MESSAGE.format(why="it is not a JSON object"))
    code, packages, explanation = answer.get("code"), answer.get("packages"), answer.get("explanation")
    if not isinstance(code, str) or not code.strip():
        raise Unavailable(MALFORMED_MESSAGE.format(why="code is missing or empty"))
    if "\x00" in code:
        raise Unavailable(MALFORMED_MESSAGE.format(why="code contains NUL characters"))
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise Unavailable(MALFORMED_MESSAGE.format(why="packages is not a list of strings"))
    if len(packages) > MAX_PACKAGES:
        raise Unavailable(MALFORMED_MESSAGE.format(why=f"more than {MAX_PACKAGES} packages"))
    cleaned = list(dict.fromkeys(p.strip() for p in packages if p.strip()))
    if not all(_PACKAGE.fullmatch(p) for p in cleaned):
        raise Unavailable(MALFORMED_MESSAGE.format(why="a package is not a PEP 508 name and version"))
    if not isinstance(explanation, str):
        raise Unavailable(MALFORMED_MESSAGE.format(why="explanation is not a string"))
    usage = Usage(int(message.usage.input_tokens or 0), int(message.usage.output_tokens or 0))
    return ModelAnswer(code, cleaned, explanation.strip(), str(message.model), usage)
