"""The scheduler: the only process agents talk to.

One loop polls four things: the clients' ROUTER (agents and aiosctl), the
workers' ROUTER, the events' XPUB (for subscriptions) and the output pipes
of the agents the kernel launched. A
call is decoded and checked, queued on its resource under the configured
policy, dispatched to a worker with a free slot, and tracked until its final
reply, with a deadline and a known owner. When a worker is lost its calls
run again elsewhere (once) or fail with a retriable error; when an agent is
gone its queued calls are dropped and its running ones cancelled.

This module holds the sockets and the loop. What the scheduler decides is
the kernel's (kernel: its state, the dispatcher, the call lifecycle, the
handlers); after every message and every tick the loop sends what the
kernel put in its outbox.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import zmq

from libaios import paths, protocol
from libaios.wire import send_frames

from .. import procs, rundir
from ..config import Config
from .agents import AgentState
from .kernel import Kernel

log = logging.getLogger(__name__)

TICK = 0.05


class Scheduler:
    def __init__(self, config: Config, runtime_dir: Path):
        self.kernel = Kernel(config, runtime_dir)
        self.state = self.kernel.state
        self.out = self.kernel.out
        self.config = config
        self.runtime_dir = runtime_dir
        self.endpoint = paths.ipc(runtime_dir, paths.KERNEL_SOCKET)
        ctx = zmq.Context.instance()
        self.clients = ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.clients.setsockopt(zmq.SNDHWM, 100_000)
        self.clients.setsockopt(zmq.RCVHWM, 100_000)
        self.clients.setsockopt(zmq.LINGER, 500)
        # Past this zmq drops the connection outright; below it, an oversized
        # body is answered with a TOO_LARGE error by the decoder.
        self.clients.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_BODY_BYTES)
        self.workers_sock = ctx.socket(zmq.ROUTER)
        self.workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers_sock.setsockopt(zmq.LINGER, 500)
        # An XPUB, not a PUB: the kernel hears subscriptions, and answers
        # one to protocol.SUBSCRIBED + a token, so a subscriber knows when
        # its subscriptions are in place (a PUB drops what it publishes
        # before then, unseen).
        self.events = ctx.socket(zmq.XPUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.poller = zmq.Poller()

    # -- sockets -------------------------------------------------------------

    def bind(self) -> None:
        old_umask = os.umask(0o077)
        try:
            for sock, name in (
                (self.clients, paths.KERNEL_SOCKET),
                (self.workers_sock, paths.WORKERS_SOCKET),
                (self.events, paths.EVENTS_SOCKET),
            ):
                path = self.runtime_dir / name
                if path.exists():
                    path.unlink()  # a stale socket of a dead scheduler
                sock.bind(paths.ipc(self.runtime_dir, name))
        finally:
            os.umask(old_umask)
        # Agents of other users (the dynamic users of launched agents, the
        # uids in access.allow_uids) reach kernel.sock, and nothing else
        # here: the directory can be passed through but not listed, the
        # workers' and events' sockets stay the daemon's own. Who may do
        # what over kernel.sock is decided at hello, from what the OS says.
        others = os.getuid() == 0 or bool(self.config.access.allow_uids)
        os.chmod(self.runtime_dir, 0o711 if others else 0o700)
        if others:
            os.chmod(self.runtime_dir / paths.KERNEL_SOCKET, 0o666)
        self.poller.register(self.clients, zmq.POLLIN)
        self.poller.register(self.workers_sock, zmq.POLLIN)
        self.poller.register(self.events, zmq.POLLIN)

    def flush(self) -> None:
        """Send what the kernel put in its outbox. A client or worker that
        cannot take its message is taken for gone (which may put more in
        the outbox: it is drained until empty)."""
        out, life = self.out, self.kernel.life
        while out:
            clients, workers, events, watch = out.clients, out.workers, out.events, out.watch
            out.clients, out.workers, out.events, out.watch = [], [], [], []
            for fd in watch:
                self.poller.register(fd, zmq.POLLIN)
            for identity, msg in clients:
                if identity is None:
                    if msg.type is protocol.MsgType.ERROR:
                        log.warning("kernel-internal call failed: %s", msg.body.get("message"))
                    continue
                if not self._send(self.clients, identity, msg):
                    life.client_gone(identity)
            for identity, msg, worker in workers:
                if (not self._send(self.workers_sock, identity, msg) and worker is not None
                        and self.state.workers.get(worker.name) is worker):
                    life.worker_lost(worker, "its connection is gone")
            for topic, body in events:
                self.events.send_multipart(protocol.encode_event(topic, body))

    @staticmethod
    def _send(sock: zmq.Socket, identity: bytes, msg: protocol.Message) -> bool:
        """Send ``msg`` to the peer ``identity``; False if it is gone or
        cannot take more."""
        try:
            send_frames(sock, [identity, *protocol.encode(msg)], nonblocking=True)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise

    def on_subscriptions(self) -> None:
        """Answer each new subscription to protocol.SUBSCRIBED + a token
        with an event of that topic (others need no answer)."""
        for _ in range(1000):
            try:
                frame = self.events.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            # b"\x01" + topic: subscribe; b"\x00" + topic: unsubscribe
            topic = frame[1:].decode("utf-8", errors="replace")
            if (frame[:1] == b"\x01" and topic.startswith(protocol.SUBSCRIBED)
                    and len(frame) <= protocol.MAX_TOPIC_BYTES):
                self.out.publish(topic, {})

    # -- agents ---------------------------------------------------------------

    def on_agent_output(self, fd: int) -> None:
        got = self.state.agents.read_output(fd)
        if got is None:
            return
        agent, stream, data = got
        if not data:
            self.poller.unregister(fd)
            return
        text = data.decode("utf-8", errors="replace")
        for identity, call_id in list(agent.watchers):
            self.out.send_client(identity, protocol.partial(call_id, {"stream": stream, "data": text}))

    # -- time ------------------------------------------------------------------

    def drain_workers(self) -> None:
        """Handle what the workers sent (a burst at most)."""
        for _ in range(1000):
            try:
                raw = self.workers_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.kernel.on_worker_frames([f.bytes for f in raw], raw[-1])
            self.flush()

    def tick(self, now: float) -> None:
        # Heartbeats that came while this loop was busy (a big client
        # message) count before any worker is taken for lost.
        self.drain_workers()
        self.kernel.tick(now)
        self.flush()

    # -- main loop --------------------------------------------------------------

    def run(self) -> None:
        def on_term(*_: object) -> None:
            self.state.stopping = True

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
            signal.signal(signal.SIGINT, on_term)
        if not procs.become_subreaper():
            log.warning("cannot become the subreaper of launched agents: a process an agent "
                        "abandons is not recognised as that agent's")
        self.bind()
        log.info("scheduler listening on %s", self.endpoint)
        next_tick = time.monotonic()
        drain_until = None
        while True:
            if self.state.stopping and drain_until is None:
                self.kernel.shut_down()
                self.flush()
                drain_until = time.monotonic() + 3.0
            if drain_until is not None:
                launched_alive = any(
                    a.launched and a.state is AgentState.RUNNING
                    for a in self.state.agents.agents.values()
                )
                if time.monotonic() > drain_until or not launched_alive:
                    break
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                ready = dict(self.poller.poll(int(timeout * 1000) + 1))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            if self.workers_sock in ready:
                self.drain_workers()
            if self.events in ready:
                self.on_subscriptions()
                self.flush()
            if self.clients in ready:
                for _ in range(1000):
                    try:
                        raw = self.clients.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.kernel.on_client_frames(raw)
                    self.flush()
            for fd in ready:
                if isinstance(fd, int):
                    self.on_agent_output(fd)
                    self.flush()
            if time.monotonic() >= next_tick:
                self.tick(time.time())
                next_tick = time.monotonic() + TICK
        self.close()

    def close(self) -> None:
        for sock in (self.clients, self.workers_sock, self.events):
            sock.close()
        rundir.remove_sockets(self.runtime_dir)


def serve(config: Config, runtime_dir: Path) -> None:
    Scheduler(config, runtime_dir).run()
