"""A radix tree that stores texts with shared prefixes once.

Conversation histories and notes of one agent share long prefixes (the same
system prompt, the same opening turns); each text is a path from the root,
and a shared prefix is one edge. ``insert`` returns a handle (the node where
the text ends) that stays valid while other texts come and go, because edges
are split and merged around existing nodes, never by replacing them. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    label: str = ""
    parent: Node | None = None
    children: dict[str, Node] = field(default_factory=dict)
    count: int = 0  # texts that end here


class Trie:
    def __init__(self) -> None:
        self.root = Node()
        #: bytes of all inserted texts, as if stored one by one
        self.raw_bytes = 0
        #: bytes actually held in edge labels
        self.stored_bytes = 0
        self.texts = 0

    def insert(self, text: str) -> Node:
        """Store ``text``; return its handle."""
        node = self.root
        rest = text
        while rest:
            child = node.children.get(rest[0])
            if child is None:
                leaf = Node(rest, node)
                node.children[rest[0]] = leaf
                self.stored_bytes += _size(rest)
                node = leaf
                break
            common = _common_prefix(child.label, rest)
            if common < len(child.label):
                # Split child's edge: a new node holds the shared part, the
                # child keeps its suffix (and so its identity as a handle).
                mid = Node(child.label[:common], node)
                node.children[rest[0]] = mid
                child.label = child.label[common:]
                child.parent = mid
                mid.children[child.label[0]] = child
                child = mid
            node = child
            rest = rest[common:]
        node.count += 1
        self.raw_bytes += _size(text)
        self.texts += 1
        return node

    def get(self, handle: Node) -> str:
        """The text whose handle is ``handle``."""
        parts = []
        node: Node | None = handle
        while node is not None:
            parts.append(node.label)
            node = node.parent
        return "".join(reversed(parts))

    def remove(self, handle: Node) -> None:
        """Forget one copy of the text at ``handle``."""
        if handle.count <= 0:
            raise KeyError("no text ends at this handle")
        text_size = _size(self.get(handle))
        handle.count -= 1
        self.raw_bytes -= text_size
        self.texts -= 1
        node = handle
        # Drop nodes no text needs any more, then re-merge a lone child.
        while node is not self.root and node.count == 0 and not node.children:
            parent = node.parent
            assert parent is not None
            del parent.children[node.label[0]]
            self.stored_bytes -= _size(node.label)
            node = parent
        if node is not self.root and node.count == 0 and len(node.children) == 1:
            (child,) = node.children.values()
            parent = node.parent
            assert parent is not None
            # Merge the node into its only child: the child (maybe a handle)
            # survives with the longer label.
            child.label = node.label + child.label
            child.parent = parent
            parent.children[child.label[0]] = child


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _size(text: str) -> int:
    return len(text.encode("utf-8"))
