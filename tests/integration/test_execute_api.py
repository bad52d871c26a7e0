"""POST /api/v1/execute through Envoy on a whole mesh, as curl would use it: the response's shape,
stdin, exit codes and stderr, each language the host offers, every refusal with its message, the
user's secrets in the run's environment, every run in the audit log (a digest of the code, never
the code, its input, its output or a secret), and native gRPC on the same port."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import uuid

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.runner.mesh import Mesh
from tests.integration.conftest import data_dir_of, error_message

LANGUAGES = ("python", "javascript", "bash")
EXECUTION_ID = re.compile(r"^[0-9a-f]{32}$")
RESPONSE_FIELDS = {"output", "error", "exitCode", "durationMs", "timedOut", "truncated", "executionId"}


def execute(client: httpx.Client, user: dict, **body: object) -> httpx.Response:
    return client.post("/api/v1/execute", json=body, headers={"x-api-key": user["apiKey"]})


def ran(response: httpx.Response) -> dict:
    """The ExecuteResponse of a 200, checked for its exact shape."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == RESPONSE_FIELDS, body
    assert EXECUTION_ID.match(body["executionId"]), body
    assert isinstance(body["durationMs"], int) and body["durationMs"] >= 0
    return body


def put_secret(client: httpx.Client, user: dict, name: str, value: str) -> None:
    response = client.put(
        f"/api/v1/secrets/{name}", json={"value": value}, headers={"x-api-key": user["apiKey"]}
    )
    assert response.status_code == 200, response.text


def audit_list(client: httpx.Client, user: dict) -> httpx.Response:
    response = client.get("/api/v1/audit", params={"limit": 500}, headers={"x-api-key": user["apiKey"]})
    assert response.status_code == 200, response.text
    return response


def executions_audited(client: httpx.Client, user: dict) -> list[dict]:
    """The user's executor.execute entries, oldest first."""
    entries = audit_list(client, user).json()["entries"]
    return [e for e in reversed(entries) if e["action"] == "executor.execute"]


def info(client: httpx.Client) -> dict:
    response = client.get("/api/info")
    assert response.status_code == 200, response.text
    return response.json()


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"


# -- running code ----------------------------------------------------------------------------------


def test_python_is_the_default_and_answers_with_the_whole_response(client: httpx.Client, user: dict) -> None:
    body = ran(execute(client, user, code="print('hello, world')"))
    assert body == {
        "output": "hello, world\n",
        "error": "",
        "exitCode": 0,
        "durationMs": body["durationMs"],
        "timedOut": False,
        "truncated": False,
        "executionId": body["executionId"],
    }
    again = ran(execute(client, user, code="print('hello, world')", language="python"))
    assert again["output"] == "hello, world\n" and again["executionId"] != body["executionId"]


def test_stdin_is_delivered(client: httpx.Client, user: dict) -> None:
    code = "import sys\nlines = sys.stdin.read().splitlines()\nprint(len(lines), lines[-1].upper())"
    body = ran(execute(client, user, code=code, stdin="first line\nsecond, ünïcode ✓\n"))
    assert (body["output"], body["error"], body["exitCode"]) == ("2 SECOND, ÜNÏCODE ✓\n", "", 0)


def test_without_stdin_the_program_reads_end_of_file(client: httpx.Client, user: dict) -> None:
    body = ran(execute(client, user, code="import sys\nprint(repr(sys.stdin.read()))"))
    assert (body["output"], body["exitCode"]) == ("''\n", 0)


@pytest.mark.parametrize("status", [0, 1, 3, 42, 255])
def test_the_exit_code_is_propagated(client: httpx.Client, user: dict, status: int) -> None:
    body = ran(execute(client, user, code=f"import sys\nprint('before')\nsys.exit({status})"))
    assert (body["output"], body["error"], body["exitCode"], body["timedOut"]) == (
        "before\n",
        "",
        status,
        False,
    )


def test_an_exception_is_reported_on_stderr_with_exit_code_1(client: httpx.Client, user: dict) -> None:
    code = "print('partial')\ndef fail():\n    raise ValueError('boom: ' + 'x' * 3)\nfail()\n"
    body = ran(execute(client, user, code=code))
    assert body["output"] == "partial\n"
    assert body["exitCode"] == 1 and body["timedOut"] is False
    assert body["error"].startswith("Traceback (most recent call last):\n")
    assert 'File "/workspace/main.py", line 4, in <module>' in body["error"]
    assert 'File "/workspace/main.py", line 3, in fail' in body["error"]
    assert body["error"].endswith("ValueError: boom: xxx\n")


def test_stdout_and_stderr_are_kept_apart(client: httpx.Client, user: dict) -> None:
    code = "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nprint('out again')"
    body = ran(execute(client, user, code=code))
    assert (body["output"], body["error"], body["exitCode"]) == ("to out\nout again\n", "to err\n", 0)


HELLO = {
    "python": "import sys\nprint('hi', sys.stdin.read().strip(), len('ü'))\nsys.exit(4)",
    "javascript": (
        "const input = require('fs').readFileSync(0, 'utf8').trim();\n"
        "console.log('hi', input, 'ü'.length);\nconsole.error('to err');\nprocess.exit(4);"
    ),
    "bash": 'read -r line\necho hi "$line" ${#WORD}\necho to err >&2\nexit 4',
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_language_the_host_offers_runs(client: httpx.Client, user: dict, language: str) -> None:
    offered = info(client)["languages"]
    if language not in offered:
        pytest.skip(f"{language} is not offered on this host (GET /api/info lists {', '.join(offered)})")
    body = ran(
        execute(client, user, code=HELLO[language], language=language, stdin="there\n", env={"WORD": "ü"})
    )
    assert (body["output"], body["exitCode"], body["timedOut"]) == ("hi there 1\n", 4, False), body
    if language != "python":
        assert body["error"] == "to err\n"


def test_every_runtime_installed_on_this_host_is_offered(client: httpx.Client) -> None:
    """/api/info lists what the executor can run; a runtime present on the host but missing there means
    its sandbox could not start under the mesh."""
    offered = info(client)["languages"]
    assert "python" in offered
    installed = {"javascript": shutil.which("node"), "bash": shutil.which("bash")}
    missing = [language for language, path in installed.items() if path and language not in offered]
    assert missing == [], f"installed here but not offered by the executor: {missing} (offered: {offered})"


def test_info_names_each_runtime_version_and_alias_and_an_alias_runs(
    client: httpx.Client, user: dict
) -> None:
    runtimes = {runtime["language"]: runtime for runtime in info(client)["runtimes"]}
    assert sorted(runtimes) == sorted(info(client)["languages"])
    python = runtimes["python"]
    assert python["version"] == ".".join(map(str, sys.version_info[:3]))  # the sandbox's is this base's
    assert {"py", "python3"} <= set(python["aliases"])
    for alias in ("py", "python3"):
        assert ran(execute(client, user, code="print(6 * 7)", language=alias))["output"] == "42\n"
    if "javascript" in runtimes:
        assert re.fullmatch(r"\d+\.\d+\.\d+", runtimes["javascript"]["version"])
        assert {"js", "node"} <= set(runtimes["javascript"]["aliases"])
        for alias in ("js", "node"):
            assert ran(execute(client, user, code="console.log(6 * 7)", language=alias))["output"] == "42\n"
        assert ran(execute(client, user, code="console.log(process.versions.node)", language="node"))[
            "output"
        ] == (runtimes["javascript"]["version"] + "\n")
    if "bash" in runtimes:
        assert "sh" in runtimes["bash"]["aliases"]
        assert ran(execute(client, user, code="echo $((6 * 7))", language="sh"))["output"] == "42\n"
        assert re.fullmatch(r"\d+\.\d+\.\d+", runtimes["bash"]["version"])
        bash_version = ran(
            execute(
                client,
                user,
                code='echo "${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}.${BASH_VERSINFO[2]}"',
                language="bash",
            )
        )
        assert bash_version["output"] == runtimes["bash"]["version"] + "\n"


def test_a_language_this_host_lacks_is_400(client: httpx.Client, user: dict) -> None:
    offered = info(client)["languages"]
    lacking = [language for language in LANGUAGES if language not in offered]
    if not lacking:
        # tests/integration/test_execute_gvisor.py refuses one its executor is told to leave out.
        pytest.skip("every language is available on this host")
    message = error_message(execute(client, user, code="1", language=lacking[0]), 400, 3)
    assert message == f"{lacking[0]} is not available on this server; available: {', '.join(offered)}"


def test_an_output_the_json_printer_escapes_is_answered_whole(client: httpx.Client, user: dict) -> None:
    """'<' is printed as \\u003c (six bytes) in JSON: a 300 000-character output, under the 1 MiB
    cap, makes a REST body of about 1.8 MB."""
    body = ran(execute(client, user, code="print('<' * 300_000)"))
    assert body["output"] == "<" * 300_000 + "\n"
    assert body["truncated"] is False


def test_an_output_of_exactly_the_cap_is_answered_whole(client: httpx.Client, user: dict) -> None:
    """1 MiB on stdout is the most a run may print (DESIGN §6): it is not truncated, and the edge must
    be able to answer it."""
    body = ran(execute(client, user, code="print('x' * ((1 << 20) - 1))"))
    assert len(body["output"]) == 1 << 20 and body["output"] == "x" * ((1 << 20) - 1) + "\n"
    assert (body["truncated"], body["error"], body["exitCode"]) == (False, "", 0)


def test_output_that_is_not_utf8_is_replaced_and_kept_within_the_cap(
    client: httpx.Client, user: dict
) -> None:
    """1 MiB of bytes that are not UTF-8 on each stream: each becomes U+FFFD (three bytes), so the text
    is cut again to 1 MiB and the run says so, instead of an answer too large for the transport."""
    code = (
        "import sys\nfor s in (sys.stdout, sys.stderr):\n    s.buffer.write(b'\\xff' * (1 << 20)); s.flush()"
    )
    body = ran(execute(client, user, code=code))
    assert body["exitCode"] == 0 and body["truncated"] is True
    assert body["output"] == "\ufffd" * ((1 << 20) // 3)
    assert len(body["error"].encode()) <= (1 << 20) + 300
    assert "[sandbox] stdout held bytes that are not UTF-8" in body["error"]


def test_the_run_can_read_what_the_sandbox_gives_it_in_etc(client: httpx.Client, user: dict) -> None:
    """The sandbox's /etc (passwd, group, hosts, nsswitch.conf) is there to be read by the program."""
    code = (
        "import grp, os, pwd, socket\n"
        "print(socket.gethostbyname('localhost'))\n"
        "print(pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name)\n"
        "print(sorted(os.listdir('/etc')))"
    )
    body = ran(execute(client, user, code=code))
    assert body["error"] == "" and body["exitCode"] == 0, body
    address, names, listing = body["output"].splitlines()
    assert address == "127.0.0.1"
    assert names in ("sandbox sandbox", "nobody nogroup")
    assert listing == "['group', 'hosts', 'nsswitch.conf', 'passwd']"


# -- refusals --------------------------------------------------------------------------------------

TIMEOUT_RANGE = "timeout must be more than 0 and at most 60 seconds"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"code": "print(1)", "language": "ruby"},
            "unknown language 'ruby'; use one of python, javascript, bash",
        ),
        (
            {"code": "print(1)", "language": "Python"},
            "unknown language 'Python'; use one of python, javascript, bash",
        ),
        ({"code": ""}, "code must not be empty"),
        ({"code": " \n\t "}, "code must not be empty"),
        ({}, "code must not be empty"),
        ({"code": "#" * (256 * 1024 + 1)}, "code is larger than 256 KiB"),
        ({"code": "# é\n" + "#" * (256 * 1024 - 4)}, "code is larger than 256 KiB"),  # counted in bytes
        ({"code": "print(1)\x00"}, "code must not contain NUL characters"),
        ({"code": "print(1)", "timeout": 0}, TIMEOUT_RANGE),
        ({"code": "print(1)", "timeout": -1}, TIMEOUT_RANGE),
        ({"code": "print(1)", "timeout": 61}, TIMEOUT_RANGE),
        ({"code": "print(1)", "timeout": 60.001}, TIMEOUT_RANGE),
        ({"code": "print(1)", "timeout": "abc"}, 'timeout: expected a number, got "abc"'),
        (
            {"code": "print(1)", "env": {"PATH": "/evil"}},
            "env: PATH is set by the sandbox and cannot be overridden",
        ),
        (
            {"code": "print(1)", "env": {"LD_PRELOAD": "/evil.so"}},
            "env: LD_PRELOAD is set by the sandbox and cannot be overridden",
        ),
        (
            {"code": "print(1)", "env": {"HOME": "/"}},
            "env: HOME is set by the sandbox and cannot be overridden",
        ),
        (
            {"code": "print(1)", "env": {"PYTHONPATH": "/x"}},
            "env: PYTHONPATH is set by the sandbox and cannot be overridden",
        ),
        (
            {"code": "print(1)", "env": {"PYTHONON_IDENTITY": "x"}},
            "env: PYTHONON_IDENTITY is set by the sandbox and cannot be overridden",
        ),
        (
            {"code": "print(1)", "env": {"path": "/evil"}},
            "env: path is set by the sandbox and cannot be overridden",
        ),
        ({"code": "print(1)", "env": {"1ABC": "x"}}, "env: '1ABC' is not an environment-variable name"),
        ({"code": "print(1)", "env": {"A=B": "x"}}, "env: 'A=B' is not an environment-variable name"),
        ({"code": "print(1)", "env": {"PATH\n": "x"}}, "env: 'PATH\\n' is not an environment-variable name"),
        ({"code": "print(1)", "env": {f"V{n}": "x" for n in range(65)}}, "env: at most 64 variables"),
        ({"code": "print(1)", "secrets": [f"S{n}" for n in range(1001)]}, "secrets: at most 1000 names"),
        ({"code": "print(1)", "secrets": ["A"] * 1001}, "secrets: at most 1000 names"),
        ({"code": "print(1)", "secrets": [1]}, "secrets must be a list of secret names"),
        ({"code": "print(1)", "secrets": [None]}, "secrets must be a list of secret names"),
        ({"code": "print(1)", "secrets": [["A"]]}, "secrets must be a list of secret names"),
        ({"code": "print(1)", "secrets": "A"}, 'secrets: expected an array, got "A"'),
        ({"code": "print(1)", "secrets": ["NO_SUCH_SECRET"]}, "secrets: no secret named NO_SUCH_SECRET"),
        (
            {"code": "print(1)", "secrets": ["PATH"]},
            "secrets: PATH is reserved: the sandbox sets it, so a secret cannot use that name",
        ),
    ],
)
def test_invalid_requests_are_400_with_a_clear_message(
    client: httpx.Client, user: dict, body: dict, message: str
) -> None:
    response = client.post("/api/v1/execute", json=body, headers={"x-api-key": user["apiKey"]})
    assert error_message(response, 400, 3) == message


@pytest.mark.parametrize(
    ("secrets", "status", "code", "message"),
    [
        (["A"] * 850_000, 400, 3, "secrets: at most 1000 names"),
        # 4 MB of JSON, 22 MB as protobuf: past the edge's buffer for the transcoded message.
        ([0] * 2_000_000, 413, 8, "request body larger than 4194304 bytes"),
    ],
)
def test_a_body_under_the_cap_that_grows_once_decoded_is_refused_for_its_size_not_rated(
    client: httpx.Client, user: dict, secrets: list, status: int, code: int, message: str
) -> None:
    """Lists under the edge's 4 MiB body cap that grow past gRPC's usual 4 MiB once transcoded
    (a one-letter name is 4 bytes of JSON and 5 of protobuf, a 0 2 and 11): gRPC refused them with
    RESOURCE_EXHAUSTED, a 429 that clients retry; the executor now takes them and names the field,
    or the edge refuses the transcoded message as too large."""
    body = json.dumps({"code": "print('never')", "secrets": secrets}, separators=(",", ":"))
    assert len(body) < 4 * 1_048_576
    response = client.post(
        "/api/v1/execute",
        content=body,
        headers={"x-api-key": user["apiKey"], "content-type": "application/json"},
    )
    assert error_message(response, status, code) == message
    assert "retry-after" not in response.headers


def test_the_limits_themselves_are_accepted(client: httpx.Client, user: dict) -> None:
    biggest = "#" * (256 * 1024 - len("print('big')\n")) + "\nprint('big')"
    assert len(biggest.encode()) == 256 * 1024
    assert ran(execute(client, user, code=biggest))["output"] == "big\n"
    for timeout in (60, 0.5, 1):
        body = ran(execute(client, user, code="print('in time')", timeout=timeout))
        assert (body["output"], body["timedOut"]) == ("in time\n", False)


def test_execute_needs_credentials(client: httpx.Client) -> None:
    missing = client.post("/api/v1/execute", json={"code": "print('never')"})
    assert error_message(missing, 401, 16).startswith("missing credentials")
    wrong = client.post("/api/v1/execute", json={"code": "print('never')"}, headers={"x-api-key": "po_wrong"})
    assert error_message(wrong, 401, 16)
    bearer = client.post(
        "/api/v1/execute", json={"code": "print('never')"}, headers={"authorization": "Bearer not.a.jwt"}
    )
    assert error_message(bearer, 401, 16)


def test_a_jwt_works_as_well_as_the_api_key(client: httpx.Client, user: dict) -> None:
    response = client.post(
        "/api/v1/execute", json={"code": "print('jwt')"}, headers={"authorization": f"Bearer {user['token']}"}
    )
    assert ran(response)["output"] == "jwt\n"


# -- environment and secrets -----------------------------------------------------------------------

PRINT_SECRETS = "import os\nprint(os.environ.get('ALPHA_KEY'), os.environ.get('BETA_KEY'))"


def test_secrets_are_injected_all_named_or_none(client: httpx.Client, user: dict) -> None:
    alpha, beta = unique("alpha"), unique("beta")
    put_secret(client, user, "ALPHA_KEY", alpha)
    put_secret(client, user, "BETA_KEY", beta)

    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"{alpha} {beta}\n"
    assert (
        ran(execute(client, user, code=PRINT_SECRETS, secrets=["ALPHA_KEY"]))["output"] == f"{alpha} None\n"
    )
    assert ran(execute(client, user, code=PRINT_SECRETS, secrets=["BETA_KEY"]))["output"] == f"None {beta}\n"
    assert ran(execute(client, user, code=PRINT_SECRETS, secrets=[]))["output"] == "None None\n"
    both = ran(execute(client, user, code=PRINT_SECRETS, secrets=["BETA_KEY", "ALPHA_KEY"]))
    assert both["output"] == f"{alpha} {beta}\n"
    message = error_message(
        execute(client, user, code=PRINT_SECRETS, secrets=["ALPHA_KEY", "GAMMA_KEY"]), 400, 3
    )
    assert message == "secrets: no secret named GAMMA_KEY"

    # The audit log names the injected secrets, never their values.
    assert [e["details"]["secrets"] for e in executions_audited(client, user)] == [
        ["ALPHA_KEY", "BETA_KEY"],
        ["ALPHA_KEY"],
        ["BETA_KEY"],
        [],
        ["ALPHA_KEY", "BETA_KEY"],
    ]


def test_a_secret_updated_is_the_new_value_in_the_next_run(client: httpx.Client, user: dict) -> None:
    first, second = unique("first"), unique("second")
    put_secret(client, user, "ALPHA_KEY", first)
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"{first} None\n"
    put_secret(client, user, "ALPHA_KEY", second)
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"{second} None\n"
    deleted = client.delete("/api/v1/secrets/ALPHA_KEY", headers={"x-api-key": user["apiKey"]})
    assert deleted.status_code == 200
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == "None None\n"


def test_the_request_env_is_delivered_and_wins_over_a_secret(client: httpx.Client, user: dict) -> None:
    put_secret(client, user, "ALPHA_KEY", unique("secret"))
    code = "import os\nprint(os.environ['GREETING'], os.environ['ALPHA_KEY'], os.environ['EMPTY'] == '')"
    env = {"GREETING": "héllo wörld", "ALPHA_KEY": "from the request", "EMPTY": ""}
    body = ran(execute(client, user, code=code, env=env))
    assert (body["output"], body["exitCode"]) == ("héllo wörld from the request True\n", 0)


def test_the_environment_is_the_safe_defaults_the_secrets_and_the_env(
    client: httpx.Client, user: dict
) -> None:
    put_secret(client, user, "ALPHA_KEY", unique("alpha"))
    code = "import json, os\nprint(json.dumps(sorted(os.environ)))"
    body = ran(execute(client, user, code=code, env={"MINE": "1"}))
    assert json.loads(body["output"]) == [
        "ALPHA_KEY",
        "HOME",
        "LANG",
        "MINE",
        "PATH",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
    ]


# -- the audit log ---------------------------------------------------------------------------------


def test_every_execution_is_audited_with_a_digest_never_the_code(client: httpx.Client, user: dict) -> None:
    code_mark, stdin_mark, env_mark, secret_value = (
        unique("code"),
        unique("stdin"),
        unique("env"),
        unique("sv"),
    )
    put_secret(client, user, "AUDITED_SECRET", secret_value)
    output_mark = unique("out")
    # The output is built at run time, so it appears in neither the code nor the request.
    runs = [
        (f"# {code_mark} ✓ non-ASCII\nprint('{output_mark[::-1]}'[::-1])\n", {}),
        (
            "import os, sys\n"
            "print(sys.stdin.read(), os.environ['AUDITED_SECRET'], os.environ['MARK'])\n"
            f"raise SystemExit(7)  # {code_mark}",
            {"stdin": stdin_mark, "env": {"MARK": env_mark}},
        ),
        (f"import sys\nsys.stderr.write('{code_mark}'[::-1])\nraise ValueError", {"secrets": []}),
    ]
    answers = [ran(execute(client, user, code=code, **extra)) for code, extra in runs]
    assert answers[0]["output"] == f"{output_mark}\n"
    assert answers[1]["output"] == f"{stdin_mark} {secret_value} {env_mark}\n"
    assert [a["exitCode"] for a in answers] == [0, 7, 1]

    audited = executions_audited(client, user)
    assert len(audited) == len(runs)
    for (code, _), answer, entry in zip(runs, answers, audited, strict=True):
        assert entry["resource"] == f"execution/{answer['executionId']}"
        assert entry["outcome"] == "success"
        assert entry["clientIp"] == "127.0.0.1" and entry["requestId"]
        details = entry["details"]
        assert set(details) == {
            "language",
            "codeSha256",
            "codeBytes",
            "exitCode",
            "durationMs",
            "timedOut",
            "truncated",
            "secrets",
        }
        assert details["language"] == "python"
        assert details["codeSha256"] == hashlib.sha256(code.encode()).hexdigest()
        assert details["codeBytes"] == len(code.encode())
        assert details["exitCode"] == answer["exitCode"]
        assert details["durationMs"] == answer["durationMs"]
        assert (details["timedOut"], details["truncated"]) == (False, False)
    assert audited[0]["details"]["codeBytes"] == len(runs[0][0]) + 2  # "✓" is three bytes in UTF-8
    assert [e["details"]["secrets"] for e in audited] == [["AUDITED_SECRET"], ["AUDITED_SECRET"], []]

    whole_log = audit_list(client, user).text
    for needle in (
        code_mark,
        code_mark[::-1],
        stdin_mark,
        env_mark,
        secret_value,
        output_mark,
        output_mark[::-1],
    ):
        assert needle not in whole_log, needle
    for code, _ in runs:
        assert code not in whole_log


def test_a_refused_request_runs_nothing(client: httpx.Client, user: dict) -> None:
    assert execute(client, user, code="print(1)", timeout=0).status_code == 400
    assert execute(client, user, code="print(1)", secrets=["NOT_THERE"]).status_code == 400
    assert executions_audited(client, user) == []


# -- native gRPC on the same port ------------------------------------------------------------------


def test_native_grpc_execute_through_the_edge(mesh: Mesh, client: httpx.Client, user: dict) -> None:
    put_secret(client, user, "ALPHA_KEY", "alpha-over-grpc")
    key = [("x-api-key", user["apiKey"])]
    with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        response = stub.Execute(
            executor_pb2.ExecuteRequest(
                code="import os, sys\nprint(sys.stdin.read(), os.environ.get('ALPHA_KEY'), os.environ['E'])\n"
                "sys.exit(5)",
                stdin="in",
                env={"E": "env"},
                timeout=5,
            ),
            metadata=key,
            timeout=30,
        )
        assert (response.output, response.error, response.exit_code) == ("in alpha-over-grpc env\n", "", 5)
        assert (response.timed_out, response.truncated) == (False, False)
        assert EXECUTION_ID.match(response.execution_id) and response.duration_ms >= 0

        none = stub.Execute(
            executor_pb2.ExecuteRequest(
                code="import os\nprint(os.environ.get('ALPHA_KEY'))", secrets=struct_pb2.ListValue()
            ),
            metadata=key,
            timeout=30,
        )
        assert none.output == "None\n"

        with pytest.raises(grpc.RpcError) as invalid:
            stub.Execute(executor_pb2.ExecuteRequest(code="1", language="ruby"), metadata=key, timeout=30)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.value.details() == "unknown language 'ruby'; use one of python, javascript, bash"

        with pytest.raises(grpc.RpcError) as anonymous:
            stub.Execute(executor_pb2.ExecuteRequest(code="print('never')"), timeout=30)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED

    audited = executions_audited(client, user)
    assert [e["resource"] for e in audited] == [
        f"execution/{response.execution_id}",
        f"execution/{none.execution_id}",
    ]


def _resolve_calls(mesh: Mesh) -> int:
    """How many ResolveSecrets calls the secrets service has answered (its request log)."""
    return (
        (data_dir_of(mesh) / "logs" / "secrets.log")
        .read_text()
        .count("SecretsResolverService/ResolveSecrets")
    )


def test_a_user_without_secrets_costs_no_call_and_each_change_is_seen_by_the_very_next_run(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    assert (data_dir_of(mesh) / "secret-markers" / ".complete").is_file()  # reconciled with Vault
    calls = _resolve_calls(mesh)
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == "None None\n"
    assert _resolve_calls(mesh) == calls  # the user has no secret: the executor did not ask

    value = unique("first")
    put_secret(client, user, "ALPHA_KEY", value)
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"{value} None\n"
    assert _resolve_calls(mesh) == calls + 1
    deleted = client.delete("/api/v1/secrets/ALPHA_KEY", headers={"x-api-key": user["apiKey"]})
    assert deleted.status_code == 200
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == "None None\n"
    assert _resolve_calls(mesh) == calls + 1  # the last one gone: no call again
    # Named secrets are always asked for, so that an unknown name is named.
    message = error_message(execute(client, user, code=PRINT_SECRETS, secrets=["GAMMA_KEY"]), 400, 3)
    assert message == "secrets: no secret named GAMMA_KEY"
    assert [e["details"]["secrets"] for e in executions_audited(client, user)] == [[], ["ALPHA_KEY"], []]


def test_a_users_values_are_kept_between_runs_until_a_change_and_each_change_is_the_next_runs(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    first, second = unique("first"), unique("second")
    put_secret(client, user, "ALPHA_KEY", first)
    calls = _resolve_calls(mesh)
    for _ in range(3):
        assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"{first} None\n"
    assert _resolve_calls(mesh) == calls + 1  # asked once, then kept under the same stamp
    put_secret(client, user, "ALPHA_KEY", second)
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"{second} None\n"
    put_secret(client, user, "BETA_KEY", first)
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"{second} {first}\n"
    deleted = client.delete("/api/v1/secrets/ALPHA_KEY", headers={"x-api-key": user["apiKey"]})
    assert deleted.status_code == 200  # BETA_KEY is left: the user stays marked, with a new stamp
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"None {first}\n"
    assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == f"None {first}\n"
    assert _resolve_calls(mesh) == calls + 4


def test_while_the_markers_are_not_complete_every_run_asks(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    complete = data_dir_of(mesh) / "secret-markers" / ".complete"
    complete.unlink()  # as at the secrets service's start, before it has read Vault
    try:
        calls = _resolve_calls(mesh)
        assert ran(execute(client, user, code=PRINT_SECRETS))["output"] == "None None\n"
        assert _resolve_calls(mesh) == calls + 1
    finally:
        complete.touch()
