"""Fitting a structured answer into the tokens a call has left.

A grammar holds a model to a JSON schema, but a free string or an open-ended
array lets a model that loops (``"12 * 12 * 12 * ..."``) run until
``max_tokens`` cuts it off, and a JSON document cut short parses to nothing.
:func:`fit` rewrites a schema so that every answer it admits ends within the
budget: the tokens of the answer's skeleton (its keys, brackets and fixed
values) are reserved first, and what is left is shared out among its free
strings as a ``maxLength`` in characters (a token carries at least one
character of a string, so a string of N characters costs at most N tokens
of it). Open-ended arrays get a ``maxItems``. Pure logic, no I/O.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

#: Tokens kept back beyond the skeleton's own: the tokenizer may split the
#: model's JSON less well than the skeleton's (``": "`` against ``":"``).
SLACK_TOKENS = 4
#: Fraction of the skeleton's tokens added to that slack, for the same reason.
SLACK_FRACTION = 0.25
#: The most items an array with no ``maxItems`` of its own may hold.
ARRAY_CAP = 8
#: Characters a JSON number may run to under llama.cpp's grammar (16 digits
#: an integral or decimal part): counted against the budget, never cut.
NUMBER_CHARS = 16

Tokens = Callable[[str], int]


class BudgetTooSmall(ValueError):
    """The skeleton of the answer alone does not fit the budget."""

    def __init__(self, needed: int, budget: int):
        super().__init__(f"needs at least {needed} tokens, and {budget} are left")
        self.needed = needed
        self.budget = budget


def estimate_tokens(text: str) -> int:
    """A token count for a backend whose tokenizer is not at hand: one token
    for every two characters, more than JSON takes with any real tokenizer."""
    return max(1, math.ceil(len(text) / 2))


def fit(schema: dict[str, Any], budget: int, tokens: Tokens = estimate_tokens) -> dict[str, Any]:
    """A copy of ``schema`` whose answers all fit ``budget`` tokens.

    Each branch of a top-level ``anyOf`` is fitted on its own (an answer takes
    one). Raises :class:`BudgetTooSmall` when no branch's skeleton fits.
    """
    branches = schema.get("anyOf")
    if isinstance(branches, list) and set(schema) == {"anyOf"}:
        fitted, smallest = [], None
        for branch in branches:
            try:
                fitted.append(_fit_one(branch, budget, tokens))
            except BudgetTooSmall as exc:
                smallest = exc if smallest is None or exc.needed < smallest.needed else smallest
        if not fitted:
            assert smallest is not None
            raise smallest
        return fitted[0] if len(fitted) == 1 else {"anyOf": fitted}
    return _fit_one(schema, budget, tokens)


def _fit_one(schema: dict[str, Any], budget: int, tokens: Tokens) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    _cap_arrays(out)
    skeleton = tokens(json.dumps(skeleton_of(out)))
    reserve = skeleton + SLACK_TOKENS + math.ceil(skeleton * SLACK_FRACTION)
    if reserve > budget:
        raise BudgetTooSmall(reserve, budget)
    strings: list[tuple[dict[str, Any], int]] = []   # (string schema, how many times it can occur)
    fixed = _slots(out, 1, strings)
    free = budget - reserve - fixed
    level = _water_level([(_cap(s), n) for s, n in strings], free)
    for s, _ in strings:
        s["maxLength"] = min(_cap(s), level)
        s["minLength"] = min(s.get("minLength", 0), s["maxLength"])
    return out


def _cap(string: dict[str, Any]) -> float:
    return string.get("maxLength", math.inf)


def _water_level(slots: list[tuple[float, int]], free: int) -> int:
    """The largest length L such that giving every slot min(cap, L)
    characters, times its count, spends no more than ``free``."""
    if not slots:
        return 0
    level, spent_below, count_above = 0, 0, sum(n for _, n in slots)
    for cap, n in sorted(slots):
        # every slot still above ``cap`` would take ``cap`` characters
        if spent_below + count_above * cap > free:
            break
        spent_below += n * cap
        count_above -= n
        level = cap
    else:
        return int(level)
    return max(0, int((free - spent_below) // count_above))


def _is_free_string(schema: dict[str, Any]) -> bool:
    return (schema.get("type") == "string" and not
            {"const", "enum", "pattern", "format"} & set(schema))


def _cap_arrays(schema: Any) -> None:
    """Give every open-ended array (and each nested one) a ``maxItems``."""
    if isinstance(schema, list):
        for item in schema:
            _cap_arrays(item)
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        schema["maxItems"] = min(schema.get("maxItems", ARRAY_CAP),
                                 max(schema.get("minItems", 0), ARRAY_CAP))
    for sub in (schema.get("properties") or {}).values():
        _cap_arrays(sub)
    for key in ("items", "anyOf", "oneOf"):
        if key in schema:
            _cap_arrays(schema[key])


def _slots(schema: Any, times: int, strings: list[tuple[dict[str, Any], int]]) -> int:
    """Collect the free strings of ``schema`` with how often each can occur;
    return the characters its numbers can take beyond the skeleton."""
    if not isinstance(schema, dict):
        return 0
    if _is_free_string(schema):
        strings.append((schema, times))
        return 0
    kind = schema.get("type")
    if kind in ("number", "integer"):
        return NUMBER_CHARS * times
    fixed = 0
    for sub in (schema.get("properties") or {}).values():
        fixed += _slots(sub, times, strings)
    if kind == "array" and isinstance(schema.get("items"), dict):
        fixed += _slots(schema["items"], times * schema.get("maxItems", ARRAY_CAP), strings)
    for key in ("anyOf", "oneOf"):
        # the branches share the budget as if all were taken: fits any one
        for sub in schema.get(key) or []:
            fixed += _slots(sub, times, strings)
    return fixed


def skeleton_of(schema: Any) -> Any:
    """The longest fixed frame of an answer: every property present, every
    array at its most items, strings empty, numbers 0."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if "enum" in schema and schema["enum"]:
        return max(schema["enum"], key=lambda v: len(json.dumps(v)))
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return max((skeleton_of(s) for s in schema[key]), key=lambda v: len(json.dumps(v)))
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    if kind == "object" or "properties" in schema:
        return {k: skeleton_of(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        item = skeleton_of(schema.get("items", {}))
        return [item] * schema.get("maxItems", max(schema.get("minItems", 0), 1))
    if kind == "string":
        return ""
    if kind in ("number", "integer"):
        return 0
    if kind == "boolean":
        return False
    return None
