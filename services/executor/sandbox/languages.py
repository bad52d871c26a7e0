"""The one table of the languages a sandbox can run. The executor's validation, /api/info (through
the backend's `languages()`), both backends and their start-up checks read it; a new language is a
row here and a runtime finder in runtimes.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.executor.sandbox import runtimes


@dataclass(frozen=True)
class Language:
    name: str
    main_file: str  # the code's file name in the working directory
    # Finds the runtime on this host: (the language, an explicit executable or None, a directory the
    # backend owns) -> Runtime; raises LookupError with the reason when it is missing.
    find_runtime: Callable[[Language, str | None, Path], runtimes.Runtime]
    smoke_test: str  # code that must print exactly "ok\n": run by every backend at start-up
    hello: str  # code that prints exactly "hello\n" (benchmarks)
    aliases: tuple[str, ...] = ()  # other names callers commonly use for it


SMOKE_TEST_OUTPUT = "ok\n"

LANGUAGES: Mapping[str, Language] = {
    language.name: language
    for language in (
        Language(
            "python", "main.py", runtimes.find_python, "print('ok')", "print('hello')", ("py", "python3")
        ),
        Language(
            "javascript",
            "main.js",
            runtimes.find_node,
            "console.log('ok')",
            "console.log('hello')",
            ("js", "node", "nodejs"),
        ),
        Language("bash", "main.sh", runtimes.find_bash, "echo ok", "echo hello", ("sh", "shell")),
    )
}

_BY_NAME = {
    name: language.name for language in LANGUAGES.values() for name in (language.name, *language.aliases)
}


def canonical_name(name: str) -> str | None:
    """The language a name or alias (e.g. "py", "node") stands for; None for no language."""
    return _BY_NAME.get(name)


def discover(
    runtime_dir: Path, executables: Mapping[str, str | None], wanted: frozenset[str] | None = None
) -> tuple[dict[str, runtimes.Runtime], dict[str, str]]:
    """The runtimes present on this host (only the `wanted` languages, when given), and for each
    missing one the reason. `executables` names an explicit interpreter per language."""
    found: dict[str, runtimes.Runtime] = {}
    missing: dict[str, str] = {}
    for name, language in LANGUAGES.items():
        if wanted is not None and name not in wanted:
            continue
        try:
            found[name] = language.find_runtime(language, executables.get(name), runtime_dir)
        except LookupError as error:
            missing[name] = str(error)
    return found, missing
