"""Fixtures shared by the unit tests."""

from .tool_worker import scheduler  # noqa: F401  (a fixture)
