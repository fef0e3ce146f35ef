"""The KV cache: the keys and values of past tokens, so each decode step computes only the new token.

Decoding token t needs every earlier token's keys and values in every layer; recomputing them would make
generation quadratic. The cache keeps them in preallocated buffers (no allocation per token) and knows,
per row, which slots hold real tokens (left padding does not) and the next rotary position.

Its whole API, used by the model and the generator; nothing else touches its fields:
    write(layer, k, v) -> (k, v)   store a layer's new keys/values at the current slots, return all so far
    buffers(T)                     (KVCache only) the buffers and first new slot, for a kernel that writes
    advance(new)                   after all layers ran: the new tokens are now past
    keep_rows(index)               drop finished rows of a batch
    reset()                        empty it for reuse
and, read-only, `length`, `max_len`, `device`, `nbytes`, `past_mask()`, `next_positions` and
`moves_positions`. Another layout (paged blocks, model/mla.py's latents) is another class with this API:
SinkCache below keeps the first tokens and a rolling window.
"""

import torch

from minillama.config import ModelConfig


class KVCache:
    """Keys and values of every layer, (B, K, S_max, D) each; all rows advance together (left padding
    keeps them aligned), so one `length` counts the filled slots of every row."""

    moves_positions = False  # a token keeps its position: keys may be cached rotated

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self._k, self._v = self._allocate(config, batch_size, max_len, device, dtype)
        self._mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S_max) real tokens
        self._positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next rotary position
        self._length = 0
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else self._mask.device

    def _allocate(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        """The buffers of every layer, batch first: keys and values, (B, K, S_max, D) each. Uninitialized:
        only written slots are ever read, and memory never written is never resident (zeroing the cache of a
        512-token prompt was 1.5% of its prefill)."""
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)  # (B, K, S_max, D)
        return ([torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
                [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)])

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
        keys, values = self._k[layer], self._v[layer]
        # narrow + copy_: the same as keys[:, :, slots] = k, a third of the time (a decode step does 60)
        keys.narrow(2, slots.start, k.shape[2]).copy_(k)
        values.narrow(2, slots.start, v.shape[2]).copy_(v)
        return keys.narrow(2, 0, slots.stop), values.narrow(2, 0, slots.stop)

    def buffers(self, T: int):
        """For a kernel that writes the T new tokens' keys and values itself (perf/fast.py, a whole decode
        step in one call): every layer's buffers, (B, K, S_max, D) each, and the first slot they take."""
        return self._k, self._v, self._new_slots(T).start

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


class SinkCache:
    """StreamingLLM's bounded cache (Xiao et al. 2023, arXiv:2309.17453): each row keeps its first
    `sink_tokens` real tokens, on which attention piles up whatever it does not need elsewhere (the
    "attention sinks"), and the `window` most recent slots; older ones leave once all layers wrote a step.
    A new token attends to the sinks, the window and the tokens of its own step: a long prompt is
    prefilled whole, then trimmed.

    Positions are slots within the cache, as the paper assigns them, so they stay at most
    sink_tokens + window (+ the step's tokens) however long generation runs: when a token leaves, those
    after it move one position down. Keys are therefore cached as projected and rotated at attention
    time (model/positions.py).
    """

    moves_positions = True

    def __init__(self, config: ModelConfig, batch_size: int, sink_tokens: int, window: int, device=None,
                 dtype=torch.float32):
        empty = torch.zeros(batch_size, config.n_kv_heads, 0, config.head_dim, device=device, dtype=dtype)
        self._k = [empty] * config.n_layers  # (B, K, S, D) each, S <= max_len between steps
        self._v = [empty] * config.n_layers
        self._mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # (B, S) real tokens
        self.sink_tokens, self.window = sink_tokens, window
        self.max_len = sink_tokens + window
        self.device = empty.device

    @property
    def length(self) -> int:
        return self._mask.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the buffers of all layers hold now (at most sink_tokens + window slots between steps)."""
        return sum(t.nbytes for t in self._k + self._v)

    @property
    def next_positions(self):
        """(B,) the position of each row's next token: the real tokens the cache holds."""
        return self._mask.sum(-1)

    def past_mask(self):
        return self._mask

    def write(self, layer: int, k, v):
        """Append the new tokens' k, v (B, K, T, D), as projected (unrotated); return all (B, K, S, D)."""
        self._k[layer] = torch.cat([self._k[layer], k], dim=2)
        self._v[layer] = torch.cat([self._v[layer], v], dim=2)
        return self._k[layer], self._v[layer]

    def advance(self, new):
        self._mask = torch.cat([self._mask, new], dim=1)
        if self.length > self.max_len:
            keep = self._kept_slots()  # (B, max_len)
            index = keep[:, None, :, None].expand(-1, self._k[0].shape[1], -1, self._k[0].shape[3])
            self._k = [k.gather(2, index) for k in self._k]  # (B, K, max_len, D)
            self._v = [v.gather(2, index) for v in self._v]
            self._mask = self._mask.gather(1, keep)

    def _kept_slots(self):
        """(B, max_len) slot indices, ascending, of what each row keeps: its sinks (first real tokens), then
        the newest slots; padding, which holds nothing, leaves first."""
        S = self.length
        rank = self._mask.long().cumsum(-1)  # (B, S) 1 for the first real token
        sink = self._mask & (rank <= self.sink_tokens)
        slot = torch.arange(S, device=self.device)
        priority = torch.where(sink, 2 * S, torch.where(self._mask, S, 0)) + slot  # (B, S)
        return priority.topk(self.max_len, dim=-1).indices.sort(dim=-1).values

    def keep_rows(self, index):
        self._k = [k[index] for k in self._k]
        self._v = [v[index] for v in self._v]
        self._mask = self._mask[index]

    def reset(self):
        self._k = [k[:, :, :0] for k in self._k]
        self._v = [v[:, :, :0] for v in self._v]
        self._mask = self._mask[:, :0]
