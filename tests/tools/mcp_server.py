"""A small MCP server over stdio, for the tests: ``add``, ``echo``, ``fail``
(which reports an error result), ``nap`` and ``freeze``, on the SDK's high-level server
(``MCPServer``, called ``FastMCP`` before mcp 2)."""

import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("demo", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with the reason given."""
    raise ToolError(reason)


@server.tool()
def nap(seconds: float, mark: str = "", done: str = "") -> str:
    """Sleep, then answer (for timeouts); creates the file ``mark``, if
    given, as it begins, and the file ``done``, if given, once it wakes."""
    if mark:
        open(mark, "w").close()
    time.sleep(seconds)
    if done:
        open(done, "w").close()
    return "rested"


@server.tool()
async def freeze(seconds: float, mark: str = "") -> str:
    """Hang the whole server (its event loop), then answer (for a hung server);
    creates the file ``mark``, if given, once it hangs."""
    if mark:
        open(mark, "w").close()
    time.sleep(seconds)
    return "thawed"


if __name__ == "__main__":
    server.run("stdio")
