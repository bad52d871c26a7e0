"""A package index on loopback for the tests: wheels (and sdists) of tiny packages made here, served
by the simple repository API (PEP 503) that uv reads, with optional slow downloads.

Wheels are written directly (a zip with the module, METADATA, WHEEL and RECORD), so making one costs
milliseconds and needs no build backend."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from packaging.utils import canonicalize_name


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@dataclass
class LocalIndex:
    root: Path
    # Seconds each download of a file whose name starts with a key waits before it is served.
    slow: dict[str, float] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)
    url: str = ""

    def add_wheel(
        self,
        name: str,
        version: str,
        modules: Mapping[str, str | bytes],
        requires: Sequence[str] = (),
    ) -> Path:
        """A py3-none-any wheel with `modules` (path inside the wheel → source) and its dependencies."""
        dist = name.replace("-", "_")
        info = f"{dist}-{version}.dist-info"
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
            f"Requires-Dist: {requirement}\n" for requirement in requires
        )
        files: dict[str, bytes] = {
            path: content.encode() if isinstance(content, str) else content
            for path, content in modules.items()
        }
        files[f"{info}/METADATA"] = metadata.encode()
        files[f"{info}/WHEEL"] = (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
        files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
        wheel = self._files(name) / f"{dist}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, data in files.items():
                archive.writestr(path, data)
        self._write_page(name)
        return wheel

    def add_sdist(self, name: str, version: str, files: Mapping[str, str] | None = None) -> Path:
        """A source distribution only: by default one whose setup.py must never run (it fails if it
        does); `files` (path inside the project → text) for one that can be built."""
        dist = name.replace("-", "_")
        sdist = self._files(name) / f"{dist}-{version}.tar.gz"
        contents = (
            files if files is not None else {"setup.py": "raise SystemExit('this setup.py must never run')\n"}
        )
        with tarfile.open(sdist, "w:gz") as archive:
            for path, text in contents.items():
                data = text.encode()
                entry = tarfile.TarInfo(f"{dist}-{version}/{path}")
                entry.size = len(data)
                archive.addfile(entry, io.BytesIO(data))
        self._write_page(name)
        return sdist

    def _files(self, name: str) -> Path:
        directory = self.root / "simple" / canonicalize_name(name)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def _write_page(self, name: str) -> None:
        directory = self._files(name)
        links = []
        for file in sorted(directory.iterdir()):
            if file.name == "index.html":
                continue
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            links.append(
                f'<a href="{html.escape(file.name)}#sha256={digest}">{html.escape(file.name)}</a><br>'
            )
        (directory / "index.html").write_text(
            "<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>"
        )

    @contextmanager
    def serve(self) -> Iterator[LocalIndex]:
        index = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(index.root), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                file = self.path.rsplit("/", 1)[-1]
                if file and file != "index.html":
                    index.downloads.append(file)
                    for prefix, seconds in index.slow.items():
                        if file.startswith(prefix):
                            time.sleep(seconds)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}/simple"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


def standard_index(root: Path) -> LocalIndex:
    """The packages the tests use: a package with a dependency, a second one, an sdist-only one,
    a slow one (its download waits, see LocalIndex.slow), and a large one."""
    index = LocalIndex(root)
    index.add_wheel("tiny-dep", "1.0", {"tiny_dep/__init__.py": "VALUE = 'dep 1.0'\n"})
    index.add_wheel(
        "tiny-greet",
        "1.2",
        {
            "tiny_greet/__init__.py": "from tiny_dep import VALUE\n\ndef hello():\n    return 'hello from tiny-greet ' + VALUE\n"
        },
        requires=["tiny-dep>=1.0"],
    )
    index.add_wheel("tiny-greet", "1.0", {"tiny_greet/__init__.py": "def hello():\n    return 'old'\n"})
    index.add_wheel("tiny-other", "0.3", {"tiny_other/__init__.py": "NAME = 'other'\n"})
    index.add_sdist("tiny-sdist-only", "0.1")
    index.add_wheel("tiny-slow", "1.0", {"tiny_slow/__init__.py": "SLOW = True\n"})
    index.add_wheel("tiny-large", "1.0", {"tiny_large/blob.bin": _incompressible(3 * 1024 * 1024)})
    return index


def _incompressible(size: int) -> bytes:
    out = bytearray()
    seed = b"pythonon"
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:size])


# An in-tree PEP 517 backend (the project's own setup.py, named by pyproject.toml): building needs
# nothing from the index, and whatever `module_source()` does runs during the build.
_IN_TREE_BACKEND = """\
import base64, hashlib, os, zipfile

NAME, VERSION, REQUIRES = {name!r}, {version!r}, {requires!r}


def module_source():
    return "VALUE = 'built from source'\\n"


{extra}


def _hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    dist = NAME.replace("-", "_")
    info = f"{{dist}}-{{VERSION}}.dist-info"
    metadata = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"
    metadata += "".join(f"Requires-Dist: {{r}}\\n" for r in REQUIRES)
    files = {{
        f"{{dist}}/__init__.py": module_source().encode(),
        f"{{info}}/METADATA": metadata.encode(),
        f"{{info}}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: tests\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }}
    record = "".join(f"{{path}},{{_hash(data)}},{{len(data)}}\\n" for path, data in files.items())
    files[f"{{info}}/RECORD"] = (record + f"{{info}}/RECORD,,\\n").encode()
    wheel = f"{{dist}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel
"""


def buildable_sdist_files(
    name: str, version: str, requires: Sequence[str] = (), extra: str = ""
) -> dict[str, str]:
    """The files of an sdist built by its own setup.py (an in-tree backend); `extra` is code run in
    that setup.py, e.g. a `module_source()` that returns what the built module holds."""
    return {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "setup"\nbackend-path = ["."]\n',
        "setup.py": _IN_TREE_BACKEND.format(name=name, version=version, requires=list(requires), extra=extra),
    }
