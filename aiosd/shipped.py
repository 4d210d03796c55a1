"""Files AIOS ships beside its code: the example agents and the systemd unit.

In the source tree they are the top-level ``agents/`` and ``systemd/``
directories; an installed wheel holds them as ``aiosd/share/agents`` and
``aiosd/share/systemd`` (pyproject.toml maps them there). These functions find
them in either place.
"""

from __future__ import annotations

from pathlib import Path

#: where a wheel puts them
INSTALLED = Path(__file__).resolve().parent / "share"
#: the top of a source tree, when aiosd runs from one (PYTHONPATH or an
#: editable install); a site-packages directory is none
SOURCE = Path(__file__).resolve().parent.parent


def _shipped(name: str) -> Path:
    """Directory ``name`` of the shipped files, installed or in the source tree."""
    installed = INSTALLED / name
    if installed.is_dir():
        return installed
    # (site-packages may hold an unrelated top-level "agents" package: a
    # source tree is recognised by its pyproject.toml too)
    source = SOURCE / name
    if source.is_dir() and (SOURCE / "pyproject.toml").is_file():
        return source
    raise FileNotFoundError(f"AIOS's {name}/ directory is missing: neither {installed} (an "
                            f"installed wheel) nor {source} (a source tree) exists; reinstall AIOS")


def agents_dir() -> Path:
    """The directory of the example agents (``aiosctl demo`` runs them)."""
    return _shipped("agents")


def systemd_unit() -> Path:
    """The systemd unit file, ``aiosd.service``."""
    unit = _shipped("systemd") / "aiosd.service"
    if not unit.is_file():
        raise FileNotFoundError(f"{unit} is missing; reinstall AIOS")
    return unit
