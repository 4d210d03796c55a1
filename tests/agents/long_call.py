"""Test agent: one long generation (a high temperature rarely ends early),
to be killed while it runs."""

import libaios

with libaios.connect() as aios:
    print("calling", flush=True)
    aios.chat("Write a very long story about a dragon.", max_tokens=3000, temperature=2.0,
              seed=1, timeout=600)
