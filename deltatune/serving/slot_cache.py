"""A preallocated key/value cache for the decode loop: every running row in a slot of one buffer per layer.

transformers' `DynamicCache` appends each new token with `torch.cat`, which copies the whole cache of every layer at
every decode step (SmolLM2, 16 rows of ~100 positions: ~70 MB copied per step). Static caches avoid the copy by
writing into a buffer allocated once (transformers' `StaticCache`; vLLM's paged KV blocks, Kwon et al. 2023 §4.2).
Here one buffer per layer holds `slots` rows of `capacity` positions, (slots, kv heads, capacity, head dim), and the
running batch is the view `buffer[:rows, :, start:end]`:

    slot 0   [ . . . p p a b c d e | _ _ _ ]      p: left padding (mask 0), a..e: the row's real entries
    slot 1   [ . . . f g h i j k l | _ _ _ ]      '.': columns left of the window (unused, stale)
    slot 2   [ . . . p p p p m n o | _ _ _ ]      '_': free columns; the next token of every row goes to `end`
                     ^start          ^end

The rows stay left-padded to a common width, as in `DynamicCache` (the decode loop's (B, L) mask marks the real
entries), so every row writes its new token into the same column: one strided copy per layer and step, nothing else
moves. A joining row is written right-aligned at `end`; a leaving row's slot is filled by the last row (one row
copied, not the batch); leading columns that only padding holds are dropped by moving `start`. When the buffer
is full the window is moved to column 0 of a buffer twice as long (amortised: once per doubling).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's keys and values: views of a preallocated (slots, heads, capacity, head dim) buffer."""

    is_croppable = True

    def __init__(self, like: torch.Tensor, slots: int, capacity: int):  # noqa: D107 - no CacheLayerMixin state
        heads, head_dim = like.shape[1], like.shape[3]
        self.buffers = [like.new_zeros(slots, heads, capacity, head_dim) for _ in range(2)]
        self.rows = self.start = self.end = 0
        self.device = like.device
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:  # (rows, heads, end - start, head dim), a view
        return self.buffers[0][: self.rows, :, self.start : self.end]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:  # `reset` and `CacheLayerMixin.__init__` assign None; nothing else may assign
            raise AttributeError("a SlotLayer's keys are views of its buffer; write through update()")

    @property
    def values(self) -> torch.Tensor:
        return self.buffers[1][: self.rows, :, self.start : self.end]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("a SlotLayer's values are views of its buffer; write through update()")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions of every row at `end` (the same column for all: rows are left-padded)."""
        new = key_states.shape[-2]
        self.buffers[0][: self.rows, :, self.end : self.end + new] = key_states
        self.buffers[1][: self.rows, :, self.end : self.end + new] = value_states
        return self.extend(new)

    def extend(self, new: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The window widened by `new` columns at `end`, which the caller writes (the fused decode kernel writes each
        row's new key and value there itself): (keys, values) views."""
        self.end += new
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def crop(self, tokens_to_remove: int) -> None:
        self.end -= abs(tokens_to_remove)

    def reset(self) -> None:
        self.rows = self.start = self.end = 0


class SlotCache(Cache):
    """The running batch's cache: one `SlotLayer` per decoder layer, all sharing the same window."""

    def __init__(self, layers: list[SlotLayer]):
        super().__init__(layers=layers)

    @classmethod
    def like(cls, cache: Cache, slots: int, capacity: int = 256) -> SlotCache:
        """An empty cache of `slots` rows with the layers, heads, dtype and device of `cache` (a prefill's)."""
        return cls([SlotLayer(layer.keys, slots, capacity) for layer in cache.layers])

    @property
    def rows(self) -> int:
        return self.layers[0].rows

    @property
    def width(self) -> int:
        return self.layers[0].end - self.layers[0].start

    def reserve(self, left: int = 0, right: int = 1) -> None:
        """Make room for `left` more columns before the window and `right` after it, moving the window (and
        doubling the buffer when it is too short) only when there is not."""
        first = self.layers[0]
        capacity = first.buffers[0].shape[2]
        if first.start >= left and first.end + right <= capacity:
            return
        needed = left + self.width + right
        size = capacity if needed <= capacity // 2 else max(2 * capacity, needed)
        for layer in self.layers:
            width = layer.end - layer.start
            moved = []
            for buffer in layer.buffers:
                target = buffer.new_zeros(*buffer.shape[:2], size, buffer.shape[3]) if size != capacity else buffer
                # clone: the source and target columns of an in-place move may overlap
                target[: layer.rows, :, left : left + width] = buffer[: layer.rows, :, layer.start : layer.end].clone()
                moved.append(target)
            layer.buffers, layer.start, layer.end = moved, left, left + width

    def append(self, cache: Cache) -> None:
        """Add the rows of `cache` (a left-padded prefill's DynamicCache, (b, heads, l, head dim)) after the running
        rows, right-aligned at the window's end; the window widens to the left when l exceeds its width."""
        length = cache.layers[0].keys.shape[-2]
        self.reserve(left=max(0, length - self.width), right=0)
        for layer, other in zip(self.layers, cache.layers, strict=True):
            count = other.keys.shape[0]
            layer.start = min(layer.start, layer.end - length)
            for buffer, values in zip(layer.buffers, (other.keys, other.values), strict=True):
                buffer[layer.rows : layer.rows + count, :, layer.end - length : layer.end] = values
            layer.rows += count

    def write_joining(self, layer: int, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A prompt prefilled inside a decode step (`LlamaDecodeStep`): its keys and values (heads, L, head dim) into
        slot `slot` (past the running rows), right-aligned at the window's end, where its row decodes from next.
        The rows join with `joined` after the step; until then the running rows do not see them."""
        slot_keys, slot_values = self.joining_columns(layer, slot, keys.shape[-2])
        slot_keys.copy_(keys)
        slot_values.copy_(values)

    def joining_columns(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The columns `write_joining` writes a prompt of `length` tokens to: (keys, values) views (heads, length,
        head dim) of slot `slot`, right-aligned at the window's end (the fused prefill kernel writes them itself)."""
        target = self.layers[layer]
        return tuple(buffer[slot, :, target.end - length : target.end] for buffer in target.buffers)

    def joined(self, count: int, length: int) -> None:
        """`count` rows written by `write_joining` join the running rows; the window widens to the left to hold the
        longest (`length` columns)."""
        for layer in self.layers:
            layer.rows += count
            layer.start = min(layer.start, layer.end - length)

    def keep(self, order: list[int], cut: int = 0) -> None:
        """Row i becomes the row `order[i]` was (each source after its target: no row is overwritten before it
        moves); the window's first `cut` columns (padding for every row kept) are dropped. No rows: an empty window."""
        for layer in self.layers:
            for target, source in enumerate(order):
                if source != target:
                    for buffer in layer.buffers:
                        buffer[target, :, layer.start : layer.end] = buffer[source, :, layer.start : layer.end]
            layer.rows = len(order)
            layer.start += cut
            if not order:  # an empty batch: the next rows start at column 0
                layer.start = layer.end = 0
