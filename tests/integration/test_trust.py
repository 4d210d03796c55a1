"""The trust boundary, tried as an attacker would: launched agents, other
users and local processes cannot become the kernel, take another's name or
data, or stall the kernel for everyone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from aiosd import confine
from libaios import errors, paths, protocol
from libaios.protocol import ErrorCode, MsgType

from ..conftest import REPO, TEST_AGENTS, Daemon

pytestmark = pytest.mark.integration

OTHER_UID = 65534   # nobody
needs_root = pytest.mark.skipif(os.getuid() != 0,
                                reason="running a process as another uid needs root")


def last_json(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text
    return json.loads(lines[-1])


def as_user(uid: int, argv: list[str], env: dict[str, str], daemon: Daemon,
            **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``argv`` (a Python program) as ``uid``, able to reach Python and
    the kernel's socket even where a directory on the way is closed to it."""
    needed = confine.needed_paths(argv[1], None, daemon.runtime)
    plan = confine.Plan(uid, uid, confine.reach_for(needed, uid, uid))
    return subprocess.run(argv, env={**env, "HOME": "/"}, preexec_fn=plan.preexec(), check=False,
                          capture_output=True, text=True, timeout=120, cwd="/", **kwargs)


def null_calls_until(daemon: Daemon, stop: threading.Event, out: dict[str, Any]) -> None:
    """Make null calls until ``stop``; record how many were answered and
    every failure (none may time out)."""
    out.update(answered=0, failures=[])
    with daemon.client(name="bystander", timeout=60) as c:
        while not stop.is_set():
            try:
                c.call(MsgType.SYS_NULL)
                out["answered"] += 1
            except errors.AIOSError as exc:
                out["failures"].append(repr(exc))


# -- launched agents -----------------------------------------------------------


def test_a_launched_agent_reaches_nothing_of_the_kernels(daemon: Daemon) -> None:
    """The attack: read the kernel's credential from /proc, its store's file,
    the runtime directory; signal the scheduler; register as a worker."""
    status = daemon.status()
    conf = status["confinement"]
    if os.getuid() != 0 and not conf["landlock_abi"]:
        pytest.skip("aiosd does not run as root and this kernel has no Landlock: "
                    "launched agents are not confined here (aiosctl status says so)")
    with daemon.client(name="victim") as c:
        c.storage.put("secret", "the victim's secret")
    result = daemon.ctl("run", str(TEST_AGENTS / "intruder.py"), daemon.env["AIOS_DATA_DIR"],
                        str(status["pid"]), timeout=120)
    found = last_json(result.stdout + result.stderr)
    for what, outcome in found.items():
        if what != "uid":
            assert outcome.startswith("denied"), (what, outcome)
    if os.getuid() == 0:
        assert int(found["uid"]) in confine.DYNAMIC_UIDS
    with daemon.client(name="victim") as c:   # the kernel serves as before
        assert c.storage.get("secret") == "the victim's secret"


def test_no_kernel_process_has_a_credential_in_its_environment(daemon: Daemon) -> None:
    status = daemon.status()
    pids = [status["supervisor_pid"], status["pid"]] + [p["pid"] for p in status["procs"]
                                                         if p.get("pid")]
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0] for entry in environ}
        assert b"AIOS_SUPERVISOR_TOKEN" not in names
        assert not any(b"TOKEN" in n or b"SECRET" in n for n in names), (pid, names)


def test_only_the_gateway_presents_api_keys(daemon: Daemon) -> None:
    """An API key makes its bearer the key's agent only through the gateway:
    a process that presents one itself over kernel.sock (under any name,
    the gateway's too) is refused, and the refusal is audited."""
    import asyncio

    from libaios.aio import AsyncClient

    made = daemon.ctl("keys", "create", "keyed", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]

    async def hello(name: str) -> None:
        client = AsyncClient(daemon.endpoint, name=name, key=key, timeout=10)
        try:
            await client.connect()
        finally:
            await client.close()

    for name in ("keyed", "gateway"):
        with pytest.raises(errors.PermissionDenied, match="only aiosd's gateway presents API keys"):
            asyncio.run(hello(name))
    assert not any(a["name"] == "keyed" for a in daemon.ps())

    def denials() -> int:   # (the audit log is written by the storage worker, soon after)
        found, after = 0, 0
        while True:   # every page: this daemon has served other tests
            audit = daemon.ctl("audit", "--json", "--limit", "10000", "--after", str(after))
            assert audit.returncode == 0, audit.stderr
            records = json.loads(audit.stdout)
            if not records:
                return found
            found += sum(1 for r in records if r.get("event") == "hello.denied"
                         and "not the gateway" in r.get("why", ""))
            after = records[-1]["seq"]

    deadline = time.monotonic() + 30
    while denials() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert denials() == 2


# -- workers.sock ------------------------------------------------------------------


def test_a_fake_worker_gets_no_calls_and_kills_nothing(daemon: Daemon) -> None:
    """A local process registers as the storage worker (under the real
    one's routing name, and claiming an unrelated process's pid)."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ctx = zmq.Context.instance()
    fakes = []
    try:
        for identity in (b"storage", None):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if identity:
                sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(paths.ipc(daemon.runtime, paths.WORKERS_SOCKET))
            ready = protocol.call(MsgType.WORKER_READY, {
                "kind": "storage", "name": "storage", "capacity": 64, "pid": bystander.pid,
                "types": ["storage.put", "storage.get"], "credential": "guessed"})
            sock.send_multipart(protocol.encode(ready))
            fakes.append(sock)
        with daemon.client(name="fake-worker-victim", timeout=30) as c:
            for n in range(20):
                c.storage.put(f"k{n}", f"value {n}")
                assert c.storage.get(f"k{n}") == f"value {n}"
        for sock in fakes:
            while sock.poll(200):
                _, payload = protocol.split_envelope(sock.recv_multipart())
                msg = protocol.decode(payload)
                assert msg.type is not MsgType.WORKER_TASK, msg.body
        assert bystander.poll() is None
        assert "refused a worker registering as 'storage'" in daemon.log_text()
    finally:
        for sock in fakes:
            sock.close(0)
        bystander.kill()
        bystander.wait()


# -- what reaches the kernel before hello ----------------------------------------------


def empty_lists_body(size: int) -> bytes:
    """A body of ``size`` bytes that is almost all empty lists."""
    return msgpack.packb({"x": [[]] * (size - 16)})


def test_a_16mb_body_before_hello_is_refused_unread(daemon: Daemon) -> None:
    stop, seen = threading.Event(), {}
    thread = threading.Thread(target=null_calls_until, args=(daemon, stop, seen))
    thread.start()
    try:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.endpoint)
        try:
            body = empty_lists_body(16 * 2**20 - 64 * 1024)
            call = protocol.call(MsgType.SYS_NULL, {})
            sock.send_multipart([b"", protocol.encode(call)[1], body])
            assert sock.poll(30_000), "no answer"
            _, payload = protocol.split_envelope(sock.recv_multipart())
            reply = protocol.decode(payload)
            assert reply.re == call.id and reply.body["code"] == ErrorCode.TOO_LARGE
            assert "has not said hello" in reply.body["message"]
        finally:
            sock.close(0)
    finally:
        stop.set()
        thread.join(60)
    assert seen["answered"] > 0 and not seen["failures"]
    status = daemon.status()
    assert status["healthy"], status
    assert "lost" not in daemon.log_text().split("scheduler listening")[-1]


def test_a_body_of_too_many_values_is_refused_after_hello(daemon: Daemon) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        hello = protocol.call(MsgType.HELLO, {"name": "many-values"})
        sock.send_multipart(protocol.encode(hello))
        assert sock.poll(10_000)
        sock.recv_multipart()
        call = protocol.call(MsgType.SYS_NULL, {})
        sock.send_multipart([b"", protocol.encode(call)[1], empty_lists_body(8 * 2**20)])
        assert sock.poll(30_000), "no answer"
        reply = protocol.decode(protocol.split_envelope(sock.recv_multipart())[1])
        assert reply.body["code"] == ErrorCode.TOO_LARGE
        assert "values" in reply.body["message"]
    finally:
        sock.close(0)


def test_a_call_whose_deadline_passed_is_refused_at_arrival(daemon: Daemon) -> None:
    with daemon.client(name="late") as c:
        msg = protocol.call(MsgType.STORAGE_PUT, {"key": "late", "value": 1}, timeout=-1.0)
        c._sock.send_multipart(protocol.encode(msg))
        assert c._sock.poll(10_000)
        reply = protocol.decode(protocol.split_envelope(c._sock.recv_multipart())[1])
        assert reply.re == msg.id and reply.body["code"] == ErrorCode.TIMEOUT
        assert "had passed when it arrived" in reply.body["message"]
        with pytest.raises(errors.NotFound):
            c.storage.get("late")   # it was not run


# -- floods --------------------------------------------------------------------------


def test_a_flood_of_20000_connections_does_not_stall_the_kernel(daemon: Daemon) -> None:
    stop, seen = threading.Event(), {}
    thread = threading.Thread(target=null_calls_until, args=(daemon, stop, seen))
    thread.start()
    try:
        flood = subprocess.run(
            [sys.executable, str(REPO / "tests" / "tools" / "flood.py"), daemon.endpoint,
             "20000"], check=False, capture_output=True, text=True, timeout=600, env=daemon.env)
    finally:
        stop.set()
        thread.join(60)
    got = last_json(flood.stdout + flood.stderr)
    assert got["silent"] == 0, got
    assert got["answered"] + got["refused"] == 20000
    limit = daemon.status()["sessions"]
    assert "kernel.max_sessions_per_process" in got["first_refusal"], got
    assert seen["answered"] > 0 and not seen["failures"], seen
    # the flooder's sessions go with its process, and ps stays small
    daemon.wait_for(lambda s: s["sessions"] < limit or s["sessions"] < 50, timeout=30)
    with daemon.client(operator=True) as c:
        ps = c.call(MsgType.ADMIN_PS)
    assert len(ps["agents"]) <= ps["total"] and len(ps["agents"]) <= 200


# -- names and other users --------------------------------------------------------------


HELLO_AS = """
import json, sys
import libaios
from libaios import errors
try:
    with libaios.Client(sys.argv[1], name=sys.argv[2], timeout=20).connect() as c:
        me = c.call(libaios.MsgType.AGENT_WHOAMI)
        try:
            value = c.storage.get("diary")
        except errors.NotFound:
            value = None
        print(json.dumps({"name": me["name"], "diary": value}))
except errors.AIOSError as exc:
    print(json.dumps({"error": exc.code.name, "message": exc.message}))
"""


def test_a_live_name_belongs_to_its_holder(daemon: Daemon, tmp_path: Path) -> None:
    script = tmp_path / "hello_as.py"
    script.write_text(HELLO_AS)
    with daemon.client(name="alice") as alice:
        alice.storage.put("diary", "alice's diary")
        # another connection of the same process is the same agent
        with daemon.client(name="alice") as again:
            assert again.call(MsgType.AGENT_WHOAMI)["agent"] == \
                alice.call(MsgType.AGENT_WHOAMI)["agent"]
        other = subprocess.run([sys.executable, str(script), daemon.endpoint, "alice"],
                               check=False, capture_output=True, text=True, timeout=60,
                               env=daemon.env)
        got = last_json(other.stdout + other.stderr)
        assert got.get("error") == "PERMISSION_DENIED", got
        assert "belongs to agent alice" in got["message"]
    with daemon.client(name="x") as c:   # '@' is the kernel's, for other users' names
        hello = protocol.call(MsgType.HELLO, {"name": "alice@0"})
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.endpoint)
        sock.send_multipart(protocol.encode(hello))
        assert sock.poll(10_000)
        reply = protocol.decode(protocol.split_envelope(sock.recv_multipart())[1])
        sock.close(0)
        assert reply.body["code"] == ErrorCode.INVALID_ARGUMENT and "'@'" in reply.body["message"]
        assert c.call(MsgType.AGENT_WHOAMI)["name"] == "x"


@needs_root
def test_another_users_agent_has_its_own_name_and_data(make_daemon, tmp_path: Path) -> None:
    d: Daemon = make_daemon({"access": {"allow_uids": [OTHER_UID]}})
    script = tmp_path / "hello_as.py"
    script.write_text(HELLO_AS)
    script.chmod(0o644)
    with d.client(name="alice") as alice:
        alice.storage.put("diary", "root's alice's diary")
        got = last_json(as_user(OTHER_UID, [sys.executable, str(script), d.endpoint, "alice"],
                                d.env, d).stdout)
    assert got == {"name": f"alice@{OTHER_UID}", "diary": None}, got


RUN_AS_CALLER = """
import json, os, sys
import libaios
with libaios.Client(sys.argv[1], name="mallory", timeout=60).connect() as c:
    out = []
    for part in c.stream(libaios.MsgType.AGENT_RUN, {"path": sys.argv[2], "wait": True}):
        if part.get("stream") == "stdout":
            out.append(part["data"])
    print("".join(out).strip().splitlines()[-1])
"""

SHADOW = """
import json, os
try:
    open("/etc/shadow").read()
    shadow = "read"
except OSError as exc:
    shadow = "denied: " + exc.strerror
print(json.dumps({"uid": os.getuid(), "shadow": shadow}))
"""


@needs_root
def test_agent_run_from_another_uid_runs_as_that_uid(make_daemon, tmp_path: Path) -> None:
    d: Daemon = make_daemon({"access": {"allow_uids": [OTHER_UID]}})
    runner, target = tmp_path / "run_as_caller.py", tmp_path / "shadow.py"
    runner.write_text(RUN_AS_CALLER)
    target.write_text(SHADOW)
    for path in (runner, target):
        path.chmod(0o644)
    tmp_path.chmod(0o755)
    result = as_user(OTHER_UID, [sys.executable, str(runner), d.endpoint, str(target)], d.env, d)
    got = last_json(result.stdout + result.stderr)
    assert got["uid"] == OTHER_UID and got["shadow"].startswith("denied"), got


# -- frames too large for the transport ----------------------------------------------------


def test_a_100mb_frame_is_refused_and_the_kernel_serves_on(daemon: Daemon) -> None:
    with daemon.client(name="big") as c:
        with pytest.raises(errors.TooLarge, match="too large"):
            c.storage.put("big", b"x" * 100 * 2**20)
        assert c.call(MsgType.SYS_NULL) is not None
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:   # a raw frame past the transport's limit: the connection is dropped
        sock.send_multipart([b"", protocol.encode(protocol.call(MsgType.SYS_NULL))[1],
                             b"x" * 100 * 2**20])
        assert not sock.poll(2000)
    finally:
        sock.close(0)
    with daemon.client(name="after-big") as c:
        assert c.call(MsgType.SYS_NULL) is not None


LANDLOCKED = """
import json, os, signal, sys
out = {}
for what, action in (("read data", lambda: open(os.path.join(sys.argv[1], "secret")).read()),
                     ("list runtime", lambda: os.listdir(sys.argv[2])),
                     ("write data", lambda: open(os.path.join(sys.argv[1], "planted"), "w")),
                     ("signal parent", lambda: os.kill(int(sys.argv[3]), 0)),
                     ("read python", lambda: bool(os.listdir(os.path.dirname(os.__file__)))),
                     ("write tmp", lambda: open(os.path.join(sys.argv[4], "ok"), "w").close())):
    try:
        action()
        out[what] = "allowed"
    except OSError as exc:
        out[what] = "denied"
print(json.dumps(out))
"""


def test_landlock_alone_keeps_a_same_user_agent_out(tmp_path: Path) -> None:
    """Where aiosd does not run as root its agents share its user: Landlock
    is then what keeps them from the kernel's files and processes (here
    even a root process is kept out)."""
    abi = confine.landlock_abi()
    if not abi:
        pytest.skip("this kernel has no Landlock")
    data, run, scratch = tmp_path / "data", tmp_path / "run", tmp_path / "scratch"
    for d in (data, run, scratch):
        d.mkdir()
    (data / "secret").write_text("the kernel's")
    script = tmp_path / "landlocked.py"
    script.write_text(LANDLOCKED)
    rules = confine.landlock_rules([str(data), str(run)], [str(scratch), "/dev"])
    plan = confine.Plan(None, None, (), rules, abi)
    result = subprocess.run(
        [sys.executable, str(script), str(data), str(run), str(os.getpid()), str(scratch)],
        preexec_fn=plan.preexec(), capture_output=True, text=True, timeout=60, check=False)
    got = last_json(result.stdout + result.stderr)
    assert got["read data"] == got["list runtime"] == got["write data"] == "denied", got
    assert got["read python"] == got["write tmp"] == "allowed", got
    if abi >= 6:
        assert got["signal parent"] == "denied", got


def test_a_closing_client_says_bye_and_its_agent_ends(daemon: Daemon) -> None:
    before = daemon.status()["sessions"]
    c = daemon.client(name="leaving")
    agent = c.call(MsgType.AGENT_WHOAMI)["agent"]
    assert daemon.status()["sessions"] == before + 1
    c.close()
    daemon.wait_for(lambda s: s["sessions"] == before, what="the session to go")
    row = next(r for r in daemon.ps() if r["id"] == agent)
    assert row["state"] == "disconnected"
