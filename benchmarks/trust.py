"""How much one hostile local process costs everyone else.

An agent makes null calls throughout (the bystander) while aiosd, on its
defaults, takes in turn:

1. nothing (the baseline);
2. 16 MB bodies of empty lists from connections that never said hello;
3. the same bodies from a connection that did;
4. 20,000 connections, each saying hello, from one process that then exits.

For each phase it prints the bystander's median and worst null-call latency,
the worst as a ratio of the baseline's, and whether every call was answered.
Run it on a quiet machine: ``make bench-trust``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from libaios import Client, errors, paths, protocol
from libaios.protocol import MsgType

from .tasks import start_daemon

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "trust.json"
BODY = 16 * 2**20 - 64 * 1024


class Bystander(threading.Thread):
    """An agent making null calls, one after another, timing each."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.samples: list[tuple[float, float]] = []   # (when it ended, latency)
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.endpoint, name="bystander", timeout=120).connect() as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    c.call(MsgType.SYS_NULL)
                except errors.AIOSError as exc:
                    self.failures.append(repr(exc))
                self.samples.append((time.monotonic(), time.monotonic() - t0))

    def between(self, start: float, end: float) -> list[float]:
        return [lat for at, lat in self.samples if start <= at <= end + 30]


def send_bodies(endpoint: str, count: int, hello: bool) -> list[str]:
    """``count`` 16 MB bodies of empty lists, each on a new connection;
    what each was answered."""
    body = msgpack.packb({"x": [[]] * (BODY - 16)})
    answers = []
    for n in range(count):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            if hello:
                sock.send_multipart(protocol.encode(protocol.call(MsgType.HELLO,
                                                                  {"name": f"big-{n}"})))
                sock.poll(30_000)
                sock.recv_multipart()
            sock.send_multipart([b"", protocol.encode(protocol.call(MsgType.SYS_NULL))[1], body])
            if sock.poll(60_000):
                reply = protocol.decode(protocol.split_envelope(sock.recv_multipart())[1])
                answers.append(reply.body.get("name", reply.type.value))
            else:
                answers.append("no answer")
        finally:
            sock.close(0)
        print(f"\r  16 MB bodies ({'after' if hello else 'before'} hello): {n + 1}/{count}",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return answers


def phase(bystander: Bystander, name: str, action: Any, baseline: float | None) -> dict[str, Any]:
    failed = len(bystander.failures)
    start = time.monotonic()
    detail = action()
    end = time.monotonic()
    time.sleep(0.5)   # the calls that were waiting through the end
    lat = bystander.between(start, end)
    row = {"phase": name, "seconds": round(end - start, 2), "calls": len(lat),
           "median_ms": round(1000 * statistics.median(lat), 2) if lat else None,
           "worst_ms": round(1000 * max(lat), 2) if lat else None,
           "failed": len(bystander.failures) - failed, "detail": detail}
    if baseline and lat:
        row["worst_vs_baseline"] = round(max(lat) / baseline, 1)
    return row


def flood(endpoint: str, count: int) -> dict[str, Any]:
    print(f"  {count} hello-and-exit connections from one process ...", file=sys.stderr,
          flush=True)
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "flood.py"), endpoint,
                          str(count)], capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr[-500:]}


def main() -> None:
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    daemon, env = start_daemon()
    endpoint = paths.ipc(Path(env["AIOS_RUNTIME_DIR"]), paths.KERNEL_SOCKET)
    rows = []
    try:
        bystander = Bystander(endpoint)
        bystander.start()
        base = phase(bystander, "baseline", lambda: time.sleep(3.0), None)
        rows.append(base)
        worst = (base["worst_ms"] or 1.0) / 1000
        rows.append(phase(bystander, "16 MB bodies before hello",
                          lambda: send_bodies(endpoint, 5, hello=False), worst))
        rows.append(phase(bystander, "16 MB bodies after hello",
                          lambda: send_bodies(endpoint, 5, hello=True), worst))
        rows.append(phase(bystander, "20,000 hello-and-exit connections",
                          lambda: flood(endpoint, 20_000), worst))
        bystander.stop.set()
        bystander.join(60)
        with Client(endpoint, name="after", operator=True, timeout=30).connect() as c:
            status = c.call(MsgType.ADMIN_STATUS)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    print(f"\n{'phase':<36} {'calls':>6} {'median ms':>10} {'worst ms':>9} {'x base':>7} "
          f"{'failed':>6}")
    for r in rows:
        print(f"{r['phase']:<36} {r['calls']:>6} {r['median_ms']!s:>10} {r['worst_ms']!s:>9} "
              f"{r.get('worst_vs_baseline', 1.0)!s:>7} {r['failed']:>6}")
    for r in rows[1:]:
        print(f"  {r['phase']}: {r['seconds']} s; {json.dumps(r['detail'])[:160]}")
    print(f"after: healthy={status['healthy']}, sessions={status['sessions']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"phases": rows, "healthy_after": status["healthy"]}, indent=2))
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
