"""A paged KV cache: the keys and values of many sequences in fixed-size blocks of one shared pool.

PagedAttention (Kwon et al. 2023, arXiv:2309.06180, vLLM): a server holds sequences of every length, which
arrive and finish at any step. One (B, K, S_max, D) buffer per batch (cache.py) would reserve S_max slots for
every row and copy the survivors whenever a row leaves. Here each sequence owns a list of blocks (its block
table) of BLOCK_SIZE slots in a pool shared by all; a sequence that finishes hands its blocks back and no other
sequence moves. The pool's size is the server's memory budget for context, shared by whoever needs it.

PagedKVCache has the API of KVCache (write/advance/keep_rows/reset, length, max_len, device, past_mask(),
next_positions) over the rows of one forward pass, plus `attend`: the model lets a cache that has it store
k, v and attend itself (model/llama.py, Attention.forward); and `write_rows`, each row's keys and values
unpadded, for the fused decode layer (perf/fast.py). It attends row by row, each over exactly its own
keys, so a row's numbers are the same bits whatever else is in the batch: a padded batch through the fused
kernel differs in the last bits (its sums group differently), enough to flip a greedy token now and then.
"""

from dataclasses import dataclass, field

import torch

from minillama.config import ModelConfig

BLOCK_SIZE = 16  # slots per block: vLLM's default; the waste is under one block per sequence


@dataclass
class PagedRow:
    """One sequence's place in the pool: its blocks in order and how many slots hold its tokens."""
    blocks: list[int] = field(default_factory=list)
    length: int = 0

    @property
    def capacity(self) -> int:
        return len(self.blocks) * BLOCK_SIZE


class BlockPool:
    """Keys and values of every layer, (K, N, BLOCK_SIZE, D) each for N blocks, and which blocks are free.
    Latent attention (model/mla.py) keeps one row per token, its latent and rope key, and no values: its
    pool holds (1, N, BLOCK_SIZE, R + Dr) "keys" only.

    Blocks along the second axis, so a run of consecutive blocks reads as one (K, slots, D) view: allocate
    looks for such a run first, and a row stored in one attends without a gather."""

    def __init__(self, config: ModelConfig, n_blocks: int, device=None, dtype=torch.float32):
        self.latent = config.kv_lora_rank is not None
        if self.latent:
            shape = (1, n_blocks, BLOCK_SIZE, config.kv_lora_rank + config.qk_rope_head_dim)  # (1, N, BLOCK_SIZE, R + Dr)
        else:
            shape = (config.n_kv_heads, n_blocks, BLOCK_SIZE, config.head_dim)  # (K, N, BLOCK_SIZE, D)
        # empty, not zeros: pages never written are never resident, and a row reads only slots it wrote
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [] if self.latent else [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.n_blocks = n_blocks
        self.free = list(range(n_blocks))  # kept sorted, so runs are easy to find
        self.device = self.k[0].device

    @staticmethod
    def token_bytes(config: ModelConfig, dtype) -> int:
        """Bytes one token takes in the pool (all layers)."""
        width = config.kv_lora_rank + config.qk_rope_head_dim if config.kv_lora_rank is not None \
            else 2 * config.n_kv_heads * config.head_dim
        return config.n_layers * width * torch.tensor([], dtype=dtype).element_size()

    @staticmethod
    def blocks_for(tokens: int) -> int:
        return -(-tokens // BLOCK_SIZE)

    def allocate(self, tokens: int) -> list[int]:
        """Blocks for `tokens` slots: the first run of consecutive free blocks that is long enough, else the
        lowest free ones. Raises MemoryError when too few are free (the caller checks n_free first)."""
        n = self.blocks_for(tokens)
        if n > len(self.free):
            raise MemoryError(f"{n} blocks asked, {len(self.free)} free")
        taken, start = self.free[:n], 0
        for i in range(len(self.free)):
            if i > start and self.free[i] != self.free[i - 1] + 1:
                start = i  # a gap: a run starts here
            if i - start + 1 == n:
                taken = self.free[start:i + 1]
                break
        self.free = sorted(set(self.free) - set(taken))
        return taken

    def release(self, blocks: list[int]) -> None:
        self.free = sorted(set(self.free) | set(blocks))

    def keys_values(self, layer: int, row: PagedRow, slots: int):
        """The first `slots` keys and values of a row, (1, K, slots, D) each: a view when its blocks are
        consecutive, else gathered block by block."""
        n = self.blocks_for(slots)
        first = row.blocks[0]
        if row.blocks[:n] == list(range(first, first + n)):
            pick = slice(first, first + n)
        else:
            pick = torch.tensor(row.blocks[:n], device=self.device)
        K, D = self.k[layer].shape[0], self.k[layer].shape[-1]
        k = self.k[layer][:, pick].reshape(K, n * BLOCK_SIZE, D)[:, :slots]  # (K, slots, D)
        if self.latent:
            return k.unsqueeze(0), None
        v = self.v[layer][:, pick].reshape(K, n * BLOCK_SIZE, D)[:, :slots]
        return k.unsqueeze(0), v.unsqueeze(0)

    def store(self, layer: int, row: PagedRow, k, v) -> None:
        """Write a row's T new keys and values, k/v (K, T, D), after its `length` past ones."""
        T = k.shape[1]
        if row.length + T > row.capacity:
            raise ValueError(f"the row's blocks hold {row.capacity} tokens; {row.length} + {T} do not fit")
        slots = torch.arange(row.length, row.length + T)
        blocks = torch.tensor(row.blocks, device=self.device)[slots // BLOCK_SIZE]  # (T,)
        offsets = (slots % BLOCK_SIZE).to(self.device)  # (T,)
        self.k[layer][:, blocks, offsets] = k  # (K, T, D) into (K, [block, offset], D)
        if v is not None:
            self.v[layer][:, blocks, offsets] = v


class PagedKVCache:
    """The cache API over some rows of a BlockPool, for one forward pass. The rows' past is seen by the
    model as right-aligned in `length` = the longest past (shorter rows padded in front, past_mask False
    there), so the model's masks and rotary positions come out as for the simple cache."""

    moves_positions = False  # a token keeps its position: keys are stored rotated (model/cache.py)

    def __init__(self, pool: BlockPool, rows: list[PagedRow]):
        self.pool, self.rows = pool, list(rows)
        self.device = pool.device
        self._slots = None  # (blocks, offsets) of this step's new tokens, the same in every layer: write_rows

    @property
    def length(self) -> int:
        return max((r.length for r in self.rows), default=0)

    @property
    def max_len(self) -> int:
        return max((r.capacity for r in self.rows), default=0)

    @property
    def next_positions(self):
        """(B,) each row's next rotary position: its length (rows hold no padding)."""
        return torch.tensor([r.length for r in self.rows], dtype=torch.long, device=self.device)

    def past_mask(self):
        """(B, length) bool: row b's past fills its last rows[b].length slots."""
        P = self.length
        lengths = self.next_positions[:, None]  # (B, 1)
        return torch.arange(P, device=self.device)[None, :] >= P - lengths  # (B, P)

    def attend(self, layer: int, q, k, v, mask, kernel):
        """Store the new k, v (B, K, T, D) and attend: q (B, H, T, D) -> (B, H, T, D), each row over its own
        past and new keys with its own columns of the model's mask (B, 1, T, P + T) (None: causal, no
        past), through `kernel`(q, k, v, mask) (the model's attention function)."""
        P, T = self.length, q.shape[2]
        out = []
        for b, row in enumerate(self.rows):
            self.pool.store(layer, row, k[b], v[b])
            keys, values = self.pool.keys_values(layer, row, row.length + T)  # (1, K, L + T, D)
            row_mask = None if mask is None else mask[b:b + 1, :, :, P - row.length:]  # (1, 1, T, L + T)
            out.append(kernel(q[b:b + 1], keys, values, row_mask))
        return torch.cat(out)  # (B, H, T, D)

    def write(self, layer: int, k, v=None):
        """KVCache.write for a model that does not call attend: store, return the padded (B, K, P + T, D).
        Latent attention writes its rows alone, kv (B, T, R + Dr), as LatentCache: -> (B, P + T, R + Dr)."""
        latent = v is None
        if latent:
            k = k.unsqueeze(1)  # (B, 1, T, R + Dr): one "head"
        P, T = self.length, k.shape[2]
        ks, vs = [], []

        def pad(t, row):  # in front of the slot axis: right-aligned, as past_mask says
            return torch.nn.functional.pad(t, (0, 0, P - row.length, 0))

        for b, row in enumerate(self.rows):
            self.pool.store(layer, row, k[b], None if latent else v[b])
            keys, values = self.pool.keys_values(layer, row, row.length + T)
            ks.append(pad(keys, row))
            if not latent:
                vs.append(pad(values, row))
        return torch.cat(ks).squeeze(1) if latent else (torch.cat(ks), torch.cat(vs))

    def write_rows(self, layer: int, k, v):
        """write() without the padding, for perf/fast.py's fused decode layer: store the new k, v (B, K, T, D)
        with one scatter, return each row's keys and values, (K, L_b + T, D) each, views of its blocks when
        they are consecutive; the kernel attends each row over its own length."""
        T, K, D = k.shape[2], k.shape[1], k.shape[3]
        if self._slots is None:
            for row in self.rows:
                if row.length + T > row.capacity:
                    raise ValueError(f"the row's blocks hold {row.capacity} tokens; {row.length} + {T} do not fit")
            slots = [(row.blocks[s // BLOCK_SIZE], s % BLOCK_SIZE) for row in self.rows
                     for s in range(row.length, row.length + T)]  # row by row, then token by token
            self._slots = torch.tensor(slots, device=self.device).T  # (2, B·T): blocks, offsets
        blocks, offsets = self._slots
        self.pool.k[layer][:, blocks, offsets] = k.transpose(0, 1).reshape(K, -1, D)  # (K, B·T, D)
        self.pool.v[layer][:, blocks, offsets] = v.transpose(0, 1).reshape(K, -1, D)
        rows = [self.pool.keys_values(layer, row, row.length + T) for row in self.rows]  # (1, K, L_b + T, D) each
        return [keys[0] for keys, _ in rows], [values[0] for _, values in rows]

    def advance(self, new):
        """The T new tokens of each row (new (B, T) bool, all real: rows take no padding) are now past."""
        if not bool(new.all()):
            raise ValueError("a paged cache stores no padding: give each row's real tokens only")
        for row in self.rows:
            row.length += new.shape[1]
        self._slots = None  # the next step's tokens go after these

    def keep_rows(self, index):
        self.rows = [self.rows[i] for i in index.tolist()]
        self._slots = None

    def reset(self):
        for row in self.rows:
            row.length = 0
        self._slots = None
