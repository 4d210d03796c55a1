"""aiosd: the AIOS kernel daemon (supervisor, scheduler, workers) and aiosctl."""

from libaios import __version__

__all__ = ["__version__"]
