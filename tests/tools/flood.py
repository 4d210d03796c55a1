"""Open COUNT connections to aiosd, say hello on each, and exit without
closing any of them properly: a local process flooding the kernel.

Usage: flood.py ENDPOINT COUNT [BATCH]. Prints one JSON line: how many
hellos were answered, how many refused (and the first refusal's message).
"""

from __future__ import annotations

import json
import sys

import zmq

from libaios import protocol
from libaios.protocol import MsgType


def main() -> None:
    endpoint, count = sys.argv[1], int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    ctx = zmq.Context()
    # closed sockets count until ZeroMQ's reaper has freed them
    ctx.set(zmq.MAX_SOCKETS, 8 * batch + 1024)
    ok = refused = silent = 0
    first_refusal = ""
    done = 0
    while done < count:
        socks = []
        for _ in range(min(batch, count - done)):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send_multipart(protocol.encode(protocol.call(MsgType.HELLO, {"name": "flood"})))
            socks.append(sock)
        for sock in socks:
            if not sock.poll(30_000):
                silent += 1
                continue
            _, payload = protocol.split_envelope(sock.recv_multipart())
            msg = protocol.decode(payload)
            if msg.type is MsgType.ERROR:
                refused += 1
                first_refusal = first_refusal or msg.body.get("message", "")
            else:
                ok += 1
        for sock in socks:
            sock.close(0)
        done += len(socks)
    print(json.dumps({"answered": ok, "refused": refused, "silent": silent,
                      "first_refusal": first_refusal}), flush=True)


if __name__ == "__main__":
    main()
