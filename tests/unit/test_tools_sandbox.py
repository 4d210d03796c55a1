"""The python sandbox cannot exceed its limits or write outside its scratch
directory (skipped where the kernel has no Landlock: the tool refuses)."""

import pytest

from aiosd.config import SandboxConfig
from aiosd.tools.sandbox import landlock_abi, run_python

pytestmark = pytest.mark.skipif(landlock_abi() < 1, reason="this kernel has no Landlock")
LIMITS = SandboxConfig(cpu_seconds=1, memory_mb=200, wall_seconds=4.0, output_bytes=2048)


def test_empty_environment_scratch_cwd_and_writes_inside() -> None:
    r = run_python("import os; print(sorted(os.environ)); print(os.getcwd());"
                   "open('f', 'w').write('ok'); print(open('f').read())", LIMITS)
    lines = r["stdout"].splitlines()
    assert r["exit_code"] == 0, r["stderr"]
    assert set(eval(lines[0])) <= {"LC_CTYPE"}  # only what Python itself sets
    assert "aios-sandbox-" in lines[1] and lines[2] == "ok"


@pytest.mark.parametrize("code", [
    "open('/tmp/aios-sandbox-escape', 'w').write('x')",
    "import os; os.mkdir('/tmp/aios-sandbox-escape-dir')",
    "import os; os.remove(os.path.expanduser('~/.bashrc'))",
])
def test_cannot_write_outside(code: str) -> None:
    r = run_python(code, LIMITS)
    assert r["exit_code"] != 0 and "PermissionError" in r["stderr"]


def test_cpu_memory_time_and_output_limits() -> None:
    assert run_python("while True: pass", LIMITS)["exit_code"] != 0
    mem = run_python("x = bytearray(1 << 30)", LIMITS)
    assert mem["exit_code"] != 0 and "MemoryError" in mem["stderr"]
    slow = run_python("import time; time.sleep(60)", LIMITS)
    assert slow["timed_out"]
    loud = run_python("print('y' * 100000)", LIMITS)
    assert len(loud["stdout"]) <= LIMITS.output_bytes


def test_no_network_where_landlock_can_deny_it() -> None:
    if landlock_abi() < 4:
        pytest.skip("Landlock ABI < 4 cannot deny TCP")
    r = run_python("import socket; socket.create_connection(('127.0.0.1', 9), timeout=2)", LIMITS)
    assert "PermissionError" in r["stderr"]
