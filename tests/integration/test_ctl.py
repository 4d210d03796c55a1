"""aiosctl against a real daemon: exit codes, --json, the agent lifecycle."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libaios import errors
from libaios.protocol import MsgType

from ..conftest import AGENTS, REPO, TEST_AGENTS, Daemon, base_env, in_thread, run_ctl

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "args",
    [["status"], ["status", "--json"], ["ps"], ["stop"], ["kill", "x"],
     ["run", str(TEST_AGENTS / "exit_code.py")], ["approvals"], ["approve", "x"],
     ["deny", "x"], ["audit"], ["mem", "stats"], ["top", "--once"]],
)
def test_exit_3_with_a_clear_message_when_no_daemon_runs(short_tmp: Path, args: list[str]) -> None:
    result = run_ctl(base_env(short_tmp), *args)
    assert result.returncode == 3, result
    assert "aiosd is not running" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(daemon: Daemon) -> None:
    assert daemon.ctl("status", "--bogus").returncode == 2
    assert daemon.ctl("run", "/no/such/agent.py").returncode == 2


def test_status_and_ps_json(daemon: Daemon) -> None:
    result = daemon.ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["ready"] is True
    assert [c["name"] for c in status["cores"]] == ["smollm2-135m"]
    assert {p["name"] for p in status["procs"]} == {"scheduler", "smollm2-135m", "storage", "memory", "tools",
                                                   "gateway"}
    assert status["gateway"]["url"].startswith("http://127.0.0.1:")
    assert status["healthy"] is True
    assert status["cores"][0]["info"]["path"].endswith(".gguf")
    assert status["cores"][0]["model"] == status["default_model"] == "smollm2-135m"
    [model] = status["models"]
    assert (model["name"], model["backend"], model["source"], model["n_ctx"], model["cores"],
            model["state"], model["default"]) == ("smollm2-135m", "llamacpp", "embedded", 2048,
                                                  ["smollm2-135m"], "ready", True)
    assert model["slots"] == status["cores"][0]["capacity"]
    listed = daemon.ctl("models", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["name"] == "smollm2-135m"
    human = daemon.ctl("models")
    assert human.returncode == 0 and "smollm2-135m (default)" in human.stdout
    human = daemon.ctl("status")
    assert human.returncode == 0 and "smollm2-135m" in human.stdout
    assert f"OpenAI API at {status['gateway']['url']}/v1" in human.stdout
    result = daemon.ctl("ps", "--json", "--all")
    assert result.returncode == 0
    assert isinstance(json.loads(result.stdout), list)


def test_run_shows_output_and_exits_with_the_agents_code(daemon: Daemon) -> None:
    result = daemon.ctl("run", str(TEST_AGENTS / "exit_code.py"), "--task", "7")
    assert result.returncode == 7
    assert "to stdout" in result.stdout
    assert "to stderr" in result.stderr


def test_run_an_example_agent(daemon: Daemon) -> None:
    result = daemon.ctl("run", str(AGENTS / "summarize.py"), "--task", "Why is ice slippery?",
                        timeout=300)
    assert result.returncode == 0, result.stderr
    assert "notes:" in result.stdout and "answer:" in result.stdout


def test_kill_a_running_agent(daemon: Daemon) -> None:
    result = daemon.ctl("run", "--detach", "--json", str(TEST_AGENTS / "long_call.py"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    ps = json.loads(daemon.ctl("ps", "--json").stdout)
    assert info["agent"] in {row["id"] for row in ps}
    killed = daemon.ctl("kill", info["agent"])
    assert killed.returncode == 0, killed.stderr
    daemon.wait_for(
        lambda s: not any(r["id"] == info["agent"] and r["state"] == "running" for r in daemon.ps()),
        what="the agent to end",
    )
    row = next(r for r in daemon.ps() if r["id"] == info["agent"])
    assert row["state"] == "killed"
    again = daemon.ctl("kill", info["agent"])
    assert again.returncode == 1 and "already ended" in again.stderr
    assert daemon.ctl("kill", "nobody").returncode == 1


def test_start_and_stop_in_the_background(short_tmp: Path) -> None:
    env = base_env(short_tmp)
    started = run_ctl(env, "start", timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        runtime = Path(env["AIOS_RUNTIME_DIR"])
        # sockets live in a directory only the owner may list; where agents
        # run as other users (aiosd is root) they may pass through it to
        # kernel.sock, and to nothing else there
        other_users = os.getuid() == 0
        assert stat.S_IMODE(runtime.stat().st_mode) == (0o711 if other_users else 0o700)
        assert (runtime / "kernel.sock").exists()
        for name in ("workers.sock", "events.sock"):
            assert stat.S_IMODE((runtime / name).stat().st_mode) & 0o077 == 0
        again = run_ctl(env, "start")
        assert again.returncode == 0 and "already running" in again.stdout
        status = json.loads(run_ctl(env, "status", "--json").stdout)
        pid = status["supervisor_pid"]
    finally:
        stopped = run_ctl(env, "stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (Path(env["AIOS_RUNTIME_DIR"]) / "kernel.sock").exists()
    assert run_ctl(env, "status").returncode == 3


def test_a_second_daemon_on_the_same_runtime_dir_refuses(daemon: Daemon) -> None:
    result = subprocess.run([sys.executable, "-m", "aiosd"], env=daemon.env, capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "already running" in result.stderr


def test_config_errors_name_the_key(short_tmp: Path) -> None:
    cfg = short_tmp / "bad.toml"
    cfg.write_text("[kernel]\ncall_timeout = -1\n")
    result = subprocess.run([sys.executable, "-m", "aiosd", "--config", str(cfg)],
                            env=base_env(short_tmp), capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "kernel.call_timeout" in result.stderr
    cfg.write_text('[[llm.models]]\nname = "a"\npath = "/no/such.gguf"\n')
    result = subprocess.run([sys.executable, "-m", "aiosd", "--check-config", "--config", str(cfg)],
                            env=base_env(short_tmp), capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "/no/such.gguf" in result.stderr


def test_print_default_config_round_trips(short_tmp: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "aiosd", "--print-default-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    cfg = short_tmp / "default.toml"
    cfg.write_text(result.stdout)
    check = subprocess.run([sys.executable, "-m", "aiosd", "--check-config", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_sigterm_stops_every_process(make_daemon) -> None:
    import psutil

    d: Daemon = make_daemon()
    children = psutil.Process(d.proc.pid).children(recursive=True)
    assert len(children) >= 2
    assert d.stop() == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_top_shows_calls_while_they_run(daemon: Daemon) -> None:
    import threading

    gave_up = threading.Event()
    body = {"messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 1500, "min_tokens": 1500, "temperature": 2.0, "seed": 3}

    def long_call() -> Any:
        with daemon.client(name="topper") as c:
            return c.call(MsgType.LLM_CHAT, body, timeout=300, cancelled=gave_up)

    t, out = in_thread(long_call)
    try:
        daemon.wait_for(lambda s: s["running"] >= 1, what="a running call")
        view = json.loads(daemon.ctl("top", "--json").stdout)
        rows = [c for c in view["status"]["calls"] if c["type"] == "llm.chat"]
        assert rows and rows[0]["state"] in ("running", "queued")
        human = daemon.ctl("top", "--once")
        assert human.returncode == 0 and "LLM cores" in human.stdout
    finally:
        gave_up.set()   # its caller gives up and leaves: the kernel cancels the call
        t.join(120)
    assert not t.is_alive()
    # given up on while it ran, or (on a fast machine) ended with all its tokens
    assert isinstance(out.get("error"), errors.Cancelled) or (
        out.get("value", {}).get("usage", {}).get("completion_tokens") == 1500), out
    daemon.wait_for(lambda s: s["running"] == 0, what="the call to end")
    # the core's KV cache figures come with its heartbeats
    status = daemon.wait_for(lambda s: "seqs" in (s["cores"][0].get("stats") or {}),
                             what="the core's KV figures")
    kv = status["cores"][0]["stats"]
    assert kv["seqs"] >= kv["slots"] and kv["decode_tokens"] > 0
    assert "KV seqs" in daemon.ctl("top", "--once").stdout
