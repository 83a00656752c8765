"""A bounded cache of prompt states: a prompt seen before skips its prefill.

Keys are (model name, the ids the network reads); values are what `model.sampling.prefill` returned
for exactly those ids, so a hit gives bit-for-bit the state and logits a miss would compute. Only
whole prompts are reused, never a cached prefix plus the rest: reading the rest on its own sums in a
different order than one fused call over the whole prompt, and the text could drift.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

Key = tuple[str, tuple[int, ...]]
Entry = tuple[torch.Tensor, tuple[torch.Tensor, ...]]  # (logits (vocab,), state tensors (layers, 1, hidden))


class PromptCache:
    """Least-recently-used map from a prompt to its (logits, state), bounded by the bytes it holds.

    Not thread-safe: the engine's scheduler thread is its only user. Entries are never modified
    after `put`; users copy them into their own buffers.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Entry | None:
        """The entry for `key` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: Key, entry: Entry) -> None:
        """Store an entry, evicting the least recently used until it fits; one too big is not kept."""
        size = entry_bytes(key, entry)
        if size > self.max_bytes or key in self._entries:
            return
        while self.bytes + size > self.max_bytes:
            old_key, old_entry = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(old_key, old_entry)
        self._entries[key] = entry
        self.bytes += size


def entry_bytes(key: Key, entry: Entry) -> int:
    """What an entry costs: its tensors plus its key's ids (8 bytes each, a rough Python figure)."""
    logits, state = entry
    tensors = (logits, *state)
    return sum(t.numel() * t.element_size() for t in tensors) + 8 * len(key[1])
