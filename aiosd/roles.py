"""The kernel's processes by role: what the supervisor spawns, how a child
knows what to run, and what the scheduler reports of each service."""

from __future__ import annotations

#: Exit code of a child (or aiosd) whose configuration is wrong: a restart
#: cannot help (sysexits' EX_CONFIG).
EX_CONFIG = 78

SCHEDULER = "scheduler"
#: The HTTP gateway (OpenAI API and MCP): a client of the scheduler that
#: calls on behalf of the agent whose key a request bears.
GATEWAY = "gateway"
#: An LLM core's child role (one process per configured core, by its name).
LLM = "llm"
#: The kernel's services: child name -> (the worker kind it registers as,
#: the module whose ``serve(config, endpoint)`` it runs).
SERVICES = {
    "storage": ("storage", "aiosd.storage.service"),
    "memory": ("memory", "aiosd.memory.service"),
    "tools": ("tool", "aiosd.tools.service"),
}
