"""The generator's parts on their own: settings, the answer's validation, the system prompt, and the
SDK client against the local Messages API stand-in (the whole path through Envoy is in
tests/integration/test_generate_api.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from services.generator.instructions import RunFacts, system_prompt
from services.generator.model import ClaudeCodeWriter, ModelTimeout, parse_answer, retry_after_seconds
from services.generator.settings import GeneratorSettings
from services.generator.user_packages import package_name
from services.platform.errors import ResourceExhausted, Unavailable
from services.platform.settings import Environment, SettingsError
from tests.anthropic_stub import Reply, error, running_stub, structured_answer

WIRING = {
    "PYTHONON_EXECUTOR_ADDRESS": "127.0.0.1:1",
    "PYTHONON_SECRETS_ADDRESS": "127.0.0.1:2",
    "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:3",
    "PYTHONON_PACKAGES_ADDRESS": "127.0.0.1:4",
}


def test_without_a_key_the_settings_say_not_configured_and_no_repr_shows_a_key() -> None:
    assert GeneratorSettings.load(Environment(WIRING)).api_key is None
    configured = GeneratorSettings.load(Environment({**WIRING, "ANTHROPIC_API_KEY": "sk-ant-secret"}))
    assert configured.api_key == "sk-ant-secret" and configured.model == "claude-sonnet-5-5"
    assert "sk-ant-secret" not in repr(configured) and "sk-ant-secret" not in str(configured)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ANTHROPIC_BASE_URL": "ftp://x"}, "ANTHROPIC_BASE_URL must be an http:// or https:// URL"),
        (
            {"PYTHONON_GENERATOR_MODEL": "two words"},
            "PYTHONON_GENERATOR_MODEL must be a model name such as claude-sonnet-5-5",
        ),
        (
            {"PYTHONON_GENERATOR_TIMEOUT_SECONDS": "0"},
            "PYTHONON_GENERATOR_TIMEOUT_SECONDS must be at least 1, got 0",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(extra: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        GeneratorSettings.load(Environment({**WIRING, **extra}))
    assert str(refused.value) == message


def _message(answer: object, *, stop_reason: str = "end_turn", text: str | None = None) -> SimpleNamespace:
    """A message as the SDK gives a structured output: a thinking block, then the answer's JSON."""
    blocks = [
        SimpleNamespace(type="thinking", thinking="", signature="sig"),
        SimpleNamespace(type="text", text=json.dumps(answer) if text is None else text),
    ]
    return SimpleNamespace(
        content=blocks,
        stop_reason=stop_reason,
        model="m-1",
        usage=SimpleNamespace(input_tokens=5, output_tokens=7),
    )


def test_a_valid_answer_is_cleaned() -> None:
    answer = parse_answer(
        _message(
            {
                "code": "print(1)",
                "packages": [" numpy>=2 ", "numpy>=2", "requests[socks]"],
                "explanation": " x ",
            }
        )
    )
    assert (answer.code, answer.packages, answer.explanation) == (
        "print(1)",
        ["numpy>=2", "requests[socks]"],
        "x",
    )
    assert (answer.model, answer.usage.input_tokens, answer.usage.output_tokens) == ("m-1", 5, 7)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (["code"], "it is not a JSON object"),
        ({"code": "", "packages": [], "explanation": ""}, "code is missing or empty"),
        ({"code": "a\x00b", "packages": [], "explanation": ""}, "code contains NUL characters"),
        ({"code": "x", "packages": [1], "explanation": ""}, "packages is not a list of strings"),
        ({"code": "x", "packages": ["pkg"] * 51, "explanation": ""}, "more than 50 packages"),
        (
            {"code": "x", "packages": ["git+https://example.invalid/x"], "explanation": ""},
            "a package is not a PEP 508 name and version",
        ),
        (
            {"code": "x", "packages": ["./local"], "explanation": ""},
            "a package is not a PEP 508 name and version",
        ),
        ({"code": "x", "packages": [], "explanation": None}, "explanation is not a string"),
    ],
)
def test_a_malformed_answer_is_unavailable_saying_why(answer: object, why: str) -> None:
    with pytest.raises(Unavailable) as refused:
        parse_answer(_message(answer))
    assert refused.value.message == f"the model's answer was malformed ({why}); retry"


@pytest.mark.parametrize(
    ("message", "said"),
    [
        (
            _message(None, text='{"code": "print(1)"'),
            "the model's answer was malformed (its text is not JSON); retry",
        ),
        (_message(None, text=" "), "the model's answer was malformed (it holds no text); retry"),
        (
            _message(None, text='{"code": "pri', stop_reason="max_tokens"),
            "the model's answer was malformed (it ran out of tokens); retry",
        ),
        (
            _message(None, text="", stop_reason="refusal"),
            "the model declined to write this program; change the prompt",
        ),
    ],
    ids=["not-json", "no-text", "max-tokens", "refusal"],
)
def test_an_answer_that_is_not_the_structured_output_is_unavailable_saying_why(
    message: SimpleNamespace, said: str
) -> None:
    with pytest.raises(Unavailable) as refused:
        parse_answer(message)
    assert refused.value.message == said


@pytest.mark.parametrize(
    ("value", "seconds"), [("17", 17), ("0.2", 1), ("2.5", 3), (None, 1), ("soon", 1), ("inf", 1)]
)
def test_retry_after_is_whole_seconds_of_at_least_one(value: str | None, seconds: int) -> None:
    assert retry_after_seconds(value) == seconds


def test_package_names_are_normalised() -> None:
    assert [package_name(s) for s in ("Requests[socks]>=2", "zope.interface", "Foo_Bar==1")] == [
        "requests",
        "zope-interface",
        "foo-bar",
    ]


def _facts(language: str, **changes: object) -> RunFacts:
    base = RunFacts(
        language, "20.19.2", 5, 256 << 20, 64, 1 << 20, 16 << 20, 64 << 20, ("numpy",), ("TOKEN",)
    )
    return RunFacts(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_the_prompt_for_javascript_reads_secrets_its_way_and_lists_no_packages() -> None:
    prompt = system_prompt(_facts("javascript"))
    assert "Language: JavaScript, run by Node.js 20.19.2." in prompt
    assert "(e.g. process.env.NAME)" in prompt and "named: TOKEN." in prompt
    assert "list no packages" in prompt and "numpy" not in prompt
    assert "Limits: 5 seconds of wall-clock time, 256 MiB of memory, 64 processes, 1 MiB of output" in prompt


def test_the_prompt_without_secrets_or_a_known_version_says_so() -> None:
    prompt = system_prompt(_facts("python", runtime_version="", secret_names=()))
    assert "Language: Python, run by CPython." in prompt
    assert "The user has no stored secrets" in prompt
    assert "Installed third-party packages (importable): numpy." in prompt


def _writer(url: str, key: str = "sk-ant-unit", *, retries: int = 2, timeout: float = 5) -> ClaudeCodeWriter:
    return ClaudeCodeWriter(
        key, "claude-x", base_url=url, max_tokens=512, timeout_seconds=timeout, max_retries=retries
    )


def test_the_client_passes_429_on_at_once_and_never_logs_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_stub("sk-ant-unit") as stub:
        stub.reply(error(429, headers={"retry-after": "9"}))
        writer = _writer(stub.url)

        async def go() -> None:
            try:
                with pytest.raises(ResourceExhausted) as limited:
                    await writer.write("system", "prompt")
                assert limited.value.retry_after == 9
                answer = await writer.write("system", "prompt")  # the stub's default answer
                assert answer.code == "print('hello')\n" and answer.model == "claude-x"
            finally:
                await writer.close()

        asyncio.run(go())
        assert len(stub.requests) == 2
    assert "sk-ant-unit" not in caplog.text


def test_the_client_retries_overload_then_gives_503_and_a_slow_model_504() -> None:
    with running_stub("k") as stub:

        async def go() -> None:
            writer = _writer(stub.url, "k", retries=1)
            stub.reply(error(529), error(529))
            with pytest.raises(Unavailable):
                await writer.write("s", "p")
            assert len(stub.requests) == 2
            slow = structured_answer({"code": "x", "packages": [], "explanation": ""})
            stub.reply(Reply(slow.status, slow.body, delay_seconds=3))
            quick = _writer(stub.url, "k", retries=0, timeout=1)
            with pytest.raises(ModelTimeout):
                await quick.write("s", "p")
            await writer.close()
            await quick.close()

        asyncio.run(go())


def test_a_generator_without_an_api_key_never_imports_the_sdk() -> None:
    """About 30 MiB of an idle mesh's memory: the SDK is imported only where a key is configured."""
    import subprocess
    import sys

    probe = "import sys, services.generator.__main__; print('anthropic' in sys.modules)"
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert answer.stdout.strip() == "False"
