"""The sandbox layer alone, no gRPC or edge: `python -m bench.sandbox_latency [--backend bwrap]`.

Measures in one run on this machine the baseline — a bare `python3 -I -S -c pass` of the
interpreter the sandbox runs — then hello-world runs straight through the backend: sequentially
with the warm pool refilling between runs (p50, p95, p99), and under concurrency 8 (runs/second,
p99), and prints the ratios against the baseline. Not part of the test suite."""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.baseline import bare_start_ms, percentile
from services.executor.sandbox import BACKENDS, LANGUAGES, RunSpec, create_backend


async def measure(backend_name: str, language: str, runs: int, pause: float, concurrency: int) -> None:
    backend = create_backend(backend_name)
    await backend.start()
    try:
        spec = RunSpec(language, LANGUAGES[language].hello)

        async def one() -> float:
            started = time.perf_counter()
            result = await backend.run(spec)
            if result.stdout != "hello\n":
                raise SystemExit(f"a benchmark run failed: {result}")
            return (time.perf_counter() - started) * 1000

        sequential = []
        for _ in range(runs):
            await asyncio.sleep(pause)  # requests arrive apart; the pool refills between them
            sequential.append(await one())

        done: list[float] = []

        async def worker(count: int) -> None:
            for _ in range(count):
                done.append(await one())

        started = time.perf_counter()
        await asyncio.gather(*(worker(runs // concurrency) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await backend.close()

    bare = bare_start_ms(30)
    bare_p50 = percentile(bare, 0.5)
    p50, p95, p99 = (percentile(sequential, f) for f in (0.5, 0.95, 0.99))
    print(f"bare python3 -I -S -c pass:      p50 {bare_p50:6.1f} ms")
    print(f"{backend_name} {language} hello, sequential: p50 {p50:6.1f} ms  p95 {p95:6.1f}  p99 {p99:6.1f}")
    print(f"  ratio p50 / bare start:        {p50 / bare_p50:6.2f}")
    print(
        f"{backend_name} {language} hello, concurrency {concurrency}: {len(done) / wall:6.1f} runs/s  "
        f"p99 {percentile(done, 0.99):6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="bwrap", choices=BACKENDS)
    parser.add_argument("--language", default="python", choices=list(LANGUAGES))
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between sequential runs")
    parser.add_argument("--concurrency", type=int, default=8)
    arguments = parser.parse_args()
    asyncio.run(
        measure(arguments.backend, arguments.language, arguments.runs, arguments.pause, arguments.concurrency)
    )


if __name__ == "__main__":
    main()
