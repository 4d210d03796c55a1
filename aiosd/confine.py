"""Confining the agents aiosd launches (Linux).

A launched agent must not reach what is the kernel's: the data directory
(the stores' files), the runtime directory beyond ``kernel.sock``, the
kernel's processes, or the daemon's user. What confines it:

- **Its own user.** Where aiosd runs as root, an agent never does: it runs
  as ``kernel.agent_user``, by default a *dynamic* user, a uid of its own
  (61184-65519, as systemd allots them) that owns no file and no other
  process. Where a directory on the way to what it must read (Python, its
  program, ``kernel.sock``) is closed to that uid (``/root`` is 0700), the
  agent gets a mount namespace in which that directory is an empty,
  readable one holding only what it needs, bound in from the real one.
- **Landlock**, where the kernel has it: the agent may read and run
  everything but the data and runtime directories, write only in the
  temporary directories, ``/dev`` and the directory it starts in, and (ABI
  6 and later) signal no process outside its own domain. Where aiosd does
  not run as root this is what keeps an agent, which then runs as the
  daemon's user, out of the kernel's files.
- ``no_new_privs``, and the kernel's own processes are non-dumpable (see
  credentials), so no agent can trace them or read their memory.

``aiosctl status`` says which of these are in force.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: systemd's range of dynamic users: uids no file or account should own.
DYNAMIC_UIDS = range(61184, 65520)

_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV = 4096, 16384, 1 << 18, 2, 4
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_SYS_LANDLOCK = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}

# Landlock's filesystem rights, by the ABI that brought them.
_READ = 1 << 0 | 1 << 2 | 1 << 3                     # execute, read_file, read_dir
_FILE_RIGHTS = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 14 | 1 << 15   # what a rule on a file may carry
_WRITE = (1 << 1 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 11
          | 1 << 12)                                   # write_file, remove_*, make_*
_HANDLED_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_SCOPE_SIGNAL = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def landlock_abi() -> int:
    """The Landlock ABI this kernel offers (0: none)."""
    calls = _SYS_LANDLOCK.get(os.uname().machine)
    if _libc is None or calls is None:
        return 0
    abi = _libc.syscall(calls[0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, abi)


def _handled(abi: int) -> int:
    return _HANDLED_BY_ABI[max(k for k in _HANDLED_BY_ABI if k <= abi)]


@dataclass(frozen=True)
class Plan:
    """How one agent is confined; made by the scheduler, carried out in the
    agent's process between fork and exec (see :meth:`preexec`)."""

    #: the uid and gid it runs as (None: the daemon's)
    uid: int | None
    gid: int | None
    #: directories closed to ``uid`` on the way to what it needs: each is
    #: replaced, in its own mount namespace, by one holding only these entries
    reach: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Landlock rules: (path, rights); empty where Landlock is not used
    rules: tuple[tuple[str, int], ...] = ()
    abi: int = 0
    death_signal: int = signal.SIGTERM

    def preexec(self) -> Callable[[], None]:
        def setup() -> None:
            if self.reach:
                _namespace(self.reach)
            ruleset = _ruleset(self.rules, self.abi) if self.abi else None
            if self.uid is not None and self.gid is not None:
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
            assert _libc is not None
            _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            if ruleset is not None:
                _check(_libc.syscall(_SYS_LANDLOCK[os.uname().machine][2], ruleset,
                                     ctypes.c_uint32(0)), "landlock_restrict_self")
                os.close(ruleset)
            # (after the change of user, which clears it)
            _libc.prctl(_PR_SET_PDEATHSIG, self.death_signal, 0, 0, 0)
            if os.getppid() == 1:
                os.kill(os.getpid(), self.death_signal)

        return setup


def _namespace(reach: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """A mount namespace in which each closed directory is an empty one,
    readable by all, holding only the entries bound in from the real one."""
    assert _libc is not None
    _check(_libc.unshare(_CLONE_NEWNS), "unshare")
    _check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private")
    fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path, _ in reach}
    for path, entries in reach:   # outer directories first
        _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                           b"mode=0755"), f"mount tmpfs on {path}")
        for entry in entries:
            source = f"/proc/self/fd/{fds[path]}/{entry}"
            target = os.path.join(path, entry)
            if stat.S_ISDIR(os.stat(source).st_mode):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            _check(_libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
                   f"bind {target}")
    for fd in fds.values():
        os.close(fd)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _ruleset(rules: tuple[tuple[str, int], ...], abi: int) -> int:
    assert _libc is not None
    create, add, _ = _SYS_LANDLOCK[os.uname().machine]
    handled = _handled(abi)
    attr = _RulesetAttr(handled, 0, _SCOPE_SIGNAL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = _libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        _check(-1, "landlock_create_ruleset")
    for path, rights in rules:
        try:
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue   # gone since the plan was made: nothing to allow
        try:
            is_dir = stat.S_ISDIR(os.fstat(target).st_mode)
            allowed = (rights if is_dir else rights & _FILE_RIGHTS) & handled
            rule = _PathBeneath(allowed, target)
            if allowed:
                _check(_libc.syscall(add, fd, 1, ctypes.byref(rule), ctypes.c_uint32(0)),
                       f"landlock rule on {path}")
        finally:
            os.close(target)
    return fd


# -- making a plan (in the scheduler) ----------------------------------------


def _closed_to(path: str, uid: int, gid: int) -> bool:
    """Whether directory ``path`` cannot be passed through by ``uid``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        return not st.st_mode & stat.S_IXUSR
    if st.st_gid == gid:
        return not st.st_mode & stat.S_IXGRP
    return not st.st_mode & stat.S_IXOTH


def reach_for(needed: list[str], uid: int, gid: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The directories closed to ``uid`` on the way to each path of
    ``needed``, outermost first, each with the entries to bind back in."""
    closed: dict[str, set[str]] = {}
    for path in needed:
        parts = Path(path).parts
        for depth in range(1, len(parts)):
            parent = os.path.join(*parts[:depth])
            if parent in closed or _closed_to(parent, uid, gid):
                closed.setdefault(parent, set()).add(parts[depth])
    return tuple((d, tuple(sorted(closed[d]))) for d in sorted(closed, key=lambda p: p.count("/")))


def _beneath_except(root: str, hidden: list[str], rights: int) -> list[tuple[str, int]]:
    """Rules giving ``rights`` beneath ``root`` but not beneath any of
    ``hidden`` (Landlock only allows: every sibling on the way is named)."""
    inside = [h for h in hidden if h == root or h.startswith(root.rstrip("/") + "/")]
    if not inside:
        return [(root, rights)]
    if root in inside:
        return []
    rules = []
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    for entry in entries:
        path = os.path.join(root, entry)
        if not os.path.islink(path):
            # (a link's rule would be its target's: one to a directory above
            # a hidden one would open it; its target has rules of its own)
            rules += _beneath_except(path, inside, rights)
    return rules


def landlock_rules(hidden: list[str], writable: list[str]) -> tuple[tuple[str, int], ...]:
    rules = _beneath_except("/", hidden, _READ)
    for path in writable:
        if os.path.isdir(path):
            rules += _beneath_except(path, hidden, _READ | _WRITE | _REFER | _TRUNCATE
                                     | _IOCTL_DEV)
    return tuple(rules)


def needed_paths(script: str, cwd: str | None, runtime_dir: Path) -> list[str]:
    """What an agent's process must reach: Python and everything it
    imports from, its program, where it starts, and ``kernel.sock``."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.executable, script,
                                           str(runtime_dir), *sys.path) if p}
    if cwd:
        paths.add(os.path.realpath(cwd))
    return sorted(p for p in paths if os.path.exists(p))


@dataclass
class Users:
    """Whom launched agents run as, and which dynamic uids are taken."""

    setting: str = "dynamic"
    taken: set[int] = field(default_factory=set)
    _next: int = 0

    def fixed(self) -> tuple[int, int] | None:
        """The uid and gid of ``kernel.agent_user`` (None: dynamic)."""
        if self.setting == "dynamic":
            return None
        try:
            entry = (pwd.getpwuid(int(self.setting)) if self.setting.isdigit()
                     else pwd.getpwnam(self.setting))
            return entry.pw_uid, entry.pw_gid
        except (KeyError, ValueError):
            if self.setting.isdigit():
                return int(self.setting), int(self.setting)
            raise LookupError(f"kernel.agent_user: no user {self.setting!r}") from None

    def allot(self) -> tuple[int, int]:
        """A uid for one agent: ``kernel.agent_user``'s, or a free dynamic one."""
        fixed = self.fixed()
        if fixed is not None:
            return fixed
        for _ in range(len(DYNAMIC_UIDS)):
            uid = DYNAMIC_UIDS[self._next % len(DYNAMIC_UIDS)]
            self._next += 1
            if uid not in self.taken:
                self.taken.add(uid)
                return uid, uid
        raise LookupError(f"all {len(DYNAMIC_UIDS)} dynamic uids are taken by running agents")

    def release(self, uid: int | None) -> None:
        self.taken.discard(uid)  # type: ignore[arg-type]


def plan(script: str, cwd: str | None, runtime_dir: Path, data_dir: Path,
         run_as: tuple[int, int] | None, abi: int) -> Plan:
    """How to confine an agent running ``script`` as ``run_as`` (None: as
    the daemon's user)."""
    hidden = [os.path.realpath(data_dir), os.path.realpath(runtime_dir)]
    reach: tuple[tuple[str, tuple[str, ...]], ...] = ()
    if run_as is not None and os.getuid() == 0:
        reach = reach_for(needed_paths(script, cwd, runtime_dir), *run_as)
    writable = ["/tmp", "/var/tmp", "/dev"] + ([os.path.realpath(cwd)] if cwd else [])
    rules = landlock_rules(hidden, writable) if abi else ()
    return Plan(run_as[0] if run_as else None, run_as[1] if run_as else None,
                reach, rules, abi)
