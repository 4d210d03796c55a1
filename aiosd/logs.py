"""Logging for the daemon's processes: one line per record, tagged with the
process's role, on stderr (journald or the log file collects it)."""

from __future__ import annotations

import logging
import sys


def setup(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
