"""A bounded cache of prompt states: a prompt seen before skips its prefill.

Keys are (the model's LoadedModel.key, the ids the network reads); values are what `model.generation.prefill` returned
for exactly those ids, so a hit gives bit-for-bit the state and logits a miss would compute. Only
whole prompts are reused, never a cached prefix plus the rest: reading the rest on its own sums in a
different order than one fused call over the whole prompt, and the text could drift.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable

import torch

Key = tuple[str, tuple[int, ...]]
Entry = tuple[torch.Tensor, tuple[torch.Tensor, ...]]  # (logits (vocab,), state tensors (layers, 1, hidden))

# What an entry costs besides its tensors' bytes, measured with the tiny and the default models
# (RSS growth per entry, less its data): a tensor's Python object, TensorImpl, StorageImpl and
# allocator rounding, about 600 bytes; the entry's tuples and the OrderedDict's node.
TENSOR_OVERHEAD = 640
ENTRY_OVERHEAD = 256
ALIGNMENT = 64  # PyTorch's CPU allocator rounds every storage up to this


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
        """Store a copy of an entry, evicting the least recently used until it fits; one too big is not kept."""
        size = entry_bytes(key, entry)
        if size > self.max_bytes or key in self._entries:
            return
        entry = owned(entry)
        while self.bytes + size > self.max_bytes:
            old_key, old_entry = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(old_key, old_entry)
        self._entries[key] = entry
        self.bytes += size

    def discard(self, model_gone: Callable[[str], bool]) -> None:
        """Drop the entries of every model for whose key `model_gone` is true (a model no longer served)."""
        for key in [k for k in self._entries if model_gone(k[0])]:
            self.bytes -= entry_bytes(key, self._entries.pop(key))


def owned(entry: Entry) -> Entry:
    """The entry's tensors copied into storages of their own, exactly their size.

    A view keeps the whole tensor it views alive, and the state tensors the recurrent layer returns
    kept far more memory resident than their own bytes (measured at 512 units with one torch
    thread: 80-700 kB of RSS per entry against 11 kB of data, the allocator unable to give back the
    layer's working memory around them); copies made once the layer has returned cost their size.
    """
    logits, state = entry
    return logits.clone(memory_format=torch.contiguous_format), tuple(
        t.clone(memory_format=torch.contiguous_format) for t in state
    )


def entry_bytes(key: Key, entry: Entry) -> int:
    """What an entry costs once stored: its tensors' whole storages, their overhead, and its key."""
    logits, state = entry
    tensors = (logits, *state)
    data = sum(_rounded(t.numel() * t.element_size()) + TENSOR_OVERHEAD for t in tensors)
    ids = key[1]
    big_ints = sum(1 for i in ids if i > 256) * sys.getsizeof(257)  # Python caches the small ones
    return data + ENTRY_OVERHEAD + sys.getsizeof(ids) + big_ints + sys.getsizeof(key[0])


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT
