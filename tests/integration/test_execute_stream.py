"""POST /api/v1/execute/stream through Envoy on a whole mesh, as `curl -N` would use it: one JSON
object a line as the run writes its output, the first while the program still runs, then exactly
one result (what /api/v1/execute answers); refusals before the first line with their usual status
and body; the output cap, the user's secrets and the audit record as for execute; a failure after
the first line in-band; a client that hangs up ends the run; and native gRPC on the same port.

The mesh keeps each user to one run at once with none waiting (so a second run is a 429) and the
output cap small (4 KiB per stream)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.executor.execution import RECORD_DEADLINE_SECONDS
from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import (
    GENEROUS_LIMITS,
    PASSWORD,
    error_message,
    new_email,
    seconds_until_gone,
    wait_until_running,
)
from tests.integration.test_execute_api import EXECUTION_ID, RESPONSE_FIELDS

OUTPUT_BYTES = 4096
STREAM = "/api/v1/execute/stream"
# Prints, sleeps 3 s, prints again (the test).
PRINT_SLEEP_PRINT = "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    service_env = {
        **GENEROUS_LIMITS,
        "executor": {
            # One run per user and two slots: the last free slot is never lent to a user at its cap,
            # so a user's second run at once is refused (no waiting allowed either).
            "PYTHONON_EXECUTOR_MAX_CONCURRENT": "2",
            "PYTHONON_EXECUTOR_MAX_RUNS_PER_USER": "1",
            "PYTHONON_EXECUTOR_MAX_WAITING_PER_USER": "0",
            "PYTHONON_EXECUTOR_OUTPUT_BYTES": str(OUTPUT_BYTES),
        },
    }
    config = MeshConfig(port=0, data_dir=tmp_path_factory.mktemp("execute-stream"), service_env=service_env)
    with Mesh(config) as running:
        yield running


@pytest.fixture()
def client(mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.url, timeout=30) as http:
        yield http


@pytest.fixture()
def user(client: httpx.Client) -> dict:
    response = client.post("/api/register", json={"email": new_email("stream"), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.json()


def streamed(client: httpx.Client, user: dict, **body: object) -> list[dict]:
    """The events of a 200 stream, each line checked to be one JSON object with one known key."""
    response = client.post(STREAM, json=body, headers={"x-api-key": user["apiKey"]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.text.endswith("\n")
    events = [json.loads(line) for line in response.text.splitlines()]
    for event in events:
        assert len(event) == 1 and next(iter(event)) in ("stdout", "stderr", "result", "error"), event
    return events


def result_of(events: list[dict]) -> dict:
    """The one result, last, checked for execute's exact shape; the output events add up to it."""
    assert [index for index, event in enumerate(events) if "result" in event] == [len(events) - 1], events
    result = events[-1]["result"]
    assert set(result) == RESPONSE_FIELDS and EXECUTION_ID.match(result["executionId"]), result
    assert joined(events, "stdout") == result["output"]
    assert joined(events, "stderr") == result["error"]
    return result


def joined(events: list[dict], stream: str) -> str:
    return "".join(event[stream] for event in events if stream in event)


def bursts(events: list[dict]) -> list[tuple[str, str]]:
    """(stream, text) of the output events, consecutive pieces of one stream joined (a write may
    come in more than one event, e.g. print's text and its newline when they arrive apart)."""
    found: list[tuple[str, str]] = []
    for event in events:
        ((stream, text),) = event.items()
        if stream not in ("stdout", "stderr"):
            continue
        if found and found[-1][0] == stream:
            found[-1] = (stream, found[-1][1] + text)
        else:
            found.append((stream, text))
    return found


def executions_audited(client: httpx.Client, user: dict) -> list[dict]:
    response = client.get(
        "/api/v1/audit",
        params={"action": "executor.execute", "limit": 100},
        headers={"x-api-key": user["apiKey"]},
    )
    assert response.status_code == 200, response.text
    return response.json()["entries"]


def wait_for_records(client: httpx.Client, user: dict, seconds: float = 10) -> list[dict]:
    deadline = time.monotonic() + seconds
    while not (entries := executions_audited(client, user)):
        assert time.monotonic() < deadline, "the run was never recorded"
        time.sleep(0.2)
    return entries


# -- streaming -------------------------------------------------------------------------------------


def test_the_first_line_arrives_while_the_program_still_runs(mesh: Mesh, user: dict) -> None:
    arrivals: list[tuple[float, dict]] = []
    with httpx.Client(base_url=mesh.url, timeout=30) as http:
        started = time.monotonic()
        with http.stream(
            "POST", STREAM, json={"code": PRINT_SLEEP_PRINT}, headers={"x-api-key": user["apiKey"]}
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                arrivals.append((time.monotonic() - started, json.loads(line)))
    events = [event for _, event in arrivals]
    assert arrivals[0][0] < 1.0, f"the first line took {arrivals[0][0]:.2f} s"
    assert "first\n".startswith(arrivals[0][1]["stdout"]) and arrivals[0][1]["stdout"]
    # All of the first print before the program's sleep is over; the rest only after it.
    assert bursts([event for seconds, event in arrivals if seconds < 2.5]) == [("stdout", "first\n")]
    assert arrivals[-1][0] >= 3.0
    print(f"\nfirst line after {arrivals[0][0] * 1000:.0f} ms, the result after {arrivals[-1][0]:.2f} s")
    result = result_of(events)
    assert (result["output"], result["error"], result["exitCode"]) == ("first\nsecond\n", "", 0)
    assert result["durationMs"] >= 3000


def test_stdout_and_stderr_events_in_the_order_written_then_the_exit_code(
    client: httpx.Client, user: dict
) -> None:
    code = (
        "import sys, time\n"
        "print('out 1', flush=True)\ntime.sleep(0.3)\n"
        "print('err 1', file=sys.stderr, flush=True)\ntime.sleep(0.3)\n"
        "print('out 2', flush=True)\nsys.exit(3)"
    )
    events = streamed(client, user, code=code)
    assert bursts(events) == [("stdout", "out 1\n"), ("stderr", "err 1\n"), ("stdout", "out 2\n")]
    result = result_of(events)
    assert (result["exitCode"], result["timedOut"], result["truncated"]) == (3, False, False)


def test_stdin_language_and_a_run_with_no_output(client: httpx.Client, user: dict) -> None:
    events = streamed(client, user, code='read line; echo "got $line"', language="bash", stdin="abc\n")
    assert result_of(events)["output"] == "got abc\n"
    assert streamed(client, user, code="x = 1")[0]["result"]["output"] == ""


def test_the_output_cap_holds_for_what_is_streamed(client: httpx.Client, user: dict) -> None:
    code = "import time\nfor i in range(100):\n    print('x' * 99, flush=True)\n    time.sleep(0.005)"
    events = streamed(client, user, code=code)
    result = result_of(events)
    assert result["truncated"] is True
    assert result["output"] == ("x" * 99 + "\n") * (OUTPUT_BYTES // 100) + "x" * (OUTPUT_BYTES % 100)
    assert len(joined(events, "stdout").encode()) == OUTPUT_BYTES
    assert joined(events, "stderr").endswith(
        "[sandbox] output limit of 4 KiB per stream exceeded; the run was stopped\n"
    )


def test_timeout_as_for_execute(client: httpx.Client, user: dict) -> None:
    events = streamed(client, user, code="import time\nprint('begun', flush=True)\ntime.sleep(30)", timeout=1)
    result = result_of(events)
    assert bursts(events) == [("stdout", "begun\n"), ("stderr", "[sandbox] execution timed out after 1 s\n")]
    assert (result["timedOut"], result["exitCode"]) == (True, 137)
    assert result["error"] == "[sandbox] execution timed out after 1 s\n"


def test_secrets_reach_the_run_and_the_record_is_executes(client: httpx.Client, user: dict) -> None:
    value = f"value-{uuid.uuid4().hex}"
    response = client.put(
        "/api/v1/secrets/STREAM_TOKEN", json={"value": value}, headers={"x-api-key": user["apiKey"]}
    )
    assert response.status_code == 200, response.text
    code = "import os\nprint(os.environ['STREAM_TOKEN'][::-1])"
    result = result_of(streamed(client, user, code=code, secrets=["STREAM_TOKEN"]))
    assert result["output"] == value[::-1] + "\n"
    (entry,) = executions_audited(client, user)
    assert entry["resource"] == f"execution/{result['executionId']}"
    assert entry["outcome"] == "success"
    details = entry["details"]
    assert details["codeSha256"] == hashlib.sha256(code.encode()).hexdigest()
    assert details["secrets"] == ["STREAM_TOKEN"] and details["exitCode"] == 0
    text = json.dumps(entry)
    assert value not in text and value[::-1] not in text and "environ" not in text


# -- refusals before the first line ----------------------------------------------------------------


def test_refusals_keep_their_status_and_body(client: httpx.Client, user: dict) -> None:
    headers = {"x-api-key": user["apiKey"]}
    message = error_message(client.post(STREAM, json={"code": "  "}, headers=headers), 400, 3)
    assert message == "code must not be empty"
    message = error_message(client.post(STREAM, json={"code": "1", "timeout": 0}, headers=headers), 400, 3)
    assert message == "timeout must be more than 0 and at most 60 seconds"
    message = error_message(client.post(STREAM, json={"code": "1", "tmeout": 5}, headers=headers), 400, 3)
    assert message.startswith('unknown field "tmeout"')
    message = error_message(client.post(STREAM, json={"code": 5}, headers=headers), 400, 3)
    assert message.startswith("code:")
    error_message(client.post(STREAM, json={"code": "print(1)"}), 401, 16)
    bad_key = {"x-api-key": "po_" + "0" * 40}
    error_message(client.post(STREAM, json={"code": "print(1)"}, headers=bad_key), 401, 16)
    assert client.get(STREAM, headers=headers).status_code == 405
    assert executions_audited(client, user) == []


def test_a_second_run_of_a_busy_user_is_429_with_retry_after(mesh: Mesh, user: dict) -> None:
    headers = {"x-api-key": user["apiKey"]}
    with httpx.Client(base_url=mesh.url, timeout=30) as http:
        with http.stream("POST", STREAM, json={"code": PRINT_SLEEP_PRINT}, headers=headers) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            first = json.loads(next(lines))
            assert "stdout" in first  # the run has begun: it holds the user's one slot
            refused = http.post(STREAM, json={"code": "print('refused')"}, headers=headers)
            assert refused.json() == {
                "code": 8,
                "message": "the executor is busy; retry shortly",
                "details": [],
            }
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
                call = executor_pb2_grpc.ExecutorServiceStub(channel).ExecuteStream(
                    executor_pb2.ExecuteRequest(code="print('refused')"), metadata=headers.items(), timeout=10
                )
                with pytest.raises(grpc.RpcError) as exhausted:
                    list(call)
            assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert exhausted.value.details() == "the executor is busy; retry shortly"
            # A refused stream is trailers-only, so the delay comes with the status.
            assert int(dict(exhausted.value.trailing_metadata())["retry-after"]) >= 1
            rest = [json.loads(line) for line in lines]
    assert result_of([first, *rest])["output"] == "first\nsecond\n"


# -- the caller goes away --------------------------------------------------------------------------


def test_a_client_that_hangs_up_ends_the_run(mesh: Mesh, client: httpx.Client, user: dict) -> None:
    # The program becomes a process whose command line the host can see, then sleeps.
    marker = f"stream-marker-{uuid.uuid4().hex}"
    code = (
        "import os, sys\nprint('sleeping', flush=True)\n"
        f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(50)', {marker!r}])"
    )
    with httpx.Client(base_url=mesh.url, timeout=30) as http:
        with http.stream(
            "POST", STREAM, json={"code": code, "timeout": 55}, headers={"x-api-key": user["apiKey"]}
        ) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection
            assert "stdout" in json.loads(next(lines))
            wait_until_running(marker)
        hung_up = time.monotonic()
    print(f"\nthe sandboxed program was gone {seconds_until_gone(marker, hung_up):.2f} s after the hang-up")
    (entry,) = wait_for_records(client, user)
    assert (entry["outcome"], entry["details"]["reason"]) == ("cancelled", "caller_gone")
    assert marker not in json.dumps(entry)


# -- native gRPC on the same port ------------------------------------------------------------------


def test_native_grpc_gets_the_same_stream(mesh: Mesh, user: dict) -> None:
    metadata = [("x-api-key", user["apiKey"])]
    with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        started = time.monotonic()
        call = stub.ExecuteStream(
            executor_pb2.ExecuteRequest(code=PRINT_SLEEP_PRINT), metadata=metadata, timeout=30
        )
        first = next(call)
        assert time.monotonic() - started < 1.0 and first.WhichOneof("event") == "stdout"
        events = [first, *call]
        assert call.code() == grpc.StatusCode.OK
        kinds = [event.WhichOneof("event") for event in events]
        assert set(kinds[:-1]) == {"stdout"} and kinds[-1] == "result"
        assert "".join(event.stdout for event in events) == "first\nsecond\n"
        result = events[-1].result
        assert (result.output, result.error, result.exit_code) == ("first\nsecond\n", "", 0)
        assert EXECUTION_ID.match(result.execution_id)

        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ExecuteStream(executor_pb2.ExecuteRequest(code=""), metadata=metadata, timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "code must not be empty"
        with pytest.raises(grpc.RpcError) as anonymous:
            list(stub.ExecuteStream(executor_pb2.ExecuteRequest(code="print(1)"), timeout=30))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- a failure after the first line ----------------------------------------------------------------


def test_a_failure_after_the_first_line_is_the_last_line(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    """The audit log cannot confirm the run's record in time: execute would answer 503; a stream
    has already sent output (and its 200), so the 503's status is its last line, and no result."""
    os.kill(mesh.pids["audit"], signal.SIGSTOP)
    resume = threading.Timer(RECORD_DEADLINE_SECONDS + 3, os.kill, (mesh.pids["audit"], signal.SIGCONT))
    resume.start()
    try:
        events = streamed(client, user, code="print('ran')")
    finally:
        resume.join()
    assert bursts(events) == [("stdout", "ran\n")] and "error" in events[-1]
    assert not any("result" in event for event in events)
    error = events[-1]["error"]
    assert set(error) == {"code", "message", "details"} and (error["code"], error["details"]) == (14, [])
    assert error["message"].startswith("the code ran, but the audit log could not confirm its record")
    # The run did run, and is recorded once the audit service is back.
    (entry,) = wait_for_records(client, user)
    assert entry["outcome"] == "success" and entry["resource"].removeprefix("execution/") in error["message"]
