"""The rows of the engine's SlotCache: which are free, and which token ids each row's keys/values hold."""

from __future__ import annotations


class Slots:
    """Free-row bookkeeping plus each row's content, so a new sequence can reuse a prefix already computed.

    A released row keeps its keys/values and ids until it is taken again: a prompt seen recently (the same
    system prompt, k samples of one prompt) is found there even after the sequence that computed it ended.
    """

    def __init__(self, n: int) -> None:
        self.free: list[int] = list(range(n))
        self.tokens: list[list[int]] = [[] for _ in range(n)]  # ids whose keys/values row i holds, in order

    def take(self) -> int:
        """A free row, preferring one that holds nothing another sequence could reuse (the emptiest)."""
        slot = min(self.free, key=lambda i: len(self.tokens[i]))
        self.free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def longest_prefix(self, ids: list[int]) -> tuple[int, int]:
        """(row, length) of the row holding the longest prefix of ids; (-1, 0) when none shares a first id."""
        best, best_len = -1, 0
        for slot, held in enumerate(self.tokens):
            if (n := common_prefix(held, ids)) > best_len:
                best, best_len = slot, n
        return best, best_len


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
