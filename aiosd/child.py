"""Entry point of the daemon's child processes: ``python -m aiosd.child ROLE [NAME]``.

The supervisor passes the validated configuration (``AIOS_CONFIG_JSON``) and
the runtime directory through the environment, so every child runs on
exactly the configuration the supervisor checked.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from libaios import paths

from . import config as config_mod
from . import credentials, logs, roles


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m aiosd.child scheduler | llm NAME | storage | memory | tools "
              "| gateway",
              file=sys.stderr)
        return 2
    # before anything else: the credential leaves the pipe it came in, and
    # no process of our user may read this one's memory
    credentials.receive()
    credentials.not_dumpable()
    cfg = config_mod.from_dict(json.loads(os.environ.get("AIOS_CONFIG_JSON", "{}")))
    runtime_dir = Path(os.environ.get("AIOS_RUNTIME_DIR") or paths.runtime_dir())
    role = argv[0]
    if role == roles.SCHEDULER:
        logs.setup(cfg.kernel, "scheduler")
        from .scheduler.server import serve

        serve(cfg, runtime_dir)
        return 0
    if role == roles.LLM and len(argv) == 2:
        logs.setup(cfg.kernel, f"llm:{argv[1]}")
        from .llm.core import serve as serve_core

        try:
            serve_core(cfg, argv[1], paths.ipc(runtime_dir, paths.WORKERS_SOCKET))
        except config_mod.ConfigError as exc:
            print(f"llm core {argv[1]}: {exc}", file=sys.stderr)
            return roles.EX_CONFIG  # restarting cannot help
        return 0
    if role == roles.GATEWAY:
        logs.setup(cfg.kernel, "gateway")
        from .gateway.service import serve as serve_gateway

        try:
            serve_gateway(cfg, runtime_dir)
        except config_mod.ConfigError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return roles.EX_CONFIG
        return 0
    if role in roles.SERVICES and len(argv) == 1:
        import importlib

        logs.setup(cfg.kernel, role)
        module = importlib.import_module(roles.SERVICES[role][1])
        module.serve(cfg, paths.ipc(runtime_dir, paths.WORKERS_SOCKET))
        return 0
    print(f"unknown child role {argv!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
