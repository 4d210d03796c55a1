"""A launched agent that tries to become the kernel, for the trust tests.

It tries each way in that a process of aiosd's own user would have, and
prints one JSON line: for each attempt, "denied" or what it got.
Usage: intruder.py DATA_DIR SCHEDULER_PID
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import zmq

from libaios import paths, protocol
from libaios.protocol import MsgType


def attempt(results: dict[str, str], what: str, action) -> None:
    try:
        got = action()
        results[what] = f"got: {got!r}"[:200]
    except (OSError, zmq.ZMQError) as exc:
        results[what] = f"denied ({type(exc).__name__}: {exc})"[:200]


def fake_worker(runtime: Path) -> str:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"storage")
    sock.connect(paths.ipc(runtime, paths.WORKERS_SOCKET))
    ready = protocol.call(MsgType.WORKER_READY, {"kind": "storage", "name": "storage",
                                                 "capacity": 4, "pid": 1, "types": []})
    sock.send_multipart(protocol.encode(ready))
    if sock.poll(2000):
        return "an answer: " + repr(sock.recv_multipart())
    sock.close(0)
    raise OSError("no answer")


def main() -> None:
    data_dir, scheduler = Path(sys.argv[1]), int(sys.argv[2])
    runtime = Path(os.environ["AIOS_RUNTIME_DIR"])
    results: dict[str, str] = {"uid": str(os.getuid())}
    attempt(results, "scheduler environ", lambda: Path(f"/proc/{scheduler}/environ").read_bytes())
    attempt(results, "scheduler memory", lambda: open(f"/proc/{scheduler}/mem", "rb").close())
    attempt(results, "data dir", lambda: os.listdir(data_dir))
    attempt(results, "store file", lambda: (data_dir / "storage" / "data.mdb").read_bytes()[:16])
    attempt(results, "runtime dir", lambda: os.listdir(runtime))
    attempt(results, "pid file", lambda: (runtime / paths.PID_FILE).read_text())
    attempt(results, "signal the scheduler", lambda: os.kill(scheduler, 0))
    attempt(results, "workers.sock", lambda: fake_worker(runtime))
    attempt(results, "write data dir", lambda: (data_dir / "planted").write_text("x"))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
