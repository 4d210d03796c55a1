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
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from libaios import Client, paths, protocol
from libaios.protocol import MsgType

from .tasks import start_daemon

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "trust.json"
BODY = 16 * 2**20 - 64 * 1024


BYSTANDER = """
import json, sys, time
from libaios import Client, errors
from libaios.protocol import MsgType
samples, failures = [], []
with Client(sys.argv[1], name="bystander", timeout=120).connect() as c:
    print("ready", flush=True)
    while True:
        t0 = time.monotonic()
        try:
            c.call(MsgType.SYS_NULL)
        except errors.AIOSError as exc:
            failures.append(repr(exc))
        samples.append((time.time(), time.monotonic() - t0))
        if len(samples) % 64 == 0:
            import select
            if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.readline():
                break
print(json.dumps({"samples": samples, "failures": failures}), flush=True)
"""


class Bystander:
    """An agent of its own process, making null calls one after another and
    timing each, until its stdin closes."""

    def __init__(self, endpoint: str):
        self.proc = subprocess.Popen([sys.executable, "-c", BYSTANDER, endpoint],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.samples: list[tuple[float, float]] = []   # (when it ended, latency)
        self.failures: list[str] = []

    def finish(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(timeout=60)
        got = json.loads(out.strip().splitlines()[-1])
        self.samples, self.failures = got["samples"], got["failures"]

    def between(self, start: float, end: float) -> list[float]:
        return [lat for at, lat in self.samples if start <= at <= end]


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


def phase(name: str, action: Any) -> dict[str, Any]:
    start = time.time()
    detail = action()
    end = time.time()
    time.sleep(0.5)
    return {"phase": name, "start": start, "end": end + 0.5, "seconds": round(end - start, 2),
            "detail": detail}


def figures(row: dict[str, Any], bystander: Bystander, baseline: float | None) -> None:
    """The bystander's latencies while ``row``'s phase ran."""
    lat = bystander.between(row.pop("start"), row.pop("end"))
    row.update(calls=len(lat), median_ms=round(1000 * statistics.median(lat), 2) if lat else None,
               worst_ms=round(1000 * max(lat), 2) if lat else None)
    if baseline and lat:
        row["worst_vs_baseline"] = round(max(lat) / baseline, 1)


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
        rows.append(phase("baseline", lambda: time.sleep(3.0)))
        rows.append(phase("16 MB bodies before hello",
                          lambda: send_bodies(endpoint, 5, hello=False)))
        rows.append(phase("16 MB bodies after hello",
                          lambda: send_bodies(endpoint, 5, hello=True)))
        rows.append(phase("20,000 hello-and-exit connections", lambda: flood(endpoint, 20_000)))
        bystander.finish()
        with Client(endpoint, name="after", operator=True, timeout=30).connect() as c:
            status = c.call(MsgType.ADMIN_STATUS)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    figures(rows[0], bystander, None)
    base = (rows[0]["worst_ms"] or 1.0) / 1000
    for row in rows[1:]:
        figures(row, bystander, base)
    print(f"\n{'phase':<36} {'calls':>6} {'median ms':>10} {'worst ms':>9} {'x base':>7}")
    for r in rows:
        print(f"{r['phase']:<36} {r['calls']:>6} {r['median_ms']!s:>10} {r['worst_ms']!s:>9} "
              f"{r.get('worst_vs_baseline', 1.0)!s:>7}")
    print(f"bystander's calls that failed: {len(bystander.failures)}")
    for r in rows[1:]:
        print(f"  {r['phase']}: {r['seconds']} s; {json.dumps(r['detail'])[:160]}")
    print(f"after: healthy={status['healthy']}, sessions={status['sessions']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"phases": rows, "failed_calls": bystander.failures,
                                   "healthy_after": status["healthy"]}, indent=2))
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
