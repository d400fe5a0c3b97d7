"""A seccomp filter that denies kernel interfaces sandboxed analysis code never needs.

Namespaces and dropped capabilities already make most of these calls fail; the filter removes the
kernel attack surface behind them as well (BPF, io_uring, userfaultfd, perf events, keyrings,
module loading, mount APIs, ptrace …). Denied calls fail with ``EPERM``, as do x32-ABI calls;
calls through a foreign ABI (32-bit ``int 0x80``) fail with ``ENOSYS``, so neither can bypass the list.

The program is classic BPF, handed to bubblewrap with ``--seccomp FD``. Supported: x86_64, aarch64
(elsewhere no filter is installed, and ``environment_info`` says so).
"""

from __future__ import annotations

import errno
import platform
import struct

# (x86_64, aarch64) numbers, checked against asm/unistd_64.h and asm-generic/unistd.h
DENIED: dict[str, tuple[int, int]] = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "unshare": (272, 97), "setns": (308, 268), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "quotactl": (179, 60),
    "syslog": (103, 116), "vhangup": (153, 58),
}

_ARCH = {"x86_64": (0xC000003E, 0), "amd64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1), "arm64": (0xC00000B7, 1)}

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_X32_BIT = 0x40000000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def supported(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in _ARCH


def program(machine: str | None = None) -> bytes:
    """The BPF program (``struct sock_filter[]``) for this machine's architecture."""
    machine = (machine or platform.machine()).lower()
    if machine not in _ARCH:
        raise ValueError(f"no seccomp filter for architecture {machine!r}")
    audit_arch, col = _ARCH[machine]
    nrs = sorted({v[col] for v in DENIED.values()})
    body: list[tuple[int, int]] = []  # (opcode, k) of the checks that jump to "deny" when true
    if audit_arch == 0xC000003E:
        body.append((_JGE_K, _X32_BIT))
    body += [(_JEQ_K, nr) for nr in nrs]
    # layout: 0 ld arch | 1 jeq arch (skip 1) | 2 ret ENOSYS | 3 ld nr | checks… | allow | deny
    n = 4 + len(body) + 2
    deny = n - 1
    prog = [
        _insn(_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _insn(_JEQ_K, 1, 0, audit_arch),
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        _insn(_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    for i, (op, k) in enumerate(body):
        idx = 4 + i
        jt = deny - (idx + 1)
        if jt > 255:
            raise ValueError("seccomp program too long for 8-bit jumps")
        prog.append(_insn(op, jt, 0, k))
    prog.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    prog.append(_insn(_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))
    assert len(prog) == n
    return b"".join(prog)
