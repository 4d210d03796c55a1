"""AIOS installed from its wheels, away from the source tree: the aios wheel in
a fresh virtualenv gives aiosd and aiosctl, and `aiosctl demo` runs the
example agents shipped in it against an aiosd started from that install; the
aios-agent wheel holds libaios alone, and an agent on it, with nothing but
pyzmq and msgpack beside it, makes calls to that kernel.

Nothing is compiled: a venv gets the wheel with --no-deps, and its
dependencies from this interpreter's site-packages through a .pth file naming
that directory. A path line in a .pth only adds the directory: the .pth files
inside it (an editable install of the source tree among them) are not run,
so aiosd and libaios come from the wheel, which the tests check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import venv
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import psutil
import pytest
import tomli_w

from ..conftest import REPO, Daemon, base_env, wait_ready_or_fail

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: what building the aios wheel reads from the source tree
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "aiosd", "libaios", "agents", "systemd")
DEMO_KINDS = {"react", "coder", "chat", "summarize", "planner", "researcher", "reflexion"}
#: what aios-agent must not bring in
HEAVY = ("aiosd", "llama_cpp", "numpy", "fastapi", "openai", "click", "psutil", "lmdb")


def build_wheel(project: Path, out: Path) -> Path:
    """The wheel of ``project`` built with this interpreter's setuptools; the
    build must print no deprecation warning."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--wheel-dir", str(out), str(project)],
        capture_output=True, text=True, timeout=300, check=False)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    assert "deprecat" not in printed.lower(), printed
    [wheel] = out.glob("*.whl")
    return wheel


def copy_tree(names: tuple[str, ...], dest: Path) -> Path:
    """A copy of the source tree's ``names`` (a build leaves build/ and
    *.egg-info where it runs: not in the source tree)."""
    skip = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    dest.mkdir(parents=True)
    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
        else:
            shutil.copy2(src, dest / name)
    return dest


def new_venv(where: Path, deps: list[str]) -> Path:
    """A virtualenv without pip whose site-packages names ``deps`` in a .pth;
    its python."""
    venv.create(where, with_pip=False, symlinks=True)
    python = where / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(site, "aios_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


def install(python: Path, wheel: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--no-cache-dir", str(wheel)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def clean_env(root: Path) -> dict[str, str]:
    """The environment of a daemon on ``root``, with nothing pointing into
    the source tree."""
    env = base_env(root)
    env.pop("PYTHONPATH", None)
    return env


def imported_from(python: Path, modules: str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    """Where ``python`` imports each of the comma-separated ``modules`` from."""
    code = (f"import json, {modules}; "
            f"print(json.dumps({{m.__name__: m.__file__ for m in ({modules},)}}))")
    result = subprocess.run([python, "-c", code], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aios-"))   # short: ipc socket paths are limited
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def kernel_python(work: Path) -> Path:
    """The python of a fresh venv holding the aios wheel."""
    wheel = build_wheel(copy_tree(SOURCES, work / "src"), work / "dist")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {f"aiosd/share/agents/{p.name}" for p in (REPO / "agents").glob("*.py")}
    assert shipped | {"aiosd/share/systemd/aiosd.service"} <= names
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    paths = sysconfig.get_paths()
    python = new_venv(work / "venv", list(dict.fromkeys([paths["purelib"], paths["platlib"]])))
    install(python, wheel)
    return python


@pytest.fixture(scope="module")
def installed_daemon(work: Path, kernel_python: Path) -> Iterator[Daemon]:
    """aiosd started from the fresh venv's own script, outside the source tree."""
    root = work / "d"
    (root / "cwd").mkdir(parents=True)
    cfg = root / "aiosd.toml"
    cfg.write_text(tomli_w.dumps({"gateway": {"listen": "127.0.0.1:0"}}))
    env = clean_env(root)
    log = root / "aiosd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([kernel_python.parent / "aiosd", "--config", str(cfg)], env=env,
                                stdout=fh, stderr=fh, start_new_session=True, cwd=root / "cwd")
    daemon = Daemon(root, env, proc, log)
    try:
        wait_ready_or_fail(daemon)
        yield daemon
    finally:
        daemon.stop()


def test_the_installed_kernel_runs_the_demo(kernel_python: Path, installed_daemon: Daemon) -> None:
    env, cwd = installed_daemon.env, installed_daemon.root / "cwd"
    venv_dir = kernel_python.parent.parent
    where = imported_from(kernel_python, "aiosd, libaios", env, cwd)
    assert all(Path(f).is_relative_to(venv_dir) for f in where.values()), where
    # the daemon runs the venv's aiosd script
    assert psutil.Process(installed_daemon.proc.pid).cmdline()[1] == str(kernel_python.parent / "aiosd")
    unit = subprocess.run([kernel_python.parent / "aiosd", "--print-systemd-unit"], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert unit.returncode == 0 and unit.stdout == (REPO / "systemd" / "aiosd.service").read_text()

    result = subprocess.run([kernel_python.parent / "aiosctl", "demo", "--agents", "7", "--json"],
                            env=env, cwd=cwd, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)["agents"]
    assert {r["name"].rsplit("-", 1)[0] for r in rows} == DEMO_KINDS
    agents = Path(where["aiosd"]).parent / "share" / "agents"
    assert all(Path(r["path"]).parent == agents for r in rows), [r["path"] for r in rows]
    assert all(r["exit_code"] == 0 and r["calls"] > 0 for r in rows), rows


def only(distributions: tuple[str, ...], dest: Path) -> Path:
    """A directory holding links to what ``distributions`` installed here
    (their top-level packages and libraries), and nothing else."""
    dest.mkdir()
    for dist in distributions:
        files = metadata.distribution(dist).files or []
        tops = {f.parts[0] for f in files if f.parts[0] != ".." and ".dist-info" not in f.parts[0]}
        for top in tops:
            (dest / top).symlink_to(Path(str(metadata.distribution(dist).locate_file(top))))
    return dest


AGENT_SCRIPT = """
import importlib, json, pkgutil, sys
import libaios
for info in pkgutil.iter_modules(libaios.__path__):
    importlib.import_module("libaios." + info.name)
missing = []
for name in {heavy!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        missing.append(name)
with libaios.connect(name="light") as aios:
    who = aios.whoami()
    reply = aios.chat("Say hello.", max_tokens=4)
print(json.dumps({{"file": libaios.__file__, "missing": missing, "who": who,
                  "tokens": reply.usage["completion_tokens"]}}))
"""


def test_an_agent_on_aios_agent_alone_reaches_the_kernel(work: Path, installed_daemon: Daemon) -> None:
    wheel = build_wheel(copy_tree(("libaios",), work / "agent-src") / "libaios", work / "agent-dist")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    modules = {f"libaios/{p.name}" for p in (REPO / "libaios").glob("*.py")}
    assert {n for n in names if ".dist-info/" not in n} == modules
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert sorted(requires) == ["msgpack>=1.0", "pyzmq>=25"]

    python = new_venv(work / "agent-venv", [str(only(("pyzmq", "msgpack"), work / "agent-deps"))])
    install(python, wheel)
    cwd = installed_daemon.root / "cwd"
    result = subprocess.run([python, "-c", AGENT_SCRIPT.format(heavy=HEAVY)],
                            env=installed_daemon.env, cwd=cwd, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert Path(out["file"]).is_relative_to(work / "agent-venv"), out
    assert out["missing"] == list(HEAVY), "aios-agent's venv should hold none of these"
    assert out["who"]["name"] == "light" and out["tokens"] > 0, out
