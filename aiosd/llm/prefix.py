"""A prefix tree of the token runs held in a core's KV cache.

Every sequence of the cache holds a run of tokens from position 0. The tree
indexes those runs by blocks of ``block`` tokens: a node is one block
following its parent's, and it lists the sequences whose run contains that
path. A new prompt walks the tree block by block; the deepest node reached
names a sequence that already holds that prefix, so its cells can be copied
instead of recomputed. The last partial block is not indexed: the engine
extends the match token by token against the one sequence found.

Pure logic: the engine keeps the tree in step with its sequences through
``grow``, ``truncate`` and ``drop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

BLOCK = 16


@dataclass(eq=False)
class _Node:
    parent: _Node | None
    key: tuple[int, ...]
    holders: set[int] = field(default_factory=set)
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)


class PrefixTree:
    def __init__(self, block: int = BLOCK):
        if block < 1:
            raise ValueError("block must be at least one token")
        self.block = block
        self._root = _Node(None, ())
        self._paths: dict[int, list[_Node]] = {}   # sequence -> its nodes, root first

    def __len__(self) -> int:
        """Nodes in the tree (the root excluded)."""
        count, todo = 0, [self._root]
        while todo:
            node = todo.pop()
            count += len(node.children)
            todo.extend(node.children.values())
        return count

    def grow(self, seq: int, tokens: Sequence[int]) -> None:
        """``seq`` now holds ``tokens``, which extend what it held before."""
        path = self._paths.setdefault(seq, [])
        b = self.block
        for k in range(len(path), len(tokens) // b):
            parent = path[-1] if path else self._root
            key = tuple(tokens[k * b:(k + 1) * b])
            node = parent.children.get(key)
            if node is None:
                node = parent.children[key] = _Node(parent, key)
            node.holders.add(seq)
            path.append(node)

    def truncate(self, seq: int, n: int) -> None:
        """``seq`` now holds only the first ``n`` tokens of its run."""
        path = self._paths.get(seq)
        if not path:
            return
        keep = max(n, 0) // self.block
        while len(path) > keep:
            node = path.pop()
            node.holders.discard(seq)
            # a deeper block implies every block above it: an unheld node has
            # no held children left, so it can go
            if not node.holders and node.parent is not None:
                del node.parent.children[node.key]
        if not path:
            del self._paths[seq]

    def drop(self, seq: int) -> None:
        self.truncate(seq, 0)

    def longest(self, tokens: Sequence[int], exclude: int | None = None) -> tuple[int | None, int]:
        """The sequence (other than ``exclude``) holding the longest whole-block
        prefix of ``tokens``, and that prefix's length; ``(None, 0)`` if none."""
        b = self.block
        node, found, depth = self._root, None, 0
        for k in range(len(tokens) // b):
            node = node.children.get(tuple(tokens[k * b:(k + 1) * b]))
            if node is None:
                break
            others = node.holders - {exclude} if exclude in node.holders else node.holders
            if not others:
                break   # deeper nodes are held by a subset of these holders
            found, depth = min(others), (k + 1) * b
        return found, depth
