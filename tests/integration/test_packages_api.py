"""The packages API through Envoy, as curl would use it, against a local package index the tests
start (tests/packages/local_index.py): the lifecycle, every refusal, isolation between users, one
build per set, failing builds, a run waiting for a build, collection of unused environments, and the
environments surviving a restart of the mesh."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, error_message, new_email
from tests.packages.local_index import LocalIndex, standard_index

# A run waits this long for a build in progress; tiny-slow's download takes longer.
RUN_WAIT_SECONDS = 3
SLOW_SECONDS = 8.0


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIndex]:
    local = standard_index(tmp_path_factory.mktemp("index"))
    local.slow["tiny_slow-"] = SLOW_SECONDS
    with local.serve():
        yield local


def _config(data_dir: Path, index: LocalIndex) -> MeshConfig:
    service_env = {
        **GENEROUS_LIMITS,
        "packages": {"PYTHONON_PACKAGES_INDEX_URL": index.url, "PYTHONON_PACKAGES_MAX_ENVIRONMENT_MIB": "2"},
        "executor": {"PYTHONON_EXECUTOR_PACKAGES_WAIT_SECONDS": str(RUN_WAIT_SECONDS)},
    }
    return MeshConfig(port=0, data_dir=data_dir, service_env=service_env)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packages-mesh")


@pytest.fixture(scope="module")
def packages_mesh(data_dir: Path, index: LocalIndex) -> Iterator[Mesh]:
    with Mesh(_config(data_dir, index)) as running:
        yield running


@pytest.fixture()
def http(packages_mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=packages_mesh.url, timeout=60) as client:
        yield client


def _user(http: httpx.Client) -> dict[str, str]:
    response = http.post("/api/register", json={"email": new_email("pkg"), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return {"x-api-key": response.json()["apiKey"]}


def _settled(http: httpx.Client, key: dict[str, str], seconds: float = 60) -> list[dict]:
    """The list once no package is pending or building."""
    deadline = time.monotonic() + seconds
    while True:
        response = http.get("/api/v1/packages", headers=key)
        assert response.status_code == 200, response.text
        packages = response.json()["packages"]
        if all(package["status"] in ("ready", "failed") for package in packages):
            return packages
        assert time.monotonic() < deadline, packages
        time.sleep(0.2)


def _run(http: httpx.Client, key: dict[str, str], code: str) -> httpx.Response:
    return http.post("/api/v1/execute", json={"code": code}, headers=key)


def _environments(data_dir: Path) -> set[str]:
    return {entry.name for entry in (data_dir / "packages" / "environments").iterdir()}


def test_lifecycle_set_add_remove_list_and_audit(http: httpx.Client) -> None:
    key = _user(http)
    assert http.get("/api/v1/packages", headers=key).json() == {"packages": []}

    response = http.put("/api/v1/packages", json={"packages": ["Tiny_Greet>=1.1"]}, headers=key)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "packages": [
            {
                "name": "tiny-greet",
                "spec": "tiny-greet>=1.1",
                "version": "",
                "status": "pending",
                "reason": "",
            }
        ]
    }
    assert _settled(http, key) == [
        {"name": "tiny-greet", "spec": "tiny-greet>=1.1", "version": "1.2", "status": "ready", "reason": ""}
    ]
    run = _run(http, key, "import tiny_greet\nprint(tiny_greet.hello())")
    assert run.status_code == 200 and run.json()["output"] == "hello from tiny-greet dep 1.0\n", run.text

    response = http.post("/api/v1/packages", json={"package": "tiny-other==0.3"}, headers=key)
    assert response.status_code == 200, response.text
    assert [package["name"] for package in response.json()["packages"]] == ["tiny-greet", "tiny-other"]
    packages = _settled(http, key)
    assert [(p["name"], p["version"], p["status"]) for p in packages] == [
        ("tiny-greet", "1.2", "ready"),
        ("tiny-other", "0.3", "ready"),
    ]

    response = http.delete("/api/v1/packages/tiny-greet", headers=key)
    assert response.status_code == 200, response.text
    assert [package["name"] for package in response.json()["packages"]] == ["tiny-other"]
    _settled(http, key)
    run = _run(
        http,
        key,
        "import tiny_other\ntry:\n    import tiny_greet\nexcept ImportError:\n    print('gone', tiny_other.NAME)",
    )
    assert run.json()["output"] == "gone other\n", run.text

    missing = http.delete("/api/v1/packages/tiny-greet", headers=key)
    assert "is not in your list" in error_message(missing, 404, 5)

    entries = http.get("/api/v1/audit", headers=key).json()["entries"]
    changes = [
        (e["action"], e["resource"], e["details"])
        for e in reversed(entries)
        if e["action"].startswith("packages.")
    ]
    assert changes == [
        ("packages.set", "packages", {"packages": ["tiny-greet>=1.1"]}),
        ("packages.add", "package/tiny-other", {"package": "tiny-other==0.3"}),
        ("packages.remove", "package/tiny-greet", {"name": "tiny-greet"}),
    ]


REFUSED = [
    ("requests>=9999999999999999999999999999999", "a number in a version has at most 18 digits"),
    ("tiny-greet==1.0.9999999999999999999", "a number in a version has at most 18 digits"),
    ("https://example.com/x.whl", "only a name and version specifiers"),
    ("tiny-greet @ https://example.com/x.whl", "only a name and version specifiers"),
    ("./local/path", "only a name and version specifiers"),
    ("file:///etc/passwd", "only a name and version specifiers"),
    ("git+https://example.com/repo.git", "only a name and version specifiers"),
    ("tiny-greet; python_version > '3'", "only a name and version specifiers"),
    ("-e .", "installer options are not accepted"),
    ("--index-url=http://127.0.0.1:1/simple", "installer options are not accepted"),
    ("--extra-index-url http://127.0.0.1:1/simple", "installer options are not accepted"),
    ("-r requirements.txt", "installer options are not accepted"),
    ("tiny-greet[--index-url]", "not a valid requirement"),
    ("tiny-greet\n--index-url x", "control characters"),
    ("a" * 101, "longer than 100 characters"),
    ("tiny greet", "not a valid requirement"),
    ("", "non-empty requirement"),
]


@pytest.mark.parametrize(("entry", "said"), REFUSED, ids=[entry[:30] or "empty" for entry, _ in REFUSED])
def test_refusals_name_the_entry_and_change_nothing(http: httpx.Client, entry: str, said: str) -> None:
    key = _user(http)
    assert http.put("/api/v1/packages", json={"packages": ["tiny-other"]}, headers=key).status_code == 200
    before = _settled(http, key)
    for response in (
        http.put("/api/v1/packages", json={"packages": ["tiny-dep", entry]}, headers=key),
        http.post("/api/v1/packages", json={"package": entry}, headers=key),
    ):
        message = error_message(response, 400, 3)
        assert said in message, message
        if entry.strip():
            assert repr(entry.strip()[:117])[:40] in message or repr(entry.strip())[:40] in message
    assert _settled(http, key) == before
    actions = [e["action"] for e in http.get("/api/v1/audit", headers=key).json()["entries"]]
    assert actions.count("packages.set") == 1 and "packages.add" not in actions


def test_too_many_and_duplicates_are_refused(http: httpx.Client) -> None:
    key = _user(http)
    message = error_message(
        http.put("/api/v1/packages", json={"packages": [f"p{i}" for i in range(51)]}, headers=key), 400, 3
    )
    assert message == "at most 50 packages, got 51"
    message = error_message(
        http.put("/api/v1/packages", json={"packages": ["tiny-dep", "Tiny.Dep>=1"]}, headers=key), 400, 3
    )
    assert message == "package 'Tiny.Dep>=1': tiny-dep is listed twice"
    assert http.get("/api/v1/packages", headers=key).json() == {"packages": []}


def test_a_missing_list_is_refused_and_changes_nothing(http: httpx.Client) -> None:
    # PUT replaces the whole list: a body without it (a client's typo, an empty object, null, no
    # body) would otherwise be an empty list and empty the user's list.
    key = _user(http)
    assert http.put("/api/v1/packages", json={"packages": ["tiny-other"]}, headers=key).status_code == 200
    before = _settled(http, key)
    for body in (b"{}", b'{"packages": null}', b""):
        response = http.put(
            "/api/v1/packages", content=body, headers={**key, "content-type": "application/json"}
        )
        assert error_message(response, 400, 3) == "packages: required, but missing (send [] for none)", body
    response = http.post("/api/v1/packages", json={}, headers=key)
    assert error_message(response, 400, 3) == "package: required, but missing"
    assert _settled(http, key) == before
    actions = [e["action"] for e in http.get("/api/v1/audit", headers=key).json()["entries"]]
    assert actions.count("packages.set") == 1 and "packages.add" not in actions
    # The explicit empty list still empties it.
    assert http.put("/api/v1/packages", json={"packages": []}, headers=key).json() == {"packages": []}


def test_isolation_between_users_and_a_read_only_environment(http: httpx.Client) -> None:
    alice, bob = _user(http), _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-greet"]}, headers=alice)
    _settled(http, alice)
    code = "try:\n    import tiny_greet\n    print('imported')\nexcept ImportError:\n    print('absent')"
    assert _run(http, bob, code).json()["output"] == "absent\n"
    assert _run(http, alice, code).json()["output"] == "imported\n"
    listing = _run(http, bob, "import os\nprint(os.path.exists('/opt/pythonon/packages'))")
    assert listing.json()["output"] == "False\n"
    write = _run(
        http,
        alice,
        "import tiny_greet, os\n"
        "target = os.path.dirname(tiny_greet.__file__)\n"
        "for path in (os.path.join(target, 'evil.py'), tiny_greet.__file__):\n"
        "    try:\n        open(path, 'a').write('x')\n        print('wrote', path)\n"
        "    except OSError as error:\n        print(error.errno)\n",
    )
    # A new file: EROFS (the mount is read-only); the existing file: EACCES first (mode 0444), or EROFS.
    assert write.json()["output"].split() in (["30", "30"], ["30", "13"]), write.text
    assert (
        "tiny_greet/__pycache__"
        in _run(http, alice, "import tiny_greet, importlib.util\nprint(tiny_greet.__spec__.cached)").json()[
            "output"
        ]
    )


def test_a_shared_set_is_built_once(http: httpx.Client, index: LocalIndex, data_dir: Path) -> None:
    first, second = _user(http), _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-other", "tiny-dep"]}, headers=first)
    _settled(http, first)
    downloads, environments = len(index.downloads), _environments(data_dir)
    # The same set in another order and spelling: the existing build, at once.
    response = http.put("/api/v1/packages", json={"packages": ["Tiny_Dep", "tiny.other"]}, headers=second)
    assert response.status_code == 200
    assert [p["status"] for p in response.json()["packages"]] == ["ready", "ready"]
    assert [p["version"] for p in response.json()["packages"]] == ["1.0", "0.3"]
    assert (
        _run(http, second, "import tiny_dep, tiny_other\nprint(tiny_dep.VALUE)").json()["output"]
        == "dep 1.0\n"
    )
    assert len(index.downloads) == downloads and _environments(data_dir) == environments


def test_failing_builds_answer_their_reason(http: httpx.Client) -> None:
    key = _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-does-not-exist"]}, headers=key)
    [package] = _settled(http, key)
    assert package["status"] == "failed" and package["version"] == ""
    assert "tiny-does-not-exist was not found" in package["reason"], package
    message = error_message(_run(http, key, "print(1)"), 400, 9)
    assert (
        message.startswith("the package environment failed to build: ") and "tiny-does-not-exist" in message
    )

    http.put("/api/v1/packages", json={"packages": ["tiny-sdist-only"]}, headers=key)
    [package] = _settled(http, key)
    assert package["status"] == "failed"
    assert "tiny-sdist-only==0.1 has no usable wheels" in package["reason"]
    assert "building packages from source is off" in package["reason"]

    http.put("/api/v1/packages", json={"packages": ["tiny-large"]}, headers=key)
    [package] = _settled(http, key)
    assert package == {
        "name": "tiny-large",
        "spec": "tiny-large",
        "version": "",
        "status": "failed",
        "reason": "the environment is larger than its size limit of 2 MiB",
    }
    # A run without packages again: the list emptied, runs are plain once more.
    http.put("/api/v1/packages", json={"packages": []}, headers=key)
    assert _run(http, key, "print(1)").json()["output"] == "1\n"


def test_a_run_waits_for_a_build_then_is_refused_with_progress(http: httpx.Client) -> None:
    key = _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-other"]}, headers=key)
    run = _run(http, key, "import tiny_other\nprint(tiny_other.NAME)")  # waits for the build
    assert run.status_code == 200 and run.json()["output"] == "other\n", run.text

    http.put("/api/v1/packages", json={"packages": ["tiny-slow"]}, headers=key)
    started = time.monotonic()
    message = error_message(_run(http, key, "import tiny_slow"), 400, 9)
    assert time.monotonic() - started >= RUN_WAIT_SECONDS - 0.5
    assert message == "the package environment is still building: 0 of 1 ready; retry shortly"
    # Its download still under way (8 s): listed as building, no version yet.
    building = http.get("/api/v1/packages", headers=key).json()["packages"]
    assert [(p["name"], p["status"], p.get("version", "")) for p in building] == [
        ("tiny-slow", "building", "")
    ]
    [package] = _settled(http, key)
    assert package["status"] == "ready"
    assert _run(http, key, "import tiny_slow\nprint(tiny_slow.SLOW)").json()["output"] == "True\n"


def _environment_calls(data_dir: Path) -> int:
    """How many GetEnvironment calls the packages service has answered (its request log)."""
    return (data_dir / "logs" / "packages.log").read_text().count("PackagesResolverService/GetEnvironment")


def test_a_ready_environment_is_asked_for_once_until_the_list_changes(
    http: httpx.Client, data_dir: Path
) -> None:
    key = _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-greet==1.0"]}, headers=key)
    _settled(http, key)
    calls = _environment_calls(data_dir)
    for _ in range(3):
        assert _run(http, key, "import tiny_greet\nprint(tiny_greet.hello())").json()["output"] == "old\n"
    assert _environment_calls(data_dir) == calls + 1  # the first run asked; the marker's key then held
    # A changed list is the very next run's, whatever was kept: first while it builds...
    http.put("/api/v1/packages", json={"packages": ["tiny-greet>=1.1"]}, headers=key)
    _settled(http, key)
    run = _run(http, key, "import tiny_greet\nprint(tiny_greet.hello())")
    assert run.json()["output"] == "hello from tiny-greet dep 1.0\n", run.text
    # ... and back to the first list: asked again (its environment may have been collected).
    http.put("/api/v1/packages", json={"packages": ["tiny-greet==1.0"]}, headers=key)
    _settled(http, key)
    asked = _environment_calls(data_dir)
    assert _run(http, key, "import tiny_greet\nprint(tiny_greet.hello())").json()["output"] == "old\n"
    assert _environment_calls(data_dir) == asked + 1
    http.put("/api/v1/packages", json={"packages": []}, headers=key)
    assert _run(http, key, "import tiny_greet").json()["exitCode"] == 1  # no packages: none mounted


def test_unused_environments_are_collected(http: httpx.Client, data_dir: Path) -> None:
    key = _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-greet==1.0"]}, headers=key)
    _settled(http, key)
    before = _environments(data_dir)
    http.put("/api/v1/packages", json={"packages": []}, headers=key)
    deadline = time.monotonic() + 10
    while _environments(data_dir) == before:
        assert time.monotonic() < deadline, "the unused environment was not collected"
        time.sleep(0.1)
    assert len(before - _environments(data_dir)) == 1


def test_environments_survive_a_restart(
    packages_mesh: Mesh, data_dir: Path, index: LocalIndex, http: httpx.Client
) -> None:
    key = _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-greet>=1.1"]}, headers=key)
    _settled(http, key)
    downloads, environments = len(index.downloads), _environments(data_dir)
    packages_mesh.stop()
    packages_mesh.start()
    with httpx.Client(base_url=packages_mesh.url, timeout=60) as again:
        assert [p["status"] for p in again.get("/api/v1/packages", headers=key).json()["packages"]] == [
            "ready"
        ]
        run = _run(again, key, "import tiny_greet\nprint(tiny_greet.hello())")
        assert run.json()["output"] == "hello from tiny-greet dep 1.0\n", run.text
    assert len(index.downloads) == downloads and _environments(data_dir) == environments
