"""Sizing a core's memory to the machine: the KV cache, the RAM kept for
evicted conversations, and the slots, when the config leaves them "auto".

A core may use the memory the process may use (what the system has
available, and under a cgroup limit what the limit leaves), less a stated
headroom for the rest of the kernel and the system, shared equally among
the machine's local cores. Of its share, a third is the KV cache (whole
streams of ``n_ctx`` cells, the fastest tier) and the rest the RAM tier
(only the cells conversations use). ``slots`` is as many calls as the
cache's streams allow, up to DEFAULT_SLOTS.

Pure: the figures come in as arguments (``available``, ``cgroup``), so the
choice is tested over any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .batching import MAX_SEQS

#: the share of the memory the process may use that the cores leave to
#: everything else (the kernel's other processes, agents, the system)
HEADROOM_FRACTION = 0.6
#: and at least this much, bytes
HEADROOM_MIN = 1 << 30
#: of a core's share, the KV cache's part (the rest is the RAM tier)
KV_FRACTION = 1 / 3
#: calls a core runs at once when the config leaves it to the core
DEFAULT_SLOTS = 32
MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    kv_mb: int
    evicted_mb: int
    slots: int
    #: the memory the figures came from, for `aiosctl status`
    usable_mb: int
    share_mb: int


def usable(available: int, cgroup_limit: int | None, cgroup_used: int | None) -> int:
    """Bytes the process may still use: what the system has available, and
    no more than a cgroup limit leaves."""
    if cgroup_limit is not None and cgroup_used is not None:
        return max(0, min(available, cgroup_limit - cgroup_used))
    return available


def usable_now() -> int:
    """Bytes this process may still use, as the machine says now (psutil's
    available memory, and the cgroup's limit where one is set)."""
    import psutil

    limit, used = cgroup_memory()
    return usable(psutil.virtual_memory().available, limit, used)


def auto_sizes(*, usable_bytes: int, cores: int, token_bytes: int, n_ctx: int,
               kv_mb: int | None = None, evicted_mb: int | None = None,
               slots: int | None = None) -> Sizes:
    """The sizes of one of ``cores`` local cores; a figure the config gives
    (not None) is kept, the others are chosen around it. The KV cache
    holds at least slots + 1 streams (the spare)."""
    headroom = max(HEADROOM_MIN, int(usable_bytes * HEADROOM_FRACTION))
    share = max(0, usable_bytes - headroom) // max(1, cores)
    stream = n_ctx * token_bytes
    if kv_mb is None:
        streams = min(MAX_SEQS, int(share * KV_FRACTION) // stream)
        streams = max(streams, (slots or 1) + 1)
        kv_bytes = streams * stream
    else:
        kv_bytes = kv_mb * MiB
        streams = min(MAX_SEQS, kv_bytes // stream)
    if slots is None:
        slots = max(1, min(DEFAULT_SLOTS, streams - 1))
    if evicted_mb is None:
        evicted_mb = max(0, share - kv_bytes) // MiB
    return Sizes(kv_mb=-(-kv_bytes // MiB), evicted_mb=int(evicted_mb), slots=slots,
                 usable_mb=usable_bytes // MiB, share_mb=share // MiB)


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """(limit, usage) of this process's memory cgroup, bytes; (None, None)
    where none limits it (v2 ``memory.max`` "max", or no cgroup files)."""
    try:
        line = next((ln for ln in Path("/proc/self/cgroup").read_text().splitlines()
                     if ln.startswith("0::")), None)
    except OSError:
        line = None
    folders = [root / line[3:].lstrip("/")] if line else []
    folders.append(root)
    for folder in folders:
        try:
            limit = (folder / "memory.max").read_text().strip()
            used = (folder / "memory.current").read_text().strip()
        except OSError:
            continue
        if limit == "max":
            return None, None
        return int(limit), int(used)
    try:   # cgroup v1
        limit_v1 = int((root / "memory" / "memory.limit_in_bytes").read_text())
        used_v1 = int((root / "memory" / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return None, None
    return (limit_v1, used_v1) if limit_v1 < 1 << 60 else (None, None)
