"""The executor queues fairly, through Envoy: a burst of runs from several users is answered in full
(queued, not refused); one user's flood delays another user's single run by about one run's time;
past the bound the answer is 429 with a Retry-After after which the run is taken; a caller that
hangs up while its run waits leaves the line, and its run never runs.

The mesh's executor sizes its slots itself (min(memory, cores × 4 / a run's CPU quota)); its
per-user cap is raised to the slot count, so that the fairness measured here comes from the
round-robin turns, not from slots a capped user leaves free."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, new_email

QUEUE_BOUND_SECONDS = 8
WAITING_PER_USER = 60
EXECUTOR_ENV = {
    "PYTHONON_EXECUTOR_MAX_RUNS_PER_USER": "1000",  # no cap below the slots: the turns alone are fair
    "PYTHONON_EXECUTOR_MAX_QUEUE_SECONDS": str(QUEUE_BOUND_SECONDS),
    "PYTHONON_EXECUTOR_MAX_WAITING_PER_USER": str(WAITING_PER_USER),
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    service_env = {**GENEROUS_LIMITS, "executor": EXECUTOR_ENV}
    config = MeshConfig(port=0, data_dir=tmp_path_factory.mktemp("fair-queue"), service_env=service_env)
    with Mesh(config) as running:
        yield running


def register(mesh: Mesh, tag: str) -> dict:
    response = httpx.post(
        f"{mesh.url}/api/register", json={"email": new_email(tag), "password": PASSWORD}, timeout=30
    )
    assert response.status_code == 201, response.text
    return response.json()


def execute(mesh: Mesh, user: dict, code: str, timeout: float = 60) -> httpx.Response:
    with httpx.Client(base_url=mesh.url, timeout=timeout) as http:
        return http.post("/api/v1/execute", json={"code": code}, headers={"x-api-key": user["apiKey"]})


def output_of(response: httpx.Response) -> str:
    assert response.status_code == 200, (response.status_code, response.text)
    body = response.json()
    assert (body["exitCode"], body["error"], body["timedOut"]) == (0, "", False), body
    return str(body["output"])


def slots_of(mesh: Mesh) -> int:
    """The executor's run slots, as it logged them at start-up."""
    log = Path(mesh.log_path("executor")).read_text()
    marker = "sandbox admission: "
    line = next(line for line in log.splitlines() if marker in line)
    return int(line.split(marker, 1)[1].split(" runs at once", 1)[0])


def executions_audited(mesh: Mesh, user: dict) -> list[dict]:
    response = httpx.get(
        f"{mesh.url}/api/v1/audit", params={"limit": 500}, headers={"x-api-key": user["apiKey"]}, timeout=30
    )
    assert response.status_code == 200, response.text
    return [e for e in response.json()["entries"] if e["action"] == "executor.execute"]


def test_64_concurrent_runs_from_3_users_are_all_answered_correctly(mesh: Mesh) -> None:
    users = [register(mesh, f"burst{n}") for n in range(3)]
    jobs = [(users[i % 3], uuid.uuid4().hex) for i in range(64)]

    def run(job: tuple[dict, str]) -> httpx.Response:
        user, token = job
        # A fifth of a second each, so that 64 of them outnumber the slots and wait in line.
        return execute(
            mesh, user, f"import time\ntime.sleep(0.2)\nprint({token!r}, {user['user']['email']!r})"
        )

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(run, jobs))
    elapsed = time.monotonic() - started
    for (user, token), response in zip(jobs, responses, strict=True):
        assert output_of(response) == f"{token} {user['user']['email']}\n"
    assert len({r.json()["executionId"] for r in responses}) == 64
    slots = slots_of(mesh)
    assert slots < 64  # so some of them waited in line
    assert elapsed >= 0.2 * (64 // slots)
    print(f"64 runs of 0.2 s from 3 users on {slots} slots: all answered in {elapsed:.2f} s")


def test_a_flood_delays_another_users_single_run_by_about_one_run(mesh: Mesh) -> None:
    flooder, other = register(mesh, "flooder"), register(mesh, "other")
    assert output_of(execute(mesh, other, "print('warm')")) == "warm\n"

    def one_second(n: int) -> httpx.Response:
        return execute(mesh, flooder, f"import time\ntime.sleep(1)\nprint({n})")

    with ThreadPoolExecutor(max_workers=48) as pool:
        flood = [pool.submit(one_second, n) for n in range(48)]
        time.sleep(1)  # the 48 reach the executor: the slots are A's, the rest wait in line
        started = time.monotonic()
        hello = execute(mesh, other, "print('hello, world')")
        waited = time.monotonic() - started
        still_queued = sum(not f.done() for f in flood)
        assert output_of(hello) == "hello, world\n"
        print(
            f"B's hello-world with A's 48 one-second runs queued: {waited:.2f} s ({still_queued} of A's pending)"
        )
        assert waited < 2.5, waited
        assert still_queued >= 48 - 3 * slots_of(mesh)  # it overtook the flood, not waited it out
        for n, future in enumerate(flood):
            assert output_of(future.result(timeout=60)) == f"{n}\n"


def test_past_the_bound_429_with_a_retry_after_after_which_the_run_is_taken(mesh: Mesh) -> None:
    flooder, other = register(mesh, "bound"), register(mesh, "bystander")
    slots = slots_of(mesh)
    flood_size = WAITING_PER_USER + 16  # more than may wait

    def run(code: str) -> tuple[float, httpx.Response]:
        response = execute(mesh, flooder, code)
        return time.monotonic(), response

    with ThreadPoolExecutor(max_workers=slots + flood_size) as pool:
        # The slots are held for 6 s, so that the flood's line does not move while it arrives.
        held = [pool.submit(run, f"import time\ntime.sleep(6)\nprint('held {n}')") for n in range(slots)]
        time.sleep(1)
        flood = [pool.submit(run, f"import time\ntime.sleep(1)\nprint({n})") for n in range(flood_size)]
        time.sleep(2)
        bystander = execute(mesh, other, "print('still served')")
        assert output_of(bystander) == "still served\n"  # another user is not refused for A's flood
        answers = [f.result(timeout=120) for f in flood]
        for n, future in enumerate(held):
            assert output_of(future.result(timeout=60)[1]) == f"held {n}\n"
    refused = [(at, r) for at, r in answers if r.status_code == 429]
    answered = [r for _, r in answers if r.status_code == 200]
    assert len(refused) + len(answered) == flood_size, [r.status_code for _, r in answers]
    assert len(refused) >= flood_size - WAITING_PER_USER
    for _, response in refused:
        assert response.json() == {"code": 8, "message": "the executor is busy; retry shortly", "details": []}
        # The expected wait: the line ahead (at most 60 runs of about a second) over the slots.
        assert 1 <= int(response.headers["retry-after"]) <= QUEUE_BOUND_SECONDS + 2
    for response in answered:
        output_of(response)
    # Retried when the first refusal said, the run is taken (its wait is now within the bound).
    refused_at, first = min(refused, key=lambda answer: answer[0])
    retry_after = int(first.headers["retry-after"])
    time.sleep(max(0.0, refused_at + retry_after - time.monotonic()))
    assert output_of(execute(mesh, flooder, "print('taken')")) == "taken\n"
    print(
        f"{len(refused)} of {flood_size} refused (bound {QUEUE_BOUND_SECONDS} s), Retry-After {retry_after} s"
    )


def test_a_caller_that_hangs_up_while_waiting_leaves_the_line_and_its_run_never_runs(mesh: Mesh) -> None:
    holder, leaver = register(mesh, "holder"), register(mesh, "leaver")
    slots = slots_of(mesh)
    ghost = f"import time\ntime.sleep(2)\nprint({uuid.uuid4().hex!r})"
    ghost_digest = hashlib.sha256(ghost.encode()).hexdigest()

    def hold(n: int) -> httpx.Response:
        return execute(mesh, holder, f"import time\ntime.sleep(2)\nprint({n})")

    def hang_up(_: int) -> None:
        with pytest.raises(httpx.ReadTimeout):
            execute(mesh, leaver, ghost, timeout=0.5)

    with ThreadPoolExecutor(max_workers=slots + 20) as pool:
        held = [pool.submit(hold, n) for n in range(slots)]
        time.sleep(0.7)  # every slot is the holder's for the next second or so
        list(pool.map(hang_up, range(20)))  # 20 runs queued, then their callers hang up
        # Had the 20 stayed in line, this run would wait behind them: 20 × 2 s over the slots.
        started = time.monotonic()
        after = execute(mesh, leaver, "print('next')")
        waited = time.monotonic() - started
        assert output_of(after) == "next\n"
        assert waited < 2.5, waited
        for n, future in enumerate(held):
            assert output_of(future.result(timeout=30)) == f"{n}\n"
    deadline = time.monotonic() + 15  # the cancelled records are written in the background
    while True:
        entries = executions_audited(mesh, leaver)
        ghosts = [e for e in entries if e["details"].get("codeSha256") == ghost_digest]
        if len(ghosts) >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ghosts) == 20
    assert {(e["outcome"], e["details"]["reason"]) for e in ghosts} == {("cancelled", "caller_gone")}
    assert not any("exitCode" in e["details"] for e in ghosts)  # none of them ran
