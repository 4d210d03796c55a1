"""Closing a test's zmq context without risking the suite.

libzmq 4.3.5's ``zmq_ctx_term`` now and then waits for good although every
socket of the context is closed with linger 0: a stand-in kernel (a ROUTER
on an ipc endpoint that a client used) reproduces it about once in 2,500
runs. The kernel and the clients never terminate their contexts (they end
with their process), so only tests meet it."""

from __future__ import annotations

import threading

import zmq


def destroy(ctx: zmq.Context) -> None:
    """Close ``ctx`` and every socket of it; a term that has not returned
    within 10 s is left to the process's exit, so a clean-up never hangs."""
    closing = threading.Thread(target=ctx.destroy, kwargs={"linger": 0}, daemon=True)
    closing.start()
    closing.join(10)
