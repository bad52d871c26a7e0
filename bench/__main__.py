"""Benchmarks: `make bench` (or `python -m bench`). Not part of the test suite.

Measures, in one run on this machine, the baseline — a bare interpreter start-up
(`python3 -I -S -c pass`, the interpreter the sandbox runs; half before the mesh starts, half after
its sequential runs, so that the ratio sees the machine's drift) — and hello-world runs through the
whole mesh (Envoy, the edge check, the executor, the user's secrets, the warm sandbox, the audit
record), sequentially (p50, p95, p99) and under concurrency 8 (runs/second, p99), and prints the
ratios against the baseline measured in the same run. Also the p50 of `GET /api/v1/secrets` through
the edge (a user without secrets, as the runs' user, and one with three, also right after a change
of theirs), and the memory the idle mesh holds (RSS and PSS of every process, see
bench/memory.py)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench import memory
from bench.baseline import bare_start_ms, base_python, percentile
from services.executor.sandbox import BACKENDS
from services.runner.mesh import Mesh, MeshConfig

HELLO = {"code": "print('hello')"}
# Secrets of the second user whose list is timed.
HOLDER_SECRETS = 3
# Bare interpreter start-ups, half before the mesh starts and half after its sequential runs.
BASELINE_RUNS = 50


def one_run(client: httpx.Client, headers: dict[str, str], pause: float = 0.0) -> float:
    if pause:
        time.sleep(pause)  # requests arriving apart: the warm pool refills between them
    started = time.perf_counter()
    response = client.post("/api/v1/execute", json=HELLO, headers=headers)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200 or response.json()["output"] != "hello\n":
        raise SystemExit(f"a benchmark run failed: {response.status_code} {response.text[:200]}")
    return elapsed


def list_secrets(
    client: httpx.Client, headers: dict[str, str], expected: int = 0, count: int = 200
) -> list[float]:
    """`count` timed GET /api/v1/secrets, each checked to list `expected` secrets."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        listed = client.get("/api/v1/secrets", headers=headers)
        times.append((time.perf_counter() - started) * 1000)
        if listed.status_code != 200 or len(listed.json()["secrets"]) != expected:
            raise SystemExit(f"GET /api/v1/secrets failed: {listed.status_code} {listed.text[:200]}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300, help="sequential runs (default 300)")
    parser.add_argument(
        "--concurrent-runs", type=int, default=600, help="runs at concurrency 8 (default 600)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="warm sandboxes per language (default: the executor's own, as make run has it)",
    )
    parser.add_argument("--sandbox", choices=BACKENDS, default="bwrap", help="the executor's sandbox backend")
    parser.add_argument(
        "--executors", type=int, default=1, help="executor processes (pyth-on up --executors)"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds between sequential runs (gvisor: ~0.5, the time a container takes to start)",
    )
    args = parser.parse_args()

    interpreter = base_python()
    # Half the baseline before the mesh starts, half after its sequential runs (the mesh idle
    # again): this machine's speed drifts within minutes, and the ratio should see the same drift.
    baseline_before = bare_start_ms(BASELINE_RUNS // 2, interpreter)
    service_env = {
        "auth": {"PYTHONON_AUTH_USER_RATE_BURST": "100000", "PYTHONON_AUTH_USER_RATE_PER_MINUTE": "1000000"},
        "executor": {
            "PYTHONON_EXECUTOR_BACKEND": args.sandbox,
            **({"PYTHONON_EXECUTOR_POOL_SIZE": str(args.pool_size)} if args.pool_size is not None else {}),
        },
    }
    with tempfile.TemporaryDirectory() as data_dir:
        config = MeshConfig(
            port=0,
            data_dir=Path(data_dir),
            service_env=service_env,
            log_level="WARNING",
            executors=args.executors,
        )
        with Mesh(config) as mesh, httpx.Client(base_url=mesh.url, timeout=60) as client:
            registered = client.post(
                "/api/register", json={"email": "bench@example.com", "password": "correct horse battery"}
            )
            headers = {"x-api-key": registered.json()["apiKey"]}
            time.sleep(5)  # idle: warm pools filled, start-up work done
            idle = memory.by_part(mesh.pids)
            for _ in range(20):
                one_run(client, headers)
            secrets = list_secrets(client, headers)
            # The same for a user who has secrets: their list asks Vault for each one.
            holder = client.post(
                "/api/register", json={"email": "holder@example.com", "password": "correct horse battery"}
            )
            holder_headers = {"x-api-key": holder.json()["apiKey"]}
            for index in range(HOLDER_SECRETS):
                client.put(f"/api/v1/secrets/BENCH_{index}", json={"value": "x"}, headers=holder_headers)
            held_secrets = list_secrets(client, holder_headers, expected=HOLDER_SECRETS)
            # Right after a change, which makes the secrets service read the list from Vault again.
            fresh_lists = []
            for _ in range(50):
                client.put("/api/v1/secrets/BENCH_0", json={"value": "y"}, headers=holder_headers)
                fresh_lists += list_secrets(client, holder_headers, expected=HOLDER_SECRETS, count=1)
            sequential = [one_run(client, headers, args.pause) for _ in range(args.runs)]
            time.sleep(1)  # the pool refilled: the bare starts have the cores to themselves
            baseline_after = bare_start_ms(BASELINE_RUNS - BASELINE_RUNS // 2, interpreter)

            clients = [httpx.Client(base_url=mesh.url, timeout=60) for _ in range(args.concurrency)]
            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                concurrent = list(
                    pool.map(
                        lambda i: one_run(clients[i % args.concurrency], headers), range(args.concurrent_runs)
                    )
                )
            wall = time.perf_counter() - started
            for each in clients:
                each.close()

    baseline = baseline_before + baseline_after
    base_p50 = statistics.median(baseline)
    p50, p95, p99 = (percentile(sequential, f) for f in (0.50, 0.95, 0.99))
    throughput = args.concurrent_runs / wall
    print(
        f"machine: {Path('/proc/cpuinfo').read_text().count('processor')} cores, python {sys.version.split()[0]}"
    )
    print(
        f"baseline  bare `{Path(interpreter).name} -I -S -c pass`: p50 {base_p50:.1f} ms (n={len(baseline)}; "
        f"before the mesh {statistics.median(baseline_before):.1f}, "
        f"after its sequential runs {statistics.median(baseline_after):.1f})"
    )
    pause = f", {args.pause:g} s apart" if args.pause else ""
    print(
        f"mesh      hello-world through Envoy, {args.sandbox} sandbox, sequential (n={len(sequential)}{pause}):"
    )
    print(f"            p50 {p50:.1f} ms   p95 {p95:.1f} ms   p99 {p99:.1f} ms")
    executors = f", {args.executors} executors" if args.executors > 1 else ""
    print(f"mesh      concurrency {args.concurrency}{executors} (n={len(concurrent)}):")
    print(f"            {throughput:.1f} runs/s   p99 {percentile(concurrent, 0.99):.1f} ms")
    print(
        f"edge      GET /api/v1/secrets (n={len(secrets)}): p50 {statistics.median(secrets):.1f} ms; "
        f"a user with {HOLDER_SECRETS} secrets: p50 {statistics.median(held_secrets):.1f} ms, "
        f"right after a change of theirs {statistics.median(fresh_lists):.1f} ms"
    )
    rss = sum(part[0] for part in idle.values()) / memory.KIB**2
    pss = sum(part[1] for part in idle.values()) / memory.KIB**2
    print(f"memory    idle mesh: RSS {rss:.0f} MiB, PSS {pss:.0f} MiB (shared pages split among sharers)")
    print("            " + ", ".join(f"{name} {part[1] / memory.KIB**2:.0f}" for name, part in idle.items()))
    print("ratios")
    print(f"  p50 through the mesh / bare interpreter start-up = {p50 / base_p50:.2f}   (target <= 1.0)")
    print(f"  runs/s at concurrency {args.concurrency} / 60 target = {throughput / 60:.2f}   (target >= 1.0)")
    print(
        f"  GET /api/v1/secrets p50 / 3 ms target = {statistics.median(secrets) / 3:.2f}   (target <= 1.0; "
        f"with {HOLDER_SECRETS} secrets {statistics.median(held_secrets) / 3:.2f})"
    )
    print(f"  idle PSS / 600 MiB target = {pss / 600:.2f}   (target <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
