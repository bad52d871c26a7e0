"""The version of each language's runtime, as the sandbox itself reports it: one tiny run per
language, once per executor process, through the backend (so every backend answers the same way,
whatever host or image the runtime comes from). Not audited: it runs no user's code."""

from __future__ import annotations

import asyncio
import logging
import re

from services.executor.sandbox import RunSpec, SandboxBackend, SandboxError

log = logging.getLogger("pythonon.executor.runtime_versions")

# Code that prints the runtime's version and nothing else.
_PROBES = {
    "python": "import sys; print(sys.version.split()[0])",
    "javascript": "console.log(process.versions.node)",
    "bash": 'echo "${BASH_VERSION%%(*}"',
}
_VERSION = re.compile(r"\d+(?:\.\d+){1,3}")


class RuntimeVersions:
    """Asked once (on first use), remembered for the life of the process; a language whose probe
    fails has version "" and is asked again next time."""

    def __init__(self, backend: SandboxBackend) -> None:
        self._backend = backend
        self._known: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def get(self) -> dict[str, str]:
        """language -> version (e.g. "3.11.2"), for every language the backend runs."""
        async with self._lock:
            missing = [name for name in self._backend.languages() if name not in self._known]
            found = await asyncio.gather(*(self._probe(name) for name in missing))
            self._known.update(
                {name: version for name, version in zip(missing, found, strict=True) if version}
            )
            self._backend.replenish()
        return {name: self._known.get(name, "") for name in self._backend.languages()}

    async def _probe(self, language: str) -> str:
        code = _PROBES.get(language)
        if code is None:
            return ""
        try:
            result = await self._backend.run(RunSpec(language=language, code=code))
        except (SandboxError, ValueError) as error:
            log.warning("runtime version probe failed", extra={"language": language, "error": str(error)})
            return ""
        match = _VERSION.fullmatch(result.stdout.strip())
        return match.group(0) if match and result.exit_code == 0 else ""
