"""What `buf` needs to check protos/ offline (`make proto-lint`, `make proto-breaking`).

googleapis   copy the google/api protos that protos/ imports (transitively) from the
             googleapis-common-protos wheel into tools/buf/googleapis/, the module buf.yaml
             names instead of a schema registry; tools/generate.py compiles from the same files
breaking     `buf breaking`: protos/ in the working tree against protos/ at a commit
             (default HEAD~1), built with today's buf.yaml and googleapis copy
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = ROOT / "tools" / "buf"
PROTOS = ROOT / "protos"
GOOGLEAPIS = HERE / "googleapis"
BUF = HERE / "node_modules" / ".bin" / "buf"
# google/protobuf/* (the well-known types) are built into buf; everything else under google/ is copied.
IMPORT = re.compile(
    r'^\s*import\s+(?:public\s+|weak\s+)?"(google/(?!protobuf/)[^"]+\.proto)"\s*;', re.MULTILINE
)


def _imports(proto: Path) -> set[str]:
    return set(IMPORT.findall(proto.read_text(encoding="utf-8")))


def copy_googleapis() -> int:
    import google.api  # googleapis-common-protos ships the .proto files next to its modules

    source = Path(google.api.__file__).resolve().parent.parent.parent
    wanted = set().union(*(_imports(proto) for proto in PROTOS.rglob("*.proto")))
    if GOOGLEAPIS.exists():
        shutil.rmtree(GOOGLEAPIS)
    copied: set[str] = set()
    while wanted - copied:
        name = min(wanted - copied)
        if not (source / name).is_file():
            print(f"{name} is imported but googleapis-common-protos does not ship it", file=sys.stderr)
            return 1
        (GOOGLEAPIS / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, GOOGLEAPIS / name)
        copied.add(name)
        wanted |= _imports(source / name)
    print(f"copied {', '.join(sorted(copied))} into {GOOGLEAPIS.relative_to(ROOT)}/")
    return 0


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)


def breaking(against: str) -> int:
    found = _git("rev-parse", "--verify", "--quiet", f"{against}^{{commit}}")
    if found.returncode != 0:
        print(
            f"buf breaking: skipped, there is no commit {against} to compare with (a first commit or a shallow clone)"
        )
        return 0
    commit = found.stdout.decode().strip()
    if _git("cat-file", "-e", f"{commit}:protos").returncode != 0:
        print(f"buf breaking: skipped, {against} ({commit[:12]}) has no protos/")
        return 0
    archive = _git("archive", "--format=tar", commit, "protos")
    if archive.returncode != 0:
        print(archive.stderr.decode(), file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pythonon-buf-") as scratch:
        previous = Path(scratch)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(previous, filter="data")
        shutil.copyfile(ROOT / "buf.yaml", previous / "buf.yaml")
        shutil.copytree(GOOGLEAPIS, previous / GOOGLEAPIS.relative_to(ROOT))
        print(f"buf breaking: protos/ in the working tree against protos/ at {against} ({commit[:12]})")
        return subprocess.run(
            [str(BUF), "breaking", "--against", str(previous)], cwd=ROOT, check=False
        ).returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("googleapis")
    compare = commands.add_parser("breaking")
    compare.add_argument("--against", default="HEAD~1", help="a commit, branch or tag (default HEAD~1)")
    args = parser.parse_args()
    if args.command == "googleapis":
        return copy_googleapis()
    if not GOOGLEAPIS.is_dir():
        print("tools/buf/googleapis/ is missing; run `make proto-lint`", file=sys.stderr)
        return 1
    return breaking(args.against)


if __name__ == "__main__":
    sys.exit(main())
