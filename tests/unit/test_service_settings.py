"""A service refuses to start, with a clear message and no traceback, when a setting is missing or
malformed: the settings are read once, before anything else happens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.platform.identity import generate_private_key_pem, public_key_pem
from tests.mesh_identity import mesh_identity_files


@pytest.mark.parametrize(
    ("service", "settings", "message"),
    [
        ("auth", {}, "pythonon-auth: configuration error: PYTHONON_PORT is required but not set"),
        ("system", {"PYTHONON_PORT": "eighty"}, "pythonon-system: configuration error: PYTHONON_PORT must be an integer"),
        ("audit", {"PYTHONON_PORT": "0", "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": "/nonexistent/identity.pub"}, "PYTHONON_IDENTITY_PUBLIC_KEY_FILE names /nonexistent/identity.pub, which is not a readable file"),
        ("executor", {"PYTHONON_PORT": "0", "KEY": "", "PYTHONON_EXECUTOR_BACKEND": "docker"}, "PYTHONON_EXECUTOR_BACKEND must be one of bwrap, gvisor"),
    ],
)  # fmt: skip
def test_a_service_with_a_bad_setting_exits_2_with_a_clear_message(
    tmp_path: Path, service: str, settings: dict[str, str], message: str
) -> None:
    key = tmp_path / "identity.pub"
    key.write_bytes(public_key_pem(generate_private_key_pem()))
    env = {"PATH": os.environ["PATH"], **settings}
    if env.pop("KEY", None) is not None:
        env["PYTHONON_IDENTITY_PUBLIC_KEY_FILE"] = str(key)
        env.update(mesh_identity_files(tmp_path, service))
    ended = subprocess.run(
        [sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ended.returncode == 2
    assert message in ended.stderr
    assert "Traceback" not in ended.stderr


def test_an_integer_setting_past_its_bounds_is_refused_naming_them() -> None:
    from services.platform.settings import Environment, SettingsError

    name = "PYTHONON_SECRETS_MAX_PER_USER"
    for value, message in (
        ("1001", f"{name} must be at most 1000, got 1001"),
        ("0", f"{name} must be at least 1, got 0"),
    ):
        with pytest.raises(SettingsError) as refused:
            Environment({name: value}).integer(name, 100, minimum=1, maximum=1000)
        assert str(refused.value) == message
    assert Environment({name: "1000"}).integer(name, 100, minimum=1, maximum=1000) == 1000
