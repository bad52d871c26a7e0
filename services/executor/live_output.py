"""A run's output told as the program writes it: the sandbox's pieces of bytes become text, decoded
as UTF-8 across the pieces' boundaries and cut at the same cap as the answer's, so that what is told
of a stream is always the start of the answer's text for it; the rest (output a backend could not
tell before the run ended, the sandbox's notes at the end of stderr) is told once the run has ended.
So the text told of each stream, joined, is exactly what the answer holds."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable

from services.executor.sandbox import RunResult

log = logging.getLogger("pythonon.executor.live_output")

STREAMS = ("stdout", "stderr")


class LiveOutput:
    """`tell(stream, text)` hears each piece of text; `hear` is the sandbox's OutputListener."""

    def __init__(self, cap: int, tell: Callable[[str, str], None]) -> None:
        self._cap = cap
        self._tell = tell
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in STREAMS}
        self._told: dict[str, list[str]] = {name: [] for name in STREAMS}
        self._told_bytes = dict.fromkeys(STREAMS, 0)

    def hear(self, stream: str, data: bytes) -> None:
        text = self._decoders[stream].decode(data)
        room = self._cap - self._told_bytes[stream]
        if not text or room <= 0:
            return
        encoded = text.encode()
        if len(encoded) > room:
            # Bytes that are not UTF-8 became U+FFFD (3 bytes each): cut as the answer is cut.
            encoded = encoded[:room]
            text = encoded.decode(errors="ignore")
        self._told_bytes[stream] += len(encoded)
        self._told[stream].append(text)
        self._tell(stream, text)

    def finish(self, result: RunResult) -> None:
        """Tell what the answer holds beyond what was told while the run went on."""
        for stream, whole in (("stdout", result.stdout), ("stderr", result.stderr)):
            told = "".join(self._told[stream])
            if not whole.startswith(told):
                # Not expected (the answer is cut the same way); the result still holds it all.
                log.warning("the %s told while running is not the start of the result's", stream)
                continue
            rest = whole[len(told) :]
            if rest:
                self._told[stream].append(rest)
                self._tell(stream, rest)
