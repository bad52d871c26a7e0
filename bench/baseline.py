"""What every benchmark compares against, measured in the same run: a bare start-up of the
interpreter the sandbox runs (the base installation's, without site: `-I -S`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def base_python() -> str:
    """The interpreter the sandbox starts: the base installation's, not the virtual environment's."""
    return os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))


def bare_start_ms(runs: int, interpreter: str | None = None) -> list[float]:
    """Wall time, in ms, of starting and exiting the interpreter `runs` times, no sandbox around it."""
    command = [interpreter or base_python(), "-I", "-S", "-c", "pass"]
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]
