"""The job process's system-call filter, built with libseccomp (through the `pyseccomp` ctypes binding).

Everything a compression job needs stays allowed (files, memory, threads, futexes); what it never needs is refused
with an error, so a hostile model cannot use it even from native code:

- no network: `socket` and `socketpair` only for AF_UNIX (Landlock scopes abstract sockets and file permissions
  the rest);
- no new processes or programs: `fork`, `vfork`, `clone` without CLONE_THREAD, `execve`, `execveat` (`clone3`
  answers ENOSYS so the C library falls back to `clone`, whose flags the filter can read);
- nothing that reaches other processes or the kernel's state: ptrace, process_vm_*, pidfd_getfd, kcmp,
  namespaces, mounts, keyrings, BPF, perf, io_uring, userfaultfd, modules, reboot, clocks, swap, TIOCSTI.

A system call from another architecture's table (32-bit or x32 calls on x86_64) kills the process.
"""
from __future__ import annotations

import errno
import socket
import termios

CLONE_THREAD = 0x00010000

DENIED = (
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "pidfd_open", "kcmp", "process_madvise",
    # new processes and programs
    "fork", "vfork", "execve", "execveat",
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel facilities a job never uses
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "add_key", "request_key", "keyctl", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm",
    "vhangup", "personality", "lookup_dcookie", "uselib",
)


def available() -> bool:
    try:
        import pyseccomp  # noqa: F401  (loads libseccomp)
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def install() -> None:
    """Load the filter into this process (and every thread and child it will have); raises if it cannot."""
    import pyseccomp as sc

    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    f.set_attr(sc.Attr.CTL_NNP, 1)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)  # every thread the engine's libraries have started, not only this one
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):  # not a system call on this architecture
            continue
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
    f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, termios.TIOCSTI))
    f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, getattr(termios, "TIOCLINUX", 0x541C)))
    f.load()
