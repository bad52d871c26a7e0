"""POST /api/v1/generate through Envoy, in a whole mesh whose generator uses the real Anthropic SDK
pointed (ANTHROPIC_BASE_URL) at a local stand-in for the Messages API (tests/anthropic_stub.py): the
exact request the SDK sent, the run through the executor, every error mapping, the audit record, and
the API key in no answer, log or audit entry. A second mesh without a key: 503 and /health."""

from __future__ import annotations

import json
import platform
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.generator.instructions import RunFacts, system_prompt
from services.generator.model import OUTPUT_CONFIG
from services.generator.settings import DEFAULT_MODEL
from services.runner.mesh import Mesh, MeshConfig
from tests.anthropic_stub import (
    AnthropicStub,
    error,
    presented_key,
    running_stub,
    structured_answer,
    text_answer,
    tool_answer,
)
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, error_message, new_email

API_KEY = f"sk-ant-test-{uuid.uuid4().hex}"
MODEL_TIMEOUT_SECONDS = 4
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def stub() -> Iterator[AnthropicStub]:
    with running_stub(API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def mesh(stub: AnthropicStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh whose generator has a key and talks to the stub (the runner passes ANTHROPIC_* on)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANTHROPIC_API_KEY", API_KEY)
        patch.setenv("ANTHROPIC_BASE_URL", stub.url)
        config = MeshConfig(
            port=0,
            data_dir=tmp_path_factory.mktemp("generate"),
            service_env={
                **GENEROUS_LIMITS,
                "generator": {"PYTHONON_GENERATOR_TIMEOUT_SECONDS": str(MODEL_TIMEOUT_SECONDS)},
            },
        )
        with Mesh(config) as running:
            yield running


@pytest.fixture()
def client(mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.url, timeout=60) as http:
        yield http


def user_of(client: httpx.Client) -> dict:
    response = client.post("/api/register", json={"email": new_email("gen"), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture()
def user(client: httpx.Client) -> dict:
    return user_of(client)


def _generate(client: httpx.Client, user: dict, **body: object) -> httpx.Response:
    return client.post("/api/v1/generate", json=body, headers={"x-api-key": user["apiKey"]})


def _answer(code: str, packages: list[str] | None = None, explanation: str = "Does it.") -> dict:
    return {"code": code, "packages": packages or [], "explanation": explanation}


def _audit(client: httpx.Client, user: dict, action: str) -> list[dict]:
    page = client.get("/api/v1/audit", params={"limit": 100}, headers={"x-api-key": user["apiKey"]})
    assert page.status_code == 200, page.text
    return [entry for entry in page.json()["entries"] if entry["action"] == action]


def test_the_model_is_told_the_facts_and_answers_in_the_structured_output(
    client: httpx.Client, user: dict, stub: AnthropicStub
) -> None:
    for name, value in (("API_TOKEN", "tok-value-1"), ("DB_PASSWORD", "db-value-2")):
        put = client.put(
            f"/api/v1/secrets/{name}", json={"value": value}, headers={"x-api-key": user["apiKey"]}
        )
        assert put.status_code == 200, put.text
    stub.reply(structured_answer(_answer("import requests\nprint(1)\n", ["requests>=2"], "Prints one.")))
    before = len(stub.requests)
    prompt = "print the number one, using requests"

    response = _generate(client, user, prompt=prompt, language="py")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "code": "import requests\nprint(1)\n",
        "language": "python",
        "packages": ["requests>=2"],
        "model": DEFAULT_MODEL,
        "output": "",
        "error": "",
        "exitCode": 0,
        "explanation": "Prints one.",
    }
    sent = stub.requests[before:]
    assert len(sent) == 1
    request = sent[0]
    assert request.path == "/v1/messages"
    assert presented_key(request.headers) == API_KEY and request.headers["anthropic-version"]
    expected_system = system_prompt(
        RunFacts(
            language="python",
            runtime_version=platform.python_version(),  # the sandbox runs this interpreter
            timeout_seconds=10,
            memory_bytes=256 * MiB,
            processes=64,
            output_bytes=1 * MiB,
            file_bytes=16 * MiB,
            tmp_bytes=64 * MiB,
            packages=(),
            secret_names=("API_TOKEN", "DB_PASSWORD"),
        )
    )
    assert request.body == {
        "model": DEFAULT_MODEL,
        "max_tokens": 8192,
        "system": expected_system,
        "messages": [{"role": "user", "content": prompt}],
        "output_config": OUTPUT_CONFIG,
    }
    assert OUTPUT_CONFIG["format"]["schema"]["required"] == ["code", "packages", "explanation"]
    # What that prompt says, in its own words (not only "what the code builds").
    system = request.body["system"]
    assert f"Language: Python, run by CPython {platform.python_version()}." in system
    assert "no network access at all" in system
    assert "Limits: 10 seconds of wall-clock time, 256 MiB of memory, 64 processes, 1 MiB of output" in system
    assert "environment variables named: API_TOKEN, DB_PASSWORD." in system
    assert "No third-party packages are installed." in system
    wire = json.dumps(request.body)
    assert "tok-value-1" not in wire and "db-value-2" not in wire  # names, never values


def test_execute_runs_the_code_with_the_users_secrets_and_is_audited(
    client: httpx.Client, user: dict, stub: AnthropicStub
) -> None:
    put = client.put(
        "/api/v1/secrets/GREETING", json={"value": "hi there"}, headers={"x-api-key": user["apiKey"]}
    )
    assert put.status_code == 200
    code = (
        "import os\nprint(os.environ['GREETING'])\nimport sys\nprint('warn', file=sys.stderr)\nsys.exit(3)\n"
    )
    stub.reply(structured_answer(_answer(code), input_tokens=1111, output_tokens=222))
    prompt = "print my GREETING secret " + "x" * 100

    response = _generate(client, user, prompt=prompt, execute=True, timeout=5)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["output"], body["error"], body["exitCode"]) == ("hi there\n", "warn\n", 3)
    assert body["code"] == code
    [generation] = _audit(client, user, "generator.generate")
    [execution] = _audit(client, user, "executor.execute")
    details = generation["details"]
    assert generation["outcome"] == "success" and generation["resource"].startswith("generation/")
    assert details["promptBytes"] == len(prompt) and len(details["promptSha256"]) == 64
    assert details["model"] == DEFAULT_MODEL
    assert (details["inputTokens"], details["outputTokens"]) == (1111, 222)
    assert details["ran"] is True and details["execute"] is True
    assert execution["resource"] == f"execution/{details['executionId']}"
    assert execution["details"]["secrets"] == ["GREETING"]
    entries = json.dumps(_audit(client, user, "generator.generate"))
    assert "print my GREETING" not in entries and "os.environ" not in entries and API_KEY not in entries


def test_the_runs_timeout_is_honoured(client: httpx.Client, user: dict, stub: AnthropicStub) -> None:
    stub.reply(structured_answer(_answer("import time\nprint('start', flush=True)\ntime.sleep(30)\n")))
    started = time.monotonic()
    response = _generate(client, user, prompt="sleep a while", execute=True, timeout=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output"] == "start\n" and body["exitCode"] == 137
    assert time.monotonic() - started < 10


def test_without_execute_nothing_runs(client: httpx.Client, user: dict, stub: AnthropicStub) -> None:
    stub.reply(structured_answer(_answer("print('never')\n")))
    response = _generate(client, user, prompt="print never")
    assert response.status_code == 200 and response.json()["output"] == ""
    assert _audit(client, user, "executor.execute") == []
    [generation] = _audit(client, user, "generator.generate")
    assert generation["details"]["ran"] is False and generation["details"]["executionId"] == ""


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ({"prompt": ""}, 400, 3, "prompt must not be empty"),
        ({"prompt": "   \n"}, 400, 3, "prompt must not be empty"),
        ({"prompt": "x" * (32 * 1024 + 1)}, 400, 3, "prompt is larger than 32 KiB (32769 bytes)"),
        (
            {"prompt": "hello", "language": "cobol"},
            400,
            3,
            "unknown language 'cobol'; use one of python, javascript, bash",
        ),
        ({"prompt": "hello", "timeout": 61}, 400, 3, "timeout must be more than 0 and at most 60 seconds"),
    ],
    ids=["empty", "blank", "oversized", "language", "timeout"],
)
def test_bad_requests_are_refused_before_the_model_is_asked(
    client: httpx.Client, user: dict, stub: AnthropicStub, body: dict, status: int, code: int, message: str
) -> None:
    before = len(stub.requests)
    assert error_message(_generate(client, user, **body), status, code) == message
    assert len(stub.requests) == before


def test_install_packages_adds_what_the_code_needs_and_the_prompt_names_the_users_packages(
    client: httpx.Client, user: dict, stub: AnthropicStub
) -> None:
    headers = {"x-api-key": user["apiKey"]}
    stub.reply(structured_answer(_answer("import six\n", ["six==1.16.0"])))
    response = _generate(client, user, prompt="use six", installPackages=True)
    assert response.status_code == 200, response.text
    assert response.json()["packages"] == ["six==1.16.0"]  # what the user lacked
    listed = client.get("/api/v1/packages", headers=headers).json()["packages"]
    assert [package["name"] for package in listed] == ["six"]
    [generation] = _audit(client, user, "generator.generate")
    assert generation["details"]["installed"] == ["six==1.16.0"]
    [added] = _audit(client, user, "packages.add")
    assert (added["resource"], added["outcome"], added["details"]) == (
        "package/six",
        "success",
        {"package": "six==1.16.0"},
    )

    stub.reply(structured_answer(_answer("import six\n", ["six==1.16.0"])))
    again = _generate(client, user, prompt="use six again")
    assert again.status_code == 200 and again.json()["packages"] == []  # the user has it now
    assert "Installed third-party packages (importable): six==1.16.0." in stub.requests[-1].body["system"]

    # Installed and run in one call: the run waits for the new package's build, then imports it.
    newcomer = user_of(client)
    stub.reply(structured_answer(_answer("import six\nprint(six.__version__)\n", ["six==1.16.0"])))
    ran = _generate(client, newcomer, prompt="print six's version", installPackages=True, execute=True)
    assert ran.status_code == 200, ran.text
    assert (ran.json()["output"], ran.json()["exitCode"], ran.json()["packages"]) == (
        "1.16.0\n",
        0,
        ["six==1.16.0"],
    )


def test_exactly_32_kib_is_accepted(client: httpx.Client, user: dict, stub: AnthropicStub) -> None:
    assert _generate(client, user, prompt="y" * (32 * 1024)).status_code == 200


def test_the_models_429_is_passed_on_with_its_retry_after_at_once(
    client: httpx.Client, user: dict, stub: AnthropicStub
) -> None:
    stub.reply(error(429, "Number of request tokens has exceeded your rate limit", {"retry-after": "17"}))
    before = len(stub.requests)
    response = _generate(client, user, prompt="hello")
    message = error_message(response, 429, 8)
    assert message == "the model's rate limit is reached; retry after the time Retry-After gives"
    assert response.headers["retry-after"] == "17"
    assert len(stub.requests) == before + 1  # not waited out and retried
    [failure] = _audit(client, user, "generator.generate")
    assert failure["outcome"] == "failure" and failure["details"]["reason"] == "resource_exhausted"


@pytest.mark.parametrize("status", [529, 500])
def test_overloaded_or_failing_after_the_sdks_retries_is_503(
    client: httpx.Client, user: dict, stub: AnthropicStub, status: int
) -> None:
    stub.reply(error(status), error(status), error(status))
    before = len(stub.requests)
    message = error_message(_generate(client, user, prompt="hello"), 503, 14)
    assert message == "the model is overloaded or unavailable right now; retry later"
    assert len(stub.requests) == before + 3  # the first try and the SDK's two retries


def test_a_retry_that_succeeds_answers_200(client: httpx.Client, user: dict, stub: AnthropicStub) -> None:
    stub.reply(error(529), structured_answer(_answer("print(2)\n")))
    response = _generate(client, user, prompt="print two")
    assert response.status_code == 200 and response.json()["code"] == "print(2)\n"


def test_a_model_that_does_not_answer_in_time_is_504(
    client: httpx.Client, user: dict, stub: AnthropicStub
) -> None:
    slow = structured_answer(_answer("print(3)\n"))
    stub.reply(type(slow)(slow.status, slow.body, slow.headers, delay_seconds=MODEL_TIMEOUT_SECONDS + 3))
    started = time.monotonic()
    message = error_message(_generate(client, user, prompt="hello"), 504, 4)
    assert message == f"the model did not answer within {MODEL_TIMEOUT_SECONDS} seconds; retry"
    assert MODEL_TIMEOUT_SECONDS - 0.5 < time.monotonic() - started < MODEL_TIMEOUT_SECONDS + 3


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (structured_answer({"packages": [], "explanation": "no code"}), "code is missing or empty"),
        (structured_answer({"code": 42, "packages": [], "explanation": ""}), "code is missing or empty"),
        (
            structured_answer({"code": "print(1)", "packages": "numpy", "explanation": ""}),
            "packages is not a list of strings",
        ),
        (
            structured_answer({"code": "print(1)", "packages": ["--index-url http://x"], "explanation": ""}),
            "a package is not a PEP 508 name and version",
        ),
        (structured_answer({"code": "print(1)", "packages": []}), "explanation is not a string"),
        (text_answer("Here is your code: print(1)"), "its text is not JSON"),
        (text_answer("[1, 2]"), "it is not a JSON object"),
        (tool_answer(_answer("print(1)")), "it holds no text"),
        (text_answer("print(", stop_reason="max_tokens"), "it ran out of tokens"),
    ],
    ids=[
        "no-code",
        "code-not-text",
        "packages-not-list",
        "package-option",
        "no-explanation",
        "text-not-json",
        "not-an-object",
        "a-tool-call",
        "max-tokens",
    ],  # fmt: skip
)
def test_a_malformed_answer_is_a_clear_503(
    client: httpx.Client, user: dict, stub: AnthropicStub, reply: object, why: str
) -> None:
    stub.reply(reply)  # type: ignore[arg-type]
    message = error_message(_generate(client, user, prompt="hello", execute=True), 503, 14)
    assert message == f"the model's answer was malformed ({why}); retry"
    assert _audit(client, user, "executor.execute") == []


def test_a_refused_key_is_503_and_the_key_appears_nowhere(
    client: httpx.Client, user: dict, stub: AnthropicStub, mesh: Mesh
) -> None:
    stub.reply(error(401, "invalid x-api-key"))
    response = _generate(client, user, prompt="hello")
    message = error_message(response, 503, 14)
    assert message == (
        "generation is unavailable: the model API refused this server's credentials; "
        "the operator must check ANTHROPIC_API_KEY"
    )
    assert API_KEY not in response.text
    stub.reply(error(400, "messages: text content blocks must be non-empty"))
    assert error_message(_generate(client, user, prompt="hello"), 503, 14) == (
        "generation failed: the model API refused the request (invalid_request_error); retry later"
    )
    logs = b"".join(path.read_bytes() for path in Path(mesh.config.data_dir).rglob("*.log"))
    assert b"pythonon.generator" in logs or b"generator" in logs  # the generator's log is there
    assert API_KEY.encode() not in logs


def test_health_reports_the_generator_ok_when_configured(client: httpx.Client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["services"]["generator"] == "ok"


def test_without_a_key_the_generator_runs_unconfigured(tmp_path: Path, stub: AnthropicStub) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("ANTHROPIC_API_KEY", raising=False)
        patch.setenv("ANTHROPIC_BASE_URL", stub.url)
        with (
            Mesh(MeshConfig(port=0, data_dir=tmp_path / "mesh")) as unconfigured,
            httpx.Client(base_url=unconfigured.url, timeout=30) as client,
        ):
            health = client.get("/health")
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "ok"
            assert health.json()["services"]["generator"] == "not_configured"
            key = client.post(
                "/api/register", json={"email": new_email("nokey"), "password": PASSWORD}
            ).json()["apiKey"]
            before = len(stub.requests)
            for body in (
                {"prompt": "hello", "execute": True},
                {"prompt": ""},
                {"prompt": "x", "language": "cobol"},
            ):
                response = client.post("/api/v1/generate", json=body, headers={"x-api-key": key})
                assert (
                    error_message(response, 503, 14) == "generation is not configured: set ANTHROPIC_API_KEY"
                )
            assert len(stub.requests) == before
            entries = client.get("/api/v1/audit", headers={"x-api-key": key}).json()["entries"]
            assert [e for e in entries if e["action"].startswith("generator")] == []
