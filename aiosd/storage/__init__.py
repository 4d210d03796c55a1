"""The storage manager: durable per-agent storage in LMDB, in its own process."""
