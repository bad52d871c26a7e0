"""One whole mesh for the SDK's and the CLI's tests (the same runner as `make run`), whose generator
talks to the Anthropic stand-in and whose packages service builds from a local package index."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import pyth_on

from services.runner.mesh import Mesh, MeshConfig
from tests.anthropic_stub import AnthropicStub, running_stub
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, new_email
from tests.packages.local_index import LocalIndex, standard_index

ANTHROPIC_KEY = f"sk-ant-test-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def stub() -> Iterator[AnthropicStub]:
    with running_stub(ANTHROPIC_KEY) as running:
        yield running


@pytest.fixture(scope="session")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIndex]:
    local = standard_index(tmp_path_factory.mktemp("sdk-index"))
    with local.serve():
        yield local


@pytest.fixture(scope="session")
def sdk_mesh(
    stub: AnthropicStub, index: LocalIndex, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        patch.setenv("ANTHROPIC_BASE_URL", stub.url)
        config = MeshConfig(
            port=0,
            data_dir=tmp_path_factory.mktemp("sdk-mesh"),
            service_env={**GENEROUS_LIMITS, "packages": {"PYTHONON_PACKAGES_INDEX_URL": index.url}},
        )
        with Mesh(config) as running:
            yield running


def register(mesh: Mesh, tag: str = "sdk") -> dict[str, str]:
    """A new user through the plain REST API (not the SDK under test): apiKey, email, password."""
    email = new_email(tag)
    response = httpx.post(f"{mesh.url}/api/register", json={"email": email, "password": PASSWORD}, timeout=60)
    assert response.status_code == 201, response.text
    return {"apiKey": response.json()["apiKey"], "email": email, "password": PASSWORD}


@pytest.fixture()
def account(sdk_mesh: Mesh) -> dict[str, str]:
    return register(sdk_mesh)


@pytest.fixture()
def client(sdk_mesh: Mesh, account: dict[str, str]) -> Iterator[pyth_on.Client]:
    with pyth_on.Client(sdk_mesh.url, api_key=account["apiKey"]) as sdk:
        yield sdk


def stream_endpoint_missing(mesh: Mesh, api_key: str) -> str | None:
    """Why the stream tests cannot run here (the endpoint is built separately), or None."""
    response = httpx.post(
        f"{mesh.url}/api/v1/execute/stream",
        json={"code": "print(1)"},
        headers={"x-api-key": api_key},
        timeout=60,
    )
    if response.status_code in (404, 405):
        return f"POST /api/v1/execute/stream is not built in this checkout ({response.status_code})"
    return None
