"""Finding and using cgroups on v1, v2 and hosts without either, against a fake /proc and a fake
cgroup tree (control files created as the kernel would): this host has only v1, and a test must
not depend on which hierarchy the machine happens to have."""

from __future__ import annotations

from pathlib import Path

from services.executor.sandbox import cgroups, leftovers

OWNER = leftovers.owner_tag()  # this process, as a cgroup's name records its owner


def fake_proc(tmp_path: Path, mountinfo: list[str], membership: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("\n".join(mountinfo) + "\n")
    (proc / "self" / "cgroup").write_text(membership)
    return proc


def control_files(directory: Path, contents: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (directory / name).write_text(text)


def test_v2_delegates_memory_pids_and_cpu_under_the_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "unified"
    own = root / "service.slice" / "executor"
    control_files(
        own, {"cgroup.controllers": "cpu io memory pids\n", "cgroup.subtree_control": "", "cgroup.procs": ""}
    )
    base = own / f"{cgroups.PREFIX}{OWNER}-t1"
    control_files(base, {"cgroup.subtree_control": ""})
    proc = fake_proc(
        tmp_path,
        [f"30 25 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"],
        "0::/service.slice/executor\n",
    )

    support = cgroups.detect("t1", proc=proc)

    assert support.memory and support.pids and support.cpu and not support.missing
    assert [(h.version, h.base) for h in support.hierarchies] == [(2, base)]
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"

    sandbox = base / "sandbox-1"
    control_files(
        sandbox, dict.fromkeys(["cgroup.procs", "memory.max", "memory.swap.max", "pids.max", "cpu.max"], "")
    )
    control_files(sandbox, {"memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"})
    cgroup = cgroups.SandboxCgroup([(support.hierarchies[0], sandbox)])
    cgroup.set_limits(256 << 20, 64, cpus=0.5)
    cgroup.add_process(1234)
    assert support.procs_files(cgroup) == [str(sandbox / "cgroup.procs")]
    assert (sandbox / "cpu.max").read_text() == "50000 100000"
    assert (sandbox / "memory.max").read_text() == str(256 << 20)
    assert (sandbox / "memory.swap.max").read_text() == "0"
    assert (sandbox / "pids.max").read_text() == "64"
    assert (sandbox / "cgroup.procs").read_text() == "1234"
    assert cgroup.oom_killed()


def test_v2_without_the_controllers_says_why(tmp_path: Path) -> None:
    root = tmp_path / "unified"
    control_files(
        root, {"cgroup.controllers": "cpu io\n", "cgroup.subtree_control": "", "cgroup.procs": "1\n"}
    )
    proc = fake_proc(tmp_path, [f"30 25 0:26 / {root} rw - cgroup2 cgroup2 rw"], "0::/\n")

    support = cgroups.detect("t2", proc=proc)

    assert not support.memory and not support.pids and not support.hierarchies
    assert "not enabled" in support.missing["memory"] and "not enabled" in support.missing["pids"]


def test_v1_uses_one_hierarchy_per_controller(tmp_path: Path) -> None:
    memory, pids, cpu = tmp_path / "memory", tmp_path / "pids", tmp_path / "cpu"
    (memory / "jobs" / "executor").mkdir(parents=True)
    pids.mkdir()
    cpu.mkdir()
    proc = fake_proc(
        tmp_path,
        [
            f"40 25 0:30 / {memory} rw,nosuid - cgroup cgroup rw,memory",
            f"41 25 0:31 / {pids} rw,nosuid - cgroup cgroup rw,pids",
            f"42 25 0:32 / {cpu} rw - cgroup cgroup rw,cpu,cpuacct",
        ],
        "9:pids:/\n4:memory:/jobs/executor\n2:cpu,cpuacct:/\n0::/\n",
    )

    support = cgroups.detect("t3", proc=proc)

    name = f"{cgroups.PREFIX}{OWNER}-t3"
    assert [(h.version, sorted(h.controllers), h.base) for h in support.hierarchies] == [
        (1, ["memory"], memory / "jobs" / "executor" / name),
        (1, ["pids"], pids / name),
        (1, ["cpu"], cpu / name),
    ]
    sandbox_memory, sandbox_pids = memory / "jobs" / "executor" / name / "s", pids / name / "s"
    sandbox_cpu = cpu / name / "s"
    control_files(sandbox_memory, dict.fromkeys(["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"], ""))
    control_files(sandbox_memory, {"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"})
    control_files(sandbox_pids, {"pids.max": ""})
    control_files(sandbox_cpu, {"cpu.cfs_period_us": "", "cpu.cfs_quota_us": ""})
    cgroup = cgroups.SandboxCgroup(
        [
            (h, base / "s")
            for h, base in zip(
                support.hierarchies,
                [memory / "jobs" / "executor" / name, pids / name, cpu / name],
                strict=True,
            )
        ]
    )
    cgroup.set_limits(1 << 20, 8, cpus=1.5)
    assert (sandbox_cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (sandbox_cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (sandbox_memory / "memory.limit_in_bytes").read_text() == str(1 << 20)
    assert (sandbox_memory / "memory.memsw.limit_in_bytes").read_text() == str(1 << 20)
    assert (sandbox_pids / "pids.max").read_text() == "8"
    assert not cgroup.oom_killed()
    (sandbox_memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert cgroup.oom_killed()


def test_stale_directories_of_dead_backends_are_removed(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    stale = memory / f"{cgroups.PREFIX}999999999-old"
    (stale / "sandbox-1").mkdir(parents=True)
    # The same pid as a live backend's, but another start time: a reused pid, so also stale.
    reused = memory / f"{cgroups.PREFIX}{OWNER.split('-')[0]}-1-other"
    reused.mkdir()
    alive = memory / f"{cgroups.PREFIX}{OWNER}-other"
    alive.mkdir()
    proc = fake_proc(tmp_path, [f"40 25 0:30 / {memory} rw - cgroup cgroup rw,memory"], "4:memory:/\n")

    cgroups.detect("t4", proc=proc)

    assert not stale.exists() and not reused.exists() and alive.exists()


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, ["22 1 0:21 / /proc rw - proc proc rw"], "")
    support = cgroups.detect("t5", proc=proc)
    assert not support.hierarchies and set(support.missing) == {"memory", "pids", "cpu"}
