"""Building packages from source, through Envoy, with a mesh whose operator turned source builds on
(PYTHONON_PACKAGES_SOURCE_BUILDS=true; test_packages_api.py shows the default, off, refusing them):
an sdist-only package is built into a wheel inside the bwrap sandbox and is importable, and a
hostile setup.py can neither reach the network, write outside its folder, nor read the host's data
directory. The setup.py records what it tried into the module it builds; a run prints it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, new_email
from tests.packages.local_index import LocalIndex, buildable_sdist_files, standard_index

# Run by the hostile setup.py during its build; each attempt's outcome goes into the built module.
HOSTILE = """
import json, os, socket

def _attempt(action):
    try:
        return "done: " + str(action())
    except Exception as error:
        return "blocked: " + type(error).__name__

def _connect():
    with socket.create_connection(("127.0.0.1", {port}), timeout=3) as connection:
        connection.sendall(b"GET /stolen-by-setup-py HTTP/1.0\\r\\n\\r\\n")
        return connection.recv(100)

def _write_outside():
    with open({outside!r}, "w") as file:
        file.write("written by setup.py")
    return "wrote"

def _read_data_dir():
    return sorted(os.listdir({data_dir!r}))

def _write_build_environment():
    with open("/opt/pythonon/build-env/planted.py", "w") as file:
        file.write("x")

def module_source():
    results = {{
        "network": _attempt(_connect),
        "write_outside": _attempt(_write_outside),
        "read_data_dir": _attempt(_read_data_dir),
        "uid": os.getuid(),
    }}
    return "RESULTS = " + json.dumps(json.dumps(results)) + "\\n"
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("source-builds-mesh")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[LocalIndex]:
    local = standard_index(tmp_path_factory.mktemp("index"))
    local.add_sdist(
        "tiny-from-source", "0.2", buildable_sdist_files("tiny-from-source", "0.2", ["tiny-dep>=1"])
    )
    local.add_sdist("tiny-collected", "0.3", buildable_sdist_files("tiny-collected", "0.3"))
    with local.serve():
        port = int(local.url.split(":")[2].split("/")[0])
        hostile = HOSTILE.format(
            port=port, outside=str(data_dir / "planted-by-setup-py"), data_dir=str(data_dir)
        )
        local.add_sdist("tiny-hostile", "0.1", buildable_sdist_files("tiny-hostile", "0.1", extra=hostile))
        yield local


@pytest.fixture(scope="module")
def http(data_dir: Path, index: LocalIndex) -> Iterator[httpx.Client]:
    service_env = {
        **GENEROUS_LIMITS,
        "packages": {"PYTHONON_PACKAGES_INDEX_URL": index.url, "PYTHONON_PACKAGES_SOURCE_BUILDS": "true"},
    }
    with (
        Mesh(MeshConfig(port=0, data_dir=data_dir, service_env=service_env)) as mesh,
        httpx.Client(base_url=mesh.url, timeout=60) as client,
    ):
        yield client


def _user(http: httpx.Client) -> dict[str, str]:
    response = http.post("/api/register", json={"email": new_email("src"), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return {"x-api-key": response.json()["apiKey"]}


def _settled(http: httpx.Client, key: dict[str, str], seconds: float = 120) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        packages = http.get("/api/v1/packages", headers=key).json()["packages"]
        if all(package["status"] in ("ready", "failed") for package in packages):
            return packages
        assert time.monotonic() < deadline, packages
        time.sleep(0.2)


def _output(http: httpx.Client, key: dict[str, str], code: str) -> str:
    response = http.post("/api/v1/execute", json={"code": code}, headers=key)
    assert response.status_code == 200, response.text
    return response.json()["output"]


def test_an_sdist_only_package_is_built_in_the_sandbox_and_importable(
    http: httpx.Client, index: LocalIndex, data_dir: Path
) -> None:
    key = _user(http)
    assert (
        http.put("/api/v1/packages", json={"packages": ["tiny-from-source"]}, headers=key).status_code == 200
    )
    assert _settled(http, key) == [
        {
            "name": "tiny-from-source",
            "spec": "tiny-from-source",
            "version": "0.2",
            "status": "ready",
            "reason": "",
        }
    ]
    code = "import tiny_from_source, tiny_dep\nprint(tiny_from_source.VALUE, '|', tiny_dep.VALUE)"
    assert _output(http, key, code) == "built from source | dep 1.0\n"
    # Kept: another set that needs the same sdist takes the wheel built before, no second build.
    built = list((data_dir / "packages" / "built").iterdir())
    assert len(built) == 1 and [wheel.name for wheel in built[0].iterdir()] == [
        "tiny_from_source-0.2-py3-none-any.whl"
    ]
    downloads = index.downloads.count("tiny_from_source-0.2.tar.gz")
    other = _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-from-source", "tiny-other"]}, headers=other)
    assert [p["status"] for p in _settled(http, other)] == ["ready", "ready"]
    assert index.downloads.count("tiny_from_source-0.2.tar.gz") == downloads == 1
    assert len(list((data_dir / "packages" / "built").iterdir())) == 1


def test_a_hostile_setup_py_cannot_reach_the_network_write_outside_or_read_the_data_dir(
    http: httpx.Client, index: LocalIndex, data_dir: Path
) -> None:
    key = _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-hostile"]}, headers=key)
    [package] = _settled(http, key)
    assert package["status"] == "ready", package
    results = json.loads(_output(http, key, "import json, tiny_hostile\nprint(tiny_hostile.RESULTS)"))
    assert results["network"].startswith("blocked: "), results
    assert results["write_outside"].startswith("blocked: "), results
    assert results["read_data_dir"].startswith("blocked: "), results
    assert results["uid"] != 0  # not root, even inside
    # And from the host's side: nothing reached the index, nothing was written.
    assert not any("stolen" in download for download in index.downloads)
    assert not (data_dir / "planted-by-setup-py").exists()


def test_a_source_build_that_fails_answers_its_reason(http: httpx.Client) -> None:
    key = _user(http)
    # Its setup.py raises (the standard index's sdist-only package; no [build-system]: setuptools,
    # which this index does not have, so the build requirements cannot even be installed).
    http.put("/api/v1/packages", json={"packages": ["tiny-sdist-only"]}, headers=key)
    [package] = _settled(http, key)
    assert package["status"] == "failed"
    assert package["reason"].startswith(
        "tiny-sdist-only==0.1: its build requirements could not be installed"
    ), package
    assert "setuptools" in package["reason"]


def test_a_built_wheel_goes_with_the_last_environment_that_pins_it(
    http: httpx.Client, data_dir: Path
) -> None:
    built = data_dir / "packages" / "built"

    def wheels() -> set[str]:
        return {wheel.name for directory in built.iterdir() for wheel in directory.glob("*.whl")}

    key, other = _user(http), _user(http)
    http.put("/api/v1/packages", json={"packages": ["tiny-collected"]}, headers=key)
    http.put("/api/v1/packages", json={"packages": ["tiny-from-source"]}, headers=other)
    assert [p["status"] for p in _settled(http, key) + _settled(http, other)] == ["ready", "ready"]
    assert {"tiny_collected-0.3-py3-none-any.whl", "tiny_from_source-0.2-py3-none-any.whl"} <= wheels()
    before = len(list(built.iterdir()))

    assert http.put("/api/v1/packages", json={"packages": []}, headers=key).status_code == 200
    deadline = time.monotonic() + 30
    while "tiny_collected-0.3-py3-none-any.whl" in wheels():
        assert time.monotonic() < deadline, "the unpinned wheel was not removed"
        time.sleep(0.2)
    # Exactly that one went: the wheel another user's environment pins stays, and still imports.
    assert len(list(built.iterdir())) == before - 1
    assert "tiny_from_source-0.2-py3-none-any.whl" in wheels()
    assert (
        _output(http, other, "import tiny_from_source\nprint(tiny_from_source.VALUE)")
        == "built from source\n"
    )
    # Asked for again, it is built again from its sdist.
    http.put("/api/v1/packages", json={"packages": ["tiny-collected"]}, headers=key)
    assert [p["status"] for p in _settled(http, key)] == ["ready"]
    assert "tiny_collected-0.3-py3-none-any.whl" in wheels()
