"""A local stand-in for the Anthropic Messages API, on loopback: POST /v1/messages answers as the
real API does (a message with a thinking block and the structured answer's JSON as text, or with
tool_use content blocks, and usage; errors with their real status codes,
`{"type": "error", "error": {...}, "request_id": ...}` bodies and headers: 429 with retry-after, 529
overloaded, ...), checks the key and version headers, refuses forced tool use as current models do
(400), and records every request exactly as the SDK sent it, so a test can read what the model was
told.

A test scripts the next answers (`reply`); with none scripted, each request gets `default_answer`.

To try /api/v1/generate by hand without an Anthropic key: `python -m tests.anthropic_stub --port 8089`
serves the default answer (a program printing "hello") until Ctrl-C, for a mesh started with
ANTHROPIC_API_KEY=stub-key ANTHROPIC_BASE_URL=http://127.0.0.1:8089."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The error type the real API gives for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a status, a JSON body, headers, and a delay before it is sent."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: Mapping[str, str]  # names in lower case
    body: Mapping[str, Any]


def structured_answer(
    answer: Mapping[str, Any], *, input_tokens: int = 321, output_tokens: int = 123
) -> Reply:
    """A message as a structured output comes: the model's (here empty, as the API shows adaptive
    thinking by default) thinking block, then one text block holding the answer as JSON."""
    content = [
        {"type": "thinking", "thinking": "", "signature": f"sig_{uuid.uuid4().hex[:16]}"},
        {"type": "text", "text": json.dumps(dict(answer))},
    ]
    return Reply(200, _message(content, "end_turn", input_tokens, output_tokens))


def tool_answer(tool_input: Mapping[str, Any], *, tool_name: str = "submit_code") -> Reply:
    """A message whose content is one tool_use block (what a model that calls a tool sends)."""
    block = {
        "type": "tool_use",
        "id": f"toolu_{uuid.uuid4().hex[:24]}",
        "name": tool_name,
        "input": dict(tool_input),
    }
    return Reply(200, _message([block], "tool_use", 321, 123))


def text_answer(text: str, *, stop_reason: str = "end_turn") -> Reply:
    """A message with only this text (not the structured answer, or cut off, or a refusal)."""
    return Reply(200, _message([{"type": "text", "text": text}], stop_reason, 100, 20))


def error(status: int, message: str = "", headers: Mapping[str, str] | None = None) -> Reply:
    error_type = ERROR_TYPES.get(status, "api_error")
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message or error_type.replace("_", " ")},
        "request_id": f"req_{uuid.uuid4().hex[:24]}",
    }
    return Reply(status, body, {"request-id": body["request_id"], **(headers or {})})


def _message(
    content: list[dict[str, Any]], stop_reason: str, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": "",  # filled with the requested model
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key a request carries: `x-api-key`, or `Authorization: Bearer` (the SDK's choice
    since its 2.x releases); the API takes either."""
    bearer = headers.get("authorization", "")
    return headers.get("x-api-key") or (
        bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else None
    )


class AnthropicStub:
    """The server; `url` is what ANTHROPIC_BASE_URL should be."""

    def __init__(self, api_key: str, port: int = 0) -> None:
        self.api_key = api_key
        self.default_answer = structured_answer(
            {"code": "print('hello')\n", "packages": [], "explanation": "Prints hello."}
        )
        self._script: list[Reply] = []
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reply(self, *replies: Reply) -> None:
        """The answers to the next requests, in order (then `default_answer` again)."""
        with self._lock:
            self._script = list(replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def start(self) -> AnthropicStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self._requests.append(request)
            if presented_key(request.headers) != self.api_key:
                return error(401, "invalid x-api-key")
            if not request.headers.get("anthropic-version"):
                return error(400, "anthropic-version: header is required")
            if request.body.get("tool_choice", {}).get("type") in ("any", "tool"):
                return error(400, "tool_choice: forced tool use is not supported with thinking")
            return self._script.pop(0) if self._script else self.default_answer

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(error(400, "the request body is not valid JSON"), {})
                    return
                headers = {name.lower(): value for name, value in self.headers.items()}
                recorded = RecordedRequest(self.path, headers, body)
                if self.path.split("?")[0] != "/v1/messages":
                    stub._requests.append(recorded)
                    self._send(error(404, f"no route {self.path}"), body)
                    return
                self._send(stub._next(recorded), body)

            def _send(self, reply: Reply, request: Mapping[str, Any]) -> None:
                if reply.delay_seconds:
                    time.sleep(reply.delay_seconds)
                body = dict(reply.body)
                if body.get("type") == "message":
                    body["model"] = request.get("model", "")
                payload = json.dumps(body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
                pass

        return Handler


@contextmanager
def running_stub(api_key: str, port: int = 0) -> Iterator[AnthropicStub]:
    stub = AnthropicStub(api_key, port).start()
    try:
        yield stub
    finally:
        stub.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A local stand-in for the Anthropic Messages API.")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--key", default="stub-key", help="the ANTHROPIC_API_KEY it accepts")
    arguments = parser.parse_args()
    with running_stub(arguments.key, arguments.port) as served:
        print(f"ANTHROPIC_API_KEY={arguments.key} ANTHROPIC_BASE_URL={served.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
