"""The seccomp filter of every app sandbox, in the spirit of Docker's default profile.

Everything is allowed except:
- the syscalls in `DENIED`, refused with EPERM (mounts, namespaces, tracing, kernel keys, bpf,
  modules, clocks, ...); names this libseccomp does not know on this architecture are skipped;
- `clone` with any namespace flag in its flags argument, refused with EPERM;
- `clone3`, refused with ENOSYS: its flags live in memory the filter cannot read, and on ENOSYS
  glibc falls back to `clone`, whose flags the filter sees (Docker does the same);
- any syscall of another ABI (32-bit x86 `int 0x80`, x32): the process is killed (SIGSYS).

`apply()` sets no_new_privs and loads the filter into the calling process (every thread of it,
and every process it starts from then on). Filters only stack: nothing can lift it afterwards.

Runs inside the sandbox: imports only the stdlib and `pyseccomp` (ctypes over libseccomp.so.2).
`pyseccomp` locates the library with `ctypes.util.find_library` (which runs `ldconfig -p`), so
import this module before entering a mount namespace without `ldconfig`: the root zygote should.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import Any

__all__ = ["DENIED", "SeccompError", "apply", "unavailable_reason"]


def _import_pyseccomp() -> tuple[Any, str | None]:
    """(the pyseccomp module, None), or (None, why it cannot be used)."""
    try:
        import pyseccomp  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None, "pyseccomp is not installed (pip install pyseccomp)"
    except (OSError, RuntimeError, AttributeError) as exc:  # library missing, or too old for pyseccomp
        return None, f"libseccomp.so.2 is missing or unusable: {exc}"
    return pyseccomp, None


_seccomp, _import_error = _import_pyseccomp()

DENIED: tuple[str, ...] = (
    # mounts and the filesystem view
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "open_by_handle_at",
    "name_to_handle_at",
    # namespaces
    "unshare",
    "setns",
    # other processes' memory and state
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "pidfd_getfd",
    "kcmp",
    # kernel interfaces that have been rich in exploits, or that bypass this filter
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "fanotify_init",
    "lookup_dcookie",
    "personality",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vm86",
    "vm86old",
    # the machine: kernel, modules, swap, accounting, logs, devices, clocks, host names
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "nfsservctl",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "adjtimex",
    "clock_adjtime",
    "clock_adjtime64",
    "sethostname",
    "setdomainname",
)

# clone(2) flags that create a namespace (CLONE_NEWTIME shares its bit with the exit signal in
# clone(2), so it is reachable only through clone3 and unshare, both refused).
_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

_PR_GET_SECCOMP = 21
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2


class SeccompError(RuntimeError):
    """The seccomp filter could not be loaded; the message says why."""


def _prctl(option: int, arg2: int = 0) -> tuple[int, int]:
    """prctl(option, arg2, 0, 0, 0) → (result, errno)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ctypes.set_errno(0)
    zero = ctypes.c_ulong(0)
    result = int(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero))
    return result, ctypes.get_errno()


def unavailable_reason() -> str | None:
    """None when a seccomp filter can be loaded here, else a one-line reason."""
    if _import_error is not None:
        return _import_error
    result, err = _prctl(_PR_GET_SECCOMP)
    if result < 0:
        if err == errno.EINVAL:
            return "the kernel has no seccomp support (CONFIG_SECCOMP)"
        return f"prctl(PR_GET_SECCOMP) failed: {os.strerror(err)}"
    # A NULL filter: EFAULT proves filters are supported, without loading anything.
    result, err = _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER)
    if err == errno.EFAULT:
        return None
    if err == errno.EINVAL:
        return "the kernel has no seccomp filter support (CONFIG_SECCOMP_FILTER)"
    return f"seccomp filters are refused here: {os.strerror(err) if result < 0 else 'unexpected success'}"


def _syscall_number(name: str) -> int | None:
    """The native number of a syscall, or None when it does not exist on this architecture."""
    number = int(_seccomp.resolve_syscall(_seccomp.Arch.NATIVE, name))
    # -1: a name libseccomp does not know; below -1: a pseudo-number, for a syscall of other arches.
    return number if number >= 0 else None


def _clone_flags_arg() -> int:
    """The argument index of clone's flags: the first, but the second on s390 (stack comes first)."""
    return 1 if int(_seccomp.system_arch()) in (_seccomp.Arch.S390, _seccomp.Arch.S390X) else 0


def _build_filter() -> Any:
    """The filter (a pyseccomp.SyscallFilter), not loaded. Raises OSError or ValueError."""
    s = _seccomp
    f = s.SyscallFilter(defaction=s.ALLOW)
    with contextlib.suppress(OSError):  # KILL_PROCESS needs Linux 4.14; else KILL (the thread)
        f.set_attr(s.Attr.ACT_BADARCH, s.KILL_PROCESS)
    eperm = s.ERRNO(errno.EPERM)
    for name in DENIED:
        number = _syscall_number(name)
        if number is not None:
            f.add_rule(eperm, number)
    clone = _syscall_number("clone")
    if clone is not None:
        arg = _clone_flags_arg()
        for flag in _NAMESPACE_FLAGS.values():
            f.add_rule(eperm, clone, s.Arg(arg, s.MASKED_EQ, flag, flag))
    clone3 = _syscall_number("clone3")
    if clone3 is not None:
        f.add_rule(s.ERRNO(errno.ENOSYS), clone3)
    return f


def _set_thread_sync(f: Any) -> None:
    """Load into every thread of the process (TSYNC); without it, only a single thread is safe."""
    try:
        f.set_attr(_seccomp.Attr.CTL_TSYNC, 1)
    except OSError as exc:
        if len(os.listdir("/proc/self/task")) > 1:
            raise SeccompError(
                f"cannot apply the seccomp filter to every thread of this process (TSYNC: {exc})"
            ) from exc


def apply() -> None:
    """Set no_new_privs and load the sandbox's seccomp filter into the calling process.

    Raises SeccompError when it cannot; nothing is loaded then (no_new_privs may be set).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise SeccompError(f"cannot load the seccomp filter: {reason}")
    try:
        f = _build_filter()
    except (OSError, ValueError) as exc:
        raise SeccompError(f"cannot build the seccomp filter: {exc}") from exc
    _set_thread_sync(f)
    result, err = _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if result != 0:
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")
    try:
        f.load()
    except OSError as exc:
        raise SeccompError(f"cannot load the seccomp filter: {exc}") from exc
