"""Each installed distribution is compiled once: a later environment that installs the same wheel
links the compiled files an earlier build kept (same inode), and they are hash-based and
unchecked, so that they stay valid whatever the sources' timestamps."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from services.packages.environments import (
    _COMPILE_SOURCES,
    BuildLimits,
    EnvironmentStore,
    Installer,
    Target,
    _shares,
)
from services.packages.settings import _base_interpreter
from tests.packages.local_index import standard_index

UNCHECKED_HASH = 0b01  # the pyc header's flags (PEP 552): hash-based, not checked against the source


def _pyc(site: Path, package: str) -> Path:
    (found,) = (site / package / "__pycache__").glob("__init__.cpython-*.pyc")
    return found


def _built(tmp_path: Path, *sets: list[str]) -> tuple[EnvironmentStore, list[str]]:
    """A new store with an environment built for each requirement set, in order, from the tests'
    local index; the store and the environments' keys."""
    index = standard_index(tmp_path / "index")
    store = EnvironmentStore(tmp_path / "store")
    target = Target.probe(_base_interpreter())

    async def build(installer: Installer, requirements: list[str]) -> str:
        deadline = asyncio.get_running_loop().time() + 120
        lock = await installer.resolve(requirements, target, deadline)
        return await store.build(
            installer, lock, target, BuildLimits(1 << 30, 120), deadline, lambda _n: None
        )

    with index.serve():
        installer = Installer(
            uv=str(Path(sys.executable).parent / "uv"), index_url=index.url, cache_dir=store.cache
        )
        return store, [asyncio.run(build(installer, requirements)) for requirements in sets]


def test_a_wheel_compiled_for_one_environment_is_linked_into_the_next(tmp_path: Path) -> None:
    # The second needs tiny-dep too, and a new wheel.
    store, keys = _built(tmp_path, ["tiny-dep"], ["tiny-greet>=1.2"])
    first, second = (store.path(key) for key in keys)

    kept = _pyc(first, "tiny_dep")
    assert int.from_bytes(kept.read_bytes()[4:8], "little") == UNCHECKED_HASH
    assert os.stat(_pyc(second, "tiny_dep")).st_ino == os.stat(kept).st_ino  # linked, not compiled again
    assert os.stat(kept).st_nlink == 3  # the two environments' and the cache's
    assert _pyc(second, "tiny_greet").is_file()  # the new wheel compiled, and kept for the next
    entries = list((store.cache / "bytecode-v1").iterdir())
    assert len(entries) == 2 and not any(entry.name.startswith("partial-") for entry in entries)
    # The environment imports from its compiled files through the read-only tree.
    imported = subprocess.run(
        [
            _base_interpreter(),
            "-I",
            "-S",
            "-c",
            "import sys; sys.path[:0] = sys.argv[1:]; import tiny_greet; print(tiny_greet.hello())",
            str(second),
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert imported.startswith("hello from tiny-greet"), imported


def test_entries_no_environment_links_are_pruned(tmp_path: Path) -> None:
    store, (only_dep, other) = _built(tmp_path, ["tiny-dep"], ["tiny-other"])
    assert store.prune_bytecode() == 0  # both entries are linked
    store.remove(other)
    assert store.prune_bytecode() == 1
    (left,) = (store.cache / "bytecode-v1").iterdir()
    assert os.stat(_pyc(store.path(only_dep), "tiny_dep")).st_ino in {
        os.stat(path).st_ino for path in left.rglob("*.pyc")
    }


def test_sources_are_shared_out_to_compile_by_size_and_a_small_set_stays_in_one_process(
    tmp_path: Path,
) -> None:
    sizes = {"big.py": 300_000, "mid.py": 200_000, "small.py": 90_000, "tiny.py": 10}
    files = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"#" * size)
        files.append(tmp_path / name)
    shares = _shares([*files, tmp_path / "gone.py"], 2)  # a file that vanished is skipped
    assert sorted(path.name for share in shares for path in share) == sorted(sizes)
    assert [[path.name for path in share] for share in shares] == [
        ["big.py"],
        ["mid.py", "small.py", "tiny.py"],
    ]
    assert _shares(files, 4) == shares  # 590 kB: two shares of 256 KiB at most
    assert _shares(files[2:], 2) == [files[2:]]  # under 256 KiB: one process
    assert _shares([], 2) == []


def test_the_compiler_writes_what_compileall_writes_and_skips_what_does_not_compile(
    tmp_path: Path,
) -> None:
    python = _base_interpreter()
    sources = {
        "pkg/__init__.py": "from .mod import VALUE\n",
        "pkg/mod.py": "VALUE = [n * n for n in range(10)]\n\ndef f(x):\n    return x + 1\n",
        "pkg/with space.py": "print('a name with a space')\n",
        "pkg/broken.py": "def nope(:\n",
    }
    trees = {}
    for name in ("ours", "compileall"):
        root = tmp_path / name
        for relative, text in sources.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text)
        trees[name] = root
    listing = "\n".join(sources) + "\n"
    ours = subprocess.run(
        [python, "-I", "-S", str(_COMPILE_SOURCES)], input=listing, cwd=trees["ours"], text=True, check=False
    )
    assert ours.returncode == 0  # a module that does not compile is no failure of the script
    subprocess.run(
        [python, "-I", "-S", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", "-i", "-"],
        input=listing, cwd=trees["compileall"], text=True, capture_output=True, check=False,
    )  # fmt: skip
    compiled = {
        name: {path.relative_to(root): path.read_bytes() for path in root.rglob("*.pyc")}
        for name, root in trees.items()
    }
    assert len(compiled["ours"]) == 3  # the broken module has none, as compileall leaves it
    assert compiled["ours"] == compiled["compileall"]
    header = next(iter(compiled["ours"].values()))
    assert int.from_bytes(header[4:8], "little") == UNCHECKED_HASH
