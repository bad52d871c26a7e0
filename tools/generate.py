"""Generate everything derived from protos/: Python stubs (with .pyi) in gen/ and Envoy's descriptor set.

Run `make generate`; `make check-generated` (and CI) fails when the committed output is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
DESCRIPTOR_SET = ROOT / "edge" / "pythonon.pb"


def _include_dirs() -> list[Path]:
    import google.api  # googleapis-common-protos ships the .proto files next to the modules

    return [
        PROTOS,
        Path(grpc_tools.__file__).parent / "_proto",
        Path(google.api.__file__).parent.parent.parent,
    ]


def _proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def _protoc(args: list[str]) -> None:
    includes = [f"-I{d}" for d in _include_dirs()]
    code = protoc.main(["protoc", *includes, *args, *_proto_files()])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generate(gen_dir: Path, descriptor_set: Path) -> None:
    """Write the stubs into gen_dir and the descriptor set to descriptor_set, from scratch."""
    if gen_dir.exists():
        shutil.rmtree(gen_dir)
    gen_dir.mkdir(parents=True)
    descriptor_set.parent.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            f"--python_out={gen_dir}",
            f"--grpc_python_out={gen_dir}",
            f"--mypy_out={gen_dir}",
            f"--mypy_grpc_out={gen_dir}",
        ]
    )
    _protoc(["--include_imports", f"--descriptor_set_out={descriptor_set}"])
    package = gen_dir / "pythonon"
    for directory in [package, *sorted(p for p in package.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (package / "py.typed").touch()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def check() -> int:
    """Regenerate into a scratch directory and compare with what is committed."""
    with tempfile.TemporaryDirectory() as scratch:
        gen_dir, descriptor_set = Path(scratch) / "gen", Path(scratch) / "pythonon.pb"
        generate(gen_dir, descriptor_set)
        fresh, committed = _tree(gen_dir), _tree(GEN) if GEN.exists() else {}
        stale = sorted(
            name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
        )
        if not DESCRIPTOR_SET.exists() or not filecmp.cmp(descriptor_set, DESCRIPTOR_SET, shallow=False):
            stale.append(str(DESCRIPTOR_SET.relative_to(ROOT)))
    if stale:
        print("generated files are stale; run `make generate`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated files are fresh")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed output is stale")
    args = parser.parse_args()
    os.chdir(ROOT)
    # The mypy plugins are installed next to this interpreter, in the project's virtual environment.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if args.check:
        return check()
    generate(GEN, DESCRIPTOR_SET)
    print(f"generated {GEN.relative_to(ROOT)}/ and {DESCRIPTOR_SET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
