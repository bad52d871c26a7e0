"""Generate everything derived from protos/: Python stubs (with .pyi) in gen/, Envoy's descriptor set,
and the OpenAPI document of the REST API with its reference page (edge/openapi.json, edge/docs.html).

Run `make generate`; `make check-generated` (and CI) fails when the committed output is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
DESCRIPTOR_SET = ROOT / "edge" / "pythonon.pb"
OPENAPI_DOCUMENT = ROOT / "edge" / "openapi.json"
REFERENCE_PAGE = ROOT / "edge" / "docs.html"


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


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _openapi(document_path: Path, page_path: Path) -> None:
    """The OpenAPI document and its HTML page, from a descriptor set with the proto comments."""
    # Imported here: the edge's modules import the stubs this script writes.
    sys.path[:0] = [str(ROOT), str(GEN)]
    from edge import config, openapi
    from services.platform.service_graph import built_services

    with tempfile.TemporaryDirectory() as scratch:
        commented = Path(scratch) / "commented.pb"
        _protoc(["--include_imports", "--include_source_info", f"--descriptor_set_out={commented}"])
        spec = openapi.document(
            config._load(commented).file,
            config.services(commented),
            version=_project_version(),
            built_sections=[node.name for node in built_services()],
        )
    document_path.write_text(openapi.render_json(spec))
    page_path.write_text(openapi.reference_page(spec))


def generate(gen_dir: Path, descriptor_set: Path, document: Path, page: Path) -> None:
    """Write the stubs into gen_dir, the descriptor set to descriptor_set and the OpenAPI document and
    its page to document and page, from scratch."""
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
    _openapi(document, page)


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
        document, page = Path(scratch) / "openapi.json", Path(scratch) / "docs.html"
        generate(gen_dir, descriptor_set, document, page)
        fresh, committed = _tree(gen_dir), _tree(GEN) if GEN.exists() else {}
        stale = sorted(
            name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
        )
        for fresh_file, committed_file in [
            (descriptor_set, DESCRIPTOR_SET),
            (document, OPENAPI_DOCUMENT),
            (page, REFERENCE_PAGE),
        ]:
            if not committed_file.exists() or not filecmp.cmp(fresh_file, committed_file, shallow=False):
                stale.append(str(committed_file.relative_to(ROOT)))
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
    generate(GEN, DESCRIPTOR_SET, OPENAPI_DOCUMENT, REFERENCE_PAGE)
    generated = [DESCRIPTOR_SET, OPENAPI_DOCUMENT, REFERENCE_PAGE]
    print(f"generated {GEN.relative_to(ROOT)}/,", ", ".join(str(p.relative_to(ROOT)) for p in generated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
