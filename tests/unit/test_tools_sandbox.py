"""The python sandbox cannot exceed its limits, write outside its scratch
directory, read the daemon's files, reach the network or the kernel's
socket, start processes, or signal anyone; and it refuses to run at all
without Landlock. (The confinement tests are skipped where the kernel has no
Landlock; the refusal test runs everywhere.)"""

from __future__ import annotations

import ast
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from aiosd.config import SandboxConfig
from aiosd.tools import sandbox
from aiosd.tools.sandbox import landlock_abi, run_python
from libaios.errors import Cancelled, Timeout, Unavailable

ABI = landlock_abi()
confined = pytest.mark.skipif(ABI < 1, reason="this kernel has no Landlock")
LIMITS = SandboxConfig(cpu_seconds=1, memory_mb=256, wall_seconds=3.0, output_bytes=2048)


def run(code: str, limits: SandboxConfig = LIMITS, **kw: object) -> dict:
    return run_python(code, limits, **kw)  # type: ignore[arg-type]


def denied(result: dict, error: str = "PermissionError") -> bool:
    return result["exit_code"] == 1 and error in result["stderr"]


def running_sandbox(candidates: Callable[[], list[psutil.Process]],
                    timeout: float = 30.0) -> psutil.Process:
    """The sandbox among ``candidates`` (processes, asked again until one
    is found) once its code has begun: the code creates ``started`` in its
    scratch directory, its working directory."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in candidates():
            try:
                if (Path(proc.cwd()) / "started").exists():
                    return proc
            except psutil.Error:
                pass
        time.sleep(0.02)
    raise AssertionError("the sandbox's code did not begin")


# -- refusing without Landlock --------------------------------------------------------


def test_refuses_to_run_unconfined_without_landlock(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox, "landlock_status",
                        lambda: (0, "ENOSYS: the kernel was built without it"))
    marker = tmp_path / "ran"
    with pytest.raises(Unavailable) as info:
        run(f"open({str(marker)!r}, 'w')")
    assert info.value.message == (
        "python sandbox: Landlock is not available on this kernel (ENOSYS: the kernel was "
        "built without it); refusing to run code unconfined")
    assert not marker.exists()


def test_landlock_status_reports_the_abi_or_why_not() -> None:
    abi, why = sandbox.landlock_status()
    assert (abi >= 1 and why == "") or (abi == 0 and why)


# -- environment --------------------------------------------------------------------


@confined
def test_empty_environment_and_scratch_cwd() -> None:
    os.environ["AIOS_SANDBOX_TEST_SECRET"] = "leak"
    try:
        r = run("import os, sys\nprint(dict(os.environ))\nprint(os.getcwd())\n"
                "print(sorted(os.listdir('.')))\nprint(sys.flags.isolated, sys.flags.no_site)")
    finally:
        del os.environ["AIOS_SANDBOX_TEST_SECRET"]
    assert r["exit_code"] == 0, r["stderr"]
    env, cwd, listing, flags = r["stdout"].splitlines()
    # nothing inherited; only what the interpreter sets itself (its locale
    # coercion puts LC_CTYPE in a C-locale environment)
    assert set(ast.literal_eval(env)) <= {"LC_CTYPE"}
    assert os.path.basename(cwd).startswith("aios-sandbox-")
    assert ast.literal_eval(listing) == ["main.py"]
    assert flags == "1 1"
    assert not os.path.exists(cwd), "the scratch directory is removed afterwards"


@confined
def test_the_standard_library_works() -> None:
    r = run("import json, re, math, statistics, decimal, fractions, datetime, random, "
            "collections, itertools, csv, sqlite3, hashlib, zlib, threading\n"
            "t = threading.Thread(target=lambda: print('thread ok')); t.start(); t.join()\n"
            "db = sqlite3.connect('x.db'); db.execute('create table t (a)'); db.commit()\n"
            "print(statistics.mean([1, 2, 3]), json.dumps({'a': 1}))")
    assert r == {"stdout": "thread ok\n2 {\"a\": 1}\n", "stderr": "", "exit_code": 0,
                 "timed_out": False, "truncated": False}


@confined
def test_errors_show_a_traceback_of_the_code_only() -> None:
    r = run("def f():\n    return 1 / 0\nf()\n")
    assert r["exit_code"] == 1
    assert "ZeroDivisionError" in r["stderr"] and "return 1 / 0" in r["stderr"]
    assert '"<string>"' not in r["stderr"]  # no frame of the bootstrap
    r = run("import sys; print('bye'); sys.exit(3)")
    assert (r["stdout"], r["exit_code"]) == ("bye\n", 3)


# -- writing --------------------------------------------------------------------------


@confined
def test_writes_inside_scratch_work_and_outside_fail() -> None:
    outside = Path("/tmp/x-outside")
    outside.unlink(missing_ok=True)
    r = run("import os\nopen('f.txt', 'w').write('inside')\nos.mkdir('d')\n"
            "open('d/g', 'w').write('x')\nos.rename('d/g', 'h')\nos.remove('h')\n"
            "print(open('f.txt').read())\n"
            "try:\n    open('/tmp/x-outside', 'w').write('x')\n"
            "except PermissionError as e:\n    print('denied', e.errno)\n")
    assert r["exit_code"] == 0, r["stderr"]
    assert r["stdout"] == "inside\ndenied 13\n"
    assert not outside.exists()


@confined
@pytest.mark.parametrize("code", [
    "open('/tmp/x-outside', 'w').write('x')",
    "import os; os.mkdir('/tmp/aios-sandbox-escape-dir')",
    "import os; os.remove('/tmp/x-victim')",
    "import os; os.rename('/tmp/x-victim', 'mine')",
    "import os; os.truncate('/tmp/x-victim', 0)",
    "import os; os.chmod('/tmp/x-victim', 0o777)",
    "import os; os.setxattr('/tmp/x-victim', 'user.x', b'1')",
    "import os; os.symlink('/tmp/x-victim', 'l'); open('l', 'w').write('x')",
    "import os; os.link('/tmp/x-victim', 'l'); open('l', 'w').write('x')",
])
def test_cannot_change_anything_outside(code: str, tmp_path: Path) -> None:
    victim = Path("/tmp/x-victim")
    victim.write_text("intact")
    victim.chmod(0o644)
    try:
        r = run(code)
        assert r["exit_code"] == 1 and ("PermissionError" in r["stderr"]
                                        or "Invalid cross-device link" in r["stderr"]), r
        assert victim.read_text() == "intact" and (victim.stat().st_mode & 0o777) == 0o644
        assert not Path("/tmp/x-outside").exists()
        assert not Path("/tmp/aios-sandbox-escape-dir").exists()
    finally:
        victim.unlink(missing_ok=True)


# -- reading ------------------------------------------------------------------------


@confined
def test_cannot_read_the_daemons_files(tmp_path: Path) -> None:
    secret = tmp_path / "storage.mdb"
    secret.write_text("other agents' data")
    for code in (f"print(open({str(secret)!r}).read())",
                 f"print(open({__file__!r}).read())",      # the daemon's own source tree
                 "import os; print(os.listdir('/'))",
                 "import os; print(open('/proc/%d/environ' % os.getppid()).read())"):
        r = run(code)
        assert denied(r), (code, r)
        assert "other agents" not in r["stdout"]


@confined
def test_output_files_cannot_be_swapped_for_a_link_to_a_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOKEN=hunter2")
    r = run("import os\nfor f in os.listdir('.'):\n    os.remove(f)\n"
            f"os.symlink({str(secret)!r}, '.stdout')\nprint('done')")
    assert r["stdout"] == "done\n" and "hunter2" not in r["stdout"] + r["stderr"]


# -- processes, signals, network -------------------------------------------------------


@confined
@pytest.mark.parametrize("code", [
    "import os; os.fork()",
    "import subprocess; subprocess.run(['/bin/true'])",
    "import os; os.posix_spawn('/bin/true', ['true'], {})",
])
def test_cannot_start_processes(code: str) -> None:
    assert denied(run(code)), code


@confined
def test_cannot_signal_outside() -> None:
    r = run("import os, signal; os.kill(os.getppid(), signal.SIGTERM)")
    assert denied(r)


@confined
@pytest.mark.parametrize("code", [
    "import os; os.kill(-1, 0)",                                    # every process of the user
    "import os, signal; os.kill(-os.getppid(), signal.SIGTERM)",    # the worker's group
    "import os, resource; resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
    "import os; os.sched_setaffinity(os.getppid(), {0})",
    "import os; os.setpriority(os.PRIO_USER, 0, 19)",
    "import os; os.truncate('main.py', 0)",
    "import ctypes; ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0) == 0 or "
    "(_ for _ in ()).throw(PermissionError('prctl'))",              # unset the death signal
])
def test_cannot_touch_other_processes(code: str) -> None:
    assert denied(run(code)), code


@confined
def test_it_can_still_signal_and_limit_itself() -> None:
    r = run("import os, signal, resource, threading\n"
            "signal.signal(signal.SIGUSR1, lambda *a: print('got it'))\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)\n"
            "resource.prlimit(0, resource.RLIMIT_NOFILE, (20, 20))\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE))")
    assert r["exit_code"] == 0, r["stderr"]
    assert r["stdout"].splitlines() == ["got it", "got it", "(20, 20)"]


@confined
def test_the_sandbox_dies_with_the_tool_worker(tmp_path: Path) -> None:
    """A worker SIGKILLed while its sandbox runs (the sandbox has a session
    of its own, out of reach of a kill of the worker's group): the
    sandbox goes too."""
    import subprocess
    import sys

    # the code marks its start in its scratch directory (its working directory)
    worker = subprocess.Popen([sys.executable, "-c",
                               "from aiosd.config import SandboxConfig\n"
                               "from aiosd.tools.sandbox import run_python\n"
                               "run_python('import time\\nopen(\\'started\\', \\'w\\').close()\\n"
                               "time.sleep(60)', SandboxConfig("
                               "cpu_seconds=5, memory_mb=256, wall_seconds=60.0, "
                               "output_bytes=2048))"])
    try:
        box = running_sandbox(lambda: psutil.Process(worker.pid).children())
        worker.kill()
        worker.wait()
        box.wait(timeout=30)   # psutil.TimeoutExpired if it outlived its worker
    finally:
        worker.kill()


@confined
def test_no_sockets_at_all() -> None:
    for code in ("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
                 "import socket; socket.socket(socket.AF_UNIX).connect('/run/aios/kernel.sock')",
                 "import socket; socket.create_connection(('127.0.0.1', 9), timeout=2)"):
        assert denied(run(code)), code


@confined
def test_landlock_alone_denies_tcp_connect_and_bind() -> None:
    """The Landlock layer by itself (the system call filter off): a real
    listener on 127.0.0.1 cannot be reached."""
    if ABI < 4:
        pytest.skip("Landlock ABI < 4 cannot deny TCP")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        r = run(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                _seccomp=False)
        assert denied(r), r
        r = run("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))", _seccomp=False)
        assert denied(r), r
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


# -- limits -------------------------------------------------------------------------


@confined
def test_cpu_limit() -> None:
    r = run("while True: pass", SandboxConfig(cpu_seconds=1, wall_seconds=20.0))
    assert r["exit_code"] == -signal.SIGXCPU and not r["timed_out"]
    assert "CPU limit of 1s" in r["stderr"]   # (not timed out: the 20 s wall limit did not end it)


@confined
def test_memory_limit() -> None:
    r = run("x = bytearray(2 * 1024 ** 3)")
    assert r["exit_code"] == 1 and "MemoryError" in r["stderr"]
    r = run("x = bytearray(50 * 1024 ** 2); print(len(x))")  # well within 256 MB
    assert r["stdout"] == f"{50 * 1024 ** 2}\n"


@confined
def test_wall_clock_limit_kills_the_process() -> None:
    # killed (not at the end of its sleep, which would exit 0), and said to
    # be killed by the wall-clock limit
    r = run("import time\nprint('started')\ntime.sleep(100)",
            SandboxConfig(cpu_seconds=5, wall_seconds=1.5))
    assert r["timed_out"] is True and r["exit_code"] == -signal.SIGKILL
    assert r["stdout"] == "started\n"      # unbuffered: what it printed is kept
    assert "wall-clock limit of 1.5s" in r["stderr"]


@confined
def test_output_is_capped() -> None:
    r = run("import sys\nprint('y' * 100000)\nsys.stderr.write('e' * 100000)")
    assert r["exit_code"] == 0 and r["truncated"] is True
    assert r["stdout"] == "y" * LIMITS.output_bytes
    assert r["stderr"].startswith("e" * LIMITS.output_bytes)
    assert r["stderr"].endswith("[sandbox: output truncated to 2048 bytes per stream]\n")


# -- the call's own deadline and cancellation ---------------------------------------------


def sandboxes() -> list[psutil.Process]:
    """This process's children: the sandboxes run_python started."""
    return psutil.Process().children()


@confined
def test_deadline_kills_and_raises_timeout_naming_the_tool() -> None:
    # the 30 s wall limit would return a result (timed_out), not raise
    before = {p.pid for p in sandboxes()}
    with pytest.raises(Timeout, match="^python: ") as info:
        run("import time; time.sleep(100)", SandboxConfig(wall_seconds=30.0),
            deadline=time.time() + 1.0)
    assert "stopped" in info.value.message
    assert {p.pid for p in sandboxes()} <= before   # the code's process is gone


@confined
def test_cancel_kills_and_raises_cancelled() -> None:
    before = {p.pid for p in sandboxes()}
    flag = threading.Event()
    canceller = threading.Thread(target=lambda: (
        running_sandbox(lambda: [p for p in sandboxes() if p.pid not in before]), flag.set()))
    canceller.start()
    try:
        # cancelled while its code runs (the 30 s wall limit would return a
        # result, not raise)
        with pytest.raises(Cancelled):
            run("import time\nopen('started', 'w').close()\ntime.sleep(100)",
                SandboxConfig(wall_seconds=30.0), cancelled=flag)
    finally:
        flag.set()
        canceller.join(60)
    assert {p.pid for p in sandboxes()} <= before   # the code's process is gone


@confined
def test_a_failed_confinement_refuses_to_run(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    # a bootstrap that cannot confine the process must not run the code
    marker = tmp_path / "ran"
    monkeypatch.setattr(sandbox, "RW_FILES", ())
    monkeypatch.setattr(sandbox, "BOOTSTRAP", "import sys, os\n"
                        "sys.stderr.write('aios sandbox: cannot install the filter\\n')\n"
                        "os._exit(125)\n")
    with pytest.raises(Unavailable, match="confining it failed: aios sandbox: cannot install"):
        run(f"open({str(marker)!r}, 'w')")
    assert not marker.exists()
