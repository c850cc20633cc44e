"""Landlock (Linux 5.13+): an unprivileged process restricts its own file system, TCP and IPC access for good.

The kernel's interface is three system calls; this module calls them through ctypes (the C library has no wrappers)
and uses only what the running kernel's ABI version offers:

- ABI 1+: file access (read, write, execute, make and remove entries) beneath granted folders, nothing elsewhere;
- ABI 2+: REFER (moving or linking a file between folders) is also denied unless granted;
- ABI 3+: truncation is denied unless granted;
- ABI 4+: TCP bind and connect are denied (no rule grants a port);
- ABI 5+: ioctl on device files is denied unless granted;
- ABI 6+: scoping: no connection to abstract UNIX sockets and no signals to processes outside the domain.

Restrictions hold for the process, its threads and anything it starts, and cannot be lifted.
"""
from __future__ import annotations

import ctypes
import os
import platform
import stat
from dataclasses import dataclass
from pathlib import Path

_SYSCALLS = {  # the same numbers on every architecture that has Landlock (asm-generic and x86_64)
    "create_ruleset": 444, "add_rule": 445, "restrict_self": 446,
}
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

#: Rights that apply to a regular file (a rule on a file may only grant these).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | MAKE_FIFO | MAKE_SOCK | REFER
         | TRUNCATE)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class LandlockError(OSError):
    pass


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _syscall(name: str, *args) -> int:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(_SYSCALLS[name]), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"landlock_{name}: {os.strerror(err)}")
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    if platform.system() != "Linux":
        return 0
    try:
        return _syscall("create_ruleset", None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (LandlockError, OSError, AttributeError):
        return 0


def handled_fs(abi: int) -> int:
    rights = READ | WRITE | MAKE_CHAR | MAKE_BLOCK
    if abi < 2:
        rights &= ~REFER
    if abi < 3:
        rights &= ~TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


@dataclass(frozen=True)
class Grants:
    """What the process keeps: read-only paths, read-write paths, and device files it may also ioctl."""

    read: tuple[Path, ...] = ()
    write: tuple[Path, ...] = ()
    devices: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Applied:
    abi: int
    fs: bool
    net: bool
    scoped: bool


def restrict_self(grants: Grants) -> Applied:
    """Restrict this process (and every thread and child it will have) to `grants`; LandlockError if the kernel
    refuses. Paths that do not exist are skipped."""
    abi = abi_version()
    if abi < 1:
        raise LandlockError(0, "Landlock is not available in this kernel")
    fs = handled_fs(abi)
    attr = _RulesetAttr(handled_access_fs=fs)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # and no rule grants a port
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    ruleset = _syscall("create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        for paths, rights in ((grants.read, READ), (grants.write, READ | WRITE),
                              (grants.devices, READ_FILE | WRITE_FILE | (IOCTL_DEV if abi >= 5 else 0))):
            for path in paths:
                _add_path(ruleset, Path(path), rights & fs)
        if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise LandlockError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        _syscall("restrict_self", ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return Applied(abi=abi, fs=True, net=abi >= 4, scoped=abi >= 6)


def _add_path(ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        _syscall("add_rule", ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                 ctypes.c_uint32(0))
    finally:
        os.close(fd)
