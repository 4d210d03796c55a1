"""An MCP "server" that exits at once, for the tests: its tools must be absent."""

import sys

sys.exit(3)
