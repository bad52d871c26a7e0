"""Zero-knowledge code through Envoy on a whole mesh, as curl would use it: encrypt (read back by an
independent implementation of the recipe), put, list, execute in every language, delete; the
recipe's bounds; names; a wrong password or an altered payload (403, never run, audited); another
user's names; and neither the code nor the password anywhere in the data directory, the logs, the
database or OpenBao's storage."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid

import httpx
import nacl.bindings
import nacl.exceptions
import pytest
from argon2.low_level import Type, hash_secret_raw

from services.runner.mesh import Mesh
from services.zk import recipe
from tests.integration.conftest import RFC3339, error_message, new_email
from tests.integration.test_secrets_api import _database_rows

PASSWORD = "zk pass phrase " + uuid.uuid4().hex
WRONG = "Password is wrong or the payload was altered"
FAST = recipe.KdfParams(memory_kib=8 * 1024, iterations=1, parallelism=1)


def register(client: httpx.Client) -> dict:
    response = client.post(
        "/api/register", json={"email": new_email("zk"), "password": "a long password 123"}
    )
    assert response.status_code == 201, response.text
    return response.json()


def headers(user: dict) -> dict[str, str]:
    return {"x-api-key": user["apiKey"]}


def put(
    client: httpx.Client, user: dict, name: str, payload: dict, language: str = "python"
) -> httpx.Response:
    return client.put(
        f"/api/v1/zk/code/{name}", json={"payload": payload, "language": language}, headers=headers(user)
    )


def execute(client: httpx.Client, user: dict, name: str, **body: object) -> httpx.Response:
    return client.post(
        f"/api/v1/zk/execute/{name}", json={"password": PASSWORD, **body}, headers=headers(user)
    )


def audit_of(client: httpx.Client, user: dict, prefix: str) -> list[tuple[str, str, str, dict]]:
    response = client.get("/api/v1/audit", headers=headers(user))
    assert response.status_code == 200, response.text
    return [
        (e["action"], e["resource"], e["outcome"], e["details"])
        for e in reversed(response.json()["entries"])
        if e["action"].startswith(prefix)
    ]


def independent_decrypt(payload: dict, password: str) -> str:
    """The README's recipe with plain PyNaCl and argon2-cffi, nothing of the project."""
    kdf = payload["kdf"]
    key = hash_secret_raw(
        password.encode(),
        base64.b64decode(payload["salt"]),
        time_cost=kdf["iterations"],
        memory_cost=kdf["memoryKib"],
        parallelism=kdf["parallelism"],
        hash_len=32,
        type=Type.ID,
    )
    plain = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        base64.b64decode(payload["ciphertext"]), None, base64.b64decode(payload["nonce"]), key
    )
    return plain.decode()


@pytest.fixture()
def user(client: httpx.Client) -> dict:
    return register(client)


def test_encrypt_answers_the_recipe_and_an_independent_implementation_reads_it(
    client: httpx.Client, user: dict
) -> None:
    code = "print('héllo', 6 * 7)\n"
    response = client.post(
        "/api/v1/zk/encrypt", json={"code": code, "password": PASSWORD}, headers=headers(user)
    )
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"version", "algorithm", "salt", "nonce", "ciphertext", "kdf"}
    assert (payload["version"], payload["algorithm"]) == (1, "argon2id-xchacha20poly1305")
    assert payload["kdf"] == {"memoryKib": 19456, "iterations": 2, "parallelism": 1}
    assert len(base64.b64decode(payload["salt"])) == 16 and len(base64.b64decode(payload["nonce"])) == 24
    assert len(base64.b64decode(payload["ciphertext"])) == len(code.encode()) + 16
    assert independent_decrypt(payload, PASSWORD) == code
    with pytest.raises(nacl.exceptions.CryptoError):
        independent_decrypt(payload, PASSWORD + "x")
    # And the other way: what the project's client module makes, the server's sandbox runs.
    assert put(client, user, "helper.py", payload).status_code == 200
    ran = execute(client, user, "helper.py")
    assert ran.status_code == 200, ran.text
    assert (ran.json()["output"], ran.json().get("exitCode", 0)) == ("héllo 42\n", 0)
    assert audit_of(client, user, "zk.encrypt") == [
        (
            "zk.encrypt",
            "zk/encrypt",
            "success",
            {"codeBytes": len(code.encode()), "memoryKib": 19456, "iterations": 2},
        )
    ]


@pytest.mark.parametrize(
    ("language", "code", "expected", "status"),
    [
        ("python", "import os, sys\nprint('py', sys.stdin.read(), os.environ['WHO'])\n", "py in zk\n", 0),
        (
            "javascript",
            "console.log('js', require('fs').readFileSync(0, 'utf8'), process.env.WHO)\n",
            "js in zk\n",
            0,
        ),
        ("bash", 'read -r line; echo "sh $line $WHO"; exit 4\n', "sh in zk\n", 4),
    ],
)
def test_put_list_execute_delete_in_every_language(
    client: httpx.Client, user: dict, language: str, code: str, expected: str, status: int
) -> None:
    payload = recipe.encrypt(code, PASSWORD, FAST).to_json()
    stored = put(client, user, "Job-1.X", payload, language)
    assert stored.status_code == 200, stored.text
    metadata = stored.json()
    ciphertext = base64.b64decode(payload["ciphertext"])
    assert set(metadata) == {"name", "language", "size", "sha256", "createdAt", "updatedAt"}
    assert (metadata["name"], metadata["language"], metadata["size"], metadata["sha256"]) == (
        "job-1.x",
        language,
        len(ciphertext),
        hashlib.sha256(ciphertext).hexdigest(),
    )
    assert RFC3339.match(metadata["createdAt"]) and metadata["updatedAt"] == metadata["createdAt"]
    listed = client.get("/api/v1/zk/code", headers=headers(user))
    assert listed.status_code == 200 and listed.json() == {"items": [metadata]}

    ran = execute(client, user, "JOB-1.x", stdin="in", env={"WHO": "zk"})
    assert ran.status_code == 200, ran.text
    body = ran.json()
    assert (body["output"], body.get("error", ""), body.get("exitCode", 0)) == (expected, "", status)

    gone = client.delete("/api/v1/zk/code/job-1.X", headers=headers(user))
    assert gone.status_code == 200 and gone.json() == {}
    assert error_message(execute(client, user, "job-1.x"), 404, 5) == "no stored code named job-1.x"
    assert client.get("/api/v1/zk/code", headers=headers(user)).json() == {"items": []}
    digest = metadata["sha256"]
    entries = audit_of(client, user, "zk.")
    assert [(action, resource, outcome) for action, resource, outcome, _ in entries] == [
        ("zk.put", "zk/code/job-1.x", "success"),
        ("zk.execute", "zk/code/job-1.x", "success"),
        ("zk.delete", "zk/code/job-1.x", "success"),
    ]
    assert entries[0][3] == {
        "name": "job-1.x",
        "language": language,
        "size": len(ciphertext),
        "sha256": digest,
        "replaced": False,
        "kdf": {"memory_kib": 8192, "iterations": 1, "parallelism": 1},
    }
    assert entries[1][3]["sha256"] == digest and entries[1][3]["exitCode"] == status
    executed = [d for a, _, _, d in audit_of(client, user, "executor.execute")]
    assert executed[-1]["encrypted"] is True and executed[-1]["codeSha256"] == digest


def test_a_wrong_password_or_an_altered_payload_is_403_never_runs_and_is_audited(
    client: httpx.Client, user: dict
) -> None:
    payload = recipe.encrypt("print('RAN')\n", PASSWORD, FAST).to_json()
    assert put(client, user, "guarded", payload).status_code == 200
    wrong = client.post("/api/v1/zk/execute/guarded", json={"password": "not it"}, headers=headers(user))
    assert error_message(wrong, 403, 7) == "the password is wrong or the payload was altered"
    assert "RAN" not in wrong.text
    altered = dict(payload)
    ciphertext = bytearray(base64.b64decode(payload["ciphertext"]))
    ciphertext[-1] ^= 0x01
    altered["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode()
    assert put(client, user, "altered", altered).status_code == 200
    assert (
        error_message(execute(client, user, "altered"), 403, 7)
        == "the password is wrong or the payload was altered"
    )
    failures = [(r, o, d.get("reason")) for a, r, o, d in audit_of(client, user, "zk.execute")]
    assert failures == [
        ("zk/code/guarded", "failure", "wrong-password"),
        ("zk/code/altered", "failure", "wrong-password"),
    ]
    executed = [(o, d.get("reason")) for _, _, o, d in audit_of(client, user, "executor.execute")]
    assert executed == [("failure", "wrong-password"), ("failure", "wrong-password")]


@pytest.mark.parametrize("language", ["python", "bash"])
def test_code_that_decrypts_to_other_than_text_is_a_precise_400_and_audited(
    client: httpx.Client, user: dict, language: str
) -> None:
    """Authentic ciphertext of bytes that are not UTF-8 (another client's bug): the executor says
    so, and zk.execute records the refusal as it records a wrong password."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

    good = recipe.encrypt("print(1)", PASSWORD, FAST)
    key = recipe.derive_key(PASSWORD, good.salt, FAST)
    plain = b"print('x')\n\xff\xfe# \xc3"
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(plain, None, good.nonce, key)
    payload = {**good.to_json(), "ciphertext": base64.b64encode(ciphertext).decode()}
    name = f"bytes-{language}"
    assert put(client, user, name, payload, language).status_code == 200
    answer = execute(client, user, name)
    assert error_message(answer, 400, 3) == "the decrypted code is not UTF-8 text"
    recorded = [(r, o, d.get("reason")) for _, r, o, d in audit_of(client, user, "zk.execute")]
    assert (
        f"zk/code/{name}",
        "failure",
        "invalid-argument: the decrypted code is not UTF-8 text",
    ) in recorded


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"kdf": {"memoryKib": 4096, "iterations": 2, "parallelism": 1}},
            "payload: kdf.memoryKib must be an integer from 8192 to 1048576 KiB, got 4096",
        ),
        (
            {"kdf": {"memoryKib": 8192, "iterations": 11, "parallelism": 1}},
            "payload: kdf.iterations must be an integer from 1 to 10, got 11",
        ),
        (
            {"kdf": {"memoryKib": 8192, "iterations": 1, "parallelism": 5}},
            "payload: kdf.parallelism must be an integer from 1 to 4, got 5",
        ),
        ({"version": 2}, "payload: version must be 1, got 2"),
        ({"algorithm": "aes"}, "payload: algorithm must be 'argon2id-xchacha20poly1305', got 'aes'"),
        ({"salt": base64.b64encode(b"short").decode()}, "payload: salt must be 16 bytes, got 5"),
    ],
)
def test_out_of_bounds_payloads_are_400(client: httpx.Client, user: dict, change: dict, message: str) -> None:
    payload = {**recipe.encrypt("print(1)", PASSWORD, FAST).to_json(), **change}
    assert error_message(put(client, user, "bounded", payload), 400, 3) == message


def test_names_and_languages(client: httpx.Client, user: dict) -> None:
    payload = recipe.encrypt("print(1)", PASSWORD, FAST).to_json()
    for bad in ("-lead", "a%20b", "x" * 65, "caf%C3%A9"):
        message = error_message(put(client, user, bad, payload), 400, 3)
        assert "name" in message, message
    assert error_message(put(client, user, "ok", payload, "cobol"), 400, 3) == (
        "unknown language 'cobol'; use one of python, javascript, bash"
    )
    assert put(client, user, "Same.Name", payload).status_code == 200
    again = put(client, user, "same.name", payload, "py")
    assert again.status_code == 200 and again.json()["name"] == "same.name"
    assert [i["name"] for i in client.get("/api/v1/zk/code", headers=headers(user)).json()["items"]] == [
        "same.name"
    ]
    # The Kelvin sign lower-cases to "k": refused, not an alias of "ak" (which it overwrote).
    assert put(client, user, "ak", payload).status_code == 200
    for request in (
        put(client, user, "a%E2%84%AA", payload),
        client.delete("/api/v1/zk/code/a%E2%84%AA", headers=headers(user)),
    ):
        assert "name" in error_message(request, 400, 3)
    names = [i["name"] for i in client.get("/api/v1/zk/code", headers=headers(user)).json()["items"]]
    assert names == ["ak", "same.name"]


def test_another_users_names_are_404(client: httpx.Client, user: dict) -> None:
    payload = recipe.encrypt("print('mine')", PASSWORD, FAST).to_json()
    assert put(client, user, "private", payload).status_code == 200
    other = register(client)
    assert error_message(execute(client, other, "private"), 404, 5) == "no stored code named private"
    gone = client.delete("/api/v1/zk/code/private", headers=headers(other))
    assert error_message(gone, 404, 5) == "no stored code named private"
    assert client.get("/api/v1/zk/code", headers=headers(other)).json() == {"items": []}
    assert error_message(client.get("/api/v1/zk/code"), 401, 16)


def test_execute_injects_the_secrets_it_names_and_honours_its_timeout(
    client: httpx.Client, user: dict
) -> None:
    for name, value in (("ZK_ONE", "one-" + uuid.uuid4().hex), ("ZK_TWO", "two-" + uuid.uuid4().hex)):
        stored = client.put(f"/api/v1/secrets/{name}", json={"value": value}, headers=headers(user))
        assert stored.status_code == 200, stored.text
    one, two = (
        client.get("/api/v1/secrets", headers=headers(user)).json()["secrets"][i]["name"] for i in (0, 1)
    )
    assert (one, two) == ("ZK_ONE", "ZK_TWO")
    code = "import os, time\nprint(os.environ.get('ZK_ONE', '-')[:4], os.environ.get('ZK_TWO', '-')[:4])\n"
    code += "time.sleep(float(input() or 0))\n"
    assert put(client, user, "env", recipe.encrypt(code, PASSWORD, FAST).to_json()).status_code == 200
    outputs = {
        "absent: all": execute(client, user, "env").json()["output"],
        "one named": execute(client, user, "env", secrets=["ZK_TWO"]).json()["output"],
        "none": execute(client, user, "env", secrets=[]).json()["output"],
    }
    assert outputs == {"absent: all": "one- two-\n", "one named": "- two-\n", "none": "- -\n"}

    started = time.monotonic()
    slow = execute(client, user, "env", stdin="30", timeout=1)
    elapsed = time.monotonic() - started
    assert slow.status_code == 200, slow.text
    body = slow.json()
    assert (body["timedOut"], body["exitCode"]) == (True, 137)
    assert elapsed < 10, f"a 1 s timeout answered after {elapsed:.1f} s"
    assert error_message(execute(client, user, "env", timeout=0), 400, 3).startswith("timeout")
    injected = [d.get("secrets") for a, _, _, d in audit_of(client, user, "executor.execute")]
    assert injected[:3] == [["ZK_ONE", "ZK_TWO"], ["ZK_TWO"], []]


def test_a_kdf_larger_than_the_runs_memory_is_a_clear_400(client: httpx.Client, user: dict) -> None:
    payload = recipe.encrypt("print('RAN')", PASSWORD, recipe.KdfParams(1024 * 1024, 1, 1)).to_json()
    assert put(client, user, "huge", payload).status_code == 200
    message = error_message(execute(client, user, "huge"), 400, 3)
    assert message.startswith("the payload's key derivation needs 1024 MiB of memory (kdf.memoryKib=1048576)")


def test_neither_code_nor_password_is_anywhere_at_rest_or_in_logs(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    needle = "needle-" + uuid.uuid4().hex
    password = "password-" + uuid.uuid4().hex
    code = f"# {needle}\nprint(len('{needle}'))\n"
    encrypted = client.post(
        "/api/v1/zk/encrypt", json={"code": code, "password": password}, headers=headers(user)
    )
    assert encrypted.status_code == 200
    assert put(client, user, "hidden", encrypted.json()).status_code == 200
    ran = client.post("/api/v1/zk/execute/hidden", json={"password": password}, headers=headers(user))
    assert ran.status_code == 200 and ran.json()["output"] == f"{len(needle)}\n", ran.text
    wrong = client.post("/api/v1/zk/execute/hidden", json={"password": password[::-1]}, headers=headers(user))
    assert wrong.status_code == 403
    assert client.get("/api/v1/audit", headers=headers(user)).status_code == 200

    time.sleep(0.5)  # let the processes' last log lines reach their files
    files = [path for path in mesh.layout.root.rglob("*") if path.is_file()]
    assert any(p.suffix == ".log" for p in files) and any(
        mesh.openbao_files.storage in p.parents for p in files
    )
    for secret in (needle, password, password[::-1]):
        for path in files:
            assert secret.encode() not in path.read_bytes(), path
    if mesh.config.database_url:
        rows = _database_rows(mesh.config.database_url)
        assert "zk.execute" in rows
        assert needle not in rows and password not in rows
