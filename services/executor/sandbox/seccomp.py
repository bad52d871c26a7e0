"""A small seccomp filter (classic BPF, handed to bwrap with --add-seccomp-fd) that refuses the
system calls a sandboxed program has no use for and that widen the kernel's attack surface: new
namespaces (so no user namespace with its own capabilities), mounts, keyrings, BPF, perf, io_uring,
ptrace, module and kexec loading; and sockets of any family but the few programs use (Unix, IPv4,
IPv6, and netlink routing sockets, which the C library reads interfaces through): no vsock (its
ports are shared host-wide, outside the network namespace), packet, crypto (AF_ALG) or other
netlink sockets. Everything else is allowed; the namespaces, the read-only mounts, the
unprivileged uid and the cgroup do the confining. x86-64 only; elsewhere there is no filter."""

from __future__ import annotations

import errno
import platform
import struct

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64)
_NR, _ARCH, _ARG0, _ARG2 = 0, 4, 16, 32

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000

_CLONE_NAMESPACE_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
_CLONE = 56
_CLONE3 = 435
_SOCKET = 41
_SOCKETPAIR = 53

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0
ALLOWED_SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

_DENIED_X86_64 = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "pivot_root": 155, "acct": 163, "mount": 165,
    "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320,
    "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_getfd": 438, "mount_setattr": 442,
}  # fmt: skip


def supported() -> bool:
    return platform.machine() == "x86_64"


def program() -> bytes | None:
    """The filter as an array of struct sock_filter, or None on an architecture without one."""
    if not supported():
        return None
    deny = _ERRNO | errno.EPERM
    code: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, deny),  # another ABI (i386 through int 0x80)
        (_LD_W_ABS, 0, 0, _NR),
        (_JGE_K, 0, 1, _X32_SYSCALL_BIT),
        (_RET_K, 0, 0, deny),  # the x32 ABI
        # clone3 passes its flags in memory a filter cannot read: make callers fall back to clone.
        (_JEQ_K, 0, 1, _CLONE3),
        (_RET_K, 0, 0, _ERRNO | errno.ENOSYS),
    ]
    code += _socket_families(deny)
    for number in sorted(_DENIED_X86_64.values()):
        code += [(_JEQ_K, 0, 1, number), (_RET_K, 0, 0, deny)]
    code += [
        (_JEQ_K, 1, 0, _CLONE),
        (_RET_K, 0, 0, _ALLOW),
        (_LD_W_ABS, 0, 0, _ARG0),  # low 32 bits of the flags (little-endian)
        (_JSET_K, 0, 1, _CLONE_NAMESPACE_FLAGS),
        (_RET_K, 0, 0, deny),
        (_RET_K, 0, 0, _ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", op, jt, jf, k) for op, jt, jf, k in code)


def _socket_families(deny: int) -> list[tuple[int, int, int, int]]:
    """socket() and socketpair(): the allowed families, netlink only for routing; else `deny`. The
    family (an int) is the low half of the first argument; the accumulator holds the call's number
    again for what follows when the call is neither."""
    block: list[tuple[int, int, int, int]] = [(_LD_W_ABS, 0, 0, _ARG0)]
    allowed = len(ALLOWED_SOCKET_FAMILIES) + 5  # the index of the last instruction: allow
    for family in ALLOWED_SOCKET_FAMILIES:
        block.append((_JEQ_K, allowed - len(block) - 1, 0, family))
    block.append((_JEQ_K, 0, 2, AF_NETLINK))  # else: to deny
    block.append((_LD_W_ABS, 0, 0, _ARG2))  # the protocol
    block.append((_JEQ_K, 1, 0, NETLINK_ROUTE))
    block += [(_RET_K, 0, 0, deny), (_RET_K, 0, 0, _ALLOW)]
    assert len(block) - 1 == allowed
    return [(_JEQ_K, 1, 0, _SOCKET), (_JEQ_K, 0, len(block), _SOCKETPAIR), *block]
