"""What a caller hands the engine and gets back: a ``Request`` (the prompt,
the sampling, the callbacks, and what the engine fills in as it runs), how
it finished, and the ``Snapshot`` of a suspended one."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Finish(enum.Enum):
    STOP = "stop"          # end-of-generation token
    LENGTH = "length"      # max_tokens reached
    CALLER = "caller"      # the callback asked to stop (a stop string)
    SUSPENDED = "suspended"
    ERROR = "error"


@dataclass
class Snapshot:
    """A suspended generation: enough to continue it exactly."""

    key: str
    state: bytes            # the sequence's KV state
    tokens: list[int]       # tokens whose KV is in ``state``
    pending: int | None     # sampled, not yet decoded
    completion: list[int]   # generated so far
    prompt_len: int
    cached: int

    @property
    def nbytes(self) -> int:
        return len(self.state)


@dataclass(eq=False)
class Request:
    key: str                          # whose KV to retain (the agent)
    prompt: list[int]
    max_tokens: int
    #: end-of-generation tokens are held back until this many are generated
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    grammar: Any = None               # a LlamaGrammar, or None
    #: called in the engine thread with each new token; returns False to stop
    on_token: Callable[[int], bool] = lambda token: True
    #: called in the engine thread each step; raises to cancel
    check: Callable[[], None] = lambda: None
    resume: Snapshot | None = None
    # -- filled in by the engine --
    completion: list[int] = field(default_factory=list)
    finish: Finish | None = None
    error: BaseException | None = None
    cached: int = 0                   # prompt tokens found in the KV cache
    snapshot: Snapshot | None = None  # set when suspended
    done: threading.Event = field(default_factory=threading.Event)
    _suspend: bool = False
    _seq: Any = None
    _todo: list[int] = field(default_factory=list)
    _pending: int | None = None
    _sampler: Any = None
    _logit_index: int = -1
    _passed: int = 0                  # steps passed over while its file was read

    def suspend(self) -> None:
        """Ask the engine to suspend this request at the next token boundary."""
        self._suspend = True
