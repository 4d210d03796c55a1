"""The access manager's rules: who may reach whose memory and storage, and
which operations wait for a person's approval. Pure: no sockets, no I/O.

Identity is established elsewhere (the scheduler binds a connection to an
agent by its credential and the peer's pid/uid); these rules only decide.
An agent always reaches its own namespace. Another agent's namespace is
reachable only through a privilege group they share: ``read`` groups allow
reads, ``write`` groups reads and writes. Destructive operations (delete,
overwrite, rollback, tools flagged destructive) need approval unless a
group of the caller pre-approves them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from libaios.protocol import MsgType

from ..config import AccessConfig, GroupConfig

MEMORY_READS = frozenset({MsgType.MEMORY_GET, MsgType.MEMORY_SEARCH, MsgType.MEMORY_LIST,
                          MsgType.MEMORY_STATS})
MEMORY_WRITES = frozenset({MsgType.MEMORY_ADD, MsgType.MEMORY_UPDATE, MsgType.MEMORY_DELETE})
STORAGE_READS = frozenset({MsgType.STORAGE_GET, MsgType.STORAGE_LIST, MsgType.STORAGE_READ_FILE,
                           MsgType.STORAGE_LIST_DIR, MsgType.STORAGE_VERSIONS,
                           MsgType.STORAGE_STATS})
STORAGE_WRITES = frozenset({MsgType.STORAGE_PUT, MsgType.STORAGE_DELETE,
                            MsgType.STORAGE_WRITE_FILE, MsgType.STORAGE_ROLLBACK})
#: Calls on an agent's data: they carry a namespace.
NAMESPACED = MEMORY_READS | MEMORY_WRITES | STORAGE_READS | STORAGE_WRITES
#: Calls only the kernel's own processes may make.
INTERNAL = frozenset({MsgType.BLOCK_PUT, MsgType.BLOCK_GET, MsgType.BLOCK_DELETE,
                      MsgType.BLOCK_SCAN, MsgType.AUDIT_APPEND, MsgType.AUDIT_LIST})
#: Memory and storage operations destructive by their type (an overwrite is
#: found by storage). The scheduler does not hold these itself: their worker,
#: which sees the data, checks the call first and answers APPROVAL_REQUIRED,
#: naming what it would act on, only for one that would run.
DESTRUCTIVE = {
    MsgType.MEMORY_DELETE: "memory.delete",
    MsgType.MEMORY_UPDATE: "memory.update",   # the text or metadata it replaces is gone
    MsgType.STORAGE_DELETE: "storage.delete",
    MsgType.STORAGE_ROLLBACK: "storage.rollback",
}


@dataclass(frozen=True)
class Principal:
    """Who makes a call, as the scheduler established it."""

    agent: str          # the agent id (accounting)
    name: str           # the agent's name: its namespace
    operator: bool = False
    internal: bool = False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    #: the operation needs a person's approval before it runs
    approval: str | None = None
    #: a destructive operation a group (or the config) let run unasked
    preapproved: str | None = None


class AccessRules:
    def __init__(self, cfg: AccessConfig, daemon_uid: int | None = None):
        self.cfg = cfg
        self.daemon_uid = os.getuid() if daemon_uid is None else daemon_uid
        self._groups = {g.name: g for g in cfg.groups}
        #: members a group gained besides the config's (the agents of API
        #: keys made with a group): agent name -> group names
        self.joined: dict[str, set[str]] = {}

    def in_group(self, name: str, group: GroupConfig) -> bool:
        return name in group.members or group.name in self.joined.get(name, ())

    def has_group(self, name: str) -> bool:
        return name in self._groups

    def groups_of(self, name: str) -> list[str]:
        return [g.name for g in self.cfg.groups if self.in_group(name, g)]

    def may_connect(self, uid: int | None) -> bool:
        """Whether a process of ``uid`` may register an agent (or operate)."""
        if uid is None:
            return True  # not an ipc peer: transport security decides
        allowed = self.cfg.allow_uids or [self.daemon_uid]
        return uid in allowed or uid == self.daemon_uid

    def may_operate(self, uid: int | None) -> bool:
        """Whether a process of ``uid`` may be an operator (aiosctl): only the
        daemon's own user or root, and only where the OS vouches for the uid
        (ipc), never on a uid the client wrote."""
        return uid is not None and uid in (self.daemon_uid, 0)

    def may_reach(self, who: Principal, namespace: str, write: bool) -> Decision:
        """May ``who`` read (or write) the data of namespace ``namespace``?"""
        if who.internal:
            return Decision(True, "kernel-internal")
        if who.operator:
            return Decision(True, "operator")
        if namespace == who.name:
            return Decision(True, "own namespace")
        for group in self.cfg.groups:
            if self.in_group(who.name, group) and self.in_group(namespace, group):
                if not write or group.access == "write":
                    return Decision(True, f"group {group.name} ({group.access})")
        verb = "write" if write else "read"
        return Decision(False, f"{who.name} may not {verb} {namespace}'s data: they share no "
                               f"group that allows it (access.groups)")

    def preapproved(self, who: Principal, op: str) -> bool:
        if who.internal or not self.cfg.require_approval:
            return True
        for group in self.cfg.groups:
            if self.in_group(who.name, group) and (op in group.preapprove or "*" in group.preapprove):
                return True
        return False

    def check(self, who: Principal, mtype: MsgType, namespace: str | None,
              destructive_tool: str | None = None) -> Decision:
        """The whole decision for one call."""
        if mtype in INTERNAL and not who.internal:
            return Decision(False, f"{mtype.value} is kernel-internal")
        if mtype in NAMESPACED:
            if namespace is None:  # statistics over every agent
                return Decision(who.operator or who.internal, "operator statistics")
            write = mtype in MEMORY_WRITES or mtype in STORAGE_WRITES
            decision = self.may_reach(who, namespace, write)
            if not decision.allowed:
                return decision
            op = DESTRUCTIVE.get(mtype)
            if op is None or who.operator:
                return decision
            return self._destructive(who, op, decision.reason)
        if destructive_tool is not None and not who.operator:
            return self._destructive(who, f"tool:{destructive_tool}", "tool flagged destructive")
        return Decision(True, "allowed")

    def _destructive(self, who: Principal, op: str, reason: str) -> Decision:
        if self.preapproved(who, op):
            return Decision(True, f"{reason}; {op} pre-approved", preapproved=op)
        return Decision(True, reason, approval=op)
