"""A streamed run's output: what is told of each stream, joined with what is told when the run ends,
is exactly the answer's text, whatever the pieces' boundaries (inside a UTF-8 character), bytes that
are not UTF-8, or the output cap; and never more than the cap is told."""

from __future__ import annotations

import pytest

from services.executor.live_output import LiveOutput
from services.executor.sandbox import Limits
from services.executor.sandbox.interface import result_of

CAP = 64


def told_while_running_and_after(pieces: list[tuple[str, bytes]], overflowed: bool = False) -> tuple:
    told: list[tuple[str, str]] = []
    live = LiveOutput(CAP, lambda stream, text: told.append((stream, text)))
    kept = {"stdout": b"", "stderr": b""}
    for stream, data in pieces:
        room = CAP - len(kept[stream])  # the sandbox keeps (and tells) at most the cap
        if room > 0:
            kept[stream] += data[:room]
            live.hear(stream, data[:room])
    while_running = list(told)
    result = result_of(
        Limits(output_bytes=CAP),
        stdout=kept["stdout"],
        stderr=kept["stderr"],
        exit_code=0,
        duration_seconds=0.1,
        timed_out=False,
        overflowed=overflowed,
    )
    live.finish(result)
    return result, while_running, told


def joined(told: list[tuple[str, str]], stream: str) -> str:
    return "".join(text for name, text in told if name == stream)


@pytest.mark.parametrize("split", range(1, 9))
def test_characters_split_across_pieces_are_told_whole(split: int) -> None:
    data = "héllo → wörld 🐍\n".encode()
    pieces = [("stdout", data[i : i + split]) for i in range(0, len(data), split)]
    result, while_running, told = told_while_running_and_after(pieces)
    assert joined(while_running, "stdout") == result.stdout == "héllo → wörld 🐍\n"
    assert told == while_running  # nothing left for the end
    assert all("\ufffd" not in text for _, text in told)


def test_bytes_that_are_not_utf8_are_told_as_the_answer_has_them() -> None:
    pieces = [("stdout", b"ok \xff\xfe"), ("stderr", b"\xe2\x82"), ("stdout", b" fine\n")]
    result, _, told = told_while_running_and_after(pieces)
    assert joined(told, "stdout") == result.stdout == "ok \ufffd\ufffd fine\n"
    # An unfinished character at the end becomes what the answer has for it, told at the end.
    assert joined(told, "stderr") == result.stderr


def test_the_cap_bounds_what_is_told_and_the_notes_come_last() -> None:
    pieces = [("stdout", b"x" * 40), ("stdout", b"\xff" * 40)]  # U+FFFD is 3 bytes: the text grows
    result, while_running, told = told_while_running_and_after(pieces, overflowed=True)
    assert len(joined(while_running, "stdout").encode()) <= CAP
    assert joined(told, "stdout") == result.stdout and len(result.stdout.encode()) <= CAP
    assert joined(told, "stderr") == result.stderr
    assert told[-1][0] == "stderr" and "[sandbox] output limit" in told[-1][1]


def test_stream_order_is_kept() -> None:
    pieces = [("stdout", b"a"), ("stderr", b"b"), ("stdout", b"c")]
    _, while_running, _ = told_while_running_and_after(pieces)
    assert while_running == [("stdout", "a"), ("stderr", "b"), ("stdout", "c")]
