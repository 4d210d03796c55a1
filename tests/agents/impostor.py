"""Test agent: tries to shed the identity the kernel launched it with. It
connects without its credential under another agent's name, calls an admin
operation, and claims to be an operator; it prints what the kernel made of
each attempt as JSON on its last line."""

import json
import os

import libaios
from libaios import errors
from libaios.protocol import MsgType

os.environ.pop("AIOS_AGENT_TOKEN", None)
seen = {}
with libaios.Client(token="", name="victim") as aios:
    seen["whoami"] = aios.whoami()
    try:
        aios.call(MsgType.ADMIN_PS)
        seen["ps"] = "allowed"
    except errors.AIOSError as exc:
        seen["ps"] = type(exc).__name__
try:
    with libaios.Client(token="", name="aiosctl", operator=True):
        seen["operator"] = "allowed"
except errors.AIOSError as exc:
    seen["operator"] = type(exc).__name__
print(json.dumps(seen))
