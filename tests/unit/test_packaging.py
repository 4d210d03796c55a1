"""What the two distributions are made of, read from their configuration:
every package of the source tree goes into the aios wheel, the example agents
and the systemd unit are found where they are shipped, and aios-agent (libaios
alone) needs nothing but pyzmq and msgpack. tests/integration/test_install.py
builds and installs the wheels."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

import libaios
from aiosd import shipped
from aiosd.ctl import DEMO_TASKS

REPO = Path(__file__).resolve().parents[2]
AIOS = tomllib.loads((REPO / "pyproject.toml").read_text())
AGENT = tomllib.loads((REPO / "libaios" / "pyproject.toml").read_text())
#: what libaios may import besides the standard library and itself
AGENT_IMPORTS = {"zmq", "msgpack"}


def source_packages(top: str) -> set[str]:
    """Packages (directories holding modules) under ``top``, skipping what
    an in-tree build leaves (build/, *.egg-info)."""
    found = set()
    for path in [REPO / top, *(REPO / top).rglob("*")]:
        parts = path.relative_to(REPO).parts
        if any(p in ("build", "__pycache__") or p.endswith(".egg-info") for p in parts):
            continue
        if path.is_dir() and any(path.glob("*.py")):
            found.add(".".join(parts))
    return found


def test_every_package_of_the_source_tree_is_in_the_wheel() -> None:
    setuptools = AIOS["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    assert set(setuptools["packages"]) == source_packages("aiosd") | source_packages("libaios") | set(mapped)
    # the shipped directories land where aiosd/shipped.py looks for them
    assert mapped == {f"aiosd.{shipped.INSTALLED.name}.agents": "agents",
                      f"aiosd.{shipped.INSTALLED.name}.systemd": "systemd"}
    assert setuptools["package-data"][f"aiosd.{shipped.INSTALLED.name}.systemd"] == ["aiosd.service"]


def test_the_shipped_files_are_found_in_the_source_tree() -> None:
    assert shipped.agents_dir() == REPO / "agents"
    assert all((shipped.agents_dir() / script).is_file() for script, _ in DEMO_TASKS)
    assert shipped.systemd_unit() == REPO / "systemd" / "aiosd.service"


def test_an_installed_copy_comes_first_and_a_missing_one_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = tmp_path / "share"
    (installed / "agents").mkdir(parents=True)
    monkeypatch.setattr(shipped, "INSTALLED", installed)
    assert shipped.agents_dir() == installed / "agents"
    # a site-packages directory with an unrelated top-level "agents" package
    # is no source tree
    site = tmp_path / "site-packages"
    (site / "agents").mkdir(parents=True)
    monkeypatch.setattr(shipped, "INSTALLED", site / "aiosd" / "share")
    monkeypatch.setattr(shipped, "SOURCE", site)
    with pytest.raises(FileNotFoundError, match="agents/ directory is missing: neither .*share/agents "
                                                r"\(an installed wheel\) nor .*site-packages/agents"):
        shipped.agents_dir()
    with pytest.raises(FileNotFoundError, match="systemd/ directory is missing"):
        shipped.systemd_unit()


def test_aiosd_prints_the_unit() -> None:
    from aiosd.main import main

    result = CliRunner().invoke(main, ["--print-systemd-unit"])
    assert result.exit_code == 0, result.output
    assert result.output == (REPO / "systemd" / "aiosd.service").read_text()


def test_libaios_imports_only_the_standard_library_pyzmq_and_msgpack() -> None:
    outside = []
    for module in sorted((REPO / "libaios").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in AGENT_IMPORTS | {"libaios"}:
                    outside.append(f"{module.name}:{node.lineno}: {name}")
    assert not outside, f"libaios must run on aios-agent's dependencies alone: {outside}"


def test_aios_agent_is_libaios_on_pyzmq_and_msgpack_alone() -> None:
    project = AGENT["project"]
    assert project["name"] == "aios-agent"
    assert sorted(r.split(">")[0] for r in project["dependencies"]) == sorted(
        {"zmq": "pyzmq", "msgpack": "msgpack"}[m] for m in AGENT_IMPORTS)
    # the same requirements as aios's, and one version for both
    assert set(project["dependencies"]) <= set(AIOS["project"]["dependencies"])
    assert AGENT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "libaios.__version__"}
    assert AIOS["project"]["version"] == libaios.__version__
    assert project["license"] == AIOS["project"]["license"] == "Apache-2.0"
    assert AGENT["tool"]["setuptools"]["packages"] == ["libaios"]
