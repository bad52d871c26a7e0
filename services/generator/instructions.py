"""What the model is told: the system prompt for one generation, built from facts only (the language
and its runtime version and the limits as the executor reports them, the user's packages, and the
NAMES of the user's secrets: never a value, which the generator never even fetches)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class _LanguageFacts:
    title: str  # how the language is named to the model
    runtime: str  # the runtime whose version is given
    reads_secret: str  # how the code reads a variable named NAME
    packages_apply: bool  # whether the user's package list applies to it (the packages service: Python)


_FACTS = {
    "python": _LanguageFacts("Python", "CPython", 'os.environ["NAME"]', True),
    "javascript": _LanguageFacts("JavaScript", "Node.js", "process.env.NAME", False),
    "bash": _LanguageFacts("Bash", "GNU Bash", '"$NAME"', False),
}


@dataclass(frozen=True)
class RunFacts:
    """What a run of the generated code will have."""

    language: str
    runtime_version: str  # "" when the executor could not tell
    timeout_seconds: float
    memory_bytes: int
    processes: int
    output_bytes: int
    file_bytes: int
    tmp_bytes: int
    packages: Sequence[str]  # the user's packages, as PEP 508 requirements
    secret_names: Sequence[str]  # environment-variable names; values are never known here


def _size(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


def system_prompt(facts: RunFacts) -> str:
    """The system prompt for code in `facts.language` that runs with `facts`."""
    language = _FACTS.get(facts.language, _LanguageFacts(facts.language, facts.language, "NAME", False))
    runtime = f"{language.runtime} {facts.runtime_version}".strip()
    lines = [
        "You write programs for Pyth-On, a code-execution service. The user describes a task; you "
        "answer with the complete program (code), the third-party packages it needs (packages), and "
        "a short explanation (explanation).",
        "",
        "Where the program runs:",
        f"- Language: {language.title}, run by {runtime}.",
        "- A sandbox with no network access at all: the program cannot download anything, reach an "
        "API or open a connection to another host. Do not write code that needs the network.",
        "- It runs once, non-interactively: input comes only from stdin, results go to stdout, "
        "errors to stderr, and the exit status says whether it worked.",
        f"- Limits: {facts.timeout_seconds:g} seconds of wall-clock time, {_size(facts.memory_bytes)} "
        f"of memory, {facts.processes} processes, {_size(facts.output_bytes)} of output per stream "
        f"(more is cut off), files up to {_size(facts.file_bytes)}, and {_size(facts.tmp_bytes)} in "
        "/tmp and in the working directory.",  # noqa: S108 (the sandbox's /tmp, described to the model)
    ]
    if not language.packages_apply:
        lines.append(
            f"- Only {language.title}'s built-in modules and standard tools are available; list no packages."
        )
    elif facts.packages:
        lines.append(
            "- Installed third-party packages (importable): " + ", ".join(facts.packages) + ". Anything "
            "else the program imports besides the standard library must be listed in `packages`."
        )
    else:
        lines.append(
            "- No third-party packages are installed. Prefer the standard library; list in `packages` "
            "every third-party package the program imports (it is importable only once installed)."
        )
    if facts.secret_names:
        names = ", ".join(facts.secret_names)
        lines.append(
            f"- The user's stored secrets are set as environment variables named: {names}. When the "
            f"task needs one, read it from the environment (e.g. {language.reads_secret}); never "
            "print a secret, write its value into the code, or invent other secret names."
        )
    else:
        lines.append("- The user has no stored secrets; the environment holds none.")
    lines += [
        "",
        "Write complete, production-quality code: no placeholders, no code fences, handle errors "
        "clearly, and print what the user asked for.",
    ]
    return "\n".join(lines)
