"""How a worker makes system calls of its own (the memory manager storing
items, a file tool reading an agent's storage): through the scheduler like
everyone else, as a kernel-internal session.

The session proves itself with the credential the supervisor gave its
process (see credentials); only such a session may make kernel-internal
calls (``block.*``, ``audit.*``) or act in an agent's namespace by naming
it in ``as_namespace``. A client is per thread, as libaios clients are.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from libaios import Client, paths
from libaios.protocol import MsgType

from . import credentials


class KernelClient:
    def __init__(self, name: str, runtime_dir: Path | None = None, timeout: float = 60.0):
        self.name = name
        self.timeout = timeout
        self.endpoint = paths.ipc(runtime_dir or paths.runtime_dir(), paths.KERNEL_SOCKET)
        self.token = credentials.mine()
        self._local = threading.local()

    def _client(self) -> Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = Client(self.endpoint, token=self.token, name=self.name,
                            operator=True, timeout=self.timeout)
            self._local.client = client
        return client

    def call(self, mtype: MsgType, body: dict[str, Any], as_namespace: str | None = None,
             timeout: float | None = None,
             cancelled: threading.Event | None = None) -> dict[str, Any]:
        """Make ``mtype`` (in ``as_namespace``'s data, if given); setting
        ``cancelled`` gives up waiting for it."""
        if as_namespace is not None:
            body = {**body, "as_namespace": as_namespace}
        return self._client().call(mtype, body, timeout, cancelled)

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None
