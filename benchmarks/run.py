"""``make bench``: the workload of N agents on aiosd, through aiosd's HTTP
gateway with the openai package, on agents calling the model directly, and
on one shared OpenAI-compatible server; the lower
bound for the workload on this machine; and the kernel's overhead for a null
system call beside a bare pyzmq round trip. Prints figures and ratios,
writes ``benchmarks/results/latest.json`` and draws it as
``benchmarks/results/latest.png`` (``benchmarks.plot``).

    python -m benchmarks.run            # N = 1, 8, 32 and 250 (beyond 32: aiosd alone)
    python -m benchmarks.run --n 8      # one size
    python -m benchmarks.run --n 500    # the largest run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

import psutil

from . import floor, plot, workload

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Watcher:
    """A thread that watches a run from the side while a ``with`` block
    lasts: ``_run`` (the subclass's) loops until ``_stop`` is set."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakRSS(Watcher):
    """Samples the summed RSS of this process's descendants every
    ``interval`` seconds. Finding the descendants reads every process's
    status, which with hundreds of agents took half a core away from the
    systems measured, so the list of them is refreshed only every
    ``refresh`` seconds (the agents start at once and live through the run)."""

    def __init__(self, interval: float = 0.2, refresh: float = 2.0) -> None:
        self.peak = 0
        #: the same for the daemon's own processes, once ``kernel_pid`` is set
        self.kernel_pid: int | None = None
        self.kernel_peak = 0
        self.interval, self.refresh = interval, refresh
        super().__init__()

    def _run(self) -> None:
        me = psutil.Process()
        tree: list[psutil.Process] = []
        mine: set[int] = set()
        found = 0.0
        while not self._stop.is_set():
            if time.monotonic() - found >= self.refresh:
                tree, found = me.children(recursive=True), time.monotonic()
                mine = set()
                if self.kernel_pid is not None:
                    try:
                        daemon = psutil.Process(self.kernel_pid)
                        mine = {daemon.pid, *(p.pid for p in daemon.children(recursive=True))}
                    except psutil.Error:
                        pass
            total = kernel = 0
            for child in tree:
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if child.pid in mine:
                    kernel += rss
            self.peak = max(self.peak, total)
            self.kernel_peak = max(self.kernel_peak, kernel)
            self._stop.wait(self.interval)


#: seconds between the progress lines of a run
PROGRESS_EVERY = 15.0


class Progress(Watcher):
    """While a run lasts, a line every ``PROGRESS_EVERY`` seconds: the time,
    the agents that have finished and, of a daemon's (``env`` points at it),
    the calls its cores have answered: one status call on a connection kept
    open, so that asking costs the run next to nothing."""

    def __init__(self, label: str, procs: list[subprocess.Popen], calls: int,
                 env: dict[str, str] | None = None) -> None:
        self.label, self.procs, self.calls, self.env = label, procs, calls, env
        self._client: Any = None
        self._start = time.time()
        super().__init__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._client is not None:
            self._client.close()

    def _served(self) -> int | None:
        from libaios import paths
        from libaios.client import Client
        from libaios.protocol import MsgType

        if self.env is None:
            return None
        try:
            if self._client is None:
                endpoint = paths.ipc(Path(self.env["AIOS_RUNTIME_DIR"]), paths.KERNEL_SOCKET)
                self._client = Client(endpoint, name="bench-progress", operator=True, timeout=5.0)
                self._client.connect()
            status = self._client.call(MsgType.ADMIN_STATUS)
        except Exception:   # progress is only shown: a run never fails for it
            return None
        return sum(int(c.get("served", 0)) for c in status.get("cores", []))

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY):
            done = sum(p.poll() is not None for p in self.procs)
            line = (f"       {self.label}: {time.time() - self._start:4.0f}s, "
                    f"{done}/{len(self.procs)} agents finished")
            answered = self._served()
            if answered is not None:
                line += f", {min(answered, self.calls)}/{self.calls} calls answered"
            print(line, flush=True)


def run_agents(system: str, n: int, env: dict[str, str], extra: list[str],
               flooder: bool = False) -> dict[str, Any]:
    flood = None
    if flooder:
        flood = subprocess.Popen([sys.executable, "-m", "benchmarks.agent", "flood", "99"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        time.sleep(1.0)  # let the flood begin before the others start
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.agent", system, str(i), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=ROOT, text=True) for i in range(n)]
    start = time.time()
    reports, failures = [], 0
    with Progress(f"N={n} {system}", procs, n * workload.TURNS,
                  env if system in ("aiosd", "gateway") else None):
        for proc in procs:
            out, err = proc.communicate()
            try:
                reports.append(json.loads(out.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                failures += workload.TURNS
                sys.stderr.write(f"{system} agent failed: {err[-500:]}\n")
    makespan = time.time() - start
    if flood is not None:
        flood.kill()
        flood.wait()
    calls = [c for r in reports for c in r["calls"]]
    generated = sum(r["generated"] for r in reports)
    # fairness: each agent's own p95 call latency, the worst against the median agent's
    per_agent = sorted(pct(r["calls"], 95) for r in reports if r["calls"])
    median_p95 = per_agent[len(per_agent) // 2] if per_agent else 0.0
    return {
        "system": system, "n": n, "makespan_s": round(makespan, 3),
        "gen_tok_per_s": round(generated / makespan, 2) if makespan else 0.0,
        "p50_call_s": round(pct(calls, 50), 4), "p95_call_s": round(pct(calls, 95), 4),
        "p95_turnaround_s": round(pct([r["end"] - r["start"] for r in reports], 95), 4),
        "failures": failures + sum(r["failures"] for r in reports), "generated": generated,
        "agent_ready_s": round(sum(r.get("ready_s", 0.0) for r in reports) / max(1, len(reports)), 3),
        "agent_p95_median_s": round(median_p95, 4),
        "agent_p95_worst_s": round(per_agent[-1], 4) if per_agent else 0.0,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_aiosd(n: int, config: dict[str, Any] | None = None, flooder: bool = False,
                gateway: bool = False) -> dict[str, Any]:
    """The workload on aiosd: its agents on libaios, or (``gateway``) on the
    openai package through the gateway, each with a key of its own."""
    import tomli_w

    tmp = Path(tempfile.mkdtemp(prefix="aios-bench-"))
    env = dict(os.environ, AIOS_RUNTIME_DIR=str(tmp / "run"), AIOS_DATA_DIR=str(tmp / "data"))
    argv = [sys.executable, "-m", "aiosd"]
    config = {**(config or {}), "gateway": {"listen": "127.0.0.1:0"}}
    (tmp / "aiosd.toml").write_text(tomli_w.dumps(config))
    argv += ["--config", str(tmp / "aiosd.toml")]
    with PeakRSS() as peak:
        daemon = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / "aiosd.log", "wb"), cwd=ROOT)
        peak.kernel_pid = daemon.pid
        try:
            wait_ready(env)
            if gateway:
                url = wait_gateway(env)
                keys = [make_key(env, f"bench{i}") for i in range(n)]
                pid = next(p["pid"] for p in ctl_status(env)["procs"] if p["name"] == "gateway")
                before = sum(psutil.Process(pid).cpu_times()[:2])
                result = run_agents("gateway", n, env, [f"{url}/v1", *keys])
                result["gateway_cpu_s"] = round(sum(psutil.Process(pid).cpu_times()[:2]) - before, 2)
            else:
                result = run_agents("aiosd", n, env, [], flooder)
            cores = core_stats(env)
        finally:
            daemon.terminate()
            daemon.wait(60)
    shutil.rmtree(tmp, ignore_errors=True)
    return {**result, "peak_rss_mb": round(peak.peak / 2**20, 1),
            "peak_rss_kernel_mb": round(peak.kernel_peak / 2**20, 1),
            "core": cores[0] if cores else {}, "cores": cores}


#: what the core's engine did in a run: where aiosd's time went
CORE_FIGURES = ("busy_s", "decode_s", "steps", "passes", "prefill_tokens", "decode_tokens",
                "cached_tokens", "shared_tokens", "moved_seqs", "evicted_seqs", "kept_seqs",
                "restored_seqs", "restored_tokens", "admit_s", "settles", "ram_hits", "disk_hits",
                "spilled_seqs")


def core_stats(env: dict[str, str]) -> list[dict[str, Any]]:
    """The engine figures of the daemon's cores, as their latest heartbeats
    reported them (one heartbeat after the last call ends), with each
    core's affinity counts (hits, moves, new)."""
    time.sleep(2.5)
    try:
        cores = ctl_status(env)["cores"]
    except (ValueError, KeyError):
        return []
    out = []
    for core in cores:
        stats = core.get("stats") or {}
        out.append({"name": core["name"], "affinity": core.get("affinity") or {},
                    **{k: round(stats[k], 2) if isinstance(stats[k], float) else stats[k]
                       for k in CORE_FIGURES if k in stats}})
    return out


def ctl_status(env: dict[str, str]) -> dict[str, Any]:
    """``aiosctl status --json`` of the daemon ``env`` points at; empty when
    it does not answer."""
    out = subprocess.run([sys.executable, "-m", "aiosd.ctl", "status", "--json"], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode not in (0, 1) or not out.stdout:
        return {}
    return json.loads(out.stdout)


def wait_gateway(env: dict[str, str]) -> str:
    """The gateway's URL, once it serves."""
    end = time.time() + 60
    while time.time() < end:
        url = (ctl_status(env).get("gateway") or {}).get("url")
        if url:
            return url
        time.sleep(0.3)
    raise RuntimeError("aiosd's gateway did not start")


def make_key(env: dict[str, str], name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "aiosd.ctl", "keys", "create", name, "--json"],
                         env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout)["key"]


def wait_ready(env: dict[str, str]) -> None:
    end = time.time() + 180
    while time.time() < end:
        if ctl_status(env).get("ready"):
            return
        time.sleep(0.3)
    raise RuntimeError("aiosd did not become ready")


def direct_agent_mb() -> float:
    """Memory one direct agent needs: a probe process loads the model as a
    direct agent does and reports its RSS."""
    code = ("import psutil; from llama_cpp import Llama; from aiosd.llm.llamacpp import embedded_model_path; "
            "llm = Llama(str(embedded_model_path()), n_ctx=2048, verbose=False); "
            "llm.create_chat_completion([{'role': 'user', 'content': 'hi'}], max_tokens=4); "
            "print(psutil.Process().memory_info().rss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def bench_direct(n: int, per_agent_mb: float | None) -> dict[str, Any]:
    if per_agent_mb is None and n > 32:
        per_agent_mb = direct_agent_mb()  # never start hundreds of models blind
    if per_agent_mb is not None:
        need = per_agent_mb * n
        avail = psutil.virtual_memory().available / 2**20
        if need > 0.8 * avail:
            # every field of a run, empty: the run could not be made
            return {"system": "direct", "n": n, "skipped": (
                f"cannot run: {n} agents each loading the model need about {need:.0f} MB; "
                f"{avail:.0f} MB are available"), "makespan_s": None, "gen_tok_per_s": None,
                "p50_call_s": None, "p95_call_s": None, "p95_turnaround_s": None,
                "peak_rss_mb": None, "failures": n * workload.TURNS}
    with PeakRSS() as peak:
        result = run_agents("direct", n, dict(os.environ), [])
    return {**result, "peak_rss_mb": round(peak.peak / 2**20, 1)}


def bench_shared(n: int) -> dict[str, Any]:
    from aiosd.llm.llamacpp import embedded_model_path

    port = free_port()
    # The server's own thread defaults (half the CPUs to decode, all to
    # prefill) are its fastest here: with every CPU decoding, its threads
    # compete with its HTTP loop and the agents (8 agents: 76 s against 61 s).
    log = tempfile.NamedTemporaryFile(prefix="aios-bench-server-", delete=False)
    with PeakRSS() as peak:
        server = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
             "--model_alias", "smollm2"], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            end = time.time() + 120
            while time.time() < end:
                try:
                    urllib.request.urlopen(f"{url}/models", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            result = run_agents("shared", n, dict(os.environ), [url])
        finally:
            server.terminate()
            server.wait(30)
    os.unlink(log.name)
    return {**result, "peak_rss_mb": round(peak.peak / 2**20, 1)}


# -- the lower bound ----------------------------------------------------------------


#: times each rate is measured (the best counts)
RATE_TRIALS = 3


def rates() -> dict[str, Any]:
    """Prefill and best batched decode rates with the low-level API: the
    best of several batch sizes and trials, with flash attention off and on (aiosd's
    default is off: see CoreConfig.flash_attn). Each kernel's own rates are
    kept too, so that a run shows how much of the bound comes from the
    faster one."""
    by = {}
    for flash_attn in (False, True):
        p, d = _rates(flash_attn)
        by["flash_on" if flash_attn else "flash_off"] = {"prefill_tok_per_s": round(p, 1),
                                                         "decode_tok_per_s": round(d, 1)}
    return {"prefill_tok_per_s": max(r["prefill_tok_per_s"] for r in by.values()),
            "decode_tok_per_s": max(r["decode_tok_per_s"] for r in by.values()), **by}


def _rates(flash_attn: bool) -> tuple[float, float]:
    from aiosd.llm.engine import Engine
    from aiosd.llm.generation import Request
    from aiosd.llm.llamacpp import embedded_model_path

    eng = Engine(str(embedded_model_path()), n_ctx=1024, slots=64, seqs=64,
                 threads=len(os.sched_getaffinity(0)), flash_attn=flash_attn)
    try:
        tok = eng.model.tokenize
        # The first decode builds the graphs. No two prompts share a prefix:
        # the engine would copy a shared prefix rather than compute it, and
        # the rate would count tokens it never computed.
        eng.run(Request("warm", tok(b"Warm up the graphs.", add_bos=False, special=False), 1))
        # Each rate is the best of its trials: the bound is what the machine
        # can do, and one trial can fall on a slow moment of a shared machine.
        prefill = best = 0.0
        for trial in range(RATE_TRIALS):
            text = f"Trial {trial}. " + "The quick brown fox jumps over the lazy dog. " * 60
            before = eng.stats["prefill_tokens"]
            t = time.time()
            eng.run(Request(f"p{trial}", tok(text.encode(), add_bos=False, special=False)[:512], 1))
            prefill = max(prefill, (eng.stats["prefill_tokens"] - before) / (time.time() - t))
            for batch in (1, 8, 16, 32, 64):
                reqs = [Request(f"d{trial}-{batch}-{i}",
                                tok(f"Story {i} of {batch}, take {trial}:".encode(), add_bos=False,
                                    special=False), 48) for i in range(batch)]
                t = time.time()
                for r in reqs:
                    eng.submit(r)
                for r in reqs:
                    r.done.wait()
                gen = sum(len(r.completion) for r in reqs)
                best = max(best, gen / (time.time() - t))
            print(f"       flash attention {'on' if flash_attn else 'off'}, trial {trial + 1} of "
                  f"{RATE_TRIALS}: prefill {prefill:.0f} tok/s, batched decode {best:.0f} tok/s "
                  f"(best so far)", flush=True)
        return prefill, best
    finally:
        eng.close()


# -- kernel overhead ----------------------------------------------------------------------


async def _hammer(call: Any, callers: int, per_caller: int) -> tuple[list[float], float]:
    lat: list[float] = []

    async def one() -> None:
        for _ in range(per_caller):
            t = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(callers)))
    return lat, time.perf_counter() - t0


def _summary(lat: list[float], elapsed: float) -> dict[str, float]:
    return {"p50_ms": round(pct(lat, 50) * 1e3, 3), "p99_ms": round(pct(lat, 99) * 1e3, 3),
            "calls_per_s": round(len(lat) / elapsed, 1)}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}


def bare_zmq(callers: int, per_caller: int) -> dict[str, float]:
    """A DEALER/ROUTER echo in another process: the floor for any IPC call."""
    import zmq
    import zmq.asyncio

    tmp = tempfile.mkdtemp(prefix="aios-zmq-")
    endpoint = f"ipc://{tmp}/echo.sock"
    code = ("import zmq,sys; s=zmq.Context().socket(zmq.ROUTER); s.bind(sys.argv[1]); print('up', flush=True)\n"
            "while True: s.send_multipart(s.recv_multipart())")
    echo = subprocess.Popen([sys.executable, "-c", code, endpoint], stdout=subprocess.PIPE, text=True)
    echo.stdout.readline()

    async def main() -> tuple[list[float], float]:
        ctx = zmq.asyncio.Context.instance()
        socks = []
        for _ in range(callers):
            s = ctx.socket(zmq.DEALER)
            s.connect(endpoint)
            socks.append(s)
        it = iter(socks)
        lat: list[float] = []

        async def one(s: Any) -> None:
            for _ in range(per_caller):
                t = time.perf_counter()
                await s.send_multipart([b"", b"x"])
                await s.recv_multipart()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(next(it)) for _ in range(callers)))
        elapsed = time.perf_counter() - t0
        for s in socks:
            s.close(0)
        return lat, elapsed

    try:
        return _summary(*asyncio.run(main()))
    finally:
        echo.kill()
        echo.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def null_syscall(callers: int = 64, per_caller: int = 50, rounds: int = 3) -> dict[str, Any]:
    """The null system call on aiosd beside the bare pyzmq echo, measured in
    turns (``rounds`` of each, alternating, so that both see the same
    machine); each figure is the median of its rounds."""
    from libaios import aio

    tmp = Path(tempfile.mkdtemp(prefix="aios-null-"))
    env = dict(os.environ, AIOS_RUNTIME_DIR=str(tmp / "run"), AIOS_DATA_DIR=str(tmp / "data"))
    daemon = subprocess.Popen([sys.executable, "-m", "aiosd"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=ROOT)

    async def on_aiosd() -> tuple[list[float], float]:
        async with aio.connect(f"ipc://{tmp}/run/kernel.sock", name="null") as c:
            await c.null()
            return await _hammer(c.null, callers, per_caller)

    aios_runs, bare_runs = [], []
    try:
        wait_ready(env)
        for _ in range(rounds):
            aios_runs.append(_summary(*asyncio.run(on_aiosd())))
            bare_runs.append(bare_zmq(callers, per_caller))
    finally:
        daemon.terminate()
        daemon.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    aios, bare = _median(aios_runs), _median(bare_runs)
    return {"callers": callers, "rounds": rounds, "aiosd": aios, "bare_pyzmq": bare,
            "p50_ratio": round(aios["p50_ms"] / bare["p50_ms"], 2)}


# -- the run ------------------------------------------------------------------------------


def floor_costs(n: int, sh: floor.Shape) -> floor.Costs:
    """What the tokens of ``sh`` cost the kernel aiosd runs, at the
    workload's contexts with ``n`` conversations (at most aiosd's default
    slots) decoded together: see ``benchmarks.floor``."""
    print(f"N={n:<4} measuring the compute floor ...", flush=True)
    return floor.measure(sh, streams=min(n, floor.STREAMS))


def floor_report(n: int, by: dict[str, dict[str, Any]], costs: list[floor.Costs], sh: floor.Shape,
                 bound: float) -> dict[str, Any]:
    """Prints the compute floor of size ``n`` measured before and after its
    runs, and how aiosd, direct and the lower bound stand against it;
    returns the figures."""
    floors = [c.floor(sh) for c in costs]
    report: dict[str, Any] = {"before_s": round(floors[0], 3), "after_s": round(floors[-1], 3),
                              "before": costs[0].report(), "after": costs[-1].report(),
                              "shared_tokens": sh.shared,
                              "turns": [{"start_cells": t.start, "prompt_tokens": sum(t.new),
                                         "decoded_rows": {str(c): k for c, k in sorted(t.rows().items())}}
                                        for t in sh.turns]}
    rows = [c.mean_row(sh) for c in costs]
    line = (f"N={n:<4} compute floor {floors[0]:.2f}s before the runs, {floors[-1]:.2f}s after "
            f"(a decoded row {rows[0] * 1e3:.2f} and {rows[-1] * 1e3:.2f} ms on average over the turns, "
            f"a prompt token of the last turn {costs[0].prompt[-1] * 1e3:.2f} and "
            f"{costs[-1].prompt[-1] * 1e3:.2f} ms)")
    low, high = min(floors), max(floors)
    for system in ("aiosd", "direct"):
        if by.get(system, {}).get("makespan_s") is not None:
            line += f"; {system}/floor {by[system]['makespan_s'] / high:.2f}-{by[system]['makespan_s'] / low:.2f}"
    # the targets at N = 32: are they within what the kernel can do?
    line += f"; floor/bound {low / bound:.2f}-{high / bound:.2f}"
    if n >= floor.STREAMS and by.get("direct", {}).get("makespan_s") is not None:
        need = by["direct"]["makespan_s"] / 10
        line += f"; 10x sooner than direct needs {need:.1f}s, {need / high:.2f}-{need / low:.2f} floors"
    print(line)
    return report


def ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    if a.get("makespan_s") is None or b.get("makespan_s") is None:
        return "n/a"
    return f"{b['makespan_s'] / a['makespan_s']:.2f}x"


def two_cores(sticky: bool, slots: int | None = None) -> dict[str, Any]:
    """Two cores of the embedded model, one thread each (on a CPU each
    where there are two), with affinity on or off."""
    model: dict[str, Any] = {"replicas": 2, "threads": 1}
    if len(os.sched_getaffinity(0)) >= 2:
        model["cpus"] = sorted(os.sched_getaffinity(0))[:2]
    if slots is not None:
        model["slots"] = slots
    return {"llm": {"models": [model]}, "scheduler": {"affinity": sticky}}


def affinity_run(n: int = 16) -> dict[str, Any]:
    """The workload at ``n`` on two cores of one model, with affinity (an
    agent's turns go where its conversation is) and without (each turn to
    the freest core): both makespans, their ratio, and what the cores did;
    with the default slots, then with fewer slots than agents (4 a core),
    where calls queue for a core and the choice to wait or move is made."""
    out: dict[str, Any] = {"n": n}
    for slots in (None, 4):
        by = {}
        what = f"two cores, N={n}, {slots or 'default'} slots"
        for sticky in (True, False):
            label = "on" if sticky else "off"
            print(f"{what}, affinity {label}: running ...", flush=True)
            r = bench_aiosd(n, two_cores(sticky, slots))
            by[label] = r
            prefilled = sum(c.get("prefill_tokens", 0) for c in r["cores"])
            cached = sum(c.get("cached_tokens", 0) for c in r["cores"])
            counts = {k: sum(c["affinity"].get(k, 0) for c in r["cores"])
                      for k in ("hits", "moves", "new")}
            r["prefill_tokens"], r["cached_tokens"], r["affinity_counts"] = prefilled, cached, counts
            print(f"{what}, affinity {label}: makespan {r['makespan_s']:.2f}s, {prefilled} tokens "
                  f"prefilled, {cached} found cached; turns at home {counts['hits']}, moved "
                  f"{counts['moves']}, first {counts['new']}; failures {r['failures']}", flush=True)
        speedup = by["off"]["makespan_s"] / by["on"]["makespan_s"]
        print(f"{what}: affinity on {by['on']['makespan_s']:.2f}s, off "
              f"{by['off']['makespan_s']:.2f}s: affinity {speedup:.2f}x faster (target 1.3x)",
              flush=True)
        out[f"slots_{slots or 'default'}"] = {"on": by["on"], "off": by["off"],
                                              "speedup": round(speedup, 3)}
    return out


FLOOD_CONFIG = {"scheduler": {"policy": "fair", "agents": [
    {"agent": "flood", "tokens_per_s": 150.0, "burst": 1000}]}}


def flood_run() -> None:
    """16 agents alone, then beside one agent that floods the kernel (its
    calls back to back on six connections), both with the quota config."""
    alone = bench_aiosd(16, FLOOD_CONFIG)
    beside = bench_aiosd(16, FLOOD_CONFIG, flooder=True)
    ratio_p95 = beside["p95_call_s"] / alone["p95_call_s"]
    print(f"16 agents alone: call p95 {alone['p95_call_s']:.3f}s; beside a flooding agent: "
          f"{beside['p95_call_s']:.3f}s; ratio {ratio_p95:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    path = RESULTS.with_name("flood.json")
    path.write_text(json.dumps({"alone": alone, "beside_flood": beside,
                                "p95_ratio": round(ratio_p95, 3)}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="agents (repeatable); default 1, 8, 32")
    parser.add_argument("--systems",
                        help="systems to run (default: aiosd,gateway,direct,shared up to N = 32, "
                             "aiosd alone beyond)")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--kv-mb", type=int,
                        help="the embedded model's KV cache in MiB (default: sized to the machine)")
    parser.add_argument("--policy", choices=("fifo", "rr", "fair"),
                        help="aiosd's scheduling policy (default: the config's default, fifo)")
    parser.add_argument("--affinity", action="store_true",
                        help="only the two-core run: N=16 with affinity on and off")
    parser.add_argument("--skip-affinity", action="store_true",
                        help="leave out the two-core affinity run")
    parser.add_argument("--flood", action="store_true",
                        help="only the flooding-agent run: 16 agents with and without a flooder")
    args = parser.parse_args()
    if args.flood:
        flood_run()
        return
    if args.affinity:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.with_name("affinity.json").write_text(json.dumps(affinity_run(), indent=2))
        return
    sizes = args.n or [1, 8, 32, 250]
    print("measuring this machine's prefill and decode rates ...", flush=True)
    measured = rates()
    off, on = measured["flash_off"], measured["flash_on"]
    print(f"rates on this machine: prefill {measured['prefill_tok_per_s']} tok/s, "
          f"best batched decode {measured['decode_tok_per_s']} tok/s "
          f"(flash attention off: {off['prefill_tok_per_s']} and {off['decode_tok_per_s']}; "
          f"on: {on['prefill_tok_per_s']} and {on['decode_tok_per_s']})")
    runs: list[dict[str, Any]] = []
    bounds: dict[str, float] = {}
    floors: dict[str, dict[str, Any]] = {}
    per_agent_mb = None
    for n in sizes:
        by: dict[str, dict[str, Any]] = {}
        # The compute floor is measured before and after the size's runs:
        # the machine's speed moves, and the systems move with it.
        sh = floor.shape(n)
        costs = [floor_costs(n, sh)]
        systems = (args.systems.split(",") if args.systems
                   else ["aiosd", "gateway", "direct", "shared"] if n <= 32 else ["aiosd"])
        for system in systems:
            print(f"N={n:<4} {system:<7} running ...", flush=True)
            if system == "aiosd":
                config: dict[str, Any] = {}
                if args.policy:
                    config["scheduler"] = {"policy": args.policy}
                if args.kv_mb:
                    config["llm"] = {"models": [{"kv_mb": args.kv_mb}]}
                by[system] = bench_aiosd(n, config or None)
            elif system == "gateway":
                by[system] = bench_aiosd(n, gateway=True)
            elif system == "direct":
                by[system] = bench_direct(n, per_agent_mb)
                if by[system].get("peak_rss_mb") and n:
                    per_agent_mb = by[system]["peak_rss_mb"] / n
            else:
                by[system] = bench_shared(n)
            runs.append(by[system])
            r = by[system]
            if "skipped" in r:
                print(f"N={n:<4} {system:<7} {r['skipped']}")
            else:
                print(f"N={n:<4} {system:<7} makespan {r['makespan_s']:8.2f}s  {r['gen_tok_per_s']:7.1f} tok/s  "
                      f"call p50 {r['p50_call_s']:.3f}s p95 {r['p95_call_s']:.3f}s  "
                      f"turnaround p95 {r['p95_turnaround_s']:.2f}s  peak {r['peak_rss_mb']:.0f} MB  "
                      f"failures {r['failures']}")
                if r.get("peak_rss_kernel_mb"):
                    print(f"       aiosd's own processes: peak {r['peak_rss_kernel_mb']:.0f} MB "
                          f"(the rest of the peak is the agents')")
                if r.get("agent_p95_median_s"):
                    print(f"       {system} agents' own call p95: median agent "
                          f"{r['agent_p95_median_s']:.3f}s, worst {r['agent_p95_worst_s']:.3f}s "
                          f"({r['agent_p95_worst_s'] / r['agent_p95_median_s']:.2f}x)")
            if "skipped" not in r:
                extra = (f"; the gateway process used {r['gateway_cpu_s']:.1f} CPU-s"
                         if "gateway_cpu_s" in r else "")
                print(f"       {system} agents: {r['agent_ready_s']:.2f}s on average from start to "
                      f"their first call (interpreter, imports, client){extra}")
            if r.get("core"):
                c = r["core"]
                print(f"       aiosd core: decoding {c.get('decode_s', 0):.1f}s of {r['makespan_s']:.1f}s; "
                      f"{c.get('prefill_tokens')} tokens prefilled, {c.get('decode_tokens')} decoded, "
                      f"{c.get('cached_tokens')} found cached ({c.get('shared_tokens')} shared); "
                      f"{c.get('steps')} steps in {c.get('passes')} passes; "
                      f"{c.get('moved_seqs')} streams moved, {c.get('evicted_seqs')} evicted; "
                      f"admitting {c.get('admit_s', 0):.1f}s with {c.get('settles')} settling decodes")
        costs.append(floor_costs(n, sh))
        gen = by.get("aiosd", next(iter(by.values()))).get("generated", n * workload.TURNS * workload.MAX_TOKENS)
        distinct = sh.distinct
        bound = distinct / measured["prefill_tok_per_s"] + gen / measured["decode_tok_per_s"]
        bounds[str(n)] = round(bound, 3)
        line = f"N={n:<4} lower bound {bound:.2f}s ({distinct} distinct prompt tokens, {gen} generated)"
        if by.get("aiosd", {}).get("makespan_s") is not None:
            line += f"; aiosd/bound {by['aiosd']['makespan_s'] / bound:.2f}"
            line += f"; direct/aiosd {ratio(by['aiosd'], by.get('direct', {}))}"
            line += f"; shared/aiosd {ratio(by['aiosd'], by.get('shared', {}))}"
            line += f"; gateway/aiosd {ratio(by['aiosd'], by.get('gateway', {}))}"
        print(line)
        floors[str(n)] = floor_report(n, by, costs, sh, bound)
    result: dict[str, Any] = {"runs": runs, "lower_bound_s": bounds, "floor": floors, "rates": measured,
                              "machine": {"cpus": os.cpu_count(),
                                          "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}}
    if not args.skip_affinity:
        result["affinity"] = affinity_run()
    if not args.skip_overhead:
        overhead = null_syscall()
        result["null_syscall"] = overhead
        a, b = overhead["aiosd"], overhead["bare_pyzmq"]
        print(f"null system call, {overhead['callers']} callers: aiosd p50 {a['p50_ms']} ms p99 {a['p99_ms']} ms "
              f"{a['calls_per_s']} calls/s; bare pyzmq p50 {b['p50_ms']} ms p99 {b['p99_ms']} ms "
              f"{b['calls_per_s']} calls/s; ratio p50 {overhead['p50_ratio']}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"results: {RESULTS.relative_to(ROOT)}")
    try:
        picture = plot.draw(RESULTS)
    except ImportError as exc:  # the figures are written: only the picture is missing
        print(f"no plot: {exc} (make install brings matplotlib)", file=sys.stderr)
    else:
        print(f"plot: {picture.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
