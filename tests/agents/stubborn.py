"""Test agent: ignores SIGTERM (and SIGINT and SIGHUP), then waits for good:
only SIGKILL ends it."""

import signal

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
while True:
    signal.pause()
