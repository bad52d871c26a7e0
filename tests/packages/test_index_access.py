"""What reaches uv: the operator's trust store and proxy variables (so that builds work behind a
TLS-intercepting proxy), and nothing else of the service's environment."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from services.packages.environments import BuildFailed, Installer, Target

PASSED = {
    "SSL_CERT_FILE": "/etc/corporate/ca.pem",
    "SSL_CERT_DIR": "/etc/corporate/certs",
    "UV_NATIVE_TLS": "true",
    "HTTPS_PROXY": "http://proxy.internal:3128",
    "NO_PROXY": "localhost",
}


def test_the_trust_store_and_proxy_variables_reach_the_uv_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for uv that records the environment it was started with, then fails as uv would.
    seen = tmp_path / "environment.json"
    recorder = tmp_path / "uv"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))\n"
        "sys.stderr.write('error: no index here')\nsys.exit(2)\n"
    )
    recorder.chmod(0o755)
    for name, value in PASSED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONON_PACKAGES_CANARY_TOKEN", "must-not-reach-uv")
    monkeypatch.setenv("UV_INDEX_URL", "http://elsewhere.invalid/simple")
    installer = Installer(uv=str(recorder), index_url=None, cache_dir=tmp_path / "cache")
    target = Target(python=sys.executable, version="3", platform="linux-x86_64")

    async def resolve() -> None:
        deadline = asyncio.get_running_loop().time() + 30
        await installer.resolve(["tiny-greet"], target, deadline)

    with pytest.raises(BuildFailed, match="no index here"):
        asyncio.run(resolve())
    environment = json.loads(seen.read_text())
    assert {name: environment.get(name) for name in PASSED} == PASSED
    assert environment["UV_CACHE_DIR"] == str(tmp_path / "cache")
    assert "PYTHONON_PACKAGES_CANARY_TOKEN" not in environment
    assert "UV_INDEX_URL" not in environment  # no UV_* of the service steers uv but the trust switch
