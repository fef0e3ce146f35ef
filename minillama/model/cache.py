"""The KV cache: the keys and values of past tokens, so each decode step computes only the new token.

Decoding token t needs every earlier token's keys and values in every layer; recomputing them would make
generation quadratic. The cache keeps them in preallocated buffers (no allocation per token) and knows,
per row, which slots hold real tokens (left padding does not) and the next rotary position.

Its whole API, used by the model and the generator; nothing else touches its fields:
    write(layer, k, v) -> (k, v)   store a layer's new keys/values at the current slots, return all so far
    advance(new)                   after all layers ran: the new tokens are now past
    keep_rows(index)               drop finished rows of a batch
    reset()                        empty it for reuse
and, read-only, `length`, `max_len`, `device`, `nbytes`, `past_mask()` and `next_positions`.
Another layout (paged blocks, a rolling window with attention sinks, model/mla.py's latents) is another
class with this API.
"""

import torch

from minillama.config import ModelConfig


class KVCache:
    """Keys and values of every layer, (B, K, S_max, D) each; all rows advance together (left padding
    keeps them aligned), so one `length` counts the filled slots of every row."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self._k, self._v = self._allocate(config, batch_size, max_len, device, dtype)
        self._mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S_max) real tokens
        self._positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next rotary position
        self._length = 0
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else self._mask.device

    def _allocate(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        """The buffers of every layer, batch first: keys and values, (B, K, S_max, D) each."""
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)  # (B, K, S_max, D)
        return ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
                [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)])

    def _new_slots(self, T: int) -> slice:
        """The slots the T new tokens take, after the past ones."""
        start = self._length
        if start + T > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {start} + {T} do not fit")
        return slice(start, start + T)

    @property
    def length(self) -> int:
        """Slots filled so far (padding included), the same for every row."""
        return self._length

    @property
    def nbytes(self) -> int:
        """Bytes the buffers of all layers hold (allocated for max_len tokens)."""
        return sum(t.nbytes for t in self._k + self._v)

    @property
    def next_positions(self):
        """(B,) the rotary position of each row's next real token: real tokens counted, padding not."""
        return self._positions

    def past_mask(self):
        """(B, length) bool: which past slots hold real tokens."""
        return self._mask[:, :self._length]

    def write(self, layer: int, k, v):
        """Store the new tokens' k, v (B, K, T, D) of `layer` after the past ones; return all (B, K, S, D)."""
        slots = self._new_slots(k.shape[2])
        self._k[layer][:, :, slots] = k
        self._v[layer][:, :, slots] = v
        return self._k[layer][:, :, :slots.stop], self._v[layer][:, :, :slots.stop]

    def advance(self, new):
        """The T new tokens (new (B, T) bool: real, not padding) join the past, once every layer wrote them."""
        T = new.shape[1]
        self._mask[:, self._length:self._length + T] = new
        self._positions += new.long().sum(-1)
        self._length += T

    def keep_rows(self, index):
        """Keep only the rows `index` (B_new,) of the batch: one copy when rows finish, not per token."""
        self._k = [k[index] for k in self._k]
        self._v = [v[index] for v in self._v]
        self._mask = self._mask[index]
        self._positions = self._positions[index]

    def reset(self):
        self._mask.zero_()
        self._positions.zero_()
        self._length = 0
