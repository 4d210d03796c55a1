"""An MCP server over stdio for the documented claims about MCP tools:
``erase`` is marked destructive by the server (``destructiveHint: true``),
``peek`` says it is not (``destructiveHint: false``), ``hold`` is left
unmarked and ``hold_read_only`` is marked read-only (``readOnlyHint: true``).
The holds run until the test lets them go, so that a test can keep a tool
call running (or waiting) as long as it needs to."""

import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("hinted", log_level="WARNING")


@server.tool(annotations=ToolAnnotations(destructive_hint=True))
def erase(path: str) -> str:
    """Delete the file at path."""
    os.remove(path)
    return "erased"


@server.tool(annotations=ToolAnnotations(destructive_hint=False))
def peek(path: str) -> str:
    """Say whether a file exists at path."""
    return "present" if os.path.exists(path) else "absent"


@server.tool()
def hold(release: str, mark: str = "") -> str:
    """Run until the file ``release`` exists; each run first adds a line to
    the file ``mark``, if given (so that it tells how many runs began)."""
    if mark:
        with open(mark, "a") as fh:
            fh.write("began\n")
    while not os.path.exists(release):
        time.sleep(0.01)
    return "let go"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def hold_read_only(release: str, mark: str = "") -> str:
    """As hold, marked read-only by the server."""
    return hold(release, mark)


if __name__ == "__main__":
    server.run("stdio")
