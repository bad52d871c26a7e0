"""Where the command line finds its server and key: PYTHONON_URL and PYTHONON_API_KEY, else the
file `pyth-on login` writes (`$XDG_CONFIG_HOME/pyth-on/config.json`, else `~/.config/...`), only its
owner may read it (0600, in a 0700 folder)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyth_on._calls import DEFAULT_URL


def config_path() -> Path:
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "pyth-on" / "config.json"


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None
    # Where each came from, for messages: "PYTHONON_URL", the config file's path, or "default".
    url_source: str
    key_source: str | None


class ConfigError(Exception):
    pass


def read_file(path: Path | None = None) -> dict[str, str]:
    """The stored settings ({} when there is no file); ConfigError when it is unreadable or others
    may read it (the key would be exposed: the file is not used until its mode is fixed)."""
    path = path or config_path()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} may be read by other users; run `chmod 600 {path}` (or `pyth-on login` again)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return {key: value for key, value in data.items() if isinstance(value, str)}


def settings() -> Settings:
    """Environment first, then the config file, then the default URL."""
    url, key = os.environ.get("PYTHONON_URL"), os.environ.get("PYTHONON_API_KEY")
    url_source = "PYTHONON_URL" if url else ""
    key_source = "PYTHONON_API_KEY" if key else None
    if not url or not key:
        path = config_path()
        stored = read_file(path)
        if not url and stored.get("url"):
            url, url_source = stored["url"], str(path)
        if not key and stored.get("api_key"):
            key, key_source = stored["api_key"], str(path)
    return Settings(url or DEFAULT_URL, key, url_source or "default", key_source)


def write_file(url: str, api_key: str, path: Path | None = None) -> Path:
    """Store the URL and key, readable by the owner only. The file is written beside its final name
    with mode 0600 from its creation and renamed into place, so no moment exposes the key."""
    path = path or config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump({"url": url, "api_key": api_key}, file)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def remove_file(path: Path | None = None) -> bool:
    path = path or config_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
