"""``aiosctl``: the operator's command line.

Thin click commands, one per operation: each makes system calls through
libaios and renders the answer (``--json`` for machines). Exit codes:
0 success, 1 failure, 2 usage, 3 aiosd is not running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

import libaios
from libaios import errors, paths
from libaios.protocol import MsgType

from . import shipped
from .gpus import SOURCES as GPU_SOURCES

EXIT_FAIL = 1
EXIT_NOT_RUNNING = 3

# Tables keep their columns when the output is a file or a pipe (make run, CI).
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True,
              width=None if sys.stderr.isatty() else 140)


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    err.print(f"aiosctl: {message}", markup=False)
    sys.exit(code)


@contextmanager
def kernel(timeout: float = 10.0) -> Iterator[libaios.Client]:
    """A client to the running kernel; exit 3 when there is none."""
    client = libaios.Client(name="aiosctl", operator=True, timeout=timeout)
    try:
        client.connect()
        yield client
    except errors.NotRunning as exc:
        fail(exc.message, EXIT_NOT_RUNNING)
    except errors.Timeout as exc:
        if not client.identity:
            fail(f"aiosd does not answer on {client.endpoint}: {exc.message}", EXIT_NOT_RUNNING)
        fail(exc.message)
    except errors.AIOSError as exc:
        fail(f"{exc.code.name}: {exc.message}")
    finally:
        client.close()


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aios", prog_name="aiosctl")
def main() -> None:
    """Control a running aiosd (the AIOS kernel).

    The daemon is found through AIOS_RUNTIME_DIR (default
    $XDG_RUNTIME_DIR/aios).
    """


# -- lifecycle -------------------------------------------------------------------


def _status_or_none(timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with libaios.Client(name="aiosctl", operator=True, timeout=timeout) as client:
            return client.call(MsgType.ADMIN_STATUS)
    except (errors.NotRunning, errors.Timeout, errors.Unauthenticated):
        return None


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML configuration file for aiosd.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for readiness.")
def start(config_path: str | None, timeout: float) -> None:
    """Start aiosd in the background and return once it is ready."""
    status = _status_or_none()
    if status is not None:
        out.print(f"aiosd is already running (pid {status['supervisor_pid']}) on {status['runtime_dir']}")
        return
    from .rundir import prepare_dir

    runtime = paths.runtime_dir()
    prepare_dir(runtime)
    log_path = runtime / paths.LOG_FILE
    argv = [sys.executable, "-m", "aiosd"] + (["--config", config_path] if config_path else [])
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        code = proc.poll()
        if code is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            fail(f"aiosd exited with code {code} while starting; {log_path} says:\n" + "\n".join(tail))
        status = _status_or_none(1.0)
        if status is not None and status.get("ready"):
            failed = [c["name"] for c in status["cores"] + status["services"]
                      if c["state"] == "failed"]
            if failed:
                fail(f"aiosd started (pid {proc.pid}) but {', '.join(failed)} failed; "
                     f"see {log_path}")
            out.print(f"aiosd started (pid {proc.pid}) on {runtime}; log: {log_path}")
            return
        time.sleep(0.2)
    fail(f"aiosd did not become ready within {timeout:g}s; see {log_path}")


@main.command()
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for it to exit.")
def stop(timeout: float) -> None:
    """Stop aiosd cleanly and wait until it has exited."""
    with kernel() as client:
        status = client.call(MsgType.ADMIN_STATUS)
        client.call(MsgType.ADMIN_SHUTDOWN)
    pid = status.get("supervisor_pid") or status["pid"]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            out.print(f"aiosd (pid {pid}) stopped")
            return
        time.sleep(0.1)
    fail(f"aiosd (pid {pid}) still runs after {timeout:g}s")


# -- inspection -------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Show the kernel: processes, LLM cores, queues."""
    with kernel() as client:
        data = client.call(MsgType.ADMIN_STATUS)
    if as_json:
        emit_json(data)
        return
    state = ("ready" if data["healthy"] else "degraded") if data["ready"] else "starting"
    if data.get("stopping"):
        state = "stopping"
    out.print(
        f"aiosd {data['version']} [bold]{state}[/] (pid {data['supervisor_pid']}), "
        f"up {data['uptime_s']:.0f}s, policy {data['policy']}, runtime {data['runtime_dir']}"
    )
    table = Table("process", "kind", "state", "pid", "restarts", "last exit")
    for proc in data["procs"]:
        colour = {"running": "green", "fatal": "red", "backoff": "yellow"}.get(proc["state"], "")
        table.add_row(proc["name"], proc["kind"], f"[{colour}]{proc['state']}[/]" if colour else proc["state"],
                      str(proc["pid"] or "-"), str(proc["restarts"]), proc["exit"] or "-")
    out.print(table)
    out.print(models_table(data["models"]))
    cores = Table("core", "model", "backend", "state", "slots", "running", "served")
    for core in data["cores"]:
        cores.add_row(core["name"], core["model"], core["backend"], core["state"],
                      str(core.get("capacity", "-")), str(core.get("running", "-")),
                      str(core.get("served", "-")))
    out.print(cores)
    for core in data["cores"]:
        decode = core.get("decode") or {}
        if decode.get("slow_since") is not None:
            since = time.strftime("%H:%M:%S", time.localtime(decode["slow_since"]))
            out.print(f"[yellow]warning[/]: core {core['name']} is slow since {since}: it decodes "
                      f"{decode['rate']} tokens/s, its recent median is {decode['median']}")
    for core in data["cores"]:
        line = memory_line(core.get("info") or {})
        if line:
            out.print(f"core {core['name']} memory: {line}")
    gpus_section(data)
    queues = ", ".join(f"{k}: {v}" for k, v in data["queues"].items())
    out.print(f"queued: {queues}; running: {data['running']}; live agents: {data['agents']}")
    services = Table("service", "kind", "state", "pid", "running", "served")
    for svc in data["services"]:
        services.add_row(svc["name"], svc["kind"], svc["state"], str(svc.get("pid", "-")),
                         str(svc.get("running", "-")), str(svc.get("served", "-")))
    out.print(services)
    gateway = data.get("gateway") or {}
    if gateway.get("enabled"):
        where = gateway.get("url") or gateway.get("listen")
        out.print(f"gateway ({gateway['state']}): OpenAI API at {where}/v1, MCP at {where}/mcp")
    conf = data.get("confinement") or {}
    if conf:
        out.print(f"launched agents run as {conf['agents_run_as']}; files: {conf['files']}; "
                  f"signals: {conf['signals']}")
    failed = [c["name"] for c in data["cores"] + data["services"] if c["state"] == "failed"]
    if failed:
        fail(f"failed: {', '.join(failed)} (restart budget spent; see the log)")


def gpus_section(data: dict[str, Any]) -> None:
    """The GPUs the daemon found, with the cores given each, and the GPU
    settings of each core given devices (a line each, not more columns in
    the cores table)."""
    found = data.get("gpus") or []
    if found:
        table = Table("gpu", "name", "memory", "cores", title="GPUs")
        for gpu in found:
            memory = f"{gpu['memory_mb']} MiB" if gpu.get("memory_mb") else "-"
            table.add_row(str(gpu["index"]), gpu["name"], memory, ", ".join(gpu["cores"]) or "-")
        out.print(table)
    else:
        out.print(f"GPUs: none found ({', '.join(GPU_SOURCES)})")
    for core in data["cores"]:
        if core.get("devices"):
            out.print(f"core {core['name']}: {core_gpu_settings(core)}", markup=False)


def core_gpu_settings(core: dict[str, Any]) -> str:
    """A core's GPUs and offload settings, as configured (with the layers
    llama.cpp was given, once the core says)."""
    layers = core.get("n_gpu_layers")
    resolved = (core.get("info") or {}).get("n_gpu_layers")
    text = "auto" if layers is None else str(layers)
    if layers is None and resolved is not None:
        text += f" ({resolved})"
    parts = [f"devices {', '.join(map(str, core['devices']))}", f"n_gpu_layers {text}",
             f"main_gpu {core.get('main_gpu', 0)}"]
    if core.get("tensor_split"):
        parts.append(f"tensor_split {', '.join(map(str, core['tensor_split']))}")
    return "; ".join(parts)


def memory_line(info: dict[str, Any]) -> str:
    """A local core's memory: its KV cache, RAM and disk tiers and slots,
    which it sized itself ("auto") and from what memory."""
    if "kv_mb" not in info:
        return ""
    auto = set(info.get("auto") or [])

    def size(key: str, unit: str = " MiB") -> str:
        return f"{key} {info[key]}{unit}" + (" (auto)" if key in auto else "")

    text = ", ".join([size("kv_mb"), size("evicted_mb"), f"disk_mb {info['disk_mb']} MiB",
                      size("slots", "")])
    if auto:
        text += (f"; from the {info['usable_mb']} MiB the process may use, this core's share "
                 f"{info['share_mb']} MiB")
    return text


def models_table(models: list[dict[str, Any]]) -> Table:
    table = Table("model", "backend", "path or URL", "context", "cores", "slots", "state",
                  title="models")
    for m in models:
        name = f"{m['name']} (default)" if m["default"] else m["name"]
        source = m["source"] + (f" ({m['remote_name']})" if m.get("remote_name") else "")
        table.add_row(name, m["backend"], source, str(m["n_ctx"] or "-"), ", ".join(m["cores"]),
                      str(m["slots"] or "-"), m["state"])
    return table


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the models calls can name, with their cores and state."""
    with kernel() as client:
        data = client.call(MsgType.ADMIN_STATUS)
    if as_json:
        emit_json(data["models"])
        return
    out.print(models_table(data["models"]))


# -- logs and events ----------------------------------------------------------------


def log_file(given: str | None) -> str:
    """The log to read: ``given``; else where the running daemon logs (its
    status says); else, with none running, the file ``aiosctl start`` wrote."""
    if given:
        return given
    status = _status_or_none()
    if status is not None:
        where = status.get("log") or {}
        if where.get("journal"):
            fail("aiosd logs to the journal: read it with `journalctl -u aiosd` (fields "
                 "AIOS_PROCESS, AIOS_AGENT, AIOS_CALL_ID, such as `journalctl AIOS_AGENT=ID`)")
        if where.get("file"):
            return str(where["file"])
        fail("aiosd's log goes to no file (to the terminal it runs in, or a pipe); give one "
             "with --file")
    path = paths.runtime_dir() / paths.LOG_FILE
    if not path.exists():
        fail(f"aiosd is not running, and there is no log at {path}", EXIT_NOT_RUNNING)
    return str(path)


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until interrupted.")
@click.option("--process", help="Only this process's records: a role (scheduler, memory, "
              "gateway, aiosd for the supervisor), llm for every core, or a core's name.")
@click.option("--agent", help="Only records about this agent: an id (calls-3), or a name "
              "(calls: every run of it).")
@click.option("--lines", "-n", "count", type=click.IntRange(min=0),
              help="Only the last N lines shown (default: all; with --follow, 10).")
@click.option("--file", "path", type=click.Path(dir_okay=False),
              help="The log file (default: where the running aiosd logs, else the one "
                   "`aiosctl start` wrote in the runtime directory).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object a line (text records parsed into fields).")
def logs(follow: bool, process: str | None, agent: str | None, count: int | None,
         path: str | None, as_json: bool) -> None:
    """Show aiosd's log (text or JSON lines alike), filtered by process and agent."""
    from collections import deque

    from . import logview

    source = log_file(path)
    keep = logview.LogFilter(process, agent)

    def show(shown: logview.Shown) -> None:
        click.echo(json.dumps(shown.fields, ensure_ascii=False) if as_json else shown.line)

    try:
        log = logview.LogFile(source)
        if count is None and follow:
            count = 10
        if count is not None:
            # what the file holds now: its last lines shown, then (following) every new one
            last: deque[logview.Shown] = deque(maxlen=count)
            for line in log.read(partial=not follow):
                if (shown := keep.feed(line)) is not None:
                    last.append(shown)
            for shown in last:
                show(shown)
            if not follow:
                return
        for line in log.read(follow=follow):
            if (shown := keep.feed(line)) is not None:
                show(shown)
    except OSError as exc:
        fail(f"cannot read the log {source}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Print events until interrupted.")
@click.option("--wait", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Without --follow: print the events of this many seconds, then exit.")
@click.option("--topic", "topics", multiple=True,
              help="Only events whose topic starts so (agent., core., proc.); may be repeated.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object an event: topic, ts, body.")
def events(follow: bool, wait: float, topics: tuple[str, ...], as_json: bool) -> None:
    """Print the kernel's events as they happen: agents starting and ending,
    processes restarting, access denied, approvals, evictions, slow cores
    (topics and bodies: docs/operations.md). The kernel keeps no past
    events: what happens from now on is printed, for --wait seconds, or with
    --follow until interrupted."""
    from libaios import events as bus

    try:
        sub = bus.subscribe(topics or ("",))
    except (errors.NotRunning, errors.Timeout) as exc:
        fail(exc.message, EXIT_NOT_RUNNING)
    end = None if follow else time.monotonic() + wait
    err.print("aiosctl: " + ("following events (Ctrl-C to stop)" if follow
                             else f"events for {wait:g}s"), markup=False)
    try:
        with sub:
            while end is None or (left := end - time.monotonic()) > 0:
                event = sub.next(None if end is None else left)
                if event is None:
                    continue
                if as_json:
                    click.echo(json.dumps({"topic": event.topic, "ts": event.ts,
                                           "body": event.body}, default=str))
                else:
                    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
                    detail = " ".join(f"{k}={v}" for k, v in event.body.items())
                    click.echo(f"{stamp} {event.topic} {detail}".rstrip())
    except errors.AIOSError as exc:
        fail(f"{exc.code.name}: {exc.message}")
    except KeyboardInterrupt:
        pass


# -- API keys ---------------------------------------------------------------------


@main.group()
def keys() -> None:
    """API keys of the gateway: a key's caller is the agent it names."""


@keys.command("create")
@click.argument("name")
@click.option("--group", "groups", multiple=True,
              help="A group (access.groups) the key's agent joins; may be repeated.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_create(name: str, groups: tuple[str, ...], as_json: bool) -> None:
    """Make a key for agent NAME and print it (this once: only its hash is kept)."""
    with kernel() as client:
        made = client.call(MsgType.ADMIN_KEYS, {"op": "create", "name": name,
                                                 "groups": list(groups)})
    if as_json:
        emit_json(made)
        return
    out.print(made["key"], markup=False)
    err.print(f"a key for agent {name}" + (f" (groups: {', '.join(groups)})" if groups else "")
              + "; it is shown only now", markup=False)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(as_json: bool) -> None:
    """The keys: whose, their groups, when made (never the keys themselves)."""
    with kernel() as client:
        rows = client.call(MsgType.ADMIN_KEYS, {"op": "list"})["keys"]
    if as_json:
        emit_json(rows)
        return
    table = Table("agent", "key", "groups", "created")
    for row in rows:
        table.add_row(row["name"], row["shown"] + "…", ", ".join(row["groups"]) or "-",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"])))
    out.print(table)


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke every key of agent NAME (its callers are refused from now on)."""
    with kernel() as client:
        done = client.call(MsgType.ADMIN_KEYS, {"op": "revoke", "name": name})
    out.print(f"revoked {done['revoked']} key(s) of {name}")


def agents_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table("agent", "pid", "state", "calls", "prompt tok", "compl tok",
                  "queue wait", "running", "preempted", "throttled", "turnaround", title=title)
    for row in rows:
        state = row["exit"] if row["state"] in ("exited", "killed") else row["state"]
        table.add_row(
            row["id"], str(row["pid"] or "-"), state, str(row["calls"]),
            str(row["prompt_tokens"]), str(row["completion_tokens"]),
            seconds(row["wait_s"]), seconds(row["service_s"]), str(row.get("preemptions", 0)),
            str(row.get("throttled", 0)), seconds(row["turnaround_s"]),
        )
    return table


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Include agents that have ended.")
@click.option("--limit", default=200, show_default=True, help="Show at most this many agents.")
def ps(as_json: bool, show_all: bool, limit: int) -> None:
    """List agents with what each has used of the kernel."""
    with kernel() as client:
        page = client.call(MsgType.ADMIN_PS, {"live": not show_all, "limit": limit})
    rows = page["agents"]
    if as_json:
        emit_json(rows)
        return
    out.print(agents_table(rows))
    if page["total"] > len(rows):
        counts = ", ".join(f"{n} {state}" for state, n in sorted(page["counts"].items()))
        out.print(f"{len(rows)} of {page['total']} shown (all agents: {counts}); "
                  "more with --limit")


# -- agents -------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", help="The task handed to the agent (as --task TEXT).")
@click.option("--name", help="The agent's name (default: the file's name).")
@click.option("--detach", is_flag=True, help="Return at once with the agent's id.")
@click.option("--json", "as_json", is_flag=True, help="With --detach: print JSON.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(path: str, task: str | None, name: str | None, detach: bool, as_json: bool,
        args: tuple[str, ...]) -> None:
    """Launch the agent at PATH through the kernel; show its output and exit
    with its exit code. Arguments after PATH go to the agent."""
    argv = list(args) + (["--task", task] if task is not None else [])
    body = {"path": str(Path(path).resolve()), "args": argv, "cwd": os.getcwd(),
            "wait": not detach, "name": name}
    with kernel() as client:
        if detach:
            info = client.call(MsgType.AGENT_RUN, body)
            if as_json:
                emit_json(info)
            else:
                out.print(f"launched {info['agent']} (pid {info['pid']})")
            return
        stream = client.stream(MsgType.AGENT_RUN, body, timeout=10 * 365 * 86400.0)
        agent_id = None
        try:
            for part in stream:
                if part.get("event") == "started":
                    agent_id = part["agent"]
                elif "data" in part:
                    target = sys.stderr if part["stream"] == "stderr" else sys.stdout
                    target.write(part["data"])
                    target.flush()
        except KeyboardInterrupt:
            if agent_id:
                with kernel() as killer:
                    killer.call(MsgType.ADMIN_KILL, {"agent": agent_id})
            sys.exit(130)
        result = stream.result or {}
    code = result.get("exit_code")
    if code is None:
        sys.exit(EXIT_FAIL)
    sys.exit(128 - code if code < 0 else code)


@main.command()
@click.argument("agent")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def kill(agent: str, as_json: bool) -> None:
    """Kill AGENT (an id, a name or a pid from `aiosctl ps`)."""
    with kernel() as client:
        info = client.call(MsgType.ADMIN_KILL, {"agent": agent})
    if as_json:
        emit_json(info)
    else:
        out.print(f"killed {info['agent']} (pid {info['pid']})")


# -- top ---------------------------------------------------------------------------------


def top_view(status: dict[str, Any], agents: list[dict[str, Any]]) -> Any:
    from rich.console import Group

    cores = Table("core", "state", "slots", "running", "served", "hits/moves",
                  "found in KV/RAM/disk/none", "KV seqs", "evicted kept", "cached tok", "shared tok", "prefilled tok",
                  "decoded tok", title="LLM cores")
    for core in status["cores"]:
        # a local core's KV cache, as of its last heartbeat
        kv = core.get("stats") or {}
        seqs = f"{kv['retained_seqs']}/{kv['seqs']}" if "seqs" in kv else "-"
        # conversations evicted from the KV cache whose cells wait in RAM
        kept = (f"{kv['evicted_kept']} ({kv['evicted_kept_mb']} MiB)"
                + (f" + {kv['disk_kept']} on disk" if kv.get("disk_kept") else "")
                if "evicted_kept" in kv else "-")
        # an agent's calls that ran where its conversation was, and those that moved here
        sticky = core.get("affinity") or {}
        cores.add_row(core["name"], core["state"], str(core.get("capacity", "-")),
                      str(core.get("running", "-")), str(core.get("served", "-")),
                      f"{sticky.get('hits', 0)}/{sticky.get('moves', 0)}",
                      "/".join(str(kv.get(k, "-")) for k in ("kv_hits", "ram_hits", "disk_hits",
                                                             "misses")),
                      seqs, kept,
                      *(str(kv.get(k, "-")) for k in ("cached_tokens", "shared_tokens",
                                                       "prefill_tokens", "decode_tokens")))
    queues = ", ".join(f"{k} {v}" for k, v in status["queues"].items())
    summary = (f"queued: {queues} | running {status['running']} | approvals {status['approvals']} "
               f"| preemptions {status['preemptions']} | policy {status['policy']}")
    calls = Table("call", "agent", "type", "state", "worker", "tokens", "preempted", "wait",
                  "service", title="calls")
    for c in status.get("calls", []):
        calls.add_row(c["call"], c["agent"], c["type"], c["state"], str(c["worker"] or "-"),
                      str(c["tokens"]), str(c["preemptions"]), seconds(c["wait_s"]),
                      seconds(c["service_s"]))
    live = [a for a in agents if a["state"] in ("running", "connected")]
    return Group(cores, summary, calls, agents_table(live, title="agents"))


@main.command()
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one view and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one view as JSON and exit.")
def top(interval: float, once: bool, as_json: bool) -> None:
    """A live view of cores, queues, running and suspended calls, and agents."""
    from rich.live import Live

    with kernel() as client:
        def snapshot() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            return (client.call(MsgType.ADMIN_STATUS, {"calls": True}),
                    client.call(MsgType.ADMIN_PS, {"live": True})["agents"])

        if as_json:
            status, agents = snapshot()
            emit_json({"status": status, "agents": agents})
            return
        if once:
            out.print(top_view(*snapshot()))
            return
        try:
            with Live(top_view(*snapshot()), console=out, refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(top_view(*snapshot()))
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the kernel's figures as JSON.")
def metrics(as_json: bool) -> None:
    """Print the kernel's metrics in Prometheus' text format (what the
    gateway serves at /metrics; see docs/metrics.md)."""
    from .metrics import exposition

    with kernel() as client:
        figures = client.call(MsgType.ADMIN_METRICS)
    if as_json:
        emit_json(figures)
        return
    click.echo(exposition(figures).decode(), nl=False)


# -- access ------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def approvals(as_json: bool) -> None:
    """List destructive operations waiting for a decision."""
    with kernel() as client:
        rows = client.call(MsgType.ADMIN_APPROVALS)["approvals"]
    if as_json:
        emit_json(rows)
        return
    table = Table("id", "agent", "operation", "acts on", "expires in")
    for row in rows:
        # what its worker found the call would act on (the key and its
        # versions, the memory item and its text); else its arguments
        shown = row.get("values") or row["arguments"]
        table.add_row(row["id"], f"{row['agent']} ({row.get('name')})", row["op"],
                      ", ".join(f"{k}={v}" for k, v in shown.items()),
                      seconds(row["expires_in_s"]))
    out.print(table if rows else "no pending approvals")


def _decide(mtype: MsgType, approval_id: str, as_json: bool) -> None:
    with kernel() as client:
        info = client.call(mtype, {"id": approval_id})
    if as_json:
        emit_json(info)
    else:
        out.print(f"{info['id']}: {'approved' if info['approved'] else 'denied'}")


@main.command()
@click.argument("approval_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def approve(approval_id: str, as_json: bool) -> None:
    """Let the pending operation APPROVAL_ID run."""
    _decide(MsgType.ADMIN_APPROVE, approval_id, as_json)


@main.command()
@click.argument("approval_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def deny(approval_id: str, as_json: bool) -> None:
    """Refuse the pending operation APPROVAL_ID."""
    _decide(MsgType.ADMIN_DENY, approval_id, as_json)


@main.command()
@click.option("--agent", help="Only records about this agent id.")
@click.option("--limit", default=50, show_default=True, help="How many records.")
@click.option("--after", default=0, help="Only records after this sequence number.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def audit(agent: str | None, limit: int, after: int, as_json: bool) -> None:
    """Show the audit log of access decisions."""
    body: dict[str, Any] = {"limit": limit, "after": after}
    if agent:
        body["agent"] = agent
    with kernel() as client:
        records = client.call(MsgType.ADMIN_AUDIT, body)["records"]
    if as_json:
        emit_json(records)
        return
    table = Table("seq", "time", "event", "agent", "detail")
    for rec in records:
        detail = {k: v for k, v in rec.items() if k not in ("seq", "time", "event", "agent")}
        table.add_row(str(rec.get("seq")), time.strftime("%H:%M:%S", time.localtime(rec["time"])),
                      rec["event"], str(rec.get("agent", "-")),
                      ", ".join(f"{k}={v}" for k, v in detail.items()))
    out.print(table)


@main.group()
def mem() -> None:
    """The memory manager."""


@mem.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def mem_stats(as_json: bool) -> None:
    """Memory usage: raw bytes against stored (prefix-compressed) bytes,
    the budget, evictions and faults."""
    with kernel() as client:
        data = client.call(MsgType.MEMORY_STATS, {"agent": "*"})
    if as_json:
        emit_json(data)
        return
    table = Table("figure", "value")
    for key, value in data.items():
        if not isinstance(value, (dict, list)):
            table.add_row(key, str(value))
    out.print(table)


# -- the demo ------------------------------------------------------------------------

#: (script, its arguments): the paper's agent kinds and the simpler examples
DEMO_TASKS = [
    ("react.py", ["--task", "A box holds 12 eggs. How many eggs are in 7 boxes?"]),
    ("coder.py", ["--task", "Write a Python function add(a, b) that returns a + b.",
                  "--tests", "assert add(2, 3) == 5"]),
    ("chat.py", ["--task", "Plan a weekend trip to the mountains."]),
    ("summarize.py", ["--task", "Why do leaves change colour in autumn?"]),
    ("planner.py", ["--task", "Organise a small birthday party."]),
    ("researcher.py", ["--task", "How many legs do 12 spiders have?"]),
    ("reflexion.py", ["--task", "Write a Python function is_even(n) that returns True when n "
                                "is even.", "--tests", "assert is_even(4)\nassert not is_even(3)"]),
    ("summarize.py", ["--task", "What makes a good night's sleep?"]),
]


def default_agents_dir() -> Path:
    """The example agents shipped with AIOS (in the wheel or the source tree)."""
    try:
        return shipped.agents_dir()
    except FileNotFoundError as exc:
        fail(str(exc))


@main.command()
@click.option("--agents", "count", default=8, show_default=True, help="How many agents to launch.")
@click.option("--agents-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=default_agents_dir, help="Where the example agents live.")
@click.option("--json", "as_json", is_flag=True, help="Print the final per-agent figures as JSON.")
def demo(count: int, agents_dir: Path, as_json: bool) -> None:
    """Launch the example agents at once, show live progress, then a table
    per agent."""
    from rich.live import Live

    with kernel() as client:
        ids = []
        start = time.time()
        for i in range(count):
            script, args = DEMO_TASKS[i % len(DEMO_TASKS)]
            body = {"path": str((agents_dir / script).resolve()), "args": args,
                    "cwd": os.getcwd(), "wait": False}
            ids.append(client.call(MsgType.AGENT_RUN, body)["agent"])

        def rows() -> list[dict[str, Any]]:
            return client.call(MsgType.ADMIN_PS, {"ids": ids})["agents"]

        with Live(console=err, refresh_per_second=4, transient=True) as live:
            while True:
                current = rows()
                done = sum(1 for r in current if r["state"] in ("exited", "killed"))
                live.update(agents_table(current, title=f"{done}/{len(ids)} agents done, "
                                                        f"{time.time() - start:.1f}s"))
                if done == len(ids):
                    break
                time.sleep(0.25)
        final = rows()
    makespan = time.time() - start
    if as_json:
        emit_json({"makespan_s": makespan, "agents": final})
    else:
        out.print(agents_table(final, title=f"{len(final)} agents in {makespan:.1f}s"))
        total_p = sum(r["prompt_tokens"] for r in final)
        total_c = sum(r["completion_tokens"] for r in final)
        out.print(f"calls: {sum(r['calls'] for r in final)}, prompt tokens: {total_p}, "
                  f"completion tokens: {total_c}")
    bad = [r["id"] for r in final if r["exit_code"] != 0 or r["failed"]]
    if bad:
        fail(f"agents failed: {', '.join(bad)}")


if __name__ == "__main__":
    main()
