"""Test agent: tries to shed the identity the kernel launched it with. It
connects without its credential under another agent's name, calls an admin
operation, claims to be an operator, and tries again from a process it
abandons (a double fork); it prints what the kernel made of each attempt as
JSON on its last line."""

import json
import os

import libaios
from libaios import errors
from libaios.protocol import MsgType


def as_operator() -> str:
    try:
        with libaios.Client(token="", name="aiosctl", operator=True):
            return "allowed"
    except errors.AIOSError as exc:
        return type(exc).__name__


def from_an_orphan() -> str:
    """as_operator() from a grandchild whose parent has exited."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            os.close(r)
            while os.getppid() == child:  # until the child below has exited
                os.sched_yield()
            os.write(w, as_operator().encode())
            os._exit(0)
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    with os.fdopen(r) as result:
        return result.read()


os.environ.pop("AIOS_AGENT_TOKEN", None)
seen = {"orphan_operator": from_an_orphan()}  # before this process touches zmq
with libaios.Client(token="", name="victim") as aios:
    seen["whoami"] = aios.whoami()
    try:
        aios.call(MsgType.ADMIN_PS)
        seen["ps"] = "allowed"
    except errors.AIOSError as exc:
        seen["ps"] = type(exc).__name__
seen["operator"] = as_operator()
print(json.dumps(seen))
